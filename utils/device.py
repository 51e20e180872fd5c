"""Device choice shared by every entry point: `auto` = CUDA when present, else CPU."""
from __future__ import annotations

import torch

from utils.errors import UsageError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's `dtype` field: float64 (published) or float32."""
    return torch.float64 if name == "float64" else torch.float32
