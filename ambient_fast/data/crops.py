"""Crops with an upper noise level (Ambient-o, Daras et al. 2025: locality).

The argument. At low noise a denoiser's output at a pixel depends on a small neighbourhood of it only:
the noise hides little, so the pixel's surroundings settle it, and the neighbourhood that matters (the
denoiser's effective receptive field) grows with the noise level. A crop of side c therefore carries
everything the denoiser needs at the levels where that neighbourhood fits inside c, whatever the rest
of its image was: an image that is poor or out of distribution as a whole can still supply good crops,
each trained only below the level sigma_max(c) where the receptive field outgrows it.

The numbers. Ambient-o's ImageNet-512 runs (EDM2 on 64x64 SD-VAE latents, sigma_data 0.5; its
`latent-diffusion/training/training_loop.py`) give crops of side 4, 8, 16 and 32 latent pixels the
upper levels 0.1, 0.175, 0.2 and 1.0, and the whole 64-pixel image none. We use those numbers by the
crop's fraction of the image's side (1/16, 1/8, 1/4, 1/2, 1), taking the entry of the largest tabulated
fraction that the crop reaches (a crop between two sizes gets the smaller crop's bound: never more
than measured). Two assumptions transfer them: that the receptive field scales with the image (images
of whole scenes at another resolution), and that our pixel values (on [-1, 1], standard deviation
about 0.5) sit on the same noise scale as EDM2's latents (standardised to 0.5). Crops smaller than 1/16
of the side have no measured bound and are refused.

Storing a crop. `crop_examples` places each crop at its own position in an otherwise unobserved image
of the data set's resolution (a mask that is 1 on the crop only), so a pixel set stores it as any
masked image, graded only on the crop, with its sigma_max beside it (sigma_max.npy). Latent sets hold
no masks (`ambient_fast.data.latents`); there a whole image carries a sigma_max instead.
"""
from __future__ import annotations

import math

import numpy as np

from ambient_fast.data.format import DataError

__all__ = ["CROP_SIGMA_MAX", "crop_sigma_max", "cut_crops", "crop_examples"]

# Ambient-o's ImageNet-512 (64x64 latents): crop side / image side -> the highest level it trains at.
CROP_SIGMA_MAX = {1 / 16: 0.1, 1 / 8: 0.175, 1 / 4: 0.2, 1 / 2: 1.0, 1: math.inf}


def crop_sigma_max(crop: int, resolution: int) -> float:
    """The highest noise level a crop of side `crop` of an image of side `resolution` trains at (module
    docstring): the bound of the largest tabulated fraction of the side that the crop reaches."""
    if not 0 < crop <= resolution:
        raise DataError(f"a crop's side must lie in 1..{resolution} (the image's side), got {crop}")
    reached = [fraction for fraction in CROP_SIGMA_MAX if crop >= fraction * resolution - 1e-9]
    if not reached:
        raise DataError(f"crops of {crop} pixels are under 1/16 of the {resolution}-pixel side, the smallest Ambient-o "
                        f"measured a noise bound for; use crops of at least {math.ceil(resolution / 16)} pixels")
    return CROP_SIGMA_MAX[max(reached)]


def cut_crops(image: np.ndarray, crop: int, stride: int = 0) -> "tuple[np.ndarray, np.ndarray]":
    """The crops of side `crop` of `image` (C, H, W) on a grid of step `stride` (default `crop`: the tiling
    Ambient-o annotates), those that fit whole. Returns (crops (K, C, crop, crop), corners (K, 2) of
    (top, left)), row by row."""
    stride = stride or crop
    _, height, width = image.shape
    if not 0 < crop <= min(height, width) or stride < 1:
        raise DataError(f"cannot cut crops of {crop} pixels with step {stride} from a {height}x{width} image")
    corners = np.array([(top, left) for top in range(0, height - crop + 1, stride)
                        for left in range(0, width - crop + 1, stride)], np.int64)
    crops = np.stack([image[:, top:top + crop, left:left + crop] for top, left in corners])
    return crops, corners


def crop_examples(image: np.ndarray, crop: int, stride: int = 0) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """Training examples of the crops of a square image (C, R, R): each crop in place, the rest unobserved.

    Returns (observed (K, C, R, R) with the crop's values and 0 elsewhere, masks bool (K, C, R, R) true on
    the crop, sigma_max float32 (K,) = crop_sigma_max(crop, R)): what `DatasetWriter.append` takes as
    observed, masks and sigma_max."""
    channels, height, width = image.shape
    if height != width:
        raise DataError(f"images must be square, got {height}x{width}")
    sigma_max = crop_sigma_max(crop, height)
    crops, corners = cut_crops(image, crop, stride)
    observed = np.zeros((len(crops), channels, height, width), image.dtype)
    masks = np.zeros(observed.shape, bool)
    for k, (top, left) in enumerate(corners):
        observed[k, :, top:top + crop, left:left + crop] = crops[k]
        masks[k, :, top:top + crop, left:left + crop] = True
    return observed, masks, np.full(len(crops), sigma_max, np.float32)
