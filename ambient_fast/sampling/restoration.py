"""Posterior restoration of many images: what `restore --method posterior` and the completion rounds
run (`ambient_fast.sampling.posterior` samples one batch).

- Where the measurements come from: a prepared data set (or an image folder with masks, imported as
  one) gives inpainting problems, y = A x with the stored mask A (`MaskedImages`); an array of
  measurements with an operator description gives any other known operator (`MeasuredArray`).
- An operator description is a small JSON object (`read_operator`): its `kind` and parameters,
  and optionally the measurements' `noise_level` (on the [-1, 1] scale):
    {"kind": "gaussian_cs", "m": 256, "seed": 0}          A with i.i.d. N(0, 1/m) entries, image i's
                                                          own from (seed, i) ("per_image": false:
                                                          one matrix from seed for every image)
    {"kind": "block_averaging", "factor": 4}              factor x factor block means, at full size
    {"kind": "blur", "kernel": [[...], ...]}              a known (k, k) kernel, k odd; or
    {"kind": "blur", "gaussian_sd": 1.0, "size": 5}       a normalised Gaussian one
    {"kind": "downsampling", "factor": 2}                 super-resolution: block means at 1/factor size
  `measure` makes such measurements of clean images (tests, benchmarks, simulations).
- `posterior_restorations` samples K restorations per image in batches of (image, k) items, item
  (i, k) drawn from the seed derive_seed(seed, i, k) alone (its latents and the prior's sampling
  mask: `PerSeedGenerators`), and the noise added to image i's measurement (`add_noise`) from
  (seed, i) alone: an image's restorations never depend on the batch it ran in. On the fast path
  every batch is padded to the same size (one static shape for CUDA graphs and compiled kernels).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ambient_fast.objective.seeds import derive_seed
from ambient_fast.options import POSTERIOR_METHODS
from ambient_fast.sampling.measurements import BlockAveraging, Blur, CompressedSensing, Downsampling, Inpainting, Measurement
from ambient_fast.sampling.posterior import DPS, AmbientMask, InverseProblem, PosteriorMethod, TweedieMoments, posterior_sample
from ambient_fast.sampling.samplers import PerSeedGenerators

__all__ = ["OPERATOR_KINDS", "read_operator", "check_operator", "operator_measurement", "measure", "MaskedImages",
           "MeasuredArray", "posterior_method", "PosteriorSettings", "posterior_restorations", "least_squares",
           "NOISE_STREAM"]

OPERATOR_KINDS = ("gaussian_cs", "block_averaging", "blur", "downsampling")
NOISE_STREAM = 1  # derive_seed(seed, NOISE_STREAM, i): image i's measurement noise; samples use (seed, i, k)


def _positive_int(description: dict, name: str) -> int:
    value = description.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"operator {description.get('kind')}: {name!r} must be a positive integer, got {value!r}")
    return value


def check_operator(description: dict) -> dict:
    """The description with its defaults filled in; ValueError naming what is wrong."""
    if not isinstance(description, dict) or description.get("kind") not in OPERATOR_KINDS:
        kind = description.get("kind") if isinstance(description, dict) else None
        raise ValueError(f"an operator description is a JSON object whose 'kind' is one of {', '.join(OPERATOR_KINDS)}, "
                         f"got kind {kind!r}")
    out = dict(description)
    noise = out.setdefault("noise_level", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"operator {out['kind']}: 'noise_level' must be a finite number >= 0, got {noise!r}")
    kind = out["kind"]
    if kind == "gaussian_cs":
        _positive_int(out, "m")
        seed = out.setdefault("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"operator gaussian_cs: 'seed' must be an integer >= 0, got {seed!r}")
        if not isinstance(out.setdefault("per_image", True), bool):
            raise ValueError(f"operator gaussian_cs: 'per_image' must be true or false, got {out['per_image']!r}")
    elif kind in ("block_averaging", "downsampling"):
        _positive_int(out, "factor")
    elif "kernel" in out:
        kernel = np.asarray(out["kernel"], dtype=np.float64)
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0 or not np.isfinite(kernel).all():
            raise ValueError("operator blur: 'kernel' must be a square list of lists of odd side, finite numbers")
    else:
        size = _positive_int(out, "size")
        sd = out.get("gaussian_sd")
        if size % 2 == 0 or isinstance(sd, bool) or not isinstance(sd, (int, float)) or not (math.isfinite(sd) and sd > 0):
            raise ValueError("operator blur: give 'kernel', or an odd 'size' and a 'gaussian_sd' > 0")
    return out


def read_operator(path) -> dict:
    """The checked operator description in the JSON file `path`."""
    try:
        description = json.loads(Path(path).read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): write the operator as e.g. "
                         '{"kind": "gaussian_cs", "m": 256, "seed": 0}') from None
    try:
        return check_operator(description)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _blur_kernel(description: dict) -> Tensor:
    if "kernel" in description:
        return torch.tensor(description["kernel"], dtype=torch.float64)
    radius = description["size"] // 2
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / description["gaussian_sd"]) ** 2)
    kernel = taps[:, None] * taps[None]
    return kernel / kernel.sum()


def operator_measurement(description: dict, image_shape: tuple, indices: Sequence[int], device=None,
                         dtype: torch.dtype = torch.float64) -> Measurement:
    """The measurement of the images `indices` (their own Gaussian CS matrices; the other kinds are
    the same for every image) for images of shape (C, H, W)."""
    kind, (C, H, W) = description["kind"], image_shape
    if kind in ("block_averaging", "downsampling") and (H % description["factor"] or W % description["factor"]):
        raise ValueError(f"operator {kind}: factor {description['factor']} must divide the image size {H}x{W}")
    if kind == "gaussian_cs":
        n, m = C * H * W, description["m"]
        seeds = [derive_seed(description["seed"], int(i)) for i in indices] if description["per_image"] else \
            [description["seed"]]
        matrices = torch.stack([torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                                for seed in seeds]) / math.sqrt(m)
        return CompressedSensing(matrices.to(device, dtype), image_shape)
    if kind == "block_averaging":
        return BlockAveraging(description["factor"])
    if kind == "blur":
        return Blur(_blur_kernel(description).to(device, dtype))
    return Downsampling(description["factor"])


def _measurement_noise(shape: tuple, indices: Sequence[int], seed: int, dtype: torch.dtype) -> Tensor:
    """Standard normal noise (len(indices), *shape), image i's from (seed, NOISE_STREAM, i) alone, drawn
    in float64 whatever `dtype` (float32 draws are other numbers, not a rounding of these)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, NOISE_STREAM, int(i))),
                                    dtype=torch.float64) for i in indices]).to(dtype)


