"""The tiny checkpoints' byte-level tokenizer and load_tokenizer."""
from __future__ import annotations

import os

import pytest

from tidal.models.tiny import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, PAD_ID, tiny_checkpoint_cached
from tidal.tokenizer import load_tokenizer


@pytest.mark.parametrize("text", ["", "hello world", "héllo wörld 🙂\n\t  x", "<|eos|> literal?", "\x00\xff"])
def test_any_string_round_trips(tiny_ckpt, text):
    tok = load_tokenizer(tiny_ckpt("qwen3"))
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode()) or "<|" in text
    assert tok.decode(ids) == text


def test_special_tokens_and_chat_template(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt("llama"))
    assert len(tok) == 272
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START_ID, IM_END_ID]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == IM_START_ID and ids.count(IM_END_ID) == 1
    # Every id the model can emit decodes.
    assert tok.decode(list(range(272)), skip_special_tokens=True) == bytes(range(256)).decode(errors="replace")


def test_directory_without_tokenizer(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


def test_tiny_checkpoint_cached_creates_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_CACHE", str(tmp_path))
    path = tiny_checkpoint_cached("qwen2")
    assert path.startswith(str(tmp_path)) and os.path.isfile(os.path.join(path, "model.safetensors"))
    stamp = os.path.getmtime(os.path.join(path, "config.json"))
    assert tiny_checkpoint_cached("qwen2") == path
    assert os.path.getmtime(os.path.join(path, "config.json")) == stamp
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
