"""The built-in synthetic data set: a distribution known exactly, small enough to learn on a CPU.

Each image (3 x R x R, R = 16 or 32) is one axis-aligned rectangle on a background:
- background: black or, with probability 1/2, a vertical gradient from gradient[0] (top row) to
  gradient[1] (bottom row), both dark;
- rectangle: colour uniform over `palette` (6 saturated colours); height and width uniform
  integers in [R/4, 3R/4]; top-left corner uniform among the positions where it fits.

Because every pixel of a clean image is a palette colour, black or a gradient colour,
`palette_fraction` (the share of pixels near one of those) is 1 on clean images and is a cheap,
distribution-specific quality score for samples. `synthetic_dataset` prepares the corrupted set
(the only thing training reads) and keeps a clean twin beside it, outside the data set, for
evaluation only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from ambient_fast.files.atomic import write_npy
from ambient_fast.objective.corruption import make_operator
from ambient_fast.data.format import CorruptedDataset, DataError, corruption_record, write_dataset

__all__ = ["palette", "gradient", "RESOLUTIONS", "ATTRIBUTES", "attribute_classes", "clean_images", "labelled_images", "palette_fraction",
           "synthetic_dataset", "dataset_name", "clean_twin", "is_synthetic"]

# Read-only: the distribution is defined by these.
palette = np.array([
    [230, 40, 40],    # red
    [40, 200, 60],    # green
    [50, 90, 235],    # blue
    [240, 210, 40],   # yellow
    [215, 50, 205],   # magenta
    [40, 205, 215],   # cyan
], dtype=np.uint8)
gradient = np.array([[10, 20, 70], [60, 10, 40]], dtype=np.uint8)  # (top row, bottom row) RGB, both dark
RESOLUTIONS = (16, 32)
HELD_OUT_STREAM = 1  # clean_images draws stream 0 of a seed; the held-out twin draws stream 1
SOURCE = "ambient_fast.data.synthetic"  # how meta.json's `source` of a synthetic set begins
# What decides an image, each an integer from 0: the rectangle's colour (palette index), the
# background (1: gradient), the rectangle's height and width (minus R/4) and its top-left corner.
ATTRIBUTES = ("colour", "background", "height", "width", "top", "left")


def attribute_classes(resolution: int) -> "dict[str, int]":
    """How many values each of ATTRIBUTES takes at this resolution."""
    sizes = (3 * resolution) // 4 - resolution // 4 + 1
    return dict(colour=len(palette), background=2, height=sizes, width=sizes, top=resolution - resolution // 4 + 1,
                left=resolution - resolution // 4 + 1)


def _draw(n: int, resolution: int, rng: np.random.Generator) -> "tuple[np.ndarray, dict[str, np.ndarray]]":
    """n images uint8 (n, 3, R, R) from `rng`, and their ATTRIBUTES (each int64 (n,))."""
    R = resolution
    t = np.linspace(0.0, 1.0, R)[:, None]
    rows_colour = np.round((1 - t) * gradient[0] + t * gradient[1]).astype(np.uint8)   # (R, 3)
    use_gradient = rng.random(n) < 0.5
    images = np.zeros((n, R, R, 3), np.uint8)
    images[use_gradient] = rows_colour[None, :, None, :]
    low, high = R // 4, (3 * R) // 4
    height, width = rng.integers(low, high + 1, n), rng.integers(low, high + 1, n)
    top, left = rng.integers(0, R - height + 1), rng.integers(0, R - width + 1)
    rows, cols = np.arange(R), np.arange(R)
    colour_index = rng.integers(0, len(palette), n)
    inside_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])      # (n, R)
    inside_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    inside = inside_rows[:, :, None] & inside_cols[:, None, :]                   # (n, R, R)
    images = np.where(inside[..., None], palette[colour_index][:, None, None, :], images)
    attributes = dict(colour=colour_index, background=use_gradient.astype(np.int64), height=height - low,
                      width=width - low, top=top, left=left)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), attributes


def _check(n: int, resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"synthetic resolution must be one of {RESOLUTIONS}, got {resolution}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")


def clean_images(n: int, resolution: int = 16, seed: int = 0) -> np.ndarray:
    """n clean images, uint8 (n, 3, R, R); the same (n, resolution, seed) give the same images."""
    return labelled_images(n, resolution, seed)[0]


def labelled_images(n: int, resolution: int = 16, seed: int = 0, stream: int = 0
                    ) -> "tuple[np.ndarray, dict[str, np.ndarray]]":
    """n clean images uint8 (n, 3, R, R) and their ATTRIBUTES: stream 0 gives `clean_images`'s,
    stream 1 the held-out twin's, others new images (e.g. to train a classifier on)."""
    _check(n, resolution)
    return _draw(n, resolution, np.random.default_rng([seed, stream]))