def measure(description: dict, clean: Tensor, indices: Sequence[int], seed: int = 0) -> Tensor:
    """y = A x + noise_level * n of clean images (N, C, H, W) on [-1, 1], image j being image
    indices[j] of its set (its CS matrix and noise); the noise from (seed, i) as `MeasuredArray`
    adds it. float64 (N, *measured shape)."""
    description = check_operator(description)
    clean = clean.double()
    y = operator_measurement(description, tuple(clean.shape[1:]), indices).forward(clean)
    if description["noise_level"] > 0:
        y = y + description["noise_level"] * _measurement_noise(tuple(y.shape[1:]), indices, seed, y.dtype)
    return y


class MaskedImages:
    """Inpainting problems of a prepared data set: y = A x for the stored A, labels one-hot.
    `add_noise` > 0 adds noise of that level to the observed values first (image i's from
    (seed, i)), for simulating noisy measurements."""

    def __init__(self, dataset, add_noise: float = 0.0, seed: int = 0):
        self.dataset, self.add_noise, self.seed = dataset, add_noise, seed
        self.shape, self.count = tuple(dataset.shape), len(dataset)

    def measurements(self, indices: np.ndarray, device, dtype: torch.dtype) -> "tuple[Measurement, Tensor, Tensor]":
        from ambient_fast.files.images import from_uint8

        observed, mask, labels = self.dataset.get(indices)
        mask = torch.from_numpy(mask).to(device, dtype)
        y = from_uint8(torch.from_numpy(observed)).to(device, dtype) * mask
        if self.add_noise > 0:
            y = y + mask * self.add_noise * _measurement_noise(self.shape, indices, self.seed, dtype).to(device)
        return Inpainting(mask), y, torch.from_numpy(labels).to(device)


