"""Finding each poor image's sigma_min (Ambient-o, Daras et al. 2025): the lowest noise level at which it
can no longer be told from a clean image.

Why that level. Noise of level sigma hides a degradation's traces (blur and compression remove high
frequencies, whose power natural images already hold little of): above some level a noisy poor image
and a noisy clean one have (almost) the same distribution, and the poor image trains there as if clean.
Below it the poor image would teach its flaws. The level differs per image (a flat image loses little
to blur), so each image gets its own, measured rather than assumed.

Design.
1. A small classifier c(x_t, sigma) -> logit that x_t is a clean image's noisy version, trained on
   balanced batches of clean and poor images (half each), each noised at a level drawn log-uniformly
   over the annotation range, with binary cross-entropy. Degradations such as blur and compression show
   as missing power in some frequency bands, and noise of a known level adds a known power to every
   band, so the classifier measures band energies: a bank of 3x3 filters at three scales (the image,
   then 2x2 averages of it, twice), each filter's mean squared response over the image (on EDM's
   c_in-scaled input x_t / sqrt(sigma^2 + sigma_data^2)), their logarithms and ln(sigma) / 4 into a small
   MLP. (A plain three-layer CNN of the same size, tried first, learnt far more slowly on the test's
   images and left its probabilities biased at high noise.)
2. For each poor image, on a grid of levels (ascending), the classifier's mean probability of "clean"
   over `trials` independent noise draws. Where the classes cannot be told apart a balanced classifier
   answers 1/2; it answers near 0 for a poor image it can tell. Ambient-o's rule: the image cannot be
   told apart where the probability is at least tau = 0.45 (its 1/2 - epsilon, epsilon = 0.05). A small
   classifier trained briefly is not that well calibrated (we measured it answering between 0.46 and
   0.58 for clean and poor alike at high noise, where nothing can tell them apart), so the threshold is
   taken relative to the clean images' own median probability at the same level, m(sigma): the poor
   image passes where p >= tau / 0.5 * m(sigma), which is Ambient-o's tau wherever the classifier is
   calibrated
   (m = 1/2 where the groups cannot be told apart). Noise makes the two groups' distributions only
   closer as it grows (the data-processing inequality), so the truth is monotone in sigma, while the
   measured probabilities fluctuate by a few hundredths from one level to the next; sigma_min is where
   the monotone (isotonic) least-squares fit of the image's margin p - tau / 0.5 * m(sigma) first
   reaches 0, so neither one noisy dip at high noise nor one noisy crossing at low noise decides it
   (requiring the raw margin to stay >= 0 at every higher level, tried first, sent images to the top of
   the grid on single dips).
3. An image told apart even at the top of the grid gets inf: it has no level to train at (drop it or
   widen the grid). Clean images get 0.

The classifier is trained on the very images it then annotates, as in Ambient-o: it is asked how well
the two groups can be told apart at each level, not to generalise to new images, and a classifier
that overfits tells them apart too easily, which errs towards higher (safer) levels.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NoiseClassifier", "train_classifier", "clean_probability", "annotate_sigma_min", "annotate"]

THRESHOLD = 0.45        # Ambient-o's tau: 1/2 - epsilon with epsilon = 0.05
SIGMA_RANGE = (0.01, 20.0)  # the annotation range (on the [-1, 1] scale), trained log-uniformly
GRID_POINTS = 32


class NoiseClassifier(torch.nn.Module):
    """c(x_t (N, C, R, R), sigma (N,)) -> (N,) logits of "a clean image's noisy version" (module docstring)."""

    def __init__(self, channels: int, filters: int = 8, scales: int = 3, hidden: int = 32, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.banks = torch.nn.ModuleList(torch.nn.Conv2d(channels, filters, 3, bias=False) for _ in range(scales))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(scales * filters + 1, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        x = x / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        energies = []
        for scale, bank in enumerate(self.banks):
            if scale:
                x = F.avg_pool2d(x, 2)
            energies.append(bank(x).square().mean((2, 3)))
        features = torch.cat([torch.log(torch.cat(energies, dim=1) + 1e-6), sigma.log().reshape(-1, 1) / 4], dim=1)
        return self.mlp(features).reshape(-1)


def _log_uniform(count: int, sigma_range: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    low, high = math.log(sigma_range[0]), math.log(sigma_range[1])
    return torch.exp(low + (high - low) * torch.rand(count, generator=generator))


def train_classifier(clean: torch.Tensor, poor: torch.Tensor, *, steps: int = 400, batch: int = 64,
                     lr: float = 1e-2, sigma_range: Sequence[float] = SIGMA_RANGE, filters: int = 8,
                     seed: int = 0) -> NoiseClassifier:
    """Train the classifier on clean and poor images, float (N, C, R, R) on [-1, 1] (module docstring, 1).
    Each step draws batch / 2 images of each group with replacement, a level per image, its noise, from
    one generator seeded with `seed`: the same inputs and seed give the same classifier."""
    if clean.shape[1:] != poor.shape[1:] or not len(clean) or not len(poor):
        raise ValueError(f"need clean and poor images of one shape (N, C, R, R); got {tuple(clean.shape)} and "
                         f"{tuple(poor.shape)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the layers' initial weights, leaving the global stream alone
        torch.manual_seed(seed)
        classifier = NoiseClassifier(clean.shape[1], filters)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    half = batch // 2
    labels = torch.cat([torch.ones(half), torch.zeros(half)])
    for _ in range(steps):
        images = torch.cat([clean[torch.randint(len(clean), (half,), generator=generator)],
                            poor[torch.randint(len(poor), (half,), generator=generator)]]).to(torch.float32)
        sigma = _log_uniform(2 * half, sigma_range, generator)
        noisy = images + sigma.reshape(-1, 1, 1, 1) * torch.randn(images.shape, generator=generator)
        loss = F.binary_cross_entropy_with_logits(classifier(noisy, sigma), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return classifier.eval()


@torch.no_grad()
def clean_probability(classifier: NoiseClassifier, images: torch.Tensor, sigmas: Sequence[float], *,
                      trials: int = 8, seed: int = 1) -> np.ndarray:
    """float64 (N, len(sigmas)): the classifier's probability of "clean" for each image at each level,
    averaged over `trials` noise draws (from a generator seeded with `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    images = images.to(torch.float32)
    result = np.zeros((len(images), len(sigmas)))
    for k, sigma in enumerate(sigmas):
        repeated = images.repeat(trials, 1, 1, 1)
        noisy = repeated + sigma * torch.randn(repeated.shape, generator=generator)
        logits = classifier(noisy, torch.full((len(repeated),), float(sigma)))
        result[:, k] = torch.sigmoid(logits).reshape(trials, len(images)).mean(0).double().numpy()
    return result


def annotate_sigma_min(probabilities: np.ndarray, sigmas: Sequence[float], reference: np.ndarray,
                       threshold: float = THRESHOLD) -> np.ndarray:
    """float32 (N,): for the poor images' probabilities (N, len(sigmas)) on an ascending grid and the
    clean images' median probability `reference` (len(sigmas),) on the same grid, the lowest level at
    which the monotone fit of each image's margin p - threshold / 0.5 * reference reaches 0 (module
    docstring, 2-3); inf where it never does.

    The non-decreasing least-squares fit of a sequence z (isotonic regression) is, at k,
    max over i <= k of min over j >= k of mean(z_i..z_j), so it is >= 0 at k exactly when
    min over j >= k of S_(j+1) >= min over i <= k of S_i, with S the prefix sums of z (S_0 = 0): a
    suffix minimum against a prefix minimum, for every image at once."""
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or not (np.diff(sigmas) > 0).all() or probabilities.shape[1:] != sigmas.shape \
            or np.shape(reference) != sigmas.shape:
        raise ValueError("the levels must be an ascending grid, one per column of the probabilities and the reference")
    margin = probabilities - threshold / 0.5 * np.asarray(reference, np.float64)[None, :]
    sums = np.concatenate([np.zeros((len(margin), 1)), np.cumsum(margin, axis=1)], axis=1)  # S_0 .. S_K
    prefix_min = np.minimum.accumulate(sums[:, :-1], axis=1)                                # min of S_0..S_k
    suffix_min = np.flip(np.minimum.accumulate(np.flip(sums[:, 1:], axis=1), axis=1), axis=1)  # min of S_(k+1)..S_K
    passes = suffix_min >= prefix_min
    first = np.argmax(passes, axis=1)
    return np.where(passes.any(axis=1), sigmas[first], np.inf).astype(np.float32)


def annotate(clean: torch.Tensor, poor: torch.Tensor, *, sigmas: Optional[Sequence[float]] = None,
             threshold: float = THRESHOLD, trials: int = 8, seed: int = 0, **training) -> np.ndarray:
    """sigma_min of each poor image, float32 (len(poor),): train the classifier on `clean` and `poor`
    (float (N, C, R, R) on [-1, 1]; `training`: train_classifier's options), then compare its
    probabilities for the poor images with the clean images' median on the grid `sigmas` (default:
    GRID_POINTS levels log-spaced over the training range)."""
    sigma_range = training.get("sigma_range", SIGMA_RANGE)
    if sigmas is None:
        sigmas = np.geomspace(sigma_range[0], sigma_range[1], GRID_POINTS)
    classifier = train_classifier(clean, poor, seed=seed, **training)
    reference = np.median(clean_probability(classifier, clean, sigmas, trials=trials, seed=seed + 1), axis=0)
    probabilities = clean_probability(classifier, poor, sigmas, trials=trials, seed=seed + 2)
    return annotate_sigma_min(probabilities, sigmas, reference, threshold)
