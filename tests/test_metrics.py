"""Metrics (Fréchet distance, nearest-neighbour similarity, PSNR, the FID Inception network) and
the evaluation CLI on real outputs of the sample CLI."""
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ambient_fast.files.checkpoints import save_network
from ambient_fast.objective.corruption import make_operator
from ambient_fast.data.format import corruption_record, write_dataset
from ambient_fast.data.synthetic import clean_twin, synthetic_dataset
from ambient_fast.evaluate import main as evaluate_main
from ambient_fast.files.images import grid, load_png, save_png
from ambient_fast.evaluation.inception import WEIGHTS_FILE, ConvBN, FIDInceptionV3
from ambient_fast.evaluation.metrics import (InceptionFeatures, cosine_nearest_neighbour, frechet_distance,
                                  nearest_neighbour_similarity, pixel_features, psnr)
from ambient_fast.networks import EDMPrecond
from ambient_fast.sample import main as sample_main

from conftest import TINY_ARCHITECTURES
from test_nn import randomize_


# ----------------------------------------------------------------------------------------------
# Fréchet distance

def scipy_frechet(a, b):
    """The usual FID formula with scipy's general matrix square root (scipy, a test extra, is imported
    here: a GPU image without it still collects this module)."""
    linalg = pytest.importorskip("scipy.linalg", reason="scipy is not installed (it is part of the [test] extra)")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.mark.parametrize("n,m,d", [(50, 60, 5), (300, 200, 40), (3, 2, 1), (20, 30, 50), (10, 12, 100)],
                         ids=lambda v: str(v))
def test_frechet_distance_matches_scipy(n, m, d):
    rng = np.random.default_rng(n * 1000 + d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))  # correlated features
    b = rng.normal(size=(m, d)) * 2 + 0.5
    ours, reference = frechet_distance(a, b), scipy_frechet(a, b)
    # D > N: singular covariances, where scipy's sqrtm is the less accurate of the two (measured
    # agreement 5e-9 relative); otherwise the two agree to rounding.
    assert ours == pytest.approx(reference, rel=1e-6 if d > n else 1e-9)


def test_frechet_distance_identical_sets_and_symmetry():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) + 1
    scale = frechet_distance(a, b)
    assert frechet_distance(a, a) < 1e-10 * scale
    singular = rng.normal(size=(10, 64))  # D > N
    assert frechet_distance(singular, singular.copy()) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    assert frechet_distance(a.astype(np.float32), b) == pytest.approx(scale, rel=1e-6)


