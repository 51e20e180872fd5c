"""The one `--device` parser of every entry point: `auto` = CUDA when present, else CPU."""
from __future__ import annotations

import re

import torch

from utils.errors import UsageError

_NAME = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


def pick_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N (| mps); anything else, or CUDA without a GPU, is one line."""
    name = str(name).strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _NAME.match(name):
        raise UsageError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if name.startswith("mps") and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's `dtype` field: float64 (published) or float32."""
    return torch.float64 if name == "float64" else torch.float32
