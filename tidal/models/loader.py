"""Load a model from an HF-format directory (config.json + *.safetensors), tensor by tensor.

Every check (config fields, weight files, tensor names and shapes, missing tensors) runs
before any parameter is allocated: shapes are read from the safetensors headers and
compared with a model built on the meta device.
"""

from __future__ import annotations

import glob
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import xxhash
from safetensors import SafetensorError, safe_open

from tidal.errors import EngineInvalidInput
from tidal.models.config import ModelArch, read_hf_config, read_json
from tidal.models.registry import get_model_class

LOAD_FORMATS = ("auto", "dummy")
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_arch(model_dir: str) -> ModelArch:
    """The ModelArch of a model directory, without touching the weights."""
    cfg, gen = read_hf_config(model_dir)
    return get_model_class(cfg).arch_from_config(cfg, gen)


def resolve_file(path: str, root: str | None, what: str) -> str:
    """`path` with every symlink resolved, refused when it lies outside `root` (if given) or is not
    a regular file. The outside-root error is worded the same whether or not the target exists,
    so it cannot be used to probe the filesystem; the file-type check runs before anything opens
    it, so a FIFO or device can never block the caller."""
    real = os.path.realpath(path)
    if root is not None and not _inside(real, os.path.realpath(root)):
        raise EngineInvalidInput(
            "path", path, f"a {what} inside the weights root", f"{what} {path!r} resolves outside the weights root"
        )
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise EngineInvalidInput("path", path, f"an existing {what}", f"{what} {path!r} does not exist") from None
    if not stat.S_ISREG(mode):
        raise EngineInvalidInput("path", path, f"a regular {what}", f"{what} {path!r} is not a regular file")
    return real


def resolve_dir(model_dir: str, root: str | None) -> str:
    real = os.path.realpath(model_dir)
    if root is not None and not _inside(real, os.path.realpath(root)):
        raise EngineInvalidInput(
            "path",
            model_dir,
            "a checkpoint directory inside the weights root",
            f"checkpoint directory {model_dir!r} resolves outside the weights root",
        )
    if not os.path.isdir(real):
        raise EngineInvalidInput(
            "path",
            model_dir,
            "an HF/safetensors checkpoint directory",
            f"checkpoint directory {model_dir!r} does not exist or is not a directory",
        )
    return real


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _inside(real: str, root: str) -> bool:
    return os.path.commonpath([real, root]) == root


def weight_files(model_dir: str, root: str | None = None) -> list[str]:
    """The resolved *.safetensors files of a checkpoint: those listed by the shard index if there
    is one, otherwise every *.safetensors file in the directory. With `root`, the directory and
    every file (index, shards, symlinks followed) must lie inside it; every file must be regular.
    Errors say what was expected, never what the directory holds."""
    real_dir = resolve_dir(model_dir, root)
    index_path = os.path.join(real_dir, INDEX_FILE)
    if os.path.lexists(index_path):
        index_path = resolve_file(index_path, root, "shard index")
        try:
            weight_map = read_json(index_path, INDEX_FILE).get("weight_map")
        except (ValueError, UnicodeDecodeError) as e:
            raise EngineInvalidInput(
                "path",
                model_dir,
                f"{INDEX_FILE} holding a JSON object",
                f"{INDEX_FILE} in {model_dir!r} is not a JSON object: {_first_line(e)}",
            ) from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise EngineInvalidInput(
                "path",
                model_dir,
                f"{INDEX_FILE} with a non-empty 'weight_map'",
                f"{INDEX_FILE} in {model_dir!r}: missing or empty 'weight_map'",
            )
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise EngineInvalidInput(
                "path",
                model_dir,
                "shard file names (strings) in 'weight_map'",
                f"{INDEX_FILE} in {model_dir!r}: 'weight_map' values must be file names",
            )
        return [resolve_file(os.path.join(real_dir, n), root, "shard file") for n in names]
    files = sorted(glob.glob(os.path.join(glob.escape(real_dir), "*.safetensors")))
    if not files:
        raise EngineInvalidInput(
            "path",
            model_dir,
            "a directory with *.safetensors weights",
            f"no *.safetensors files in {model_dir!r}; only safetensors checkpoints "
            "are supported, or use load_format='dummy'",
        )
    return [resolve_file(f, root, "weight file") for f in files]


