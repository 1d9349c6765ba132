"""Sample-quality and memorisation metrics: Fréchet distance (FID with Inception features),
precision and recall of k-nearest-neighbour manifolds (Kynkäänniemi et al. 2019), nearest-neighbour
similarity to the training set (the paper's memorisation study, Figure 6), PSNR and SSIM.

Everything takes uint8 image arrays (N, C, H, W) or (N, D) feature arrays and returns numpy.
Statistics are computed in float64. Nothing here needs scipy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ambient_fast.evaluation.inception import FEATURES, RESOLUTION, load_inception_weights

__all__ = ["frechet_distance", "precision_recall", "pixel_features", "InceptionFeatures", "nearest_neighbour_similarity",
           "cosine_nearest_neighbour", "psnr", "ssim"]


def _check_images(images: np.ndarray, name: str = "images") -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        described = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{name} must be a uint8 array (N, C, H, W), got {described}")


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a feature array (N, D), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} holds non-finite values")
    return features


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are
    Inception pool3 features).

    Args:
        features_a: (N, D), N >= 2.
        features_b: (M, D), M >= 2.
    Returns:
        ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), means and (N - 1)-normalised
        covariances in float64.

    (S_a S_b)^(1/2) is not symmetric, but its trace is the sum of the square roots of the
    eigenvalues of the symmetric positive semi-definite sqrt(S_a) S_b sqrt(S_a) (the same
    spectrum): two symmetric eigen-decompositions, no general matrix square root. Eigenvalues
    that rounding pushes below zero are set to 0, which makes singular covariances (D > N) safe.
    """
    a, b = _check_features(features_a, "features_a"), _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {a.shape[1]} and {b.shape[1]}; "
                         "extract both with the same feature extractor")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    # np.cov of one column is 0-d
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    values, vectors = np.linalg.eigh(cov_a)
    root = np.sqrt(np.clip(values, 0, None))
    # sqrt(S_a) S_b sqrt(S_a) = V diag(root) (V^T S_b V) diag(root) V^T: the outer V does not
    # change the eigenvalues, so it is left out.
    inner = root[:, None] * (vectors.T @ cov_b @ vectors) * root[None, :]
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    # The true value is >= 0; rounding can leave it a hair below for identical sets.
    return float(max(distance, 0.0))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, floored at 0 (rounding of the expansion)."""
    return np.maximum((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T, 0)


def _manifold_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Each point's squared distance to its k-th nearest other point of the same set."""
    radii = np.empty(len(features))
    for start in range(0, len(features), batch_size):
        block = _squared_distances(features[start:start + batch_size], features)
        # Column k of the sorted row: column 0 is the point itself (distance 0).
        radii[start:start + len(block)] = np.partition(block, k, axis=1)[:, k]
    return radii


def _covered(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> np.ndarray:
    """Whether each query lies in some centre's ball (squared radius `radii`)."""
    inside = np.zeros(len(queries), bool)
    for start in range(0, len(queries), batch_size):
        inside[start:start + batch_size] = (_squared_distances(queries[start:start + batch_size], centres)
                                            <= radii[None]).any(1)
    return inside


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3, batch_size: int = 1024) -> "tuple[float, float]":
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of
    balls around its points, each reaching its k-th nearest neighbour in the set. Precision: the
    share of generated points inside the real manifold (are the samples realistic?); recall: the
    share of real points inside the generated manifold (is the distribution covered?).

    Args:
        real: (N, D) features of real images; generated: (M, D); both need more than k points.
        k: the neighbour that sets each ball's radius (3, the paper's).
    Returns:
        (precision, recall), each in [0, 1].
    """
    real, generated = _check_features(real, "real"), _check_features(generated, "generated")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {real.shape[1]} and {generated.shape[1]}")
    if k < 1 or min(len(real), len(generated)) <= k:
        raise ValueError(f"k must be >= 1 and each set must hold more than k = {k} points, got "
                         f"{len(real)} and {len(generated)}")
    precision = _covered(generated, real, _manifold_radii(real, k, batch_size), batch_size).mean()
    recall = _covered(real, generated, _manifold_radii(generated, k, batch_size), batch_size).mean()
    return float(precision), float(recall)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) -> float64 (N, C*H*W) in [-1, 1]."""
    _check_images(images)
    return images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1


