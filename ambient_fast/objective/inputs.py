"""The ambient input of a training step, in one place: from a batch as stored (`RawBatch`, what the
loaders deliver) to what the network and the loss take (`TrainingBatch`).

For each image, from its position in the run (ambient_fast.objective.seeds):
- its own Philox words (IMAGE stream) give its noise level sigma and the words of its further
  corruption. sigma comes from the loss's distribution restricted to the levels the image may
  train at: above its noise level sigma_n (a noisy image) and its sigma_min (an image marked as
  degraded in a way we do not model); every level for the others;
- the data set's mask operator (`ambient_fast.objective.corruption.training_operator`: the paper's B for its
  kind of masks, or an allowed `--further` override) turns those words into B: a coin per value,
  or one box per image (placed relative to A's own box for fixed_box and keep_patch); images whose
  A hides nothing (clean, or only noisy) get none;
- `ambient_fast.kernels.ambient_input` then unpacks, mirrors, scales, corrupts and noises every
  value in one pass (the fused kernel on CUDA, its PyTorch reference elsewhere; bitwise the same
  draws), writing the network input and the target, A and A_hat that the loss grades against.

The objective per image, and why it stays unbiased. Clean images: EDM's loss at every sigma.
Masked ones: the ambient loss. A noisy image (x_n = x0 + sigma_n n1, A x_n if also masked) trains
only at sigma > sigma_n, with x_t = x_n + sqrt(sigma^2 - sigma_n^2) n: its target on the pixels the
network sees is x_n - sigma_n^2 / sqrt(sigma^2 - sigma_n^2) n, whose expectation given x_t is
E[x0 | x_t] (Tweedie's formula applied twice: the same minimiser as Ambient-o's loss on
sigma_n^2 / sigma^2 x_t + (1 - sigma_n^2 / sigma^2) D against x_n, which weighs by
sigma^4 / (sigma^2 - sigma_n^2)^2); on pixels B hid, x_n itself (its expectation given what the
network sees is x0's). So at every sigma each eligible image's target is unbiased for the clean
posterior mean, and any weight that depends only on sigma and the image's record keeps that
minimiser. The weights chosen:
- the mixture over sigma is Ambient-o's: draw sigma, then an image among those eligible at sigma.
  Here the image comes first (the loader's order), so its sigma is drawn from the distribution
  restricted to its eligible levels (mass P(sigma > bound)), and the loss is weighted by
  mass / (share of the data set's images eligible at sigma): in expectation exactly that mixture
  (at a level only the clean images reach, they carry all of its weight);
- a noisy image's weight falls off as sigma approaches sigma_n, as ((1 - a) / 0.5)^2 below
  1 - a = 0.5 (sigma < sqrt(2) sigma_n), a = sigma_n^2 / sigma^2: its target's extra noise variance,
  sigma_n^2 / (1 - a), would otherwise be unbounded there.
"""
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ambient_fast import kernels
from ambient_fast.objective.corruption import MaskOperator
from ambient_fast.data.loader import RawBatch
from ambient_fast.objective.seeds import Stream, bits24, centred_uniform, philox, stream_key

__all__ = ["TrainingBatch", "AmbientInputs", "training_batch", "FULL_WEIGHT_FROM"]

FULL_WEIGHT_FROM = 0.5  # a noisy image weighs fully where 1 - sigma_n^2 / sigma^2 >= this (module docstring)


class TrainingBatch(NamedTuple):
    """What one step's loss takes, on the device. Images float32 (N, C, H, W) unless noted."""

    net_input: Tensor  # (N, 2C, H, W) cat([A_hat * (y + sqrt(sigma^2 - sigma_n^2) n), A_hat])
    y: Tensor          # the target: A * y on [-1, 1], nothing outside A (noisy images: Tweedie's)
    A: Tensor          # the observation mask
    A_hat: Tensor      # B * A, what the network sees
    sigma: Tensor      # (N,) noise levels
    labels: Tensor     # (N, label_dim) one-hot conditioning (label_dim 0 without labels)
    weight: Tensor     # (N,) each image's weight beside the loss's own (module docstring); 1 in one-kind sets


