"""Ambient network input: from an observed image y and its mask A to the denoiser's input, in one pass.

For each image the further corruption B ~ Bernoulli(1 - delta) (per channel, or one draw per
pixel shared by its channels) and the noise n ~ N(0, 1) are drawn, and

    A_hat = B * A
    net_input = cat([c_in * A_hat * (y + sigma * n), c_in_mask * A_hat])      (N, 2C, H, W)

with per-sample sigma and c_in; c_in_mask is 1 (mask-aware preconditioning, whose mask channels
enter the network unscaled) or c_in (`scale_mask=True`, the reference's preconditioning, which
scales the whole input). A_hat, A and A * y are written too, as float32, for the loss.

Storage read: y as uint8 (value v means v / 127.5 - 1) or float in [-1, 1]; A bit-packed
(`numpy.packbits(A.reshape(N, -1), axis=1, bitorder="little")`: element j of an image's
flattened C*H*W is bit j % 8 of byte j // 8) or as 0/1 values.

Random numbers (fused kernel): Philox, counter-based. Element (n, c, h, w) of a call uses the
counter `offset + n*C*H*W + c*H*W + h*W + w`: two of its four outputs make the noise (Box-Muller),
the third B's uniform draw; with shared channels every channel takes channel 0's draw. The same
(seed, offset) reproduces a batch exactly; the next batch passes `offset + N*C*H*W`, so that
`offset = images_seen * C*H*W` makes every image's draws depend on its position in the run only,
and a resumed run continues the same stream.
"""
from typing import NamedTuple, Optional, Union

import torch

from ._utils import cdiv, empty_planes, is_channels_last, kernel, next_power_of_2, planes, tl, use_fused

# ----------------------------------------------------------------------------------------------
# Kernel


@kernel(do_not_specialize=["seed", "offset"])
def _ambient_input_kernel(
    y_ptr,      # (N, C, H, W) observed image, uint8 or float, strides (y_sn, y_sc, y_sp)
    a_ptr,      # PACKED: (N, ceil(C*H*W / 8)) uint8, row stride a_sn; else (N, C, H, W) 0/1, strides (a_sn, a_sc, a_sp)
    sigma_ptr,  # (N,) float32 noise level
    cin_ptr,    # (N,) float32 input scale c_in
    net_ptr,    # (N, 2C, H, W) out: network input, strides (x_sn, x_sc, x_sp)
    ahat_ptr,   # (N, C, H, W) float32 out: A_hat = B * A, strides (o_sn, o_sc, o_sp) (all four outputs)
    aout_ptr,   # (N, C, H, W) float32 out: A
    yout_ptr,   # (N, C, H, W) float32 out: A * y
    b_ptr,      # (N, C, H, W) float32 out: B; only if WRITE_DRAWS
    noise_ptr,  # (N, C, H, W) float32 out: n; only if WRITE_DRAWS
    seed, offset, delta,
    C, HW,
    y_sn, y_sc, y_sp, a_sn, a_sc, a_sp, x_sn, x_sc, x_sp, o_sn, o_sc, o_sp,
    Y_UINT8: tl.constexpr, PACKED: tl.constexpr, SHARED: tl.constexpr, SCALE_MASK: tl.constexpr,
    WRITE_DRAWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """With j = c*HW + p the element's index in its image and (u1, u2, u3, _) = Philox(seed, offset + n*C*HW + j):
        noise = sqrt(-2 ln u1) cos(2 pi u2),  B = [u3' >= delta]  (u3' = u3 of channel 0 if SHARED)
        A_hat = B A;  x = c_in A_hat (A y + sigma noise);  m = (c_in if SCALE_MASK else 1) A_hat."""
    n = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    p = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    inside = (c < C) & (p < HW)
    j = c * HW + p  # index in the image's flattened C*H*W

    y = tl.load(y_ptr + n * y_sn + c * y_sc + p * y_sp, mask=inside, other=0).to(tl.float32)
    if Y_UINT8:
        y = y / 127.5 - 1.0
    if PACKED:
        byte = tl.load(a_ptr + n * a_sn + j // 8, mask=inside, other=0).to(tl.int32)
        a = ((byte >> (j % 8)) & 1).to(tl.float32)
    else:
        a = (tl.load(a_ptr + n * a_sn + c * a_sc + p * a_sp, mask=inside, other=0) != 0).to(tl.float32)

    base = offset.to(tl.int64) + n * C * HW
    u1, u2, u3, _ = tl.rand4x(seed, base + j)
    noise = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7))) * tl.cos(6.283185307179586 * u2)
    if SHARED:
        _, _, u3, _ = tl.rand4x(seed, base + p)  # channel 0's counter, (1, BLOCK_HW)
    keep = (u3 >= delta).to(tl.float32)
    if SHARED:
        keep = tl.broadcast_to(keep, (BLOCK_C, BLOCK_HW))

    sigma = tl.load(sigma_ptr + n)
    c_in = tl.load(cin_ptr + n)
    a_hat = keep * a
    y = a * y
    x = c_in * a_hat * (y + sigma * noise)
    m = c_in * a_hat if SCALE_MASK else a_hat

    net = net_ptr + n * x_sn + c * x_sc + p * x_sp
    tl.store(net, x.to(net_ptr.dtype.element_ty), mask=inside)
    tl.store(net + C * x_sc, m.to(net_ptr.dtype.element_ty), mask=inside)
    out = n * o_sn + c * o_sc + p * o_sp
    tl.store(ahat_ptr + out, a_hat, mask=inside)
    tl.store(aout_ptr + out, a, mask=inside)
    tl.store(yout_ptr + out, y, mask=inside)
    if WRITE_DRAWS:
        tl.store(b_ptr + out, keep, mask=inside)
        tl.store(noise_ptr + out, noise, mask=inside)