def exact_gaussian_sample(mean, variances, n, rng):
    """n points whose sample mean is `mean` and sample covariance diag(variances), exactly."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: sample covariance I
    return mean + z * np.sqrt(variances)


def test_frechet_distance_of_two_gaussians_in_closed_form():
    """For commuting covariances the distance is ||mu_a - mu_b||^2 + sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2;
    a shared rotation of both sets leaves it unchanged."""
    rng = np.random.default_rng(2)
    mean_a, mean_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 9.0])
    a, b = exact_gaussian_sample(mean_a, var_a, 200, rng), exact_gaussian_sample(mean_b, var_b, 150, rng)
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert expected == pytest.approx(5.25 + 1 + 1 + 0.25)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    assert frechet_distance(a @ rotation, b @ rotation) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="dimension: 3 and 4"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))


# ----------------------------------------------------------------------------------------------
# Nearest-neighbour similarity

def brute_force_nearest(samples, training):
    """The whole similarity matrix at once, mean-centred pixel cosine."""
    def unit(images):
        x = images.reshape(len(images), -1).astype(np.float64)
        x -= x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    similarity = unit(samples) @ unit(training).T
    return similarity.max(1), similarity.argmax(1)


@pytest.fixture
def image_sets():
    rng = np.random.default_rng(3)
    training = rng.integers(0, 256, (23, 3, 4, 4), dtype=np.uint8)
    samples = rng.integers(0, 256, (17, 3, 4, 4), dtype=np.uint8)
    samples[[2, 11]] = training[[20, 4]]  # two memorised samples
    # A brightened copy: the same image after removing each image's mean.
    samples[5] = (training[9].astype(np.int64) // 2 + 60).astype(np.uint8)
    samples[6] = (training[9].astype(np.int64) // 2 + 20).astype(np.uint8)
    return samples, training


@pytest.mark.parametrize("batch_size", [1, 2, 5, 16, 17, 23, 1024])
def test_nearest_neighbour_matches_brute_force(image_sets, batch_size):
    samples, training = image_sets
    similarity, index = nearest_neighbour_similarity(samples, training, batch_size=batch_size)
    expected_similarity, expected_index = brute_force_nearest(samples, training)
    np.testing.assert_allclose(similarity, expected_similarity, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(index, expected_index)
    assert similarity.dtype == np.float64 and index.dtype == np.int64
    assert index[2] == 20 and index[11] == 4 and similarity[[2, 11]] == pytest.approx(1)
    assert index[5] == index[6] == 9


@pytest.mark.parametrize("batch_size", [1, 3, 4, 100])
def test_nearest_neighbour_ties_go_to_the_lowest_index(batch_size):
    """Duplicates of the best match in later blocks never replace the first one."""
    keys = np.array([[0.0, 1], [1, 0], [1, 1], [1, 0], [0, 1], [1, 0]])
    similarity, index = cosine_nearest_neighbour(np.array([[1.0, 0], [0, 2], [3, 3]]), keys, batch_size)
    np.testing.assert_array_equal(index, [1, 0, 2])
    np.testing.assert_allclose(similarity, 1)


def test_nearest_neighbour_with_a_feature_extractor_and_degenerate_images():
    rng = np.random.default_rng(4)
    training = rng.integers(0, 256, (9, 1, 3, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (4, 1, 3, 3), dtype=np.uint8)
    samples[3] = 7  # constant: zero after centring

    def first_pixels(images):
        return images.reshape(len(images), -1)[:, :4].astype(np.float64) + 1

    similarity, index = nearest_neighbour_similarity(samples, training, features=first_pixels, batch_size=2)
    a, b = first_pixels(samples), first_pixels(training)
    full = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(similarity, full.max(1), atol=1e-12)
    np.testing.assert_array_equal(index, full.argmax(1))
    pixel_similarity, _ = nearest_neighbour_similarity(samples, training)
    assert pixel_similarity[3] == 0
    with pytest.raises(ValueError, match="one shape"):
        nearest_neighbour_similarity(samples, training[:, :, :2])
    with pytest.raises(ValueError, match="uint8"):
        nearest_neighbour_similarity(samples.astype(np.float32), training)


# ----------------------------------------------------------------------------------------------
# PSNR, pixel features

def test_psnr_known_values():
    a = np.full((3, 2, 4, 4), 100, np.uint8)
    b = a.copy()
    b[0] += 1                      # MSE 1: 20 log10(255)
    b[1, :, :2] = 0                # half the values off by 100: MSE 5000
    np.testing.assert_allclose(psnr(b, a), [20 * math.log10(255), 10 * math.log10(255 ** 2 / 5000),
                                            10 * math.log10(255 ** 2 / 1e-10)])
    assert psnr(np.zeros((1, 5), np.uint8), np.full((1, 5), 255, np.uint8))[0] == pytest.approx(0)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:2])


def test_pixel_features():
    images = np.array([[[[0, 255], [127, 128]]]], np.uint8)
    features = pixel_features(images)
    assert features.dtype == np.float64 and features.shape == (1, 4)
    np.testing.assert_allclose(features[0], [-1, 1, 127 / 127.5 - 1, 128 / 127.5 - 1])


def test_evaluate_extracts_a_set_given_twice_once(monkeypatch):
    """Equal image sets (the same set as --samples and --reference, or as --reference and
    --training) are extracted once; sets of one shape but other pixels are extracted apart."""
    from ambient_fast.evaluation import report

    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8) for _ in range(2))
    extracted = []
    monkeypatch.setattr(report, "pixel_features", lambda array: extracted.append(array) or pixel_features(array))

    def evaluated(samples, reference):
        extracted.clear()
        images = [report.Images(array, [str(i) for i in range(len(array))], name)
                  for array, name in ((samples, "samples"), (reference, "reference"))]
        return report.evaluate(*images, None, "pixel", None, "cpu", 4)["frechet_distance"]

    assert evaluated(a, a.copy()) == frechet_distance(pixel_features(a), pixel_features(a))
    assert len(extracted) == 1
    assert evaluated(a, b) == frechet_distance(pixel_features(a), pixel_features(b)) > 0
    assert len(extracted) == 2


# ----------------------------------------------------------------------------------------------
# The FID Inception network, on random weights

def random_inception() -> FIDInceptionV3:
    """Every weight and batch-norm statistic redrawn, at a scale that keeps activations of order one."""
    network = FIDInceptionV3().eval()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, ConvBN):
                weight = module.conv.weight
                weight.normal_(0, math.sqrt(2 / weight[0].numel()))
                module.bn.weight.uniform_(0.5, 1.5)
                module.bn.bias.normal_(0, 0.1)
                module.bn.running_mean.normal_(0, 0.1)
                module.bn.running_var.uniform_(0.5, 1.5)
    return network


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random FID Inception saved the way pytorch-fid's file is laid out: torchvision's names,
    batch-norm step counters and the unused 1008-class classifier included."""
    torch.manual_seed(5)
    network = random_inception()
    state = dict(network.state_dict(), **{"fc.weight": torch.randn(1008, 2048), "fc.bias": torch.randn(1008)})
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(state, path)
    return network, path


