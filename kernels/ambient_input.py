"""Ambient network input: from a batch as the data set stores it to what the network and the loss take,
in one pass.

Per image n (C, H, W values, flattened index j = c*H*W + h*W + w):

    A     = the stored mask bits, mirrored left-right where flip[n] (with the image)
    y     = A * level(u): u the stored uint8 value (level(u) = (2u - 255) / 255, `LEVELS`), or a
            stored float value on the [-1, 1] scale, mirrored likewise
    B     = the further corruption of `FurtherDraw` (ambient_fast.objective.corruption: per-value coins, or
            one box per image), evaluated value by value
    A_hat = B * A
    net_input = cat([A_hat * (y + noise_std[n] * noise), A_hat])             (N, 2C, H, W)
    target = y - tweedie[n] * noise * A_hat

all four outputs float32 (the network casts what its layers read under autocast). `target` is what
the loss grades the network against: y itself, or for an image with Gaussian noise of level
sigma_n trained at sigma (x_t = y + sqrt(sigma^2 - sigma_n^2) noise), with tweedie =
sigma_n^2 / sqrt(sigma^2 - sigma_n^2) on the pixels the network sees, y minus that multiple of the
added noise: uncorrelated with x_t's total noise, so its expectation given x_t is E[x0 | x_t]
(Tweedie's formula twice; ambient_fast.objective.objective). Elsewhere (pixels B hid) the noisy value itself,
whose expectation given what the network sees is the clean one's.

Random numbers: value j of image n uses the Philox counter `offset + n*C*H*W + j` of the stream
`key` (ambient_fast.objective.seeds: its words 0 and 1 make the noise by Box-Muller, word 2 the value's coin;
with shared channels every channel takes channel 0's coin). The fused kernel and the reference draw
the same words and turn them into numbers the same way, so they agree bitwise in float32 (the
kernel under Triton's interpreter; compiled, up to the GPU's last bits in the logarithm and cosine).
`offset = position * C*H*W`, with `position` the first image's index in the run, makes every
image's draws a function of its position only.
"""
from typing import NamedTuple, Optional

import torch

from ambient_fast.objective.corruption import FurtherDraw, FurtherKind, keep_mask
from ambient_fast.objective.seeds import bits24, box_muller, philox

from ._utils import cdiv, empty_planes, kernel, next_power_of_2, planes, tl, use_fused

# The value of each stored uint8 level on the [-1, 1] scale, correctly rounded to float32: one table
# for every path (a division by 127.5 and a multiplication by its reciprocal differ in 111 of the
# 256 levels, and CUDA compiles the one into the other).
LEVELS = ((2 * torch.arange(256, dtype=torch.float64) - 255) / 255).to(torch.float32)
_LEVELS_ON = {}


def levels(device) -> torch.Tensor:
    """LEVELS on `device` (one copy per device)."""
    device = torch.device(device)
    table = _LEVELS_ON.get(device)
    if table is None:
        table = _LEVELS_ON[device] = LEVELS.to(device)
    return table


# ----------------------------------------------------------------------------------------------
# Kernel


