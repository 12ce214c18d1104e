"""Load a model from an HF-format directory (config.json + *.safetensors), tensor by tensor.

Every check (config fields, weight files, tensor names and shapes, missing tensors) runs
before any parameter is allocated: shapes are read from the safetensors headers and
compared with a model built on the meta device.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from tidal.models.config import ModelArch, read_hf_config, read_json
from tidal.models.registry import get_model_class

LOAD_FORMATS = ("auto", "dummy")
INDEX_FILE = "model.safetensors.index.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def load_arch(model_dir: str) -> ModelArch:
    """The ModelArch of a model directory, without touching the weights."""
    cfg, gen = read_hf_config(model_dir)
    return get_model_class(cfg).arch_from_config(cfg, gen)


def weight_files(model_dir: str) -> list[str]:
    """The *.safetensors files of a checkpoint: those listed by the shard index if there is
    one, otherwise every *.safetensors file in the directory."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: missing or empty 'weight_map'")
        files = [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
        absent = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if absent:
            raise ValueError(f"{index_path} lists shard files that do not exist: {absent}")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        present = sorted(os.listdir(model_dir))
        raise ValueError(f"model directory {model_dir!r} has no *.safetensors weights (found {present}); "
                         "only safetensors checkpoints are supported, or use load_format='dummy'")
    return files


def iter_checkpoint(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, read lazily one at a time on the CPU."""
    for path in weight_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def checkpoint_specs(model_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) from the safetensors headers alone."""
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in weight_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise ValueError(f"checkpoint tensor {name!r} in {os.path.basename(path)} has unsupported "
                                     f"dtype {sl.get_dtype()}")
                specs[name] = (tuple(sl.get_shape()), dtype)
    return specs


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype = {dtype!r}, expected a floating-point torch dtype such as 'bfloat16'")
    return value


def load_model(model_dir: str, dtype: torch.dtype | str, device: str | torch.device,
               load_format: str = "auto", seed: int = 0):
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
            raise ValueError(f"checkpoint in {model_dir!r} is missing {len(missing)} tensor(s) that "
                             f"{arch.architecture} needs: {missing}")
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
    for name, param in model.named_parameters():   # tied parameters appear once
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            noise = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
            param.copy_(noise * std)


def save_index(model_dir: str, weight_map: dict[str, str], total_size: int) -> None:
    with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
