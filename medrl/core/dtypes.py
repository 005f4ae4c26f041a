"""Weight dtypes by name, with ``auto`` meaning bf16 on a GPU and fp32 on a CPU."""

from __future__ import annotations

from typing import Literal

import torch

DType = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_dtype(name: DType | str, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype for ``name``; ``auto`` is bfloat16 on CUDA, float32 elsewhere.

    With no ``device``, ``auto`` looks at whether any GPU is visible (where the trainer will run). CPUs without
    bf16 units run bf16 4-20x slower than fp32, hence fp32 there.

    >>> resolve_dtype("auto", "cpu")
    torch.float32
    >>> resolve_dtype("bfloat16")
    torch.bfloat16
    """
    if name == "auto":
        on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu else torch.float32
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``, the spelling vLLM and configs use."""
    return str(dtype).removeprefix("torch.")
