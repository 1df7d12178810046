"""Devices and threads: what torch can run on here. The server asks these instead of
importing torch itself."""

from __future__ import annotations

from typing import Literal

import torch

from batcher.models.errors import ModelLoadError

DtypeOption = Literal["auto", "float32", "float16", "bfloat16"]


def pick_device(option: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; anything else is passed to torch."""
    if option == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(option)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {option!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {option!r} asked for, but CUDA is not available")
    return device


def pick_dtype(option: DtypeOption, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 elsewhere."""
    if option == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype: torch.dtype = getattr(torch, option)
    return dtype


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without CUDA)."""
    return torch.cuda.device_count()


def set_threads(count: int) -> None:
    """torch's intra-op threads for this process."""
    torch.set_num_threads(count)