class MeasuredArray:
    """Measurements y (N, *measured shape) on the [-1, 1] scale of images of shape (C, H, W) under the
    operator `description` (no labels)."""

    def __init__(self, y: np.ndarray, description: dict, image_shape: tuple):
        self.description, self.shape, self.count = check_operator(description), tuple(image_shape), len(y)
        probe = operator_measurement(self.description, self.shape, [0]).forward(torch.zeros(1, *self.shape, dtype=torch.float64))
        if y.ndim < 2 or tuple(y.shape[1:]) != tuple(probe.shape[1:]) or not np.issubdtype(y.dtype, np.floating):
            raise ValueError(f"the measurements must be a float array (N, {', '.join(map(str, probe.shape[1:]))}) for "
                             f"{description['kind']} of {'x'.join(map(str, self.shape))} images, got {y.dtype} {y.shape}")
        if not np.isfinite(y).all():
            raise ValueError("the measurements hold NaN or infinite values")
        self.y = y

    def measurements(self, indices: np.ndarray, device, dtype: torch.dtype) -> "tuple[Measurement, Tensor, None]":
        measurement = operator_measurement(self.description, self.shape, indices, device, dtype)
        return measurement, torch.from_numpy(np.asarray(self.y[indices])).to(device, dtype), None


def posterior_method(name: str, *, cg_iterations: int = 8, dps_scale: float = 0.1, sigma_floor: float = 0.002
                     ) -> PosteriorMethod:
    """The posterior method of a command's `--posterior` choice (ambient_fast.options.POSTERIOR_METHODS)."""
    if name not in POSTERIOR_METHODS:
        raise ValueError(f"posterior method must be one of {POSTERIOR_METHODS}, got {name!r}")
    if name == "ambient":
        return AmbientMask(sigma_floor=sigma_floor)
    if name == "tweedie":
        return TweedieMoments(cg_iterations=cg_iterations)
    return DPS(dps_scale)


@dataclass(frozen=True)
class PosteriorSettings:
    """How each item is sampled: `posterior_sample`'s arguments, the prior's sampling mask (dust
    keeping a pixel with probability `survival`, per pixel when `shared_channels`) and the
    measurements' noise level."""

    method: PosteriorMethod
    noise_level: float
    survival: float
    shared_channels: bool
    num_steps: int = 18
    solver: str = "heun"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    fast: bool = False
    dtype: torch.dtype = torch.float64


def posterior_restorations(model: torch.nn.Module, source, indices: Sequence[int], *, samples: int, seed: int,
                           batch: int, settings: PosteriorSettings, device) -> Iterator["tuple[int, Tensor]"]:
    """(i, restorations (samples, C, H, W) float32 on the CPU, on [-1, 1]) for each image i of
    `indices`, in order, as soon as its samples are drawn. `source`: MaskedImages or MeasuredArray."""
    items = [(int(i), k) for i in indices for k in range(samples)]
    dtype = torch.float32 if settings.fast else settings.dtype
    pending: dict = {}
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        padded = chunk + [chunk[-1]] * ((batch - len(chunk)) if settings.fast else 0)
        images = np.array([i for i, _ in padded])
        measurement, y, labels = source.measurements(images, device, dtype)
        generators = PerSeedGenerators([derive_seed(seed, i, k) for i, k in padded])
        latents, masks = generators.sampling_inputs(source.shape, 1, settings.survival, settings.shared_channels, device)
        out = posterior_sample(model, latents, InverseProblem(measurement, y, settings.noise_level),
                               method=settings.method, mask=masks[0],
                               class_labels=labels if getattr(model, "label_dim", 0) else None,
                               num_steps=settings.num_steps, sigma_min=settings.sigma_min,
                               sigma_max=settings.sigma_max, solver=settings.solver, dtype=dtype, fast=settings.fast)
        out = out[:len(chunk)].float().cpu()
        for (i, _), image in zip(chunk, out):
            pending.setdefault(i, []).append(image)
            if len(pending[i]) == samples:
                yield i, torch.stack(pending.pop(i))


def least_squares(measurement: Measurement, y: Tensor, iterations: int = 30) -> Tensor:
    """The minimum-norm least-squares image A^T (A A^T)^-1 y, by a fixed number of conjugate-gradient
    iterations (which also regularise an ill-conditioned A, e.g. a blur): what the measurement says
    without a prior, shown beside the restorations and scored as the baseline."""
    from ambient_fast.sampling.posterior import conjugate_gradient

    return measurement.adjoint(conjugate_gradient(lambda u: measurement.forward(measurement.adjoint(u)), y, iterations))
