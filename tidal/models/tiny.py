"""Tiny random-weight HF-format checkpoints (Llama / Qwen2 / Qwen3) with a byte-level tokenizer:
the default model when none is given (its output is gibberish), and what tests build on, so
neither needs a download.

The weights come from the transformers model class itself and are written with
``save_pretrained``, so HF can load exactly the same checkpoint for parity tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3")

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = range(256, 256 + len(SPECIAL_TOKENS))
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=272,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.08,
    hidden_act="silu",
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)
# Per arch: the transformers classes and what makes each one exercise its special features.
_ARCH_DEFAULTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, use_sliding_window=False)),
    # head_dim * heads != hidden_size, as in real Qwen3 models; tied embeddings.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
}


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, the alphabet the byte-level pre-tokenizer works in:
    printable Latin-1 bytes map to themselves, the rest to code points from 256 up."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def make_tokenizer(vocab_size: int, model_max_length: int = 512):
    """A byte-level tokenizer: token id b < 256 is byte b, then SPECIAL_TOKENS, then
    ``<|reserved_i|>`` specials up to ``vocab_size`` so every id the model can emit decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size = {vocab_size}, expected >= {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)"
        )
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - 256 - len(SPECIAL_TOKENS))]
    tok.add_special_tokens(SPECIAL_TOKENS + reserved)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def _hf_config(arch: str, overrides: dict[str, Any]):
    import transformers

    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"arch = {arch!r}, expected one of {list(ARCHS)}")
    config_cls, _, extra = _ARCH_DEFAULTS[arch]
    kwargs = {**_TINY, **extra, **overrides}
    if "rope_parameters" not in kwargs and "rope_scaling" not in kwargs:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10000.0)}
    return getattr(transformers, config_cls)(**kwargs)


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter from a seeded generator (independent of HF's init code and
    of the global RNG): matrices N(0, std), norms 1 + N(0, 0.1), biases N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(std * noise)


@contextlib.contextmanager
def quiet_progress_bars():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _shard(path: str, num_shards: int) -> None:
    from safetensors.torch import load_file, save_file

    from tidal.models.loader import save_index

    single = os.path.join(path, "model.safetensors")
    tensors = load_file(single)
    names = sorted(tensors)
    weight_map, total = {}, 0
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::num_shards]}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    os.remove(single)
    save_index(path, weight_map, total)


def make_tiny_checkpoint(
    path: str, arch: str = "llama", seed: int = 0, num_shards: int = 1, **config_overrides: Any
) -> str:
    """Write a tiny random-weight HF checkpoint of ``arch`` into ``path`` and return ``path``.

    ``config_overrides`` go to the transformers config class (e.g. ``num_hidden_layers=4`` or
    ``rope_parameters={"rope_type": "llama3", ...}``)."""
    import transformers

    if num_shards < 1:
        raise ValueError(f"num_shards = {num_shards}, expected >= 1")
    config = _hf_config(arch, config_overrides)
    with torch.device("cpu"):
        model = getattr(transformers, _ARCH_DEFAULTS[arch][1])(config).float()
    _randomise(model, seed, config.initializer_range)
    os.makedirs(path, exist_ok=True)
    with quiet_progress_bars():
        model.save_pretrained(path)
    if num_shards > 1:
        _shard(path, num_shards)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(
            {
                "bos_token_id": config.bos_token_id,
                "eos_token_id": [config.eos_token_id, IM_END_ID],
                "pad_token_id": config.pad_token_id,
            },
            f,
            indent=2,
        )
    make_tokenizer(config.vocab_size, config.max_position_embeddings).save_pretrained(path)
    return path


def tiny_checkpoint_cached(arch: str = "qwen3") -> str:
    """A tiny checkpoint of ``arch`` under $TIDAL_CACHE (default ~/.cache/tidal), created once."""
    root = os.environ.get("TIDAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tidal")
    path = os.path.join(root, f"tiny-{arch}-v1")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=root)
    try:
        make_tiny_checkpoint(tmp, arch)
        try:
            os.rename(tmp, path)  # atomic; a concurrent creator may have won the race
        except OSError:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
