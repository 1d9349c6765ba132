"""Fused kernels for ambient-fast, importable as `ambient_fast.kernels`.

Every op lives in its own file with its plain PyTorch reference beside it. The public
functions here dispatch at each call: the fused Triton kernel where it can run (CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1; Triton importable; `AMBIENT_FAST_KERNELS` not set to
0), the reference everywhere else. Triton is optional. `active_path()` says which path a run
uses, for the summary line.

Fused ops: gated_activation (and gated_activation_packed), masked_loss, image_draws, ambient_input,
sampler_step. Not fused yet: GroupNorm + SiLU (waits for GPU profiling).
"""
import torch

from ._utils import fused_device, interpreting, kernels_enabled, triton_available, use_fused
from .ambient_input import LEVELS, AmbientInput, ambient_input, ambient_input_reference, levels, mirror, network_input, unpack_mask
from .gated_activation import gated_activation, gated_activation_packed, gated_activation_reference
from .masked_loss import masked_loss, masked_loss_reference
from .sampler_step import SamplerStep, sampler_step, sampler_step_reference

FUSED_OPS = ("gated_activation", "masked_loss", "image_draws", "ambient_input", "sampler_step")

__all__ = [
    "gated_activation", "gated_activation_packed", "gated_activation_reference",
    "masked_loss", "masked_loss_reference",
    "ambient_input", "ambient_input_reference", "AmbientInput", "unpack_mask", "mirror", "network_input",
    "LEVELS", "levels",
    "sampler_step", "sampler_step_reference", "SamplerStep",
    "kernels_enabled", "fused_device", "use_fused", "active_path", "FUSED_OPS",
]


def active_path(device) -> str:
    """A short human-readable description of the path ops take on `device` now."""
    if not kernels_enabled():
        return "PyTorch references (AMBIENT_FAST_KERNELS=0)"
    if not triton_available():
        return "PyTorch references (Triton is not installed)"
    kind = torch.device(device).type
    if not fused_device(device):
        return f"PyTorch references (fused kernels need CUDA; this is {kind})"
    how = "Triton interpreter (TRITON_INTERPRET=1)" if kind == "cpu" and interpreting() else "fused Triton"
    return f"{how}: {', '.join(FUSED_OPS)}; PyTorch: group norm + SiLU"