@kernel(do_not_specialize=["key", "offset"])
def _ambient_input_kernel(
    obs_ptr,     # (N, C, H, W) stored values, contiguous: uint8 levels (Y_UINT8) or float on [-1, 1]
    bits_ptr,    # (N, ceil(C*H*W / 8)) uint8 packed mask, row stride bits_sn: value j is bit j % 8 of byte j // 8
    flip_ptr,    # (N,) uint8: 1 = mirror left-right
    levels_ptr,  # (256,) float32 value of each uint8 level (Y_UINT8 only)
    std_ptr,     # (N,) float32 standard deviation of the noise added to y
    tw_ptr,      # (N,) float32 multiple of the noise taken off the target where seen (TWEEDIE only)
    thr_ptr,     # (N,) int64 coin threshold of each image (coins only)
    box_ptr,     # (N, 4) int64 top, left, height, width of B's box (box kinds only)
    net_ptr,     # (N, 2C, H, W) float32 out: network input, strides (x_sn, x_sc, x_sp)
    ahat_ptr,    # (N, C, H, W) float32 out: A_hat, strides (o_sn, o_sc, o_sp) (all three image outputs)
    aout_ptr,    # (N, C, H, W) float32 out: A
    yout_ptr,    # (N, C, H, W) float32 out: the target, A * y (minus tweedie * noise where seen)
    key, offset,
    C, W, HW, bits_sn,
    x_sn, x_sc, x_sp, o_sn, o_sc, o_sp,
    Y_UINT8: tl.constexpr, B_KIND: tl.constexpr, SHARED: tl.constexpr, TWEEDIE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """With (r0, r1, r2, _) = Philox(key, offset + n*C*HW + j), s the mirrored source of j:
        noise = sqrt(-2 ln u(r1 + 1)) cos(2 pi u(r0))   (float64, rounded), u(r) = (r >> 8) 2^-24
        B = (r2 >> 8) >= threshold[n] (channel 0's r2 if SHARED) | outside the box | inside the box
        A = bit s;  y = A level(u_s);  A_hat = B A;  x = A_hat (y + std noise);  m = A_hat;
        target = y - (tweedie noise) A_hat (TWEEDIE), else y."""
    n = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None]
    p = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)[None, :]
    inside = (c < C) & (p < HW)
    h = p // W
    w = p % W
    flip = tl.load(flip_ptr + n) != 0
    source = tl.where(flip, h * W + (W - 1 - w), p)  # (1, BLOCK_HW)
    j_source = c * HW + source

    stored = tl.load(obs_ptr + n * C * HW + j_source, mask=inside, other=0)
    if Y_UINT8:
        y = tl.load(levels_ptr + stored.to(tl.int32), mask=inside, other=0.0)
    else:
        y = stored.to(tl.float32)
    byte = tl.load(bits_ptr + n * bits_sn + j_source // 8, mask=inside, other=0).to(tl.int32)
    a = ((byte >> (j_source % 8)) & 1).to(tl.float32)

    base = offset.to(tl.int64) + n * C * HW
    r0, r1, r2, _ = tl.randint4x(key, base + c * HW + p)
    angle = ((r0 >> 8).to(tl.float32) * 5.9604644775390625e-08).to(tl.float64)  # u in [0, 1): times 2^-24
    radius = (((r1 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08).to(tl.float64)  # u in (0, 1]
    # 6.2831854820251465: 2 pi as a float32 (ambient_fast.objective.seeds.TWO_PI)
    noise = (tl.sqrt(-2.0 * tl.log(radius)) * tl.cos(6.2831854820251465 * angle)).to(tl.float32)
    if B_KIND == 0:  # coins
        if SHARED:
            _, _, r2, _ = tl.randint4x(key, base + p)  # channel 0's counter, (1, BLOCK_HW)
        keep = ((r2 >> 8).to(tl.int64) >= tl.load(thr_ptr + n)).to(tl.float32)
        if SHARED:
            keep = tl.broadcast_to(keep, (BLOCK_C, BLOCK_HW))
    else:
        top = tl.load(box_ptr + n * 4)
        left = tl.load(box_ptr + n * 4 + 1)
        in_box = (h >= top) & (h < top + tl.load(box_ptr + n * 4 + 2)) & \
                 (w >= left) & (w < left + tl.load(box_ptr + n * 4 + 3))
        if B_KIND == 1:  # erase the box
            in_box = in_box == 0
        keep = tl.broadcast_to(in_box.to(tl.float32), (BLOCK_C, BLOCK_HW))

    # A is stored before its first use: Triton 3.6 otherwise reuses the layout conversion made for
    # this store at the earlier uses (float values, NCHW outputs) and fails ("operand #0 does not
    # dominate this use"); bench/aot.py compiles that case.
    out = n * o_sn + c * o_sc + p * o_sp
    tl.store(aout_ptr + out, a, mask=inside)
    a_hat = keep * a
    y = a * y
    x = a_hat * (y + tl.load(std_ptr + n) * noise)
    target = y
    if TWEEDIE:
        target = y - tl.load(tw_ptr + n) * noise * a_hat

    net = net_ptr + n * x_sn + c * x_sc + p * x_sp
    tl.store(net, x, mask=inside)
    tl.store(net + C * x_sc, a_hat, mask=inside)
    tl.store(ahat_ptr + out, a_hat, mask=inside)
    tl.store(yout_ptr + out, target, mask=inside)


# ----------------------------------------------------------------------------------------------
# Launcher


_TILE_ELEMENTS = 1024
_ELEMENTS_PER_THREAD = 4


class AmbientInput(NamedTuple):
    """What `ambient_input` writes, laid out as asked; float32."""

    net_input: torch.Tensor  # (N, 2C, H, W) cat([A_hat * (y + noise_std * noise), A_hat])
    A_hat: torch.Tensor      # (N, C, H, W) B * A
    A: torch.Tensor          # (N, C, H, W) the observation mask, unpacked (and mirrored)
    y: torch.Tensor          # (N, C, H, W) the target: A * y on [-1, 1] (noisy images: Tweedie's, see above)


def ambient_input_launch(observed: torch.Tensor, mask_bits: torch.Tensor, flips: torch.Tensor,
                         noise_std: torch.Tensor, further: FurtherDraw, key: int, offset: int,
                         channels_last: bool, tweedie: Optional[torch.Tensor] = None) -> AmbientInput:
    """Launch the kernel on checked arguments (see `ambient_input`)."""
    N, C, H, W = observed.shape
    device = observed.device
    net_input = empty_planes((N, 2 * C, H, W), torch.float32, device, channels_last)
    outs = [empty_planes((N, C, H, W), torch.float32, device, channels_last) for _ in range(3)]
    # Unread pointers (coins have no boxes, boxes no thresholds) take any tensor.
    thresholds = further.thresholds if further.thresholds is not None else further.boxes
    boxes = further.boxes if further.boxes is not None else further.thresholds
    # Tiles of 1024 values over 8 warps: 4 a thread. Each value draws Philox words and a Box-Muller
    # normal in float64, so registers grow with the values a thread holds, and this bandwidth-bound
    # kernel needs the occupancy that few registers allow.
    block_c = min(next_power_of_2(C), 16)
    block_hw = min(next_power_of_2(H * W), max(_TILE_ELEMENTS // block_c, 1))
    warps = max(1, min(8, block_c * block_hw // (32 * _ELEMENTS_PER_THREAD)))
    grid = (cdiv(H * W, block_hw), cdiv(C, block_c), N)
    _ambient_input_kernel[grid](
        observed, mask_bits, flips, levels(device), noise_std, noise_std if tweedie is None else tweedie, thresholds,
        boxes, net_input, *outs,
        key, offset, C, W, H * W, mask_bits.stride(0),
        *planes(net_input, channels_last)[1], *planes(outs[0], channels_last)[1],
        Y_UINT8=observed.dtype == torch.uint8, B_KIND=int(further.kind), SHARED=further.shared_channels,
        TWEEDIE=tweedie is not None, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=warps)
    return AmbientInput(net_input, *outs)


# ----------------------------------------------------------------------------------------------
# Reference and public function


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """(N, ceil(C*H*W / 8)) uint8, little bit order -> (N, C, H, W) float32 0/1."""
    N = packed.shape[0]
    size = int(torch.Size(shape[1:]).numel())
    bits = (packed.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    return bits.reshape(N, -1)[:, :size].reshape(shape).to(torch.float32)


def mirror(t: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """t (N, ...) with image n mirrored left-right (its last axis reversed) where flips[n] != 0."""
    return torch.where((flips != 0).reshape(-1, *[1] * (t.ndim - 1)), t.flip(-1), t)


def network_input(y: torch.Tensor, A_hat: torch.Tensor, noise_std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """cat([A_hat * (y + noise_std * noise), A_hat]) of float32 (N, C, H, W) y, A_hat and noise and
    (N,) noise_std: what the network sees of an image, with the kernel's order of operations."""
    x = A_hat * (y + noise_std.reshape(-1, 1, 1, 1) * noise)
    return torch.cat([x, A_hat], dim=1)


def ambient_input_reference(observed: torch.Tensor, mask_bits: torch.Tensor, flips: torch.Tensor,
                            noise_std: torch.Tensor, further: FurtherDraw, key: int, offset: int,
                            channels_last: bool = False, tweedie: Optional[torch.Tensor] = None) -> AmbientInput:
    """Plain PyTorch ambient input; arguments and result as in `ambient_input`, bitwise the kernel's."""
    N, C, H, W = shape = tuple(observed.shape)
    device = observed.device
    y = levels(device)[observed.long()] if observed.dtype == torch.uint8 else observed.to(torch.float32)
    A = mirror(unpack_mask(mask_bits, shape), flips)
    y = A * mirror(y, flips)
    counters = offset + torch.arange(N * C * H * W, dtype=torch.int64, device=device).reshape(shape)
    r0, r1, r2, _ = philox(key, counters)
    noise = box_muller(r1, r0)
    coins = None
    if further.kind == FurtherKind.COIN:
        coins = bits24(r2[:, :1] if further.shared_channels else r2)  # channel 0's counter is the pixel's
    A_hat = keep_mask(further, shape, coins).to(torch.float32) * A
    net_input = network_input(y, A_hat, noise_std.to(torch.float32), noise)
    if tweedie is not None:
        y = y - tweedie.to(torch.float32).reshape(-1, 1, 1, 1) * noise * A_hat
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return AmbientInput(*(t.contiguous(memory_format=layout) for t in (net_input, A_hat, A, y)))


def ambient_input(observed: torch.Tensor, mask_bits: torch.Tensor, flips: torch.Tensor, noise_std: torch.Tensor,
                  further: FurtherDraw, *, key: int, offset: int, channels_last: bool = False,
                  tweedie: Optional[torch.Tensor] = None) -> AmbientInput:
    """Unpack, mirror, scale, further-corrupt and noise a stored batch into the ambient network input
    (forward only).

    Args:
        observed: (N, C, H, W) contiguous stored values `A x`: uint8 levels, or float on [-1, 1].
        mask_bits: (N, ceil(C*H*W / 8)) uint8, A bit-packed in little bit order (as stored).
        flips: (N,) uint8 or bool, 1 mirrors image and mask left-right.
        noise_std: (N,) standard deviation of the noise added to each image (its sigma).
        further: B for the batch (`ambient_fast.objective.corruption.MaskOperator.further_draw`).
        key, offset: the value stream and the counter of the batch's first value (module docstring).
        channels_last: lay the outputs out channels_last.
        tweedie: (N,) multiple of the noise the target loses where seen (noisy images; module
            docstring), or None (the target is A * y).
    Returns:
        AmbientInput(net_input (N, 2C, H, W), A_hat, A, y: the target).

    Example:
        >>> from ambient_fast.objective.corruption import FurtherDraw, FurtherKind
        >>> observed = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
        >>> bits = torch.full((2, 24), 255, dtype=torch.uint8)  # all 3*8*8 = 192 values observed
        >>> coins = FurtherDraw(FurtherKind.COIN, torch.full((2,), 1 << 21))  # B erases 1 in 8
        >>> flips = torch.zeros(2, dtype=torch.uint8)
        >>> ambient_input(observed, bits, flips, torch.ones(2), coins, key=7, offset=0).net_input.shape
        torch.Size([2, 6, 8, 8])
    """
    if observed.ndim != 4 or not observed.is_contiguous():
        raise ValueError(f"observed must be a contiguous (N, C, H, W) tensor, got shape {tuple(observed.shape)}")
    N, C, H, W = observed.shape
    if not (observed.dtype == torch.uint8 or observed.is_floating_point()):
        raise ValueError(f"observed must be uint8 levels or floating point, got {observed.dtype}")
    if mask_bits.dtype != torch.uint8 or tuple(mask_bits.shape) != (N, cdiv(C * H * W, 8)) or mask_bits.stride(1) != 1:
        raise ValueError(f"mask_bits must be uint8 of shape ({N}, {cdiv(C * H * W, 8)}) with contiguous rows, got "
                         f"{mask_bits.dtype} {tuple(mask_bits.shape)}")
    if any(tuple(t.shape) != (N,) for t in (flips, noise_std) + (() if tweedie is None else (tweedie,))):
        raise ValueError(f"flips, noise_std and tweedie must hold one value per image ({N})")
    coins = further.kind == FurtherKind.COIN
    if coins and (further.thresholds is None or tuple(further.thresholds.shape) != (N,)):
        raise ValueError(f"a coin draw needs one threshold per image ({N})")
    if not coins and (further.boxes is None or tuple(further.boxes.shape) != (N, 4)):
        raise ValueError(f"a box draw needs (N, 4) boxes for {N} images")
    if not (offset >= 0 and 0 <= key < 2 ** 64):
        raise ValueError(f"key must lie in [0, 2^64) and offset be >= 0, got key {key}, offset {offset}")
    flips = flips.to(torch.uint8).contiguous()
    noise_std = noise_std.to(torch.float32).contiguous()
    tweedie = None if tweedie is None else tweedie.to(torch.float32).contiguous()
    def on_device(t):
        return None if t is None else t.to(device=observed.device, dtype=torch.int64).contiguous()

    further = FurtherDraw(further.kind, on_device(further.thresholds), further.shared_channels, on_device(further.boxes))
    if use_fused(observed, mask_bits, flips, noise_std) and observed.numel():
        return ambient_input_launch(observed, mask_bits, flips, noise_std, further, int(key), int(offset),
                                    channels_last, tweedie)
    return ambient_input_reference(observed, mask_bits, flips, noise_std, further, int(key), int(offset),
                                   channels_last, tweedie)