def _held_out(n: int, resolution: int, seed: int) -> np.ndarray:
    """Clean images independent of clean_images(n, resolution, seed) (another random stream)."""
    return labelled_images(n, resolution, seed, HELD_OUT_STREAM)[0]


def palette_fraction(images: np.ndarray, tolerance: float = 24.0) -> float:
    """Fraction of pixels of uint8 (N, 3, H, W) images whose colour lies within `tolerance`
    (Euclidean, in 0..255 units) of a palette colour, black or the background gradient (the
    segment between its two colours: resolution-independent)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {images.shape}")
    pixels = images.transpose(0, 2, 3, 1).reshape(-1, 1, 3).astype(np.float32)
    points = np.concatenate([palette, np.zeros((1, 3), np.uint8)]).astype(np.float32)
    near_point = (np.linalg.norm(pixels - points[None], axis=2) <= tolerance).any(axis=1)
    start, direction = gradient[0].astype(np.float32), gradient[1].astype(np.float32) - gradient[0]
    t = np.clip(((pixels[:, 0] - start) @ direction) / (direction @ direction), 0, 1)
    near_gradient = np.linalg.norm(pixels[:, 0] - (start + t[:, None] * direction), axis=1) <= tolerance
    return float((near_point | near_gradient).mean())


def dataset_name(*, resolution: int, n: int, p: float, delta: float, shared_channels: bool, seed: int) -> str:
    """Folder name that keys a prepared synthetic set by all of its parameters."""
    channels = "shared" if shared_channels else "per-channel"
    return f"synthetic-r{resolution}-n{n}-p{p:g}-delta{delta:g}-{channels}-seed{seed}"


def clean_twin(path: Union[str, Path]) -> Path:
    """The folder beside the synthetic data set at `path` holding its clean images
    (images.npy) and held-out clean images (held_out.npy)."""
    path = Path(path)
    return path.with_name(f"{path.name}-clean")


def is_synthetic(dataset: CorruptedDataset) -> bool:
    """True when `dataset` was prepared by `synthetic_dataset` (so it has a clean twin)."""
    return dataset.meta.source.startswith(SOURCE)


def _matches(path: Path, corruption: dict, n: int, resolution: int) -> bool:
    """True when `path` is an intact data set with these parameters."""
    try:
        dataset = CorruptedDataset(path)
    except DataError:
        return False
    return dataset.corruption == corruption and len(dataset) == n and dataset.resolution == resolution


def synthetic_dataset(root: Union[str, Path], *, resolution: int = 16, n: int = 4096, p: float = 0.8,
                      delta: float = 0.1, shared_channels: bool = True, seed: int = 0) -> Path:
    """Prepare (once) the corrupted synthetic data set under `root` and return its path.

    root/<name>/           the data set (ambient_fast.data.format): dust masks with erasure
                           probability p drawn from torch.Generator(seed); delta recorded as
                           the training default
    root/<name>-clean/     images.npy (the same images, clean) and held_out.npy (n other
                           images): for evaluation only, never read by training

    <name> is `dataset_name(...)`: a set that exists with the same parameters is reused as is.
    """
    _check(n, resolution)
    operator = make_operator("dust", p=p, delta=delta, shared_channels=shared_channels)
    corruption = corruption_record(operator)
    root = Path(root)
    name = dataset_name(resolution=resolution, n=n, p=p, delta=delta, shared_channels=shared_channels, seed=seed)
    path = root / name
    clean_dir = clean_twin(path)
    for file, make in (("images.npy", lambda: clean_images(n, resolution, seed)),
                       ("held_out.npy", lambda: _held_out(n, resolution, seed))):
        if not (clean_dir / file).is_file():
            write_npy(clean_dir / file, make())
    if not _matches(path, corruption, n, resolution):
        images = clean_images(n, resolution, seed)
        _, A = operator.corrupt(torch.zeros(images.shape), torch.Generator().manual_seed(seed))
        masks = A.numpy() != 0
        write_dataset(path, images * masks, masks, corruption,
                      source=f"{SOURCE} ({n} images {resolution}x{resolution}, seed {seed})",
                      overwrite=path.exists())
    return path