# ----------------------------------------------------------------------------------------------
# Launcher


_TILE_ELEMENTS = 1024
_ELEMENTS_PER_THREAD = 4


class AmbientInput(NamedTuple):
    """What `ambient_input` writes. All float32 except net_input (its `dtype`)."""

    net_input: torch.Tensor         # (N, 2C, H, W) cat([c_in * A_hat * (y + sigma n), c_in_mask * A_hat])
    A_hat: torch.Tensor             # (N, C, H, W) B * A
    A: torch.Tensor                 # (N, C, H, W) the observation mask, unpacked
    y: torch.Tensor                 # (N, C, H, W) A * y in [-1, 1]
    B: Optional[torch.Tensor] = None      # (N, C, H, W) the drawn B, with return_draws only
    noise: Optional[torch.Tensor] = None  # (N, C, H, W) the drawn n, with return_draws only


def ambient_input_launch(y: torch.Tensor, A: torch.Tensor, sigma: torch.Tensor, c_in: torch.Tensor, delta: float,
                         seed: int, offset: int, shared_channels: bool, scale_mask: bool, dtype: torch.dtype,
                         return_draws: bool) -> AmbientInput:
    """Launch the kernel on checked arguments (see `ambient_input`); outputs follow y's layout."""
    N, C, H, W = y.shape
    channels_last = is_channels_last(y)
    y, y_s = planes(y, channels_last)
    packed = A.ndim == 2
    if packed:
        A = A.contiguous()
        a_s = (A.stride(0), 0, 0)
    else:
        A, a_s = planes(A.view(torch.uint8) if A.dtype == torch.bool else A, channels_last)
    net_input = empty_planes((N, 2 * C, H, W), dtype, y.device, channels_last)
    outs = [empty_planes((N, C, H, W), torch.float32, y.device, channels_last) for _ in range(5 if return_draws else 3)]
    draws = outs[3:] if return_draws else [outs[0], outs[0]]
    # Tiles of 1024 elements over 8 warps: 4 elements a thread. Each element draws four Philox
    # numbers and a Box-Muller pair, so registers grow with elements per thread (ptxas, sm_90: 16 a
    # thread take 153 registers, 8 take 80, 4 take 48), and this bandwidth-bound kernel needs the
    # occupancy that few registers allow.
    block_c = min(next_power_of_2(C), 16)
    block_hw = min(next_power_of_2(H * W), max(_TILE_ELEMENTS // block_c, 1))
    warps = max(1, min(8, block_c * block_hw // (32 * _ELEMENTS_PER_THREAD)))
    grid = (cdiv(H * W, block_hw), cdiv(C, block_c), N)
    _ambient_input_kernel[grid](
        y, A, sigma, c_in, net_input, *outs[:3], *draws, seed, offset, float(delta), C, H * W,
        *y_s, *a_s, *planes(net_input, channels_last)[1], *planes(outs[0], channels_last)[1],
        Y_UINT8=y.dtype == torch.uint8, PACKED=packed, SHARED=shared_channels, SCALE_MASK=scale_mask,
        WRITE_DRAWS=return_draws, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps)
    return AmbientInput(net_input, *outs)


# ----------------------------------------------------------------------------------------------
# Reference and public function


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """(N, ceil(C*H*W / 8)) uint8, little bit order -> (N, C, H, W) float32 0/1."""
    N = packed.shape[0]
    size = int(torch.Size(shape[1:]).numel())
    bits = (packed.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    return bits.reshape(N, -1)[:, :size].reshape(shape).to(torch.float32)


def ambient_input_reference(y: torch.Tensor, A: torch.Tensor, sigma: torch.Tensor, c_in: Optional[torch.Tensor] = None,
                            *, delta: float, shared_channels: bool = False, scale_mask: bool = False,
                            dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None,
                            B: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                            return_draws: bool = False) -> AmbientInput:
    """Plain PyTorch ambient input. Arguments as in `ambient_input`, except the random source:
    B and noise ((N, C, H, W), or (N, 1, H, W) for a shared B) are used when given, else drawn
    from `generator` with torch's RNG."""
    N, C, H, W = y.shape
    y = y.to(torch.float32) / 127.5 - 1 if y.dtype == torch.uint8 else y.to(torch.float32)
    A = unpack_mask(A, y.shape) if A.ndim == 2 else (A != 0).to(torch.float32)
    if B is None:
        b_shape = (N, 1, H, W) if shared_channels else (N, C, H, W)
        B = (torch.rand(b_shape, device=y.device, generator=generator) >= delta).to(torch.float32)
    B = B.to(torch.float32).expand(N, C, H, W)
    if noise is None:
        noise = torch.randn(y.shape, device=y.device, generator=generator)
    noise = noise.to(torch.float32)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    c_in = torch.ones_like(sigma) if c_in is None else c_in.to(torch.float32).reshape(-1, 1, 1, 1)
    A_hat = B * A
    y = A * y
    x = c_in * A_hat * (y + sigma * noise)
    m = c_in * A_hat if scale_mask else A_hat
    extra = (B.contiguous(), noise) if return_draws else ()
    return AmbientInput(torch.cat([x, m], dim=1).to(dtype), A_hat, A, y, *extra)


def ambient_input(y: torch.Tensor, A: torch.Tensor, sigma: Union[torch.Tensor, float],
                  c_in: Optional[Union[torch.Tensor, float]] = None, *, delta: float, seed: int, offset: int = 0,
                  shared_channels: bool = False, scale_mask: bool = False, dtype: torch.dtype = torch.float32,
                  return_draws: bool = False) -> AmbientInput:
    """Draw the further corruption and the noise and write the ambient network input (forward only).

    Args:
        y: (N, C, H, W) observed images `A * x`: uint8 (v -> v / 127.5 - 1) or float in [-1, 1].
            Values outside A are ignored.
        A: observation masks: (N, ceil(C*H*W / 8)) uint8 bit-packed in little bit order, or
            (N, C, H, W) 0/1 (float, bool or uint8).
        sigma: (N,) noise levels, or one for all.
        c_in: (N,) input scales, or one for all; None means 1.
        delta: probability that B hides an observed pixel, in [0, 1).
        seed, offset: random stream and its position; this call uses counters
            offset .. offset + N*C*H*W - 1 (see the module docstring).
        shared_channels: one B draw per pixel for all its channels.
        scale_mask: scale the mask channels by c_in too (the reference's preconditioning);
            False leaves them unscaled (mask-aware models).
        dtype: dtype of net_input.
        return_draws: also return the drawn B and noise (for tests and debugging).
    Returns:
        AmbientInput(net_input (N, 2C, H, W), A_hat, A, y = A * y, B, noise), laid out like y.
        Off the fused path the draws come from torch's RNG seeded by (seed, offset): reproducible,
        but a different stream from the kernel's.

    Example:
        >>> y = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        >>> A = torch.full((2, 24), 255, dtype=torch.uint8)  # all 3*8*8 = 192 bits set
        >>> ambient_input(y, A, torch.ones(2), delta=0.1, seed=0).net_input.shape
        torch.Size([2, 6, 8, 8])
    """
    if y.ndim != 4:
        raise ValueError(f"y must be (N, C, H, W), got shape {tuple(y.shape)}")
    N, C, H, W = y.shape
    if A.ndim == 2:
        if A.dtype != torch.uint8 or A.shape != (N, cdiv(C * H * W, 8)):
            raise ValueError(f"a packed mask must be uint8 of shape ({N}, {cdiv(C * H * W, 8)}), got {A.dtype} "
                             f"{tuple(A.shape)}")
    elif A.shape != y.shape:
        raise ValueError(f"A must be packed (N, ceil(C*H*W/8)) or of y's shape {tuple(y.shape)}, got {tuple(A.shape)}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not (y.dtype == torch.uint8 or y.is_floating_point()):
        raise ValueError(f"y must be uint8 or floating point, got {y.dtype}")
    sigma = _per_sample(sigma, N, y.device, "sigma")
    c_in = _per_sample(1.0 if c_in is None else c_in, N, y.device, "c_in")
    if use_fused(y, A, sigma, c_in) and y.numel():
        return ambient_input_launch(y, A, sigma, c_in, delta, int(seed), int(offset), shared_channels, scale_mask,
                                    dtype, return_draws)
    generator = torch.Generator(device=y.device).manual_seed((int(seed) * 0x9E3779B1 + int(offset)) % 2 ** 63)
    return ambient_input_reference(y, A, sigma, c_in, delta=delta, shared_channels=shared_channels,
                                   scale_mask=scale_mask, dtype=dtype, generator=generator, return_draws=return_draws)


def _per_sample(value, N: int, device, name: str) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
    if value.numel() == 1:
        value = value.expand(N)
    if value.numel() != N:
        raise ValueError(f"{name} must hold one value or one per sample ({N}), got {value.numel()}")
    return value.contiguous()