def test_inception_structure(inception_file):
    network, _ = inception_file
    # torchvision's Inception-v3 has 27,161,264 parameters; without its auxiliary classifier
    # (3,326,696) and its 1000-class classifier (2,049,000), 21,785,568 remain.
    assert sum(p.numel() for p in network.parameters()) == 21_785_568
    assert len([m for m in network.modules() if isinstance(m, ConvBN)]) == 94
    with torch.no_grad():
        out = network(torch.rand(2, 3, 299, 299) * 2 - 1)
    assert out.shape == (2, 2048) and torch.isfinite(out).all() and out.std() > 0


def test_inception_weights_round_trip(inception_file, tmp_path):
    network, path = inception_file
    images = np.random.default_rng(6).integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    extract = InceptionFeatures(path, batch_size=1)
    features = extract(images)
    x = F.interpolate(torch.from_numpy(images).float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = network(2 * x - 1).double().numpy()
    assert features.dtype == np.float64 and features.shape == (2, 2048)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)

    from safetensors.torch import save_file

    copy = tmp_path / "inception.safetensors"
    save_file(torch.load(path, weights_only=True), copy)
    np.testing.assert_array_equal(InceptionFeatures(copy, batch_size=2)(images[:1]), features[:1])
    grey = images[1:, :1]
    np.testing.assert_array_equal(extract(grey), extract(grey.repeat(3, axis=1)))


def test_inception_refuses_missing_and_mismatched_files(inception_file, tmp_path):
    _, path = inception_file
    with pytest.raises(ValueError, match=f"not found.*{WEIGHTS_FILE}"):
        InceptionFeatures(tmp_path / "absent.pth")
    state = torch.load(path, weights_only=True)
    broken = dict(state)
    del broken["Mixed_6b.branch1x1.conv.weight"]
    broken["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(1, 1)
    broken["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"1 missing \(e.g. Mixed_6b.branch1x1.conv.weight\), 1 unexpected "
                                         r"\(e.g. AuxLogits.fc.weight\), 1 of the wrong shape") as error:
        InceptionFeatures(tmp_path / "broken.pth")
    assert WEIGHTS_FILE in str(error.value)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"cannot read.*{WEIGHTS_FILE}"):
        InceptionFeatures(tmp_path / "garbage.pth")


REAL_WEIGHTS = os.environ.get("AMBIENT_FAST_INCEPTION_WEIGHTS", "")


@pytest.mark.skipif(not Path(REAL_WEIGHTS).is_file(),
                    reason=f"compares our features with pytorch-fid's on the real weights: set "
                           f"AMBIENT_FAST_INCEPTION_WEIGHTS to pytorch-fid's {WEIGHTS_FILE} (never downloaded)")
