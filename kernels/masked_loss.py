"""Masked ambient loss: per-sample sums of `weight[n] * A * (D - y)^2` (or `|D - y|`).

This is the grading of `ambient_fast.objective.objective` (Daras et al. 2023, section 3.1): the network's
prediction D is graded only on the pixels of A. The fused kernel reads D, y and A once,
accumulates each sample's sum in fp32 and, in the same pass, writes the gradient with respect
to D; the backward only scales that gradient by each sample's incoming gradient.
"""
import torch

from ._utils import (cdiv, empty_planes, is_channels_last, kernel, next_power_of_2, num_warps, planes, tile,
                     tl, use_fused)

# ----------------------------------------------------------------------------------------------
# Kernels


@kernel
def _masked_loss_kernel(
    d_ptr,        # (N, C, H, W) prediction D, float32 / bfloat16 / float16, strides (d_sn, d_sc, d_sp)
    y_ptr,        # (N, C, H, W) target y, float, strides (y_sn, y_sc, y_sp)
    a_ptr,        # (N, C, H, W) mask A (0/1), float, strides (a_sn, a_sc, a_sp)
    w_ptr,        # (N,) float32 per-sample weight
    partial_ptr,  # (N, programs per sample) float32 out: partial sums
    grad_ptr,     # (N, C, H, W) out, D's dtype: dloss_n/dD, strides (g_sn, g_sc, g_sp); unless WRITE_GRAD
    C, HW,
    d_sn, d_sc, d_sp, y_sn, y_sc, y_sp, a_sn, a_sc, a_sp, g_sn, g_sc, g_sp,
    L1: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """With e = D - y (fp32):
        L2: loss_n = sum w_n A e^2,  dloss_n/dD = 2 w_n A e
        L1: loss_n = sum w_n A |e|,  dloss_n/dD = w_n A sign(e)
    Each program stores the fp32 sum over its tile in partial[n, program]."""
    n = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    p = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    inside = (c < C) & (p < HW)
    d = tl.load(d_ptr + n * d_sn + c * d_sc + p * d_sp, mask=inside, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + n * y_sn + c * y_sc + p * y_sp, mask=inside, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + n * a_sn + c * a_sc + p * a_sp, mask=inside, other=0.0).to(tl.float32)
    wa = tl.load(w_ptr + n) * a
    e = d - y
    if L1:
        value = wa * tl.abs(e)
        grad = tl.where(e > 0, wa, tl.where(e < 0, -wa, 0.0))
    else:
        value = wa * e * e
        grad = 2.0 * wa * e
    if WRITE_GRAD:
        tl.store(grad_ptr + n * g_sn + c * g_sc + p * g_sp, grad.to(grad_ptr.dtype.element_ty), mask=inside)
    programs = tl.num_programs(0) * tl.num_programs(1)
    slot = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(partial_ptr + n * programs + slot, tl.sum(tl.sum(tl.where(inside, value, 0.0), axis=1), axis=0))


@kernel
def _scale_samples_kernel(
    src_ptr,    # (N, M) saved gradient, each sample's M = C*H*W elements contiguous
    scale_ptr,  # (N,) float32 incoming gradient of each sample's loss
    out_ptr,    # (N, M) out, same dtype and layout as src
    M,
    BLOCK: tl.constexpr,
):
    """out[n, j] = src[n, j] * scale[n] (fp32 math)."""
    n = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = j < M
    src = tl.load(src_ptr + n * M + j, mask=inside).to(tl.float32)
    tl.store(out_ptr + n * M + j, (src * tl.load(scale_ptr + n)).to(out_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launchers


def masked_loss_forward(D: torch.Tensor, y: torch.Tensor, A: torch.Tensor, weight: torch.Tensor, norm: int,
                        write_grad: bool):
    """Launch the loss kernel. Returns (loss (N,) float32, grad or None), grad in D's dtype and
    layout, contiguous."""
    N, C, H, W = D.shape
    channels_last = is_channels_last(D)
    block_c, block_hw = tile(C, H * W, channels_last)
    grid = (cdiv(H * W, block_hw), cdiv(C, block_c), N)
    D, d_s = planes(D, channels_last)
    y, y_s = planes(y, channels_last)
    A, a_s = planes(A, channels_last)
    weight = weight.to(torch.float32).contiguous()
    partial = torch.empty((N, grid[0] * grid[1]), dtype=torch.float32, device=D.device)
    grad = empty_planes(D.shape, D.dtype, D.device, channels_last) if write_grad else partial
    g_s = planes(grad, channels_last)[1] if write_grad else (0, 0, 0)
    _masked_loss_kernel[grid](
        D, y, A, weight, partial, grad, C, H * W, *d_s, *y_s, *a_s, *g_s,
        L1=norm == 1, WRITE_GRAD=write_grad, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=num_warps(block_c * block_hw))
    return partial.sum(1), (grad if write_grad else None)


def scale_samples(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`grad * scale.reshape(-1, 1, 1, 1)` for a gradient from `masked_loss_forward`."""
    N = grad.shape[0]
    M = grad.numel() // N
    block = min(4096, max(next_power_of_2(M), 16))
    out = torch.empty_like(grad)
    _scale_samples_kernel[(cdiv(M, block), N)](grad, scale.to(torch.float32).contiguous(), out, M, BLOCK=block,
                                               num_warps=num_warps(block))
    return out


# ----------------------------------------------------------------------------------------------
# Autograd


class MaskedLoss(torch.autograd.Function):
    """Per-sample masked loss whose gradient with respect to D is computed in the forward pass."""

    @staticmethod
    def forward(ctx, D, y, A, weight, norm):
        loss, grad = masked_loss_forward(D, y, A, weight, norm, write_grad=True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return scale_samples(grad, dloss), None, None, None, None


# ----------------------------------------------------------------------------------------------
# Reference and public function


def masked_loss_reference(D: torch.Tensor, y: torch.Tensor, A: torch.Tensor, weight: torch.Tensor,
                          norm: int = 2) -> torch.Tensor:
    """Plain PyTorch masked loss.

    Args:
        D: (N, C, H, W) prediction.
        y: (N, C, H, W) target (observed image).
        A: (N, C, H, W) 0/1 mask of the graded pixels.
        weight: (N,) or (N, 1, 1, 1) per-sample weight.
        norm: 2 for `(D - y)^2`, 1 for `|D - y|`.
    Returns:
        (N,) per-sample sums `sum weight[n] * A * err`, float32 (D of lower precision is promoted).
    """
    if D.dtype not in (torch.float32, torch.float64):
        D = D.float()
    error = (D - y).square() if norm == 2 else (D - y).abs()
    return (weight.reshape(-1, 1, 1, 1) * A * error).flatten(1).sum(1)


def masked_loss(D: torch.Tensor, y: torch.Tensor, A: torch.Tensor, weight: torch.Tensor,
                norm: int = 2) -> torch.Tensor:
    """Per-sample masked loss `sum_{c,h,w} weight[n] * A * (D - y)^2` (norm=2) or `|D - y|` (norm=1).

    Shapes as in `masked_loss_reference`. Differentiable with respect to D only. The fused kernel
    accumulates in fp32 for D in float32, bfloat16 or float16 and reads channel slices of a
    network output (`net(x)[:, :C]`) in place.

    Example:
        >>> D, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> masked_loss(D, y, torch.ones(2, 3, 4, 4), torch.ones(2)).shape
        torch.Size([2])
    """
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 (L1) or 2 (L2), got {norm!r}")
    if D.ndim != 4 or y.shape != D.shape or A.shape != D.shape:
        raise ValueError(f"D, y and A must share one (N, C, H, W) shape; got {tuple(D.shape)}, {tuple(y.shape)}, "
                         f"{tuple(A.shape)}")
    if weight.numel() != D.shape[0]:
        raise ValueError(f"weight must hold one value per sample ({D.shape[0]}), got shape {tuple(weight.shape)}")
    fused_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if not (use_fused(D, y, A, weight) and D.dtype in fused_dtypes and y.dtype in fused_dtypes
            and A.dtype in fused_dtypes and D.numel()):
        return masked_loss_reference(D, y, A, weight, norm)
    weight = weight.reshape(-1)
    if D.requires_grad and torch.is_grad_enabled():
        return MaskedLoss.apply(D, y, A, weight, norm)
    return masked_loss_forward(D, y, A, weight, norm, write_grad=False)[0]
