"""`train --arch edm2` end to end on the data sets the trainer takes (masked, noisy, a mixture, crops with
noise-level windows, latents of a tiny AutoencoderKL with windows), exact resumption with the post-hoc EMA's profiles,
the `ema` command against a directly tracked profile, and `sample` on the latent model (decoded) and on
plain EDM2 networks (NVlabs/edm2's snapshot, a latent one with --autoencoder).
Two FSDP2 ranks with compile and bf16: tests/test_cuda_config.py; the log-variance head under FSDP2:
tests/test_parallel.py."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ambient_fast import ema, prepare, sample, train
from ambient_fast.data.format import CorruptedDataset
from ambient_fast.files.checkpoints import load_network
from ambient_fast.files.images import load_png
from ambient_fast.networks import EDM2Precond
from ambient_fast.training.posthoc_ema import read_snapshots

# An EDM2 U-Net of one resolution without attention (the fixture tests cover the rest of the network).
TINY = ["--arch", "edm2", "--channels", "8", "--channel-mult", "1", "--blocks", "1", "--attn", "",
        "--batch", "8", "--sample-count", "2", "--sample-steps", "2", "--no-verify-data"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Share one built-in synthetic data set between the tests of this module."""
    monkeypatch.setenv("AMBIENT_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 24 random 16x16 RGB PNGs."""
    folder = tmp_path_factory.mktemp("images")
    for i, image in enumerate(np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)):
        Image.fromarray(image).save(folder / f"img{i:03d}.png")
    return folder