class InceptionFeatures:
    """The FID Inception-v3's pool3 features: uint8 (N, 3, H, W) (or (N, 1, H, W), repeated to
    three channels as EDM's FID does) -> float64 (N, 2048).

    Images are scaled to [0, 1], resized to 299x299 bilinearly (no antialiasing), then mapped to
    [-1, 1]: pytorch-fid's order of operations, which its published FIDs depend on.

    Args:
        weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a .safetensors copy
            (ambient_fast.evaluation.inception.load_inception_weights); never downloaded.
        device: where the network runs.
        batch_size: images per forward pass.
    """

    def __init__(self, weights: Union[str, Path], device="cpu", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.network = load_inception_weights(weights).to(self.device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need RGB or greyscale images (N, 3 or 1, H, W), got {images.shape}")
        out = np.empty((len(images), FEATURES), np.float64)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.from_numpy(images[start:start + self.batch_size]).to(self.device)
                x = batch.float().expand(-1, 3, -1, -1) / 255
                x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
                out[start:start + len(batch)] = self.network(2 * x - 1).double().cpu().numpy()
        return out


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (cosine similarity 0 to everything)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1)


def cosine_nearest_neighbour(queries: np.ndarray, keys: np.ndarray, batch_size: int = 1024):
    """For each query, the largest cosine similarity to any key and that key's index.

    Args:
        queries: (N, D) features. keys: (M, D) features, M >= 1.
        batch_size: queries and keys are compared in (batch_size x batch_size) blocks, so the
            N x M similarity matrix is never held at once.
    Returns:
        (similarity float64 (N,), index int64 (N,)); ties go to the lowest index. A zero feature
        vector has similarity 0 to everything.
    """
    queries, keys = _check_features(queries, "queries"), _check_features(keys, "keys")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys differ in dimension: {queries.shape[1]} and {keys.shape[1]}")
    if len(keys) == 0:
        raise ValueError("no keys (training images) to compare with")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    queries, keys = _unit_rows(queries), _unit_rows(keys)
    best = np.full(len(queries), -np.inf)
    index = np.zeros(len(queries), np.int64)
    for q in range(0, len(queries), batch_size):
        block_best, block_index = best[q:q + batch_size], index[q:q + batch_size]  # views: updated in place
        for k in range(0, len(keys), batch_size):
            similarity = queries[q:q + batch_size] @ keys[k:k + batch_size].T
            column = similarity.argmax(1)
            value = similarity[np.arange(len(similarity)), column]
            better = value > block_best  # strict: an equal value in a later block keeps the lower index
            block_best[better], block_index[better] = value[better], column[better] + k
    return best, index


def nearest_neighbour_similarity(samples: np.ndarray, training: np.ndarray,
                                 features: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                                 batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 cosine similarity of each sample to the training set: memorisation shows as samples
    with similarity near 1 (the paper's Figure 6, after Somepalli et al., uses DINOv2 features;
    pass any extractor as `features`).

    Args:
        samples: uint8 (N, C, H, W). training: uint8 (M, C, H, W).
        features: callable uint8 (n, C, H, W) -> (n, D), e.g. InceptionFeatures; None = pixels,
            each image's mean subtracted (the similarity is then the correlation of the pixels,
            blind to overall brightness; a constant image has similarity 0 to everything).
        batch_size: block size of the comparison (cosine_nearest_neighbour).
    Returns:
        (similarity float64 (N,), index int64 (N,) of the nearest training image).

    The training features are held in memory (M x D float64).
    """
    _check_images(samples, "samples")
    _check_images(training, "training")
    if samples.shape[1:] != training.shape[1:]:
        raise ValueError(f"samples are {samples.shape[1:]} images, training {training.shape[1:]}; "
                         "compare images of one shape (C, H, W)")
    if features is None:
        def features(images):
            x = pixel_features(images)
            return x - x.mean(1, keepdims=True)
    return cosine_nearest_neighbour(features(samples), features(training), batch_size)


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 arrays of equal shape (N, ...). The mean squared error is
    floored at 1e-10, so identical images give about 148 dB rather than infinity."""
    if images.shape != references.shape or images.dtype != np.uint8 or references.dtype != np.uint8:
        raise ValueError(f"psnr compares uint8 arrays of one shape, got {images.dtype} {images.shape} and "
                         f"{references.dtype} {references.shape}")
    diff = images.astype(np.float64) - references.astype(np.float64)
    mse = np.maximum((diff ** 2).reshape(len(images), -1).mean(1), 1e-10)
    return 10 * np.log10(255.0 ** 2 / mse)


SSIM_SIGMA, SSIM_RADIUS = 1.5, 5    # Wang et al. 2004's Gaussian window: sd 1.5, 11 x 11
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_window() -> np.ndarray:
    taps = np.exp(-0.5 * (np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1) / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _window_means(x: np.ndarray) -> np.ndarray:
    """Gaussian-weighted means of every full 11 x 11 window of (..., H, W): (..., H - 10, W - 10)."""
    taps, size = _gaussian_window(), 2 * SSIM_RADIUS + 1
    rows = sum(taps[i] * x[..., i:x.shape[-2] - size + 1 + i, :] for i in range(size))
    return sum(taps[j] * rows[..., j:x.shape[-1] - size + 1 + j] for j in range(size))


def ssim(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per-image structural similarity (Wang et al. 2004) of uint8 (N, C, H, W) arrays, H and W at
    least 11: the SSIM map of each channel from Gaussian-weighted local means, variances and
    covariance (window sd 1.5, 11 x 11; K1 0.01, K2 0.03; dynamic range 255), averaged over the
    windows that lie inside the image and then over channels. The same number as scikit-image's
    `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255, channel_axis=...)`, whose average leaves out the border windows too."""
    if images.shape != references.shape or images.dtype != np.uint8 or references.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"ssim compares uint8 arrays (N, C, H, W) of one shape, got {images.dtype} {images.shape} "
                         f"and {references.dtype} {references.shape}")
    if min(images.shape[2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1} pixels, got "
                         f"{images.shape[2]}x{images.shape[3]}")
    x, y = images.astype(np.float64), references.astype(np.float64)
    mean_x, mean_y = _window_means(x), _window_means(y)
    var_x = _window_means(x * x) - mean_x ** 2
    var_y = _window_means(y * y) - mean_y ** 2
    cov = _window_means(x * y) - mean_x * mean_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean(axis=(1, 2, 3))
