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

TINY = ["--channels", "16", "--channel-mult", "1,2", "--blocks", "1", "--attn", "", "--sample-count", "4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained briefly by the trainer's CLI on the built-in synthetic set."""
    root = tmp_path_factory.mktemp("trained")
    mp = pytest.MonkeyPatch()
    mp.setenv("AMBIENT_FAST_CACHE", str(root / "cache"))
    run = root / "run"
    assert train_main(["--out", str(run), "--steps", "150", "--batch", "16", "--lr-rampup", "0.5", *TINY]) == 0
    data = next(p for p in (root / "cache").iterdir() if p.is_dir() and not p.name.endswith("-clean"))
    yield run, data
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
