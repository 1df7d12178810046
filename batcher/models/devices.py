"""Devices and threads: what torch can run on here. The server asks these instead of
importing torch itself."""

from __future__ import annotations

import torch

from batcher.models.errors import ModelLoadError


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


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without CUDA)."""
    return torch.cuda.device_count()


def set_threads(count: int) -> None:
    """torch's intra-op threads for this process."""
    torch.set_num_threads(count)


def device_problem(option: str) -> str | None:
    """Why `option` (a `--device`) cannot be used on this machine, in one line; None
    when it can."""
    if option == "auto":
        return None
    try:
        device = torch.device(option)
    except RuntimeError:
        return f"unknown device {option!r}: use auto, cpu, cuda, cuda:N or mps"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"{option}: this machine has no CUDA device torch can use; use cpu or auto"
        if device.index is not None and device.index >= count:
            return f"{option}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{option}: MPS (Apple GPU) is not available here; use cpu or auto"
    return None
