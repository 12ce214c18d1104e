"""Our PyTorch implementations of HF causal LMs (Llama, Qwen2, Qwen3) and their loader."""

from tidal.models.config import ModelArch
from tidal.models.loader import iter_checkpoint, load_arch, load_model
from tidal.models.registry import get_model_class, supported_architectures

__all__ = ["ModelArch", "get_model_class", "iter_checkpoint", "load_arch", "load_model", "supported_architectures"]
