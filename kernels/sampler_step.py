"""The elementwise part of one step of the fixed-mask ambient sampler (EDM's Euler / Heun).

Per network evaluation `ambient_sample` clamps the prediction D to [-1, 1], forms the
increment `g = dt * (x_eval - D) / t`, updates the state and builds the next network input
`cat([M * x, M])`. One kernel does all of it per evaluation, in three stages:

    "euler":        g1 = dt (x - D) / t,             x_next = x + g1
    "heun_predict": g1 = dt (x - D) / t,             returns g1, the next input at x + g1
    "heun_correct": g2 = dt ((x + g1) - D) / t,      x_next = x + (g1 + g2) / 2

and writes `M * x_next` (or `M * (x + g1)` after "heun_predict") into the image channels of the
(N, 2C, H, W) input buffer; the mask channels are written only when asked (they never change
during a run). Arithmetic is the reference's, in the state's dtype (float64 or float32); D, read
in place from the network's output, is converted to that dtype first, as the reference does.
"""
from typing import NamedTuple, Optional

import torch

from ._utils import (cdiv, empty_planes, is_channels_last, kernel, num_warps, plane_strides, planes, tile, tl,
                     use_fused)

STAGES = ("euler", "heun_predict", "heun_correct")

# ----------------------------------------------------------------------------------------------
# Kernel


