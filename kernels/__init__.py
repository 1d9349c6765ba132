"""Fused kernels for ambient-fast, importable as `ambient_fast.kernels`.

Every op lives in its own file with its plain PyTorch reference beside it. The public
functions here dispatch: the fused implementation where it can run (CUDA tensors, Triton
importable, `AMBIENT_FAST_KERNELS` not set to 0), the reference everywhere else.
`active_path()` says which one a run uses, for the summary line.
"""
import os

from .gated_activation import gated_activation, gated_activation_reference

__all__ = ["gated_activation", "gated_activation_reference", "kernels_enabled", "active_path"]


def kernels_enabled() -> bool:
    """True unless the user forced the PyTorch references with AMBIENT_FAST_KERNELS=0."""
    return os.environ.get("AMBIENT_FAST_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def active_path(device) -> str:
    """A short human-readable description of the path ops take on `device`."""
    import torch

    if not kernels_enabled():
        return "PyTorch references (AMBIENT_FAST_KERNELS=0)"
    if torch.device(device).type != "cuda":
        return "PyTorch references (fused kernels need CUDA)"
    return "PyTorch references (no fused kernel available yet)"
