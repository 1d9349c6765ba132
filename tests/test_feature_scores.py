"""SSIM, improved precision and recall, and the synthetic set's attribute classifier: each against an
independent computation or a case worked by hand."""

import numpy as np
import pytest
import torch

from ambient_fast.data.synthetic import ATTRIBUTES, attribute_classes, clean_images, labelled_images
from ambient_fast.evaluation.classifier import ClassifierFeatures, train_classifier
from ambient_fast.evaluation.metrics import precision_recall, ssim


# ----------------------------------------------------------------------------- SSIM


def naive_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of one (C, H, W) pair written window by window: Gaussian weights (sd 1.5, 11 x 11)
    normalised over each window, weighted means, variances and covariance, Wang et al.'s formula at
    every window centre whose window lies inside the image, the mean over those and the channels."""
    offsets = np.arange(-5, 6)
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None] ** 2) / (2 * 1.5 ** 2))
    weights /= weights.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for channel in range(a.shape[0]):
        x, y = a[channel].astype(np.float64), b[channel].astype(np.float64)
        for i in range(5, x.shape[0] - 5):
            for j in range(5, x.shape[1] - 5):
                wx, wy = x[i - 5:i + 6, j - 5:j + 6], y[i - 5:i + 6, j - 5:j + 6]
                mx, my = (weights * wx).sum(), (weights * wy).sum()
                vx, vy = (weights * (wx - mx) ** 2).sum(), (weights * (wy - my) ** 2).sum()
                cxy = (weights * (wx - mx) * (wy - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 1, 11, 14), (2, 3, 13, 12)],
                         ids=lambda s: "x".join(map(str, s)))
def test_ssim_matches_a_window_by_window_computation(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-60, 60, shape), 0, 255).astype(np.uint8)
    expected = [naive_ssim(a[i], b[i]) for i in range(len(a))]
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-10)


def test_ssim_known_cases():
    """Identical images: 1. Two constant images c and d: every window's variances and covariance
    are 0, so SSIM is the luminance term (2cd + C1) / (c^2 + d^2 + C1), worked here by hand."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 3, 12, 12), dtype=np.uint8)
    np.testing.assert_allclose(ssim(a, a), 1.0)
    c, d = np.full((1, 1, 12, 12), 100, np.uint8), np.full((1, 1, 12, 12), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    np.testing.assert_allclose(ssim(c, d), (2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rtol=1e-12)
    assert ssim(a, 255 - a).mean() < 0.2  # inverted contrast: the covariance turns negative


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is not part of [test]; the window-by-window "
                                  "computation above checks the same formula")
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 3, 16, 20), dtype=np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    expected = [metrics.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=255, channel_axis=0) for i in range(2)]
    np.testing.assert_allclose(ssim(a, b), expected, rtol=1e-10)


def test_ssim_errors():
    a = np.zeros((1, 3, 10, 16), np.uint8)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a)
    with pytest.raises(ValueError, match="one shape"):
        ssim(np.zeros((1, 3, 16, 16), np.uint8), np.zeros((1, 3, 16, 16), np.float32))


# ----------------------------------------------------------------------------- precision and recall


def brute_force_precision_recall(real, generated, k):
    """Kynkäänniemi et al.'s definition with a loop per point and sorted distances."""
    def radius(points, i):
        return np.sort(np.linalg.norm(points - points[i], axis=1))[k]  # index 0 is the point itself

    def share_covered(queries, centres):
        radii = np.array([radius(centres, i) for i in range(len(centres))])
        return np.mean([bool((np.linalg.norm(centres - q, axis=1) <= radii).any()) for q in queries])

    return share_covered(generated, real), share_covered(real, generated)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_the_definition(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(150, 5))
    generated = rng.normal(size=(120, 5)) * 1.5 + 0.5
    assert precision_recall(real, generated, k=k, batch_size=32) == pytest.approx(
        brute_force_precision_recall(real, generated, k), abs=1e-12)


def test_precision_recall_known_cases():
    """A set against itself: both 1. Far apart: both 0. Real points 0, 1, ..., 100 (integers: every
    distance exact), generated the half 0..50: every generated point is real (precision 1) and the
    real points covered are those within the generated balls (radius k = 3 at the end point 50):
    0..53, 54 of 101."""
    grid = np.arange(101.0)[:, None]
    assert precision_recall(grid, grid) == (1.0, 1.0)
    assert precision_recall(grid, grid + 1000) == (0.0, 0.0)
    precision, recall = precision_recall(grid, grid[:51], k=3)
    assert precision == 1.0 and recall == pytest.approx(54 / 101)


def test_precision_recall_errors():
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(ValueError, match="dimension"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# ----------------------------------------------------------------------------- the attribute classifier


def test_labelled_images_are_the_set_images_with_their_attributes():
    """Stream 0 is the training set; each attribute, read back from the pixels, is what was drawn."""
    images, attributes = labelled_images(64, 16, seed=3)
    np.testing.assert_array_equal(images, clean_images(64, 16, seed=3))
    classes = attribute_classes(16)
    for name in ATTRIBUTES:
        assert attributes[name].min() >= 0 and attributes[name].max() < classes[name]
    for i in range(64):
        top, left = attributes["top"][i], attributes["left"][i]
        height, width = attributes["height"][i] + 4, attributes["width"][i] + 4
        colour = images[i, :, top, left]
        from ambient_fast.data.synthetic import palette

        np.testing.assert_array_equal(colour, palette[attributes["colour"][i]])
        inside = (images[i] == colour[:, None, None]).all(0)
        assert inside[top:top + height, left:left + width].all()
        assert inside.sum() == height * width  # the background never takes a palette colour


def test_classifier_learns_the_attributes_and_round_trips(tmp_path):
    """80 steps of batch 128 (about 3 s on one core) on fresh images: colour and background, the
    easy attributes, are read from held-out images far above chance (1/6 and 1/2); features and
    confidence survive saving and loading bitwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = train_classifier(16, steps=80, batch=128, seed=1)
    finally:
        torch.set_num_threads(threads)
    scorer = ClassifierFeatures(net)
    images, attributes = labelled_images(256, 16, seed=0, stream=1)
    accuracy = scorer.accuracy(images, attributes)
    assert accuracy["colour"] > 0.9 and accuracy["background"] > 0.9, accuracy
    features, confidence = scorer(images), scorer.confidence(images)
    assert features.shape == (256, 128) and ((confidence > 0) & (confidence <= 1)).all()
    scorer.save(tmp_path / "classifier.safetensors")
    loaded = ClassifierFeatures.load(tmp_path / "classifier.safetensors")
    np.testing.assert_array_equal(loaded(images), features)
    np.testing.assert_array_equal(loaded.confidence(images), confidence)
    with pytest.raises(ValueError, match="takes uint8"):
        scorer(np.zeros((2, 3, 32, 32), np.uint8))