def final_weights(run):
    return load_file(str(run / "network-final.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def test_edm2_resumes_exactly_with_its_posthoc_ema(tmp_path):
    """On the built-in masked set: a run cut at step 2 and resumed ends bit for bit where the straight
    run ends, its post-hoc EMA snapshots included (the profiles are part of the training state)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(["--out", str(straight), *TINY, "--steps", "4", "--ema-snapshot-kimg", "0.016"]) == 0
    assert train.main(["--out", str(resumed), *TINY, "--steps", "2", "--ema-snapshot-kimg", "0.016"]) == 0
    assert train.main(["--resume", str(resumed), "--steps", "4"]) == 0
    assert_same_tensors(final_weights(straight), final_weights(resumed))
    snapshots = read_snapshots(straight / "phema")
    assert sorted((s.images, s.std) for s in snapshots) == [(16, 0.05), (16, 0.1), (32, 0.05), (32, 0.1)]
    for snapshot in snapshots:
        assert_same_tensors(load_file(str(snapshot.path)), load_file(str(resumed / "phema" / snapshot.path.name)))
    loaded = load_network(straight / "network-final.safetensors")
    assert isinstance(loaded.model, EDM2Precond) and loaded.model.ambient


def test_ema_command_reconstructs_a_directly_tracked_length(tmp_path, capsys):
    """`ema --std 0.07` from the profiles 0.05 and 0.1 is close to the 0.07 profile a run with the same
    seed tracked directly (the EMA does not change training): much closer than the two tracked
    lengths are to it."""
    pair, single = tmp_path / "pair", tmp_path / "single"
    common = [*TINY, "--steps", "6", "--ema-snapshot-kimg", "0.008", "--snapshot-every", "6"]
    assert train.main(["--out", str(pair), *common, "--ema-stds", "0.05,0.1"]) == 0
    assert train.main(["--out", str(single), *common, "--ema-stds", "0.07"]) == 0
    out = tmp_path / "ema.safetensors"
    assert ema.main(["--run", str(pair), "--std", "0.07", "--out", str(out)]) == 0
    assert "from 12 snapshots" in capsys.readouterr().out

    def flat(path):
        weights = load_network(path).model.state_dict()
        return torch.cat([weights[k].reshape(-1) for k in sorted(weights) if k.endswith("weight")])

    tracked = {s.std: flat(s.path) for s in read_snapshots(pair / "phema") if s.images == 48}
    direct = flat(single / "phema" / "phema-000000000048-0.070.safetensors")
    error = (flat(out) - direct).norm()
    nearest_tracked = min((tracked[std] - direct).norm() for std in (0.05, 0.1))
    assert error < 0.2 * nearest_tracked, (error, nearest_tracked)  # measured: about 0.06
    # The output guard: an existing file that is not ours is never replaced.
    (tmp_path / "other.safetensors").write_text("not a checkpoint")
    assert ema.main(["--run", str(pair), "--std", "0.07", "--out", str(tmp_path / "other.safetensors")]) == 1
    assert "error:" in capsys.readouterr().err


def _noisy_set(images, folder):
    from ambient_fast.data.prepare import prepare_corrupted

    return prepare_corrupted(images, folder, corruption="none", noise=0.2)


def _mixture(images, folder):
    from ambient_fast.data.prepare import mix_datasets, prepare_corrupted

    masked = prepare_corrupted(images, folder.parent / "masked", corruption="dust", p=0.4, max_size=12)
    noisy = prepare_corrupted(images, folder.parent / "noisy", corruption="none", noise=0.2)
    return mix_datasets([(masked, None), (noisy, 12)], folder)


def _crops(images, folder):
    """Masked images with noise-level windows (each crop below its sigma_max)."""
    from ambient_fast.data.prepare import prepare_crops

    return prepare_crops(images, folder, 8, max_size=4)


@pytest.mark.parametrize("make", [_noisy_set, _mixture, _crops], ids=["noisy", "mixture", "crops"])
def test_edm2_trains_on_noisy_sets_mixtures_and_crops(images, tmp_path, make):
    data = make(images, tmp_path / "data")
    run = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(run), *TINY, "--steps", "2"]) == 0
    stats = (run / "stats.jsonl").read_text()
    assert "NaN" not in stats and "Infinity" not in stats
    assert isinstance(load_network(run / "network-final.safetensors").model, EDM2Precond)


def test_edm2_trains_on_latents_with_windows_and_samples_decoded(images, tmp_path, capsys):
    """A latent set (tiny AutoencoderKL, 4x8x8 latents of 16x16 images) with sigma_min and sigma_max per
    image trains an EDM2 network of the latents' shape; the checkpoint records the autoencoder, and
    `sample` decodes its samples into 16x16 RGB PNGs; masks on a latent set are refused."""
    pytest.importorskip("diffusers", reason="latent sets need diffusers (the test extra installs it)")
    from test_latents import tiny_autoencoder

    vae = tmp_path / "vae"
    tiny_autoencoder(vae)
    data = tmp_path / "latents"
    np.save(tmp_path / "sigma_max.npy", np.where(np.arange(24) % 2, 1.0, np.inf).astype(np.float32))
    assert prepare.main(["latents", "--source", str(images), "--dest", str(data), "--autoencoder", str(vae),
                         "--sigma-min", "0.05", "--sigma-max", str(tmp_path / "sigma_max.npy")]) == 0
    assert "12 with sigma_max" in capsys.readouterr().out
    dataset = CorruptedDataset(data)
    assert dataset.is_latent and dataset.shape == (4, 8, 8)

    run = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(run), *TINY, "--steps", "2"]) == 0
    assert "noise-level window" in (run / "log.txt").read_text()  # the objective's line of the run's summary
    loaded = load_network(run / "network-final.safetensors")
    assert loaded.model.img_resolution == 8 and loaded.model.img_channels == 8  # 2 x 4 latent channels
    assert loaded.corruption["latent"] == dataset.meta.latent

    assert sample.main(["--net", str(run), "--out", str(tmp_path / "samples"), "--seeds", "0-1", "--steps", "3"]) == 0
    picture = load_png(tmp_path / "samples" / "000001.png")
    assert picture.shape == (16, 16, 3) and picture.dtype == np.uint8
    assert "Infinity" not in (run / "stats.jsonl").read_text()

    capsys.readouterr()
    assert train.main(["--data", str(data), "--out", str(tmp_path / "masked"), *TINY, "--steps", "1",
                       "--further", "dust"]) == 1
    assert "masks do not live in latent space" in capsys.readouterr().err


def test_sample_takes_a_plain_edm2_snapshot(tmp_path):
    """NVlabs/edm2's snapshot (the fixture), which takes the image alone, samples through the command
    with a mask of ones: each PNG is EDM2's sampler (`edm2_sample`) on that seed's latents."""
    from conftest import fixture_folder
    from ambient_fast.files.images import to_uint8
    from ambient_fast.sampling.edm2 import edm2_sample
    from ambient_fast.sampling.samplers import PerSeedGenerators

    snapshot = fixture_folder("edm2_tiny") / "snapshot.pkl"
    assert sample.main(["--net", str(snapshot), "--out", str(tmp_path / "out"), "--seeds", "3-4", "--steps", "3",
                        "--float32"]) == 0
    model = load_network(snapshot).model
    noise, _ = PerSeedGenerators([3, 4]).sampling_inputs((3, 16, 16), 1, 1.0, False, torch.device("cpu"))
    with torch.no_grad():
        want = to_uint8(edm2_sample(model, noise, num_steps=3))
    for k, seed in enumerate((3, 4)):
        np.testing.assert_array_equal(load_png(tmp_path / "out" / f"{seed:06d}.png"), want[k])
    assert sample.main(["--net", str(snapshot), "--out", str(tmp_path / "masked"), "--survival", "0.5"]) == 1


def test_sample_decodes_a_plain_latent_edm2_with_the_autoencoder_given(tmp_path, capsys):
    """A plain EDM2 of 4-channel latents: refused without an autoencoder (its samples are no images),
    decoded into RGB PNGs of the autoencoder's size with --autoencoder."""
    pytest.importorskip("diffusers", reason="latent sets need diffusers (the test extra installs it)")
    from test_latents import tiny_autoencoder

    from ambient_fast.files.checkpoints import save_network

    tiny_autoencoder(tmp_path / "vae")
    net = EDM2Precond(img_resolution=8, img_channels=4, ambient=False, model_channels=8, channel_mult=[1],
                      num_blocks=1, attn_resolutions=[])
    save_network(tmp_path / "latent.safetensors", net.eval())
    args = ["--net", str(tmp_path / "latent.safetensors"), "--seeds", "0", "--steps", "2"]
    assert sample.main([*args, "--out", str(tmp_path / "none")]) == 1
    assert "--autoencoder" in capsys.readouterr().err
    assert sample.main([*args, "--out", str(tmp_path / "out"), "--autoencoder", str(tmp_path / "vae")]) == 0
    assert load_png(tmp_path / "out" / "000000.png").shape == (16, 16, 3)