def iter_checkpoint(model_dir: str, root: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, read lazily one at a time on the CPU."""
    for path in weight_files(model_dir, root):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise EngineInvalidInput(
                "path",
                model_dir,
                "valid safetensors files",
                f"{os.path.basename(path)} in {model_dir!r} is not a valid safetensors file: {e}",
            ) from None


# Files up to this size are hashed in full (xxh3, several GB/s); larger shards are identified by
# size, mtime_ns and their safetensors header, so fingerprinting never re-reads a big checkpoint.
FULL_HASH_MAX_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class FileStamp:
    size: int
    mtime_ns: int
    digest: str  # xxh3_64 of the whole file, or of its safetensors header ("header:...")


def checkpoint_fingerprint(model_dir: str, root: str | None = None) -> dict[str, FileStamp]:
    """What identifies the checkpoint now: per weight file (and the shard index, if any) its size,
    mtime_ns and a content digest (see FULL_HASH_MAX_BYTES). Compare two with `fingerprint_change`."""
    files = weight_files(model_dir, root)
    index_path = os.path.join(resolve_dir(model_dir, root), INDEX_FILE)
    if os.path.lexists(index_path):
        files.append(resolve_file(index_path, root, "shard index"))
    return {f: _stamp(f) for f in files}


def _stamp(path: str) -> FileStamp:
    st = os.stat(path)
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_MAX_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return FileStamp(st.st_size, st.st_mtime_ns, h.hexdigest())
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            h.update(f.read(min(int.from_bytes(head, "little"), 100 << 20)))
        return FileStamp(st.st_size, st.st_mtime_ns, "header:" + h.hexdigest())


def fingerprint_change(old: dict[str, FileStamp], new: dict[str, FileStamp]) -> str | None:
    """None if `new` describes the same files as `old`, else what changed, in words."""
    gone = sorted(set(old) - set(new))
    added = sorted(set(new) - set(old))
    if gone or added:
        return (
            f"its file set changed (removed {[os.path.basename(f) for f in gone]}, "
            f"added {[os.path.basename(f) for f in added]})"
        )
    for f in sorted(old):
        a, b = old[f], new[f]
        for what in ("size", "mtime_ns", "digest"):
            if getattr(a, what) != getattr(b, what):
                return f"{os.path.basename(f)} changed ({what} {getattr(a, what)} -> {getattr(b, what)})"
    return None


def checkpoint_specs(model_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) from the safetensors headers alone."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in weight_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ValueError(
                        f"checkpoint tensor {name!r} in {os.path.basename(path)} has unsupported dtype {sl.get_dtype()}"
                    )
                specs[name] = (tuple(sl.get_shape()), dtype)
    return specs


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype = {dtype!r}, expected a floating-point torch dtype such as 'bfloat16'")
    return value


def load_model(
    model_dir: str, dtype: torch.dtype | str, device: str | torch.device, load_format: str = "auto", seed: int = 0
):
    """Build the model for ``model_dir`` on ``device`` in ``dtype`` and fill its weights from the
    checkpoint (``load_format="auto"``) or with small seeded random values (``"dummy"``)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format = {load_format!r}, expected one of {list(LOAD_FORMATS)}")
    dtype = _as_dtype(dtype)
    device = torch.device(device)
    cfg, gen = read_hf_config(model_dir)
    cls = get_model_class(cfg)
    arch = cls.arch_from_config(cfg, gen)

    if load_format == "auto":
        with torch.device("meta"):
            skeleton = cls(arch, dtype)
        specs = checkpoint_specs(model_dir)
        for name, (shape, st_dtype) in specs.items():
            skeleton.check_weight_spec(name, shape, st_dtype)
        missing = sorted(set(skeleton.weight_specs()) - skeleton.optional_weights() - set(specs))
        if missing:
            raise ValueError(
                f"checkpoint in {model_dir!r} is missing {len(missing)} tensor(s) that "
                f"{arch.architecture} needs: {missing}"
            )
        del skeleton

    with torch.device(device):
        model = cls(arch, dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        model.load_weights(iter_checkpoint(model_dir))
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic (per seed and device) random weights: norms 1, everything else N(0, std)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():  # tied parameters appear once
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
            param.copy_(noise * std)


def save_index(model_dir: str, weight_map: dict[str, str], total_size: int) -> None:
    with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
