"""Which dtype a model runs in. `--dtype auto` is float16 on CUDA and float32 on MPS; on a
CPU with native bfloat16 (AVX512-BF16 or AMX on x86, the BF16 extension on Arm) it is
bfloat16, kept only if a probe at start shows that it computes what float32 computes:
the probe inputs run through the model in float32 and in bfloat16, and every output must
agree within the bound (cosine >= 0.999 by default, `--min-accuracy`), else the model
stays float32 and the log says why. An explicit `--dtype` is used as given, unprobed.

Agreement is the cosine between an output and its float32 reference: per input for
vectors (embeddings, a classifier's logits); for a model with one output (a reranker's
score) the cosine between the probe's two columns of scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def native_bf16(capabilities: Mapping[str, Any] | None = None) -> bool:
    """Whether this CPU computes bfloat16 in hardware, as torch's CPU feature detection
    (cpuinfo) reports it, and oneDNN has bfloat16 kernels for it. Without native
    support torch still runs bfloat16, emulated and slower than float32."""
    if not bf16_flags(capabilities):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bfloat16 kernels
        return False


def cpu_capabilities() -> Mapping[str, Any]:
    """torch's view of the CPU's features (`torch.cpu.get_capabilities`, torch 2.8 and
    later; the older private probes before that)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        capabilities: Mapping[str, Any] = get()
        return capabilities
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return {
        "avx512_bf16": bool(probe and probe()),
        "amx_bf16": bool(amx and amx()),
    }


def bf16_flags(capabilities: Mapping[str, Any] | None = None) -> list[str]:
    """The CPU features that make bfloat16 native here, for the log and `/model`."""
    if capabilities is None:
        capabilities = cpu_capabilities()
    flags = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
    return [f for f in flags if capabilities.get(f)]


def agreement(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """The cosine of each output to its reference (rows of [inputs, width]); with one
    column, the cosine of the two columns (one value)."""
    reference, candidate = reference.double(), candidate.double()
    if reference.shape[-1] == 1:
        reference, candidate = reference.T, candidate.T
    return torch.nn.functional.cosine_similarity(reference, candidate, dim=-1, eps=1e-12)


@dataclass(frozen=True, slots=True)
class Probe:
    """What the start-up probe measured for a lower precision against float32."""

    candidate: str
    inputs: int
    worst: float
    """The lowest cosine of any output to its float32 reference."""
    mean: float
    min_accuracy: float
    kept: bool

    def describe(self) -> dict[str, object]:
        return {
            "candidate": self.candidate,
            "inputs": self.inputs,
            "worst_cosine": round(self.worst, 6),
            "mean_cosine": round(self.mean, 6),
            "min_accuracy": self.min_accuracy,
            "kept": self.kept,
        }


@dataclass(frozen=True, slots=True)
class Precision:
    """The dtype a model runs in, and why."""

    dtype: torch.dtype
    reason: str
    probe: Probe | None = None

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, object]:
        return {
            "dtype": self.name,
            "reason": self.reason,
            "probe": self.probe.describe() if self.probe else None,
        }


def judge(
    reference: torch.Tensor, candidate: torch.Tensor, dtype: torch.dtype, min_accuracy: float
) -> Precision:
    """The precision to run in, given the probe's outputs in float32 (`reference`) and
    in `dtype` (`candidate`): `dtype` when every output agrees within `min_accuracy`,
    else float32."""
    cosines = agreement(reference, candidate)
    finite = bool(torch.isfinite(candidate).all())
    worst = float(cosines.min()) if finite else float("nan")
    mean = float(cosines.mean()) if finite else float("nan")
    name = str(dtype).removeprefix("torch.")
    kept = finite and worst >= min_accuracy
    probe = Probe(name, int(reference.shape[0]), worst, mean, min_accuracy, kept)
    if kept:
        reason = (
            f"auto: the CPU has native bfloat16 ({', '.join(bf16_flags()) or 'detected'}) "
            f"and {name} agrees with float32 on the probe (worst cosine {worst:.5f} over "
            f"{probe.inputs} inputs; the bound is {min_accuracy:g})"
        )
        return Precision(dtype, reason, probe)
    why = "non-finite outputs" if not finite else f"worst cosine {worst:.5f}"
    reason = (
        f"auto: {name} was probed and refused ({why} over {probe.inputs} inputs, under "
        f"the bound {min_accuracy:g}, --min-accuracy): serving float32"
    )
    return Precision(torch.float32, reason, probe)


def plan(option: str, device: torch.device) -> tuple[Precision, torch.dtype | None]:
    """The precision to load a model in, and the lower one to probe against it (None:
    no probe). `option` is a `--dtype`."""
    if option != "auto":
        dtype: torch.dtype = getattr(torch, option)
        return Precision(dtype, f"asked for (--dtype {option})"), None
    if device.type == "cuda":
        return Precision(torch.float16, "auto: float16 on CUDA"), None
    if device.type != "cpu":
        return Precision(torch.float32, f"auto: float32 on {device.type}"), None
    if not native_bf16():
        return Precision(
            torch.float32,
            "auto: this CPU has no native bfloat16 (no AVX512-BF16, AMX or Arm BF16 in "
            "torch's CPU features), where float32 is faster: serving float32",
        ), None
    return Precision(torch.float32, "auto: float32 until the bfloat16 probe"), torch.bfloat16