def test_real_weights_match_pytorch_fid(monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception", reason="pytorch-fid (the comparison) is not installed")
    # pytorch-fid fetches its weights by URL: hand it the local file instead.
    monkeypatch.setattr(inception, "load_state_dict_from_url",
                        lambda *args, **kwargs: torch.load(REAL_WEIGHTS, weights_only=True))
    images = np.random.default_rng(7).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    with torch.no_grad():
        theirs = inception.InceptionV3([3])(torch.from_numpy(images).float() / 255)[0].flatten(1).double().numpy()
    np.testing.assert_allclose(InceptionFeatures(REAL_WEIGHTS)(images), theirs, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The evaluation CLI on the sample CLI's outputs

@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """Six samples from a tiny random 16x16 model via `python -m ambient_fast.sample`, and a small
    prepared synthetic set."""
    root = tmp_path_factory.mktemp("evaluate")
    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    torch.manual_seed(8)
    model = randomize_(EDMPrecond(img_resolution=16, img_channels=6, model_type=model_type, **kwargs)).eval()
    save_network(root / "net.safetensors", model, dict(kind="dust", p=0.5, delta=0.1, shared_channels=True))
    assert sample_main(["--net", str(root / "net.safetensors"), "--out", str(root / "samples"), "--seeds", "0-5",
                        "--steps", "2", "--batch", "4", "--device", "cpu"]) == 0
    data = synthetic_dataset(root / "cache", resolution=16, n=48, p=0.6, seed=1)
    return root, data


def run_evaluate(capsys, *args):
    code = evaluate_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_samples_against_the_synthetic_set(sampled, capsys):
    root, data = sampled
    code, out, err = run_evaluate(capsys, "--samples", root / "samples", "--reference", data, "--training", data,
                                  "--out", root / "report.json")
    assert code == 0, err
    report = json.loads((root / "report.json").read_text())
    names = [f"{seed:06d}.png" for seed in range(6)]
    samples = np.stack([load_png(root / "samples" / name) for name in names]).transpose(0, 3, 1, 2)
    held_out, clean = np.load(clean_twin(data) / "held_out.npy"), np.load(clean_twin(data) / "images.npy")
    assert report["samples"]["count"] == 6 and report["reference"]["count"] == 48 and report["training"]["count"] == 48
    assert "held_out.npy" in report["reference"]["source"] and "images.npy" in report["training"]["source"]
    assert report["feature_dim"] == 768
    assert report["frechet_distance"] == pytest.approx(frechet_distance(pixel_features(samples),
                                                                        pixel_features(held_out)), rel=1e-12)
    similarity, index = nearest_neighbour_similarity(samples, clean)
    per_sample = report["nearest_neighbour"]["per_sample"]
    assert [entry["sample"] for entry in per_sample] == names  # grid.png left out
    np.testing.assert_allclose([entry["similarity"] for entry in per_sample], similarity)
    assert [entry["training"] for entry in per_sample] == [f"images.npy[{i}]" for i in index]
    assert "Fréchet distance (pixels)" in out and f"{report['frechet_distance']:.4f}" in out


def test_evaluate_finds_memorised_samples(sampled, tmp_path, capsys):
    """Samples that are training images have similarity 1 to exactly those images; the reference
    given as a folder of PNGs gives the same distance as the same images in a .npy."""
    _, data = sampled
    clean = np.load(clean_twin(data) / "images.npy")
    copies = tmp_path / "copies"
    copies.mkdir()
    for i in (3, 17, 40):
        save_png(clean[i].transpose(1, 2, 0), copies / f"copy{i:02d}.png")
    save_png(grid([a.transpose(1, 2, 0) for a in clean[:4]]), copies / "grid.png")  # another size: must be skipped
    np.save(tmp_path / "reference.npy", clean[:10])
    code, out, err = run_evaluate(capsys, "--samples", copies, "--reference", tmp_path / "reference.npy",
                                  "--training", data, "--out", tmp_path / "report.json")
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    nn = report["nearest_neighbour"]
    assert [(e["sample"], e["training"]) for e in nn["per_sample"]] == [
        ("copy03.png", "images.npy[3]"), ("copy17.png", "images.npy[17]"), ("copy40.png", "images.npy[40]")]
    assert nn["max"] == pytest.approx(1) and nn["mean"] == pytest.approx(1)
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, image in enumerate(clean[:10]):
        save_png(image.transpose(1, 2, 0), folder / f"{i:03d}.png")
    assert run_evaluate(capsys, "--samples", copies, "--reference", folder, "--out", tmp_path / "folder.json")[0] == 0
    assert json.loads((tmp_path / "folder.json").read_text())["frechet_distance"] == report["frechet_distance"]


def test_evaluate_with_inception_features(sampled, inception_file, capsys, tmp_path):
    """Samples identical to the reference and training images: FID 0, similarity 1 to themselves."""
    _, data = sampled
    _, weights = inception_file
    np.save(tmp_path / "images.npy", np.load(clean_twin(data) / "held_out.npy")[:3])
    code, out, err = run_evaluate(capsys, "--samples", tmp_path / "images.npy", "--reference", tmp_path / "images.npy",
                                  "--training", tmp_path / "images.npy", "--features", "inception",
                                  "--weights", weights, "--device", "cpu", "--out", tmp_path / "report.json")
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["feature_dim"] == 2048 and report["frechet_distance"] < 1e-6
    nn = report["nearest_neighbour"]
    assert nn["features"] == "inception pool3" and nn["mean"] == pytest.approx(1)
    assert [e["training"] for e in nn["per_sample"]] == [f"images.npy[{i}]" for i in range(3)]
    assert "FID (Inception pool3)" in out


def test_evaluate_errors(sampled, tmp_path, capsys):
    root, data = sampled
    samples = root / "samples"
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_png(np.zeros((8, 8, 3), np.uint8), mixed / "a.png")
    save_png(np.zeros((16, 16, 3), np.uint8), mixed / "b.png")
    np.save(tmp_path / "grey.npy", np.zeros((4, 1, 16, 16), np.uint8))
    np.save(tmp_path / "hwc.npy", np.zeros((4, 16, 16, 3), np.uint8))
    np.save(tmp_path / "small.npy", np.zeros((4, 3, 8, 8), np.uint8))
    (tmp_path / "notes.txt").write_text("not images")
    operator = make_operator("dust", p=0.5, delta=0.1)
    masks = np.random.default_rng(9).random((4, 3, 16, 16)) < 0.5
    write_dataset(tmp_path / "mine", np.full((4, 3, 16, 16), 9, np.uint8) * masks, masks,
                  corruption_record(operator), source="a test")
    cases = [
        (["--samples", tmp_path / "empty", "--reference", data], "holds no .png images"),
        (["--samples", mixed, "--reference", data],
         re.escape("mixes image sizes: 8x8 with 3 channel(s) (e.g. a.png), 16x16")),
        (["--samples", samples, "--reference", tmp_path / "grey.npy"],
         re.escape("--samples have 3 channel(s), --reference 1")),
        (["--samples", samples, "--reference", tmp_path / "hwc.npy"], "channels first"),
        (["--samples", samples, "--reference", tmp_path / "small.npy"],
         "--samples are 3x16x16 images, --reference 3x8x8"),
        (["--samples", samples, "--reference", tmp_path / "mine"], "cannot serve as clean images"),
        (["--samples", samples, "--reference", data, "--training", tmp_path / "mine"], "--training .*corrupted"),
        (["--samples", samples, "--reference", data, "--features", "inception"], f"needs --weights: .*{WEIGHTS_FILE}"),
        (["--samples", samples, "--reference", data, "--features", "inception", "--weights", tmp_path / "no.pth"],
         f"no.pth not found.*{WEIGHTS_FILE}"),
        (["--samples", samples, "--reference", data, "--weights", tmp_path / "no.pth"], "only used with --features"),
        (["--samples", tmp_path / "absent", "--reference", data], "absent does not exist"),
        (["--samples", tmp_path / "notes.txt", "--reference", data], "neither a folder of PNG images nor a .npy"),
    ]
    for args, message in cases:
        code, _, err = run_evaluate(capsys, *args)
        assert code == 1 and err.startswith("error: "), (args, err)
        assert re.search(message, err), (message, err)
