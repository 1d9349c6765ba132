"""Beyond the paper: noisy images, per-image corruption records and mixtures of clean and corrupted
sets (prepare --noise / --sigma-min / mix, training on them, the sampler's floor), each against an
independent computation. The objective's side of them (Tweedie targets, restricted noise-level
distributions, the weights of a mixture) is tested in test_objective.py."""
import json
import math

import numpy as np
import pytest
import torch

from ambient_fast.objective.corruption import training_operator
from ambient_fast.data.format import CorruptedDataset, DataError, content_digest
from ambient_fast.data.loader import make_loader
from ambient_fast.prepare import main as prepare
from ambient_fast.files.images import save_png
from ambient_fast.train import main as train_main

TINY = ["--channels", "8", "--channel-mult", "1", "--blocks", "1", "--attn", "", "--sample-count", "4",
        "--sample-steps", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """64 random 16x16 RGB images."""
    folder = tmp_path_factory.mktemp("noisy") / "src"
    folder.mkdir()
    for index, image in enumerate(np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)):
        save_png(image, folder / f"{index:03d}.png")
    return folder


def run_prepare(*argv) -> None:
    assert prepare([str(a) for a in argv]) == 0


# ----------------------------------------------------------------------------------------------
# Data sets: noise as stored, records through mix, verify and training


def test_stored_noise_is_gaussian_of_the_right_level_and_never_clipped(tmp_path):
    """White and black images with noise 0.3: values - x have mean 0 and variance 0.09, about half
    lie beyond [-1, 1] (kept), and the uint8 previews clip."""
    folder = tmp_path / "src"
    folder.mkdir()
    for index in range(32):
        save_png(np.full((16, 16, 3), 255 * (index % 2), np.uint8), folder / f"{index:03d}.png")
    run_prepare("--source", folder, "--dest", tmp_path / "set", "--corruption", "none", "--noise", "0.3", "--seed", "4")
    dataset = CorruptedDataset(tmp_path / "set", verify=True)
    stored = dataset.get_stored(np.arange(32)).values
    assert dataset.has_noise and stored.dtype == np.float16
    values = stored.astype(np.float64)
    clean = np.where(np.arange(32)[:, None, None, None] % 2 == 1, 1.0, -1.0)
    residual = values - clean
    n = residual.size
    assert abs(residual.mean()) < 5 * 0.3 / math.sqrt(n)
    assert abs(residual.var() - 0.09) < 5 * 0.09 * math.sqrt(2 / n) + 1e-4  # float16 storage adds ~1e-7
    beyond = (np.abs(values) > 1).mean()
    assert abs(beyond - 0.5) < 0.02
    observed, _, _ = dataset.get(np.arange(32))
    assert observed.min() == 0 and observed.max() == 255  # previews are clipped
    records = dataset.records()
    assert (records["sigma_n"] == np.float32(0.3)).all() and not records["masked"].any()
    assert dataset.meta.records["noisy"] == 32 and dataset.corruption["sigma_n"] == 0.3


def test_mixture_records_survive_mix_verify_and_resume(tmp_path, source, monkeypatch, capsys):
    """Parts' records, in order, in the mixture; verify recomputes them (an edited record or summary
    is caught); a run on the mixture resumes bitwise; the network records the sampler's floor."""
    monkeypatch.chdir(tmp_path)
    run_prepare("--source", source, "--dest", "clean", "--corruption", "none")
    run_prepare("--source", source, "--dest", "noisy", "--corruption", "none", "--noise", "0.2", "--seed", "1")
    run_prepare("--source", source, "--dest", "masked", "--corruption", "dust", "--p", "0.8", "--shared-channels",
                "--sigma-min", "0.05")
    run_prepare("mix", "--dest", "mix", "clean:8", "noisy:40", "masked:16")
    mix = CorruptedDataset(tmp_path / "mix", verify=True)
    records = mix.records()
    assert records["masked"].tolist() == [0] * 48 + [1] * 16
    assert records["sigma_n"].tolist() == [0.0] * 8 + [np.float32(0.2)] * 40 + [0.0] * 16
    assert records["sigma_min"].tolist() == [0.0] * 48 + [np.float32(0.05)] * 16
    assert {k: mix.meta.records[k] for k in ("clean", "noisy", "masked", "with_sigma_min")} == \
        {"clean": 8, "noisy": 40, "masked": 16, "with_sigma_min": 16}
    noisy = CorruptedDataset(tmp_path / "noisy")
    np.testing.assert_array_equal(mix.get_stored(np.arange(8, 48)).values, noisy.get_stored(np.arange(40)).values)
    clean = CorruptedDataset(tmp_path / "clean")  # uint8 levels as float16 values, exactly the table's
    np.testing.assert_array_equal(mix.get_stored(np.arange(8)).values,
                                  ((2 * clean.get_stored(np.arange(8)).values.astype(np.float64) - 255) / 255)
                                  .astype(np.float32).astype(np.float16))
    assert training_operator(mix.corruption, 0.1).name == "dust"

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--data", "mix", "--batch", "8", *TINY, "--snapshot-every", "100"]
    assert train_main(["--out", str(straight), *common, "--steps", "4"]) == 0
    assert train_main(["--out", str(resumed), *common, "--steps", "2"]) == 0
    assert train_main(["--resume", str(resumed), "--steps", "4"]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "network-final.safetensors")) for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    from ambient_fast.files.checkpoints import load_network

    loaded = load_network(straight / "network-final.safetensors")
    assert loaded.corruption["sigma_floor"] == 0.0 and loaded.survival == 1.0  # clean images were in it

    # Tampering: a record edited in records.npy, then the summary edited in meta.json.
    edited = tmp_path / "mix" / "records.npy"
    array = np.load(edited)
    array["sigma_n"][3] = 0.5
    np.save(edited, array)
    with pytest.raises(DataError, match="records.npy: checksum"):
        CorruptedDataset(tmp_path / "mix").verify()


