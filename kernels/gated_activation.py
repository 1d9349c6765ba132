"""Gated activation: out = a * s(g) + bias, the second half of a gated convolution.

A gated convolution computes `a = conv(x, weight)` and `g = conv(x, gate_weight)` (in one
convolution over the concatenated weights) and multiplies the two. `s` is the sigmoid, or
the sigmoid applied twice for the published Ambient Diffusion checkpoints (REFERENCE.md,
section 4), whose gate therefore only scales by 0.5 to 0.73.

The fused kernels read `a` and `g` in place, also as the two channel halves of the
convolution's (N, 2C, H, W) output (NCHW or channels_last), compute in fp32 and write one
output; the backward writes the gradients of both halves (straight into one (N, 2C, H, W)
tensor for `gated_activation_packed`) and per-tile fp32 partial sums of the bias gradient.
"""
from typing import Optional

import torch

from ._utils import (cdiv, empty_planes, is_channels_last, kernel, num_warps, planes, tile, tl,
                     use_fused)

# ----------------------------------------------------------------------------------------------
# Kernels. Grid: (pixel blocks, channel blocks, N); each program handles a BLOCK_C x BLOCK_HW tile
# of one sample. Strides are (sample, channel, pixel) with pixel = h * W + w.


@kernel
def _gated_forward_kernel(
    a_ptr,     # (N, C, H, W) linear branch, strides (a_sn, a_sc, a_sp)
    g_ptr,     # (N, C, H, W) gate branch, strides (g_sn, g_sc, g_sp)
    bias_ptr,  # (C,) bias; not read unless HAS_BIAS
    out_ptr,   # (N, C, H, W) output, strides (o_sn, o_sc, o_sp)
    C, HW,
    a_sn, a_sc, a_sp, g_sn, g_sc, g_sp, o_sn, o_sc, o_sp,
    HAS_BIAS: tl.constexpr, DOUBLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """out = a * s(g) + bias[c], s(g) = sigmoid(g) or sigmoid(sigmoid(g)) if DOUBLE; fp32 math."""
    n = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    p = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    inside = (c < C) & (p < HW)
    a = tl.load(a_ptr + n * a_sn + c * a_sc + p * a_sp, mask=inside).to(tl.float32)
    g = tl.load(g_ptr + n * g_sn + c * g_sc + p * g_sp, mask=inside).to(tl.float32)
    s = tl.sigmoid(g)
    if DOUBLE:
        s = tl.sigmoid(s)
    out = a * s
    if HAS_BIAS:
        out += tl.load(bias_ptr + c, mask=c < C).to(tl.float32)
    tl.store(out_ptr + n * o_sn + c * o_sc + p * o_sp, out.to(out_ptr.dtype.element_ty), mask=inside)


@kernel
def _gated_backward_kernel(
    a_ptr,      # (N, C, H, W) linear branch, strides (a_sn, a_sc, a_sp)
    g_ptr,      # (N, C, H, W) gate branch, strides (g_sn, g_sc, g_sp)
    dout_ptr,   # (N, C, H, W) gradient of the output, strides (d_sn, d_sc, d_sp)
    da_ptr,     # (N, C, H, W) out: gradient of a, strides (da_sn, da_sc, da_sp)
    dg_ptr,     # (N, C, H, W) out: gradient of g, strides (dg_sn, dg_sc, dg_sp)
    dbias_ptr,  # (N * pixel blocks, C) float32 out: partial bias gradients; not written unless HAS_BIAS
    C, HW,
    a_sn, a_sc, a_sp, g_sn, g_sc, g_sp, d_sn, d_sc, d_sp,
    da_sn, da_sc, da_sp, dg_sn, dg_sc, dg_sp,
    HAS_BIAS: tl.constexpr, DOUBLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """With s1 = sigmoid(g):
        single: s = s1,          ds/dg = s1 (1 - s1)
        double: s = sigmoid(s1), ds/dg = s (1 - s) s1 (1 - s1)
    da = dout * s, dg = dout * a * ds/dg, dbias[c] = sum over the tile's pixels of dout (fp32)."""
    n = tl.program_id(2).to(tl.int64)
    c_row = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = c_row[:, None]
    p = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    inside = (c < C) & (p < HW)
    a = tl.load(a_ptr + n * a_sn + c * a_sc + p * a_sp, mask=inside).to(tl.float32)
    g = tl.load(g_ptr + n * g_sn + c * g_sc + p * g_sp, mask=inside).to(tl.float32)
    dout = tl.load(dout_ptr + n * d_sn + c * d_sc + p * d_sp, mask=inside).to(tl.float32)
    s = tl.sigmoid(g)
    slope = s * (1 - s)
    if DOUBLE:
        s2 = tl.sigmoid(s)
        slope = slope * s2 * (1 - s2)
        s = s2
    tl.store(da_ptr + n * da_sn + c * da_sc + p * da_sp, (dout * s).to(da_ptr.dtype.element_ty), mask=inside)
    tl.store(dg_ptr + n * dg_sn + c * dg_sc + p * dg_sp, (dout * a * slope).to(dg_ptr.dtype.element_ty),
             mask=inside)
    if HAS_BIAS:
        row = n * tl.num_programs(0) + tl.program_id(0)
        partial = tl.sum(tl.where(inside, dout, 0.0), axis=1)
        tl.store(dbias_ptr + row * C + c_row, partial, mask=c_row < C)


# ----------------------------------------------------------------------------------------------
# Launchers


def _launch_config(a: torch.Tensor):
    N, C, H, W = a.shape
    channels_last = is_channels_last(a)
    block_c, block_hw = tile(C, H * W, channels_last)
    grid = (cdiv(H * W, block_hw), cdiv(C, block_c), N)
    return channels_last, block_c, block_hw, grid


def gated_forward(a: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor],
                  double_sigmoid: bool) -> torch.Tensor:
    """Launch the forward kernel; returns out (N, C, H, W) in a's dtype and layout."""
    N, C, H, W = a.shape
    channels_last, block_c, block_hw, grid = _launch_config(a)
    a, a_s = planes(a, channels_last)
    g, g_s = planes(g, channels_last)
    out = empty_planes(a.shape, a.dtype, a.device, channels_last)
    _, o_s = planes(out, channels_last)
    bias_arg = bias.contiguous() if bias is not None else out
    _gated_forward_kernel[grid](
        a, g, bias_arg, out, C, H * W, *a_s, *g_s, *o_s,
        HAS_BIAS=bias is not None, DOUBLE=double_sigmoid, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=num_warps(block_c * block_hw))
    return out


def gated_backward(a: torch.Tensor, g: torch.Tensor, dout: torch.Tensor, has_bias: bool, double_sigmoid: bool,
                   da: torch.Tensor, dg: torch.Tensor) -> Optional[torch.Tensor]:
    """Launch the backward kernel, writing into `da` and `dg` (views allowed); returns the bias
    gradient (C,) in float32, or None without bias."""
    N, C, H, W = a.shape
    channels_last, block_c, block_hw, grid = _launch_config(a)
    a, a_s = planes(a, channels_last)
    g, g_s = planes(g, channels_last)
    dout, d_s = planes(dout, channels_last)
    partial = torch.empty((N * grid[0], C) if has_bias else (1,), dtype=torch.float32, device=a.device)
    _gated_backward_kernel[grid](
        a, g, dout, da, dg, partial, C, H * W, *a_s, *g_s, *d_s, *planes(da, channels_last)[1],
        *planes(dg, channels_last)[1],
        HAS_BIAS=has_bias, DOUBLE=double_sigmoid, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=num_warps(block_c * block_hw))
    return partial.sum(0) if has_bias else None


# ----------------------------------------------------------------------------------------------
# Autograd


class GatedActivation(torch.autograd.Function):
    """Fused `a * s(g) + bias` with separate a and g."""

    @staticmethod
    def forward(ctx, a, g, bias, double_sigmoid):
        ctx.save_for_backward(a, g)
        ctx.double_sigmoid = double_sigmoid
        ctx.bias_dtype = None if bias is None else bias.dtype
        return gated_forward(a, g, bias, double_sigmoid)

    @staticmethod
    def backward(ctx, dout):
        a, g = ctx.saved_tensors
        channels_last = is_channels_last(a)
        da = empty_planes(a.shape, a.dtype, a.device, channels_last)
        dg = empty_planes(g.shape, g.dtype, g.device, channels_last)
        dbias = gated_backward(a, g, dout, ctx.bias_dtype is not None, ctx.double_sigmoid, da, dg)
        return da, dg, None if dbias is None else dbias.to(ctx.bias_dtype), None


class GatedActivationPacked(torch.autograd.Function):
    """Fused `a * s(g) + bias` reading a and g as the two channel halves of one (N, 2C, H, W)
    tensor and writing their gradients into one tensor of the same layout."""

    @staticmethod
    def forward(ctx, ag, bias, double_sigmoid):
        ctx.save_for_backward(ag)
        ctx.double_sigmoid = double_sigmoid
        ctx.bias_dtype = None if bias is None else bias.dtype
        a, g = ag.chunk(2, dim=1)
        return gated_forward(a, g, bias, double_sigmoid)

    @staticmethod
    def backward(ctx, dout):
        (ag,) = ctx.saved_tensors
        dag = torch.empty_like(ag)
        a, g = ag.chunk(2, dim=1)
        da, dg = dag.chunk(2, dim=1)
        dbias = gated_backward(a, g, dout, ctx.bias_dtype is not None, ctx.double_sigmoid, da, dg)
        return dag, None if dbias is None else dbias.to(ctx.bias_dtype), None


# ----------------------------------------------------------------------------------------------
# Reference and public functions


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


def _check(a: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if a.ndim != 4 or a.shape != g.shape or a.dtype != g.dtype:
        raise ValueError(f"a and g must be (N, C, H, W) tensors of one shape and dtype; got {tuple(a.shape)} "
                         f"{a.dtype} and {tuple(g.shape)} {g.dtype}")
    if bias is not None and bias.shape != (a.shape[1],):
        raise ValueError(f"bias must have shape ({a.shape[1]},), got {tuple(bias.shape)}")


def _fused_dtype(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.bfloat16, torch.float16)


def gated_activation(
    a: torch.Tensor, g: torch.Tensor, bias: Optional[torch.Tensor] = None, double_sigmoid: bool = False
) -> torch.Tensor:
    """Gated activation `a * s(g) + bias`; see `gated_activation_reference` for shapes.

    Dispatches to the fused kernel where one can run and to the reference otherwise.

    Example:
        >>> a, g = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
        >>> gated_activation(a, g, torch.zeros(8)).shape
        torch.Size([2, 8, 4, 4])
    """
    _check(a, g, bias)
    if use_fused(a, g, bias) and _fused_dtype(a) and a.numel():
        if bias is not None:
            bias = bias.to(a.dtype)
        return GatedActivation.apply(a, g, bias, double_sigmoid)
    return gated_activation_reference(a, g, bias, double_sigmoid)


def gated_activation_packed(ag: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            double_sigmoid: bool = False) -> torch.Tensor:
    """Gated activation of a gated convolution's output: `a, g = ag.chunk(2, dim=1)`, then
    `a * s(g) + bias`.

    Args:
        ag: (N, 2C, H, W) linear channels then gate channels (NCHW or channels_last).
        bias: optional (C,).
        double_sigmoid: apply the sigmoid twice (reference-compatible checkpoints).
    Returns:
        (N, C, H, W) in `ag`'s dtype and memory format. The fused backward writes the gradient of
        `ag` directly, without the copy that autograd's `chunk` would make.
    """
    if ag.ndim != 4 or ag.shape[1] % 2:
        raise ValueError(f"ag must be (N, 2C, H, W) with an even channel count, got {tuple(ag.shape)}")
    a, g = ag.chunk(2, dim=1)
    _check(a, g, bias)
    if use_fused(ag, bias) and _fused_dtype(ag) and ag.numel():
        if bias is not None:
            bias = bias.to(ag.dtype)
        return GatedActivationPacked.apply(ag, bias, double_sigmoid)
    return gated_activation_reference(a, g, bias, double_sigmoid)
