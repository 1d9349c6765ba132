"""One-step restoration and the README's chain: train -> sample -> restore on the synthetic set."""
import json

import numpy as np
import pytest
import torch

from ambient_fast.files.checkpoints import load_network
from ambient_fast.files.images import load_png, save_png, to_uint8
from ambient_fast.evaluation.metrics import psnr
from ambient_fast.evaluation.restoration import restore
from ambient_fast.restore import main as restore_main
from ambient_fast.sample import main as sample_main
from ambient_fast.train import main as train_main
from ambient_fast.training.trainer import SYNTHETIC_P

from conftest import built_once

TINY = ["--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn", "", "--sample-count", "4",
        "--sample-steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained briefly by the trainer's CLI on the built-in synthetic set (once per
    session). 75 steps restore the held-out images 6.1 dB above the corrupted input (150: 7.1 dB, in
    twice the time; the test below asks for 3), measured on the 2-core CPU."""
    mp = pytest.MonkeyPatch()

    def train(root):
        mp.setenv("AMBIENT_FAST_CACHE", str(root / "cache"))
        assert train_main(["--out", str(root / "run"), "--steps", "75", "--batch", "16", "--lr-rampup", "0.5",
                           *TINY]) == 0

    root = built_once(tmp_path_factory, "restore-trained", train)
    mp.setenv("AMBIENT_FAST_CACHE", str(root / "cache"))
    data = next(p for p in (root / "cache").iterdir() if p.is_dir() and not p.name.endswith("-clean"))
    yield root / "run", data
    mp.undo()


def test_psnr():
    a = np.random.randint(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    assert psnr(a, a).min() > 90
    b = a.astype(np.int64) + 4
    np.testing.assert_allclose(psnr(np.clip(b, 0, 255).astype(np.uint8)[:, :1, :1], a[:, :1, :1]),
                               10 * np.log10(255 ** 2 / 16) * np.ones(2), rtol=0.2)


def test_restore_is_one_evaluation_and_sees_only_observed_pixels():
    calls = []

    def net(x, sigma, labels=None):
        calls.append(x.clone())
        return torch.cat([x[:, :3] * 0 + 0.25, x[:, 3:]], dim=1)

    mask = (torch.rand(2, 3, 4, 4) < 0.5).float()
    observed = torch.rand(2, 3, 4, 4) * 2 - 1
    out = restore(net, observed, mask, 0.02)
    assert len(calls) == 1 and torch.equal(calls[0][:, :3], mask * observed)
    assert torch.all(out == 0.25)


def test_trained_model_restores_better_than_the_corrupted_input(trained, tmp_path, capsys):
    run, data = trained
    out = tmp_path / "restored"
    assert restore_main(["--net", str(run / "network-final.safetensors"), "--input", str(data), "--out", str(out),
                         "--max-images", "64"]) == 0
    report = json.loads((out / "restore.json").read_text())
    assert report["psnr_restored"] > report["psnr_input"] + 3, report
    assert "LPIPS" in capsys.readouterr().out
    assert (out / "overview.png").is_file() and load_png(out / "000063.png").shape == (16, 16, 3)


def test_restore_from_images_and_masks(trained, tmp_path):
    run, data = trained
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    kept = rng.random((3, 16, 16, 1)) < 0.3
    for i in range(3):
        save_png(pictures[i], images / f"{i}.png")
        save_png(kept[i].astype(np.uint8) * 255, masks / f"{i}.png")
    out = tmp_path / "out"
    network = run / "network-final.safetensors"
    assert restore_main(["--net", str(network), "--input", str(images), "--masks", str(masks), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png", "000002.png"]
    # Each file is the one-step restoration of its image under its mask, computed here directly.
    mask = torch.from_numpy(np.repeat(kept, 3, axis=3)).permute(0, 3, 1, 2).float()
    observed = torch.from_numpy(pictures).permute(0, 3, 1, 2).double() / 127.5 - 1
    expected = to_uint8(restore(load_network(network).model, (observed * mask).float(), mask, 0.02))
    for i in range(3):
        np.testing.assert_array_equal(load_png(out / f"{i:06d}.png"), expected[i])


def test_sample_from_a_trained_checkpoint(trained, tmp_path):
    run, _ = trained
    out = tmp_path / "samples"
    assert sample_main(["--net", str(run / "network-final.safetensors"), "--out", str(out), "--seeds", "0-3",
                        "--steps", "4"]) == 0
    assert (out / "grid.png").is_file()
    assert json.loads((out / "sampling.json").read_text())["survival"] == pytest.approx((1 - SYNTHETIC_P) * 0.9)


def test_restore_bad_input(trained, tmp_path, capsys):
    run, _ = trained
    (tmp_path / "images").mkdir()
    assert restore_main(["--net", str(run / "network-final.safetensors"), "--input", str(tmp_path / "images"),
                         "--out", str(tmp_path / "o")]) == 1
    assert "not a prepared data set" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --method posterior


def same_files(a, b, names, levels=0):
    """The PNGs `names` in folders a and b agree to `levels` grey levels."""
    for name in names:
        difference = np.abs(load_png(a / name).astype(int) - load_png(b / name).astype(int))
        assert difference.max() <= levels, (name, difference.max())


def test_posterior_restore_on_the_builtin_set(trained, tmp_path):
    """K = 3 samples per image: mean, spread and samples written, metrics against the clean twin; the
    same files whether the 9 samples ran in one batch or in batches of 2 (per-image seeds), and again
    on a second run (reproducible)."""
    run, data = trained
    common = ["--net", str(run / "network-final.safetensors"), "--input", str(data), "--method", "posterior",
              "--posterior", "ambient", "--samples", "3", "--steps", "4", "--max-images", "3"]
    assert restore_main([*common, "--out", str(tmp_path / "a"), "--batch", "9"]) == 0
    assert restore_main([*common, "--out", str(tmp_path / "b"), "--batch", "2"]) == 0
    names = [f"{i:06d}{suffix}.png" for i in range(3) for suffix in ("", "-spread", "-samples")]
    same_files(tmp_path / "a", tmp_path / "b", names)
    report = json.loads((tmp_path / "a" / "restore.json").read_text())
    assert report["samples"] == 3 and report["posterior"] == "ambient" and report["noise_level"] == 0
    # The observed pixels are kept and the hidden ones filled: better than the measurements alone.
    assert report["psnr_restored"] > report["psnr_input"] + 3 and report["ssim_restored"] > report["ssim_input"]
    assert load_png(tmp_path / "a" / "000002-samples.png").shape == (18, 52, 3)  # 3 samples of 16x16 in a row
    assert (tmp_path / "a" / "overview.png").is_file()


def test_posterior_restore_of_a_folder_with_masks(trained, tmp_path):
    """Tweedie moments on images with masks: an image's restoration is the same restored alone or
    with others, to rounding: the float32 network's convolutions round differently at another batch
    size (1e-5) and the conjugate gradients carry that on, so a value moves across a rounding
    boundary now and then, and by a few levels here and there (by up to 11 on 4 of the 768 values,
    mean 0.06, with the network this module trains on 2 threads; 1 level on one thread); the images
    differ from one another (by 87 levels on average). A draw that depended on the batch would move
    every value."""
    run, _ = trained
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        save_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), images / f"{i}.png")
        save_png((rng.random((16, 16, 1)) < 0.3).astype(np.uint8) * 255, masks / f"{i}.png")
    common = ["--net", str(run / "network-final.safetensors"), "--input", str(images), "--masks", str(masks),
              "--method", "posterior", "--steps", "3", "--cg-iterations", "2"]
    assert restore_main([*common, "--out", str(tmp_path / "all")]) == 0
    assert restore_main([*common, "--out", str(tmp_path / "one"), "--max-images", "1"]) == 0
    together, alone, other = (load_png(tmp_path / folder / name).astype(int) for folder, name in
                              (("all", "000000.png"), ("one", "000000.png"), ("all", "000001.png")))
    difference = np.abs(together - alone)
    assert difference.mean() <= 0.25 and (difference > 1).mean() <= 0.02, (difference.mean(), (difference > 1).mean())
    assert np.abs(together - other).mean() > 20


def test_posterior_restore_of_measurements_with_an_operator(trained, tmp_path, capsys):
    """Gaussian compressed sensing of clean images (.npy measurements and their operator), restored by
    Tweedie moments: per-image independent (to one grey level, as above), scored against --clean; the mask-only method, one-step
    and a non-.npy input are refused with one line."""
    from ambient_fast.files.images import from_uint8
    from ambient_fast.sampling.restoration import measure

    run, data = trained
    clean = np.load(data.with_name(data.name + "-clean") / "held_out.npy")[:3]
    operator = {"kind": "gaussian_cs", "m": 300, "seed": 5, "noise_level": 0.01}
    y = measure(operator, from_uint8(torch.from_numpy(clean)), range(3), seed=2).float().numpy()
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "clean.npy", clean)
    (tmp_path / "cs.json").write_text(json.dumps(operator))
    common = ["--net", str(run / "network-final.safetensors"), "--input", str(tmp_path / "y.npy"), "--operator",
              str(tmp_path / "cs.json"), "--clean", str(tmp_path / "clean.npy"), "--method", "posterior",
              "--steps", "3", "--cg-iterations", "3"]
    assert restore_main([*common, "--out", str(tmp_path / "all"), "--batch", "3"]) == 0
    assert restore_main([*common, "--out", str(tmp_path / "two"), "--batch", "1", "--max-images", "2"]) == 0
    same_files(tmp_path / "all", tmp_path / "two", ["000000.png", "000001.png"], levels=1)
    report = json.loads((tmp_path / "all" / "restore.json").read_text())
    assert report["operator"]["kind"] == "gaussian_cs" and report["noise_level"] == 0.01 and "psnr_restored" in report
    capsys.readouterr()
    assert restore_main([*common, "--out", str(tmp_path / "x"), "--posterior", "ambient"]) == 1
    assert "restores masked images" in capsys.readouterr().err
    assert restore_main([*common[:-6], "--out", str(tmp_path / "x")]) == 1
    assert "--method posterior" in capsys.readouterr().err
    assert restore_main(["--net", str(run), "--input", str(data), "--operator", str(tmp_path / "cs.json"),
                         "--method", "posterior", "--out", str(tmp_path / "x")]) == 1
    assert "not an .npy file" in capsys.readouterr().err