def test_a_noisy_only_model_samples_down_to_its_noise_level(tmp_path, source, monkeypatch):
    """Trained on images of noise 0.2 only: it records the floor 0.2, and sampling stops there (its
    last step is the denoiser at 0.2, E[x0 | x_0.2])."""
    monkeypatch.chdir(tmp_path)
    run_prepare("--source", source, "--dest", "noisy", "--corruption", "none", "--noise", "0.2")
    assert train_main(["--data", "noisy", "--out", "run", "--batch", "8", "--steps", "2", *TINY]) == 0
    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.sample import main as sample_main
    from ambient_fast.sampling.samplers import sampling_sigmas

    loaded = load_network(tmp_path / "run" / "network-final.safetensors")
    assert loaded.corruption["sigma_floor"] == pytest.approx(0.2) and loaded.survival == 1.0
    assert sampling_sigmas(loaded)["sigma_min"] == pytest.approx(0.2)
    assert sample_main(["--net", "run/network-final.safetensors", "--out", "samples", "--seeds", "0-1",
                        "--steps", "3"]) == 0
    assert json.loads((tmp_path / "samples" / "sampling.json").read_text())["sigma_min"] == pytest.approx(0.2)


def test_naive_training_ignores_the_noise_level(tmp_path, source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_prepare("--source", source, "--dest", "noisy", "--corruption", "none", "--noise", "0.2")
    assert train_main(["--data", "noisy", "--out", "naive", "--batch", "8", "--steps", "1", "--ignore-noise",
                       *TINY]) == 0
    from ambient_fast.files.checkpoints import load_network

    assert load_network(tmp_path / "naive" / "network-final.safetensors").corruption["sigma_floor"] == 0.0


def test_version_1_data_sets_read_and_train_unchanged(tmp_path, source, monkeypatch):
    """A set written by the format's first version (no records, no values, version 1 in meta.json)."""
    monkeypatch.chdir(tmp_path)
    run_prepare("--source", source, "--dest", "old", "--corruption", "dust", "--p", "0.5")
    meta_path = tmp_path / "old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("values", "records", "content_sha256"):
        meta.pop(key)
    meta["version"] = 1
    meta_path.write_text(json.dumps({**meta, "content_sha256": content_digest(meta)}))
    old = CorruptedDataset(tmp_path / "old", verify=True)
    assert old.meta.version == 1 and old.records()["masked"].all() and not old.has_noise
    batch = make_loader(old, batch_size=8).next()
    assert batch.observed.dtype == torch.uint8 and batch.masked.all() and not batch.sigma_n.any()
    assert train_main(["--data", "old", "--out", "run", "--batch", "8", "--steps", "1", *TINY]) == 0


def test_bad_records_are_clear_errors(tmp_path, source, capsys):
    assert prepare(["--source", str(source), "--dest", str(tmp_path / "a"), "--corruption", "none", "--noise",
                    "-1"]) == 1
    assert "--noise" in capsys.readouterr().err
    assert prepare(["--source", str(source), "--dest", str(tmp_path / "b"), "--corruption", "none", "--sigma-min",
                    "nonsense"]) == 1
    assert "--sigma-min" in capsys.readouterr().err
    assert prepare(["--source", str(source), "--dest", str(tmp_path / "c"), "--corruption", "none", "--p", "0.5"]) == 1
    assert "masks nothing" in capsys.readouterr().err
    run_prepare("--source", source, "--dest", tmp_path / "box", "--corruption", "box", "--p", "0.25")
    run_prepare("--source", source, "--dest", tmp_path / "dust", "--corruption", "dust", "--p", "0.5")
    run_prepare("mix", "--dest", tmp_path / "both", f"{tmp_path / 'box'}:8", f"{tmp_path / 'dust'}:8")
    with pytest.raises(ValueError, match="box and dust masks"):
        training_operator(CorruptedDataset(tmp_path / "both").corruption, 0.1)
    assert prepare(["mix", "--dest", str(tmp_path / "d"), f"{tmp_path / 'dust'}:999"]) == 1
    assert "COUNT" in capsys.readouterr().err