@kernel
def _sampler_step_kernel(
    x_ptr,    # (N, C, H, W) sampler state x, float32 / float64, strides (x_sn, x_sc, x_sp)
    d_ptr,    # (N, C, H, W) prediction D (e.g. the image channels of the net's output), strides (d_sn, d_sc, d_sp)
    m_ptr,    # (N, C, H, W) mask M, strides (m_sn, m_sc, m_sp)
    g1_ptr,   # (N, C, H, W) Heun's first increment: written by STAGE 1, read by STAGE 2; strides (g_sn, g_sc, g_sp)
    t_ptr,    # () noise level t of this evaluation, state dtype
    dt_ptr,   # () step t_next - t_hat, state dtype
    out_ptr,  # (N, C, H, W) out: x_next (STAGES 0 and 2), strides (o_sn, o_sc, o_sp); same as x allowed
    net_ptr,  # (N, 2C, H, W) out: next network input (mask channels only if WRITE_MASK), strides (i_sn, i_sc, i_sp)
    C, HW,
    x_sn, x_sc, x_sp, d_sn, d_sc, d_sp, m_sn, m_sc, m_sp, g_sn, g_sc, g_sp, o_sn, o_sc, o_sp, i_sn, i_sc, i_sp,
    STAGE: tl.constexpr, CLIP: tl.constexpr, WRITE_MASK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """D' = clamp(D, -1, 1) if CLIP. STAGE 0: x' = x + dt (x - D') / t.  STAGE 1: g1 = dt (x - D') / t.
    STAGE 2: x' = x + (g1 + dt ((x + g1) - D') / t) / 2.  net[:, :C] = M x' (M (x + g1) for STAGE 1),
    net[:, C:] = M if WRITE_MASK."""
    n = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    p = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    inside = (c < C) & (p < HW)
    x = tl.load(x_ptr + n * x_sn + c * x_sc + p * x_sp, mask=inside)
    d = tl.load(d_ptr + n * d_sn + c * d_sc + p * d_sp, mask=inside).to(x.dtype)
    m = tl.load(m_ptr + n * m_sn + c * m_sc + p * m_sp, mask=inside).to(x.dtype)
    t = tl.load(t_ptr).to(x.dtype)
    dt = tl.load(dt_ptr).to(x.dtype)
    if CLIP:
        # Like torch.clamp, a NaN prediction stays NaN. The enum is spelled out in each call: bound to a
        # local name, the compiler takes it for a tensor and fails (the interpreter does not notice).
        d = tl.minimum(tl.maximum(d, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0, propagate_nan=tl.PropagateNan.ALL)
    g1_at = g1_ptr + n * g_sn + c * g_sc + p * g_sp
    if STAGE == 2:
        g1 = tl.load(g1_at, mask=inside)
        x_next = x + (g1 + dt * ((x + g1) - d) / t) / 2
    else:
        g1 = dt * (x - d) / t
        x_next = x + g1
    if STAGE == 1:
        tl.store(g1_at, g1, mask=inside)
    else:
        tl.store(out_ptr + n * o_sn + c * o_sc + p * o_sp, x_next, mask=inside)
    net = net_ptr + n * i_sn + c * i_sc + p * i_sp
    tl.store(net, (m * x_next).to(net_ptr.dtype.element_ty), mask=inside)
    if WRITE_MASK:
        tl.store(net + C * i_sc, m.to(net_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launcher


def sampler_step_launch(x: torch.Tensor, D: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                        stage: str, g1: Optional[torch.Tensor], clip: bool, net_input: torch.Tensor,
                        write_mask: bool, out: Optional[torch.Tensor]) -> torch.Tensor:
    """Launch one stage on checked arguments; returns x_next, or g1 for "heun_predict"."""
    N, C, H, W = x.shape
    channels_last = is_channels_last(x)
    # float64 values take two registers each: half the tile, the same 8 warps (4 elements a thread)
    wide = x.dtype == torch.float64
    block_c, block_hw = tile(C, H * W, channels_last, elements=1024 if wide else 2048)
    grid = (cdiv(H * W, block_hw), cdiv(C, block_c), N)
    stage_index = STAGES.index(stage)
    x, x_s = planes(x, channels_last)
    D, d_s = planes(D, channels_last)
    mask, m_s = planes(mask, channels_last)
    if stage_index == 1:
        g1 = empty_planes(x.shape, x.dtype, x.device, channels_last)
        result = g1
    else:
        result = out if out is not None else empty_planes(x.shape, x.dtype, x.device, channels_last)
        g1 = g1 if g1 is not None else x
    g1, g_s = planes(g1, channels_last)
    t = t.to(device=x.device, dtype=x.dtype).reshape(())
    dt = dt.to(device=x.device, dtype=x.dtype).reshape(())
    _sampler_step_kernel[grid](
        x, D, mask, g1, t, dt, result, net_input, C, H * W, *x_s, *d_s, *m_s, *g_s, *dense_strides(result, "out"),
        *dense_strides(net_input, "net_input"),
        STAGE=stage_index, CLIP=clip, WRITE_MASK=write_mask, BLOCK_C=block_c, BLOCK_HW=block_hw,
        num_warps=num_warps(block_c * block_hw, per_thread=4 if wide else 8))
    return result


def dense_strides(t: torch.Tensor, name: str):
    """Plane strides of an output written in place (it cannot be copied to a better layout)."""
    strides = plane_strides(t)
    if strides is None:
        raise ValueError(f"{name} must be dense over H and W (contiguous or channels_last)")
    return strides


# ----------------------------------------------------------------------------------------------
# Reference and public function


class SamplerStep(NamedTuple):
    """x_next (None after "heun_predict"), g1 (only after "heun_predict"), and the input buffer."""

    x: Optional[torch.Tensor]
    g1: Optional[torch.Tensor]
    net_input: torch.Tensor


def sampler_step_reference(x: torch.Tensor, D: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, dt: torch.Tensor,
                           *, stage: str = "euler", g1: Optional[torch.Tensor] = None, clip: bool = True,
                           net_input: Optional[torch.Tensor] = None, write_mask: bool = True) -> SamplerStep:
    """Plain PyTorch sampler step, the arithmetic of `ambient_sample`. Arguments as in `sampler_step`."""
    D = D.to(x.dtype)
    if clip:
        D = D.clamp(-1, 1)
    if stage == "heun_correct":
        x_next = x + (g1 + dt * ((x + g1) - D) / t) / 2
        new_g1 = None
    else:
        new_g1 = dt * (x - D) / t
        x_next = x + new_g1
    mask = mask.to(x.dtype)
    if net_input is None:
        net_input = torch.cat([mask * x_next, mask], dim=1)
    else:
        C = x.shape[1]
        net_input[:, :C] = mask * x_next
        if write_mask:
            net_input[:, C:] = mask
    if stage == "heun_predict":
        return SamplerStep(None, new_g1, net_input)
    return SamplerStep(x_next, None, net_input)


def sampler_step(x: torch.Tensor, D: torch.Tensor, mask: torch.Tensor, t: torch.Tensor, dt: torch.Tensor, *,
                 stage: str = "euler", g1: Optional[torch.Tensor] = None, clip: bool = True,
                 net_input: Optional[torch.Tensor] = None, write_mask: bool = True,
                 out: Optional[torch.Tensor] = None) -> SamplerStep:
    """One network evaluation's elementwise work in the fixed-mask sampler.

    Args:
        x: (N, C, H, W) state at the start of the step (float64 or float32).
        D: (N, C, H, W) the network's prediction at this evaluation, any float dtype; a channel
            slice `net(...)[:, :C]` is read in place.
        mask: (N, C, H, W) the fixed mask M.
        t: () noise level of this evaluation (t_hat for the first, t_next for Heun's second).
        dt: () step t_next - t_hat.
        stage: "euler", "heun_predict" or "heun_correct" (module docstring).
        g1: (N, C, H, W) the increment from "heun_predict"; required by "heun_correct".
        clip: clamp D to [-1, 1] first.
        net_input: (N, 2C, H, W) buffer for the next input, written in place; None allocates one.
        write_mask: also write M into its mask channels (needed once per buffer).
        out: where to write x_next (may be x itself); None allocates.
    Returns:
        SamplerStep(x_next or None, g1 or None, net_input).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if x.ndim != 4 or D.shape != x.shape or mask.shape != x.shape:
        raise ValueError(f"x, D and mask must share one (N, C, H, W) shape; got {tuple(x.shape)}, {tuple(D.shape)}, "
                         f"{tuple(mask.shape)}")
    if stage == "heun_correct" and (g1 is None or g1.shape != x.shape):
        raise ValueError("stage 'heun_correct' needs g1 of x's shape from stage 'heun_predict'")
    N, C, H, W = x.shape
    if net_input is not None and net_input.shape != (N, 2 * C, H, W):
        raise ValueError(f"net_input must have shape {(N, 2 * C, H, W)}, got {tuple(net_input.shape)}")
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    dt = torch.as_tensor(dt, dtype=x.dtype, device=x.device)
    fused = (use_fused(x, D, mask, g1, net_input, out) and x.dtype in (torch.float32, torch.float64)
             and (g1 is None or g1.dtype == x.dtype) and x.numel())
    if not fused:
        step = sampler_step_reference(x, D, mask, t, dt, stage=stage, g1=g1, clip=clip, net_input=net_input,
                                      write_mask=write_mask)
        if out is not None and step.x is not None:
            out.copy_(step.x)
            step = step._replace(x=out)
        return step
    if net_input is None:
        net_input = empty_planes((N, 2 * C, H, W), x.dtype, x.device, is_channels_last(x))
        write_mask = True
    result = sampler_step_launch(x, D, mask, t, dt, stage, g1, clip, net_input, write_mask, out)
    if stage == "heun_predict":
        return SamplerStep(None, result, net_input)
    return SamplerStep(result, None, net_input)