class AmbientInputs:
    """The ambient input of one run (see the module docstring).

    Args:
        operator: the mask operator whose `further_draw` makes B.
        loss: the ambient loss, whose noise-level distribution sigma comes from (`sigma_above`).
        seed: the run's seed (the IMAGE and ELEMENT streams derive from it).
        shape: (C, R, R) of the data set's images; label_dim: its classes (0: none).
        channels_last: lay the outputs out channels_last.
        bounds: every image's lowest usable level, max(sigma_n, sigma_min) (`CorruptedDataset.
            sigma_bounds`), for the share of images eligible at a level; None: all 0.
        noise: whether the set holds noisy images (their Tweedie targets); False also trains
            noisy images as if clean (the naive baseline: their sigma_n ignored).
    """

    def __init__(self, operator: MaskOperator, loss, *, seed: int, shape: Tuple[int, int, int], label_dim: int = 0,
                 channels_last: bool = False, bounds: Optional[np.ndarray] = None, noise: bool = False):
        self.operator, self.loss, self.noise = operator, loss, bool(noise)
        self.shape, self.label_dim, self.channels_last = tuple(shape), int(label_dim), bool(channels_last)
        self.image_key = stream_key(seed, Stream.IMAGE)
        self.value_key = stream_key(seed, Stream.ELEMENT)
        self.bounds = None
        if bounds is not None and np.any(bounds > 0):
            self.bounds = torch.from_numpy(np.sort(np.asarray(bounds, np.float64)))
            never = int(np.sum(loss.tail(self.bounds).numpy() <= 0))
            if never:
                raise ValueError(f"{never} images have a noise level or sigma_min at or above the largest level the "
                                 "loss trains at: they could never be used; drop them or lower their records")

    def __call__(self, raw: RawBatch) -> TrainingBatch:
        N = raw.observed.shape[0]
        C, H, W = self.shape
        device = raw.observed.device
        words = philox(self.image_key, raw.position + torch.arange(N, dtype=torch.int64, device=device))
        sigma, weight, noise_std, tweedie = self.noise_levels(raw, centred_uniform(words[0]))
        kept = None
        if self.operator.reads_mask:  # where A's own box lies: channel 0 of A, mirrored as the image
            channel0 = kernels.unpack_mask(raw.mask_bits[:, : -(-H * W // 8)], (N, 1, H, W))
            kept = kernels.mirror(channel0, raw.flips)[:, 0] != 0
        further = self.operator.further_draw(kept, torch.stack([bits24(words[2]), bits24(words[3])], 1), (N, C, H, W))
        if raw.masked is not None:
            further = further.restricted_to(raw.masked != 0, (N, C, H, W))
        out = kernels.ambient_input(raw.observed, raw.mask_bits, raw.flips, noise_std, further, key=self.value_key,
                                    offset=raw.position * C * H * W, channels_last=self.channels_last,
                                    tweedie=tweedie)
        return TrainingBatch(out.net_input, out.y, out.A, out.A_hat, sigma, self.one_hot(raw.labels, N, device), weight)

    def noise_levels(self, raw: RawBatch, u: Tensor) -> "tuple[Tensor, Tensor, Tensor, Optional[Tensor]]":
        """(sigma, weight, the standard deviation of the noise to add, the Tweedie multiple or None), each
        (N,) float32, from the images' records and their uniforms u (module docstring)."""
        zeros = torch.zeros_like(u)
        sigma_n = raw.sigma_n.to(torch.float64) if self.noise and raw.sigma_n is not None else zeros
        sigma_min = raw.sigma_min.to(torch.float64) if raw.sigma_min is not None else zeros
        bound = torch.maximum(sigma_n, sigma_min)
        sigma, mass = self.loss.sigma_above(bound, u)
        # Strictly above the bound in float32 too: sigma^2 - sigma_n^2 stays positive.
        bound32 = bound.to(torch.float32)
        sigma = torch.maximum(sigma, torch.nextafter(bound32, torch.full_like(bound32, float("inf"))))
        if self.bounds is None:
            weight = torch.ones_like(sigma)
        else:
            if self.bounds.device != u.device:  # moved once, not every step
                self.bounds = self.bounds.to(u.device)
            share = torch.searchsorted(self.bounds, sigma.to(torch.float64)) / len(self.bounds)
            weight = (mass / share).to(torch.float32)
        if not self.noise:
            return sigma, weight, sigma, None
        variance = sigma.to(torch.float64) ** 2 - sigma_n ** 2
        kept_share = variance / sigma.to(torch.float64) ** 2  # 1 - sigma_n^2 / sigma^2
        weight = weight * ((kept_share / FULL_WEIGHT_FROM) ** 2).clamp(max=1).to(torch.float32)
        return sigma, weight, variance.sqrt().to(torch.float32), (sigma_n ** 2 / variance.sqrt()).to(torch.float32)

    def one_hot(self, labels: Optional[Tensor], count: int, device) -> Tensor:
        """(count, label_dim) float32 conditioning from class indices (or none)."""
        if labels is None or not self.label_dim:
            return torch.zeros((count, self.label_dim), device=device)
        return F.one_hot(labels, self.label_dim).to(torch.float32)

    def describe(self) -> str:
        """One line for the run's summary: which further corruption, where it is drawn, the records."""
        records = "" if self.bounds is None and not self.noise else \
            f", sigma above each image's noise level / sigma_min{' (Tweedie targets)' if self.noise else ''}"
        return f"B of {self.operator!r} where A hides something, drawn with the noise from the stored bytes in one pass{records}"


def training_batch(y: Tensor, A: Tensor, A_hat: Tensor, sigma: Tensor, noise: Tensor,
                   labels: Optional[Tensor] = None) -> TrainingBatch:
    """A TrainingBatch from images, masks and draws given as tensors (tests, benchmarks, the
    reference's host-side data path): y is masked by A, the network input made as the kernel makes
    it. y, A, A_hat, noise: float (N, C, H, W); sigma: (N,); labels: (N, label_dim) or None."""
    shapes = {tuple(t.shape) for t in (y, A, A_hat, noise)}
    if len(shapes) != 1 or y.ndim != 4:
        raise ValueError(f"y, A, A_hat and noise must share one (N, C, H, W) shape; got {sorted(shapes)}")
    y, A, A_hat = (t.to(torch.float32) for t in (y, A, A_hat))
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=y.device).reshape(-1).expand(len(y)).contiguous()
    y = A * y  # nothing outside A may reach the network or the loss
    net_input = kernels.network_input(y, A_hat, sigma, noise.to(torch.float32))
    if labels is None:
        labels = torch.zeros((len(y), 0), device=y.device)
    return TrainingBatch(net_input, y, A, A_hat, sigma, labels, torch.ones_like(sigma))
