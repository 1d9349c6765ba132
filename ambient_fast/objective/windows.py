"""Noise-level windows: each image trains only at levels sigma inside its own window (low, high), with the
mixture over images kept unbiased. Ambient-o (Daras et al. 2025) gives a low-quality image a lower bound
(it trains only where noise hides its flaws: sigma above its sigma_min, or above its own noise level)
and a crop or partial view an upper bound (it trains only where the denoiser looks no further than the
crop: sigma below its sigma_max). An image without bounds has the window (0, inf).

The draw. The image comes first (the loader's order), then its level: from the loss's noise-level
distribution p restricted to the window, by the inverse of the tail function T(s) = P(level > s): with
u uniform on (0, 1), sigma = T^-1(T(high) + u (T(low) - T(high))), whose distribution is
p(sigma) 1[low < sigma < high] / m with m = T(low) - T(high), the window's mass. Tails rather than
distribution functions keep the precision where a window leaves little mass at high levels (as
`NoiseSchedule.sigma_above`, the special case high = inf).

Why the weights keep the mixture unbiased. Ambient-o's objective is "draw sigma from p, then an image
among those eligible at sigma": at every level, a uniform mixture of the eligible images, each trained
towards the same clean posterior mean (a clean image directly; a noisy one through its Tweedie target;
a crop at levels where its missing context does not matter). The loader draws the image first, uniformly
among N, so the pair (image i, sigma) has density (1 / N) p(sigma) 1[sigma in W_i] / m_i. Weighting the
loss by m_i / share(sigma), with

    share(sigma) = #(images with low_j < sigma < high_j) / N,

the share of the data set eligible at sigma, turns that density into p(sigma) 1[sigma in W_i] /
#eligible(sigma): exactly "draw sigma, then one of the eligible images uniformly". With lower bounds
only the share is #(low_j < sigma) / N (`AmbientObjective`'s weight today); with windows an image also
leaves the share above its high. At a level no image reaches (outside every window) nothing trains: the
effective distribution of levels is p restricted to the union of the windows, which covers everything
whenever one image has no bounds. The weight depends on sigma and the image's own window only, so each
image's target at each level, and hence the minimiser, is unchanged.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["draw_in_window", "NoiseWindows"]


def draw_in_window(loss, low: Tensor, high: Tensor, u: Tensor) -> "tuple[Tensor, Tensor]":
    """(sigma float32 (N,), mass float64 (N,)): a level of `loss`'s distribution restricted to the window
    (low, high) of each image, drawn by the inverse tail at u, and the window's mass T(low) - T(high).

    Args:
        loss: a noise schedule (`tail`, `upper_quantile`: `ambient_fast.objective.objective.NoiseSchedule`).
        low, high: (N,) bounds, 0 and inf for none.
        u: (N,) uniforms in (0, 1).
    The level lies strictly inside the window in float32 too (then sigma^2 - sigma_n^2 > 0 for a noisy
    image whose low is its noise level)."""
    low64, high64 = low.to(torch.float64), high.to(torch.float64)
    tail_low, tail_high = loss.tail(low64), loss.tail(high64)
    mass = tail_low - tail_high
    sigma = loss.upper_quantile(tail_high + mass * (1 - u.to(torch.float64))).to(torch.float32)
    low32, high32 = low.to(torch.float32), high.to(torch.float32)
    sigma = torch.maximum(sigma, torch.nextafter(low32, torch.full_like(low32, float("inf"))))
    sigma = torch.minimum(sigma, torch.nextafter(high32, torch.zeros_like(high32)))
    return sigma, mass


class NoiseWindows:
    """The windows of a data set's images for one loss: draws levels and the weights that keep the mixture
    unbiased (module docstring).

    Args:
        loss: the ambient loss whose distribution the levels follow.
        low, high: (N,) every image's window (`CorruptedDataset.sigma_bounds()` / `sigma_max()`).
    Raises ValueError when an image's window is empty or holds no mass of the distribution (it could
    never train).
    """

    def __init__(self, loss, low: np.ndarray, high: np.ndarray):
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        if low.shape != high.shape or low.ndim != 1 or not len(low):
            raise ValueError(f"need one window per image: low and high of one shape (N,), got {low.shape} and {high.shape}")
        if np.isnan(low).any() or np.isnan(high).any() or (low < 0).any():
            raise ValueError("window bounds must be numbers with low >= 0")
        mass = (loss.tail(torch.from_numpy(low)) - loss.tail(torch.from_numpy(high))).numpy()
        never = int(np.count_nonzero(~(mass > 0)))
        if never:
            raise ValueError(f"{never} images have a noise-level window the loss never draws from (empty, or beyond "
                             "the levels it trains at): they could never be used; drop them or widen their windows")
        self.loss = loss
        self.lows = torch.from_numpy(np.sort(low))
        self.highs = torch.from_numpy(np.sort(high))

    def __len__(self) -> int:
        return len(self.lows)

    def share(self, sigma: Tensor) -> Tensor:
        """float64 (N,): the share of the data set's images whose window holds each sigma,
        #(low < sigma) - #(high <= sigma) over the count (a high <= sigma implies a low < sigma)."""
        if self.lows.device != sigma.device:  # moved once, not every step
            self.lows, self.highs = self.lows.to(sigma.device), self.highs.to(sigma.device)
        sigma = sigma.to(torch.float64)
        inside = torch.searchsorted(self.lows, sigma, side="left") - torch.searchsorted(self.highs, sigma, side="right")
        return inside.to(torch.float64) / len(self)

    def draw(self, low: Tensor, high: Tensor, u: Tensor) -> "tuple[Tensor, Tensor]":
        """(sigma float32 (N,), weight float32 (N,)) for images with windows (low, high) (N,) at uniforms u:
        the level from the restricted distribution and the weight mass / share(sigma)."""
        sigma, mass = draw_in_window(self.loss, low, high, u)
        return sigma, (mass / self.share(sigma)).to(torch.float32)
