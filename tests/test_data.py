"""Corrupted data sets: the format (round trip, atomic writes, verification), the prepare command
(folders, zips, user masks, every bad input), the synthetic set, and the torch and DALI loaders
(the stored bytes, positions and flips, sharding, exact resumption, agreement, independence from
erased pixels)."""
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_fast.data.format import CorruptedDataset, DataError, DatasetWriter, write_dataset
from ambient_fast.objective.corruption import make_operator
from ambient_fast.data.batches import RawBatch, dali_available
from ambient_fast.data.loader import make_loader
from ambient_fast.objective.objective import AmbientObjective, EDMSchedule
from ambient_fast.objective.seeds import Stream, philox, stream_key
from ambient_fast.prepare import main as prepare
from ambient_fast.data.synthetic import (clean_images, dataset_name, palette, palette_fraction,
                                         synthetic_dataset)

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable "
                                "(pip install -e \".[dali]\" to run the DALI loader tests)")
DUST = {"kind": "dust", "p": 0.5, "delta": 0.1, "shared_channels": False}


def random_set(n=24, shape=(3, 8, 8), label_dim=0, p=0.5, seed=0):
    """(observed, masks, labels) of random images with random masks."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, *shape)) >= p
    observed = (rng.integers(0, 256, (n, *shape), dtype=np.uint8) * masks).astype(np.uint8)
    labels = rng.integers(0, label_dim, n) if label_dim else None
    return observed, masks, labels


def write_random(path, **kwargs):
    observed, masks, labels = random_set(**kwargs)
    return write_dataset(path, observed, masks, DUST, labels=labels, source="test"), (observed, masks, labels)


def write_pngs(folder, images, names=None):
    """Save uint8 (H, W, C) images as PNGs; names default to img000.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"img{i:03d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)
    return names


def rgb_images(n, height=8, width=8, seed=0):
    return list(np.random.default_rng(seed).integers(1, 256, (n, height, width, 3), dtype=np.uint8))


def run_prepare(capsys, *argv):
    """(exit code, stdout, stderr) of the prepare command."""
    code = prepare([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# Format.

def test_round_trip(tmp_path):
    path, (observed, masks, labels) = write_random(tmp_path / "set", label_dim=5)
    dataset = CorruptedDataset(path, verify=True)
    assert (len(dataset), dataset.channels, dataset.resolution, dataset.label_dim) == (24, 3, 8, 5)
    assert dataset.corruption == DUST and dataset.meta.source == "test"
    assert sorted(p.name for p in path.iterdir()) == ["labels.npy", "masks.npy", "meta.json", "observed.npy"]
    assert np.load(path / "masks.npy").shape == (24, 24)  # 3*8*8 bits = 24 bytes per image
    indices = np.array([5, 0, 23, 5])
    got_observed, got_masks, got_labels = dataset.get(indices)
    assert got_observed.dtype == np.uint8 and got_masks.dtype == np.bool_ and got_labels.dtype == np.float32
    np.testing.assert_array_equal(got_observed, observed[indices])
    np.testing.assert_array_equal(got_masks, masks[indices])
    np.testing.assert_array_equal(got_labels, np.eye(5, dtype=np.float32)[labels[indices]])
    meta = json.loads((path / "meta.json").read_text())
    assert meta["observed_fraction"] == pytest.approx(masks.mean())
    assert set(meta["files"]) == {"observed.npy", "masks.npy", "labels.npy"}
    # An odd number of values per image: the last packed byte is partly padding.
    path, (observed, masks, _) = write_random(tmp_path / "odd", shape=(1, 3, 3))
    np.testing.assert_array_equal(CorruptedDataset(path).get(np.arange(24))[1], masks)
    assert CorruptedDataset(path).get(np.arange(2))[2].shape == (2, 0)


def test_write_refuses_values_outside_the_mask_and_bad_shapes(tmp_path):
    observed, masks, _ = random_set()
    observed[~masks] = 7
    with pytest.raises(DataError, match="non-zero where the mask is 0"):
        write_dataset(tmp_path / "set", observed, masks, DUST)
    with pytest.raises(DataError, match="square"):
        write_dataset(tmp_path / "set", np.zeros((2, 3, 4, 5), np.uint8), np.zeros((2, 3, 4, 5), bool), DUST)
    assert not (tmp_path / "set").exists() and not list(tmp_path.iterdir())


def test_destination_in_use_and_overwrite(tmp_path):
    path, _ = write_random(tmp_path / "set")
    with pytest.raises(DataError, match="destination in use"):
        write_random(path, seed=1)
    observed, masks, _ = random_set(seed=1)
    write_dataset(path, observed, masks, DUST, overwrite=True)
    np.testing.assert_array_equal(CorruptedDataset(path, verify=True).get(np.arange(24))[0], observed)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an ambient-fast data set"):
        write_dataset(other, observed, masks, DUST, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CorruptedDataset(write_dataset(empty, observed, masks, DUST)).meta.count == 24


def test_crash_mid_write_leaves_no_data_set_and_keeps_the_old_one(tmp_path):
    observed, masks, _ = random_set()
    dest = tmp_path / "new"
    with pytest.raises(RuntimeError, match="crash"):
        with DatasetWriter(dest, count=24, shape=(3, 8, 8)) as writer:
            writer.append(observed[:10], masks[:10])
            raise RuntimeError("crash")
    assert not dest.exists() and not list(tmp_path.iterdir())
    old, (old_observed, _, _) = write_random(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(DataError, match="only 10 of 24"):
        with DatasetWriter(old, count=24, shape=(3, 8, 8), overwrite=True) as writer:
            writer.append(observed[:10], masks[:10])
            writer.commit(DUST, "interrupted")
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_killed_writer_leaves_no_valid_data_set(tmp_path):
    """A process killed mid-write (no clean-up runs at all) leaves only a hidden partial folder."""
    dest = tmp_path / "set"
    script = (f"import os, numpy as np\nfrom ambient_fast.data.format import DatasetWriter\n"
              f"w = DatasetWriter({str(dest)!r}, count=4, shape=(1, 2, 2))\n"
              f"w.append(np.zeros((2, 1, 2, 2), np.uint8), np.zeros((2, 1, 2, 2), bool))\nos._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert not dest.exists()
    assert [p.name.startswith(".set.partial-") for p in tmp_path.iterdir()] == [True]
    with pytest.raises(DataError, match="not an ambient-fast data set"):
        CorruptedDataset(dest)


def test_verify_detects_a_corrupted_byte(tmp_path, capsys):
    path, _ = write_random(tmp_path / "set")
    code, out, _ = run_prepare(capsys, "verify", path)
    assert code == 0 and "ok" in out and "24 x 3x8x8" in out
    raw = bytearray((path / "masks.npy").read_bytes())
    raw[-5] ^= 0x10
    (path / "masks.npy").write_bytes(bytes(raw))
    CorruptedDataset(path)  # opening stays cheap: shapes only
    with pytest.raises(DataError, match="masks.npy: checksum mismatch"):
        CorruptedDataset(path, verify=True)
    code, _, err = run_prepare(capsys, "verify", path)
    assert code == 1 and "checksum mismatch" in err and "Traceback" not in err
    (path / "observed.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="observed.npy cannot be read"):
        CorruptedDataset(path)


# ----------------------------------------------------------------------------------------------
# Prepare.

def test_prepare_from_a_png_folder(tmp_path, capsys):
    images = rgb_images(12)
    names = write_pngs(tmp_path / "src", images, [f"{'sub/' if i % 2 else ''}img{i:02d}.png" for i in range(12)])
    code, out, err = run_prepare(capsys, "--source", tmp_path / "src", "--dest", tmp_path / "set",
                                 "--corruption", "dust", "--p", 0.6, "--delta", 0.2, "--seed", 3)
    assert code == 0, err
    assert "wrote" in out
    dataset = CorruptedDataset(tmp_path / "set", verify=True)
    assert dataset.corruption == {"kind": "dust", "p": 0.6, "delta": 0.2, "shared_channels": False}
    observed, masks, _ = dataset.get(np.arange(12))
    order = np.argsort(names)  # the data set is in sorted relative-path order
    clean = np.stack(images)[order].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(observed, clean * masks)
    assert abs(masks.mean() - 0.4) < 0.1 and not (masks == masks[:, :1]).all()
    # Same seed, same data set; --shared-channels shares masks over channels.
    assert prepare(["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "again"), "--p", "0.6",
                    "--delta", "0.2", "--seed", "3"]) == 0
    np.testing.assert_array_equal(CorruptedDataset(tmp_path / "again").get(np.arange(12))[1], masks)
    assert prepare(["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "shared"), "--p", "0.6",
                    "--shared-channels", "--max-size", "5"]) == 0
    shared = CorruptedDataset(tmp_path / "shared")
    assert len(shared) == 5 and (shared.get(np.arange(5))[1] == shared.get(np.arange(5))[1][:, :1]).all()


@pytest.mark.parametrize("kind,p", [("box", 0.5), ("fixed_box", 0.25), ("keep_patch", 0.5)])
def test_prepare_box_corruptions(tmp_path, kind, p):
    write_pngs(tmp_path / "src", rgb_images(4))
    assert prepare(["--source", str(tmp_path / "src"), "--dest", str(tmp_path / "set"), "--corruption", kind,
                    "--p", str(p)]) == 0
    dataset = CorruptedDataset(tmp_path / "set", verify=True)
    masks = dataset.get(np.arange(4))[1]
    assert dataset.corruption["kind"] == kind and dataset.corruption["shared_channels"]
    assert 0 < masks.mean() < 1 and (masks == masks[:, :1]).all()


def test_prepare_mixed_sizes_needs_resolution(tmp_path, capsys):
    write_pngs(tmp_path / "src", rgb_images(2, 8, 8) + rgb_images(1, 12, 10), ["a.png", "b.png", "c.png"])
    code, _, err = run_prepare(capsys, "--source", tmp_path / "src", "--dest", tmp_path / "set", "--p", 0.5)
    assert code == 1 and "different sizes" in err and "--resolution" in err and "c.png 10x12" in err
    code, _, err = run_prepare(capsys, "--source", tmp_path / "src", "--dest", tmp_path / "set", "--p", 0.5,
                               "--resolution", 6)
    assert code == 0, err
    assert CorruptedDataset(tmp_path / "set").shape == (3, 6, 6)
    write_pngs(tmp_path / "wide", rgb_images(2, 8, 12))
    code, _, err = run_prepare(capsys, "--source", tmp_path / "wide", "--dest", tmp_path / "w", "--p", 0.5)
    assert code == 1 and "not square" in err


def test_prepare_from_an_edm_zip_with_labels(tmp_path):
    images, labels = rgb_images(6), [3, 0, 1, 3, 2, 0]
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i, image in enumerate(images):
            path = tmp_path / f"{i}.png"
            Image.fromarray(image).save(path)
            z.write(path, f"00000/img{i:08d}.png")
        z.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", c] for i, c in enumerate(labels)]}))
    assert prepare(["--source", str(archive), "--dest", str(tmp_path / "set"), "--p", "0.5"]) == 0
    dataset = CorruptedDataset(tmp_path / "set", verify=True)
    observed, masks, one_hot = dataset.get(np.arange(6))
    assert dataset.label_dim == 4 and one_hot.argmax(1).tolist() == labels
    np.testing.assert_array_equal(observed, np.stack(images).transpose(0, 3, 1, 2) * masks)
    assert "zip" in dataset.meta.source


def test_import_user_masks_from_a_folder_and_an_array(tmp_path):
    rng = np.random.default_rng(0)
    images = rgb_images(5)
    names = write_pngs(tmp_path / "src", images, [f"d{i % 2}/x{i}.png" for i in range(5)])
    shared = rng.random((5, 8, 8)) < 0.5
    write_pngs(tmp_path / "masks", [(m * 255).astype(np.uint8) for m in shared],
               [n.replace(".png", ".bmp") for n in names])  # any image extension, greyscale: all channels
    assert prepare(["--source", str(tmp_path / "src"), "--masks", str(tmp_path / "masks"),
                    "--dest", str(tmp_path / "folder")]) == 0
    dataset = CorruptedDataset(tmp_path / "folder", verify=True)
    order = np.argsort(names)
    observed, masks, _ = dataset.get(np.arange(5))
    np.testing.assert_array_equal(masks, np.repeat(shared[order][:, None], 3, axis=1))
    np.testing.assert_array_equal(observed, np.stack(images)[order].transpose(0, 3, 1, 2) * masks)
    assert dataset.corruption["kind"] == "user" and dataset.corruption["shared_channels"]
    assert dataset.corruption["p"] == pytest.approx(1 - shared.mean(), abs=1e-6)
    per_channel = rng.random((5, 3, 8, 8)) < 0.5  # one .npy, sorted-name order, one mask per channel
    np.save(tmp_path / "masks.npy", per_channel.astype(np.uint8))
    assert prepare(["--source", str(tmp_path / "src"), "--masks", str(tmp_path / "masks.npy"),
                    "--dest", str(tmp_path / "array")]) == 0
    masks = CorruptedDataset(tmp_path / "array").get(np.arange(5))[1]
    np.testing.assert_array_equal(masks, per_channel)
    assert not CorruptedDataset(tmp_path / "array").corruption["shared_channels"]


def _bad_inputs(tmp_path):
    """(argv, expected message) for every bad input of the prepare command."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    names = write_pngs(src, rgb_images(3))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    write_pngs(tmp_path / "broken", rgb_images(1), ["good.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    write_pngs(tmp_path / "missing", [np.full((8, 8), 255, np.uint8)] * 2, names[:2])
    write_pngs(tmp_path / "small", [np.full((4, 4), 255, np.uint8)] * 3, names)
    write_pngs(tmp_path / "grey", [np.full((8, 8), 128, np.uint8)] * 3, names)
    np.save(tmp_path / "count.npy", np.ones((2, 8, 8), np.uint8))
    np.save(tmp_path / "values.npy", np.full((3, 8, 8), 2, np.uint8))
    np.save(tmp_path / "channels.npy", np.ones((3, 2, 8, 8), np.uint8))
    used = tmp_path / "used"
    used.mkdir()
    (used / "file.txt").write_text("x")
    base = ["--source", src, "--dest", dest]
    masks = lambda name: ["--source", src, "--dest", dest, "--masks", tmp_path / name]  # noqa: E731
    return [
        (["--source", tmp_path / "broken", "--dest", dest, "--p", 0.5], "cannot read image bad.png"),
        (["--source", tmp_path / "empty", "--dest", dest, "--p", 0.5], "holds no images"),
        (["--source", tmp_path / "nowhere", "--dest", dest, "--p", 0.5], "does not exist"),
        (["--source", src, "--dest", used, "--p", 0.5], "is not empty (file.txt)"),
        ([*base, "--p", 1.5], "--p must be a finite number in [0, 1), got 1.5"),
        ([*base, "--p", 0.5, "--delta", -0.1], "--delta must be a finite number in [0, 1), got -0.1"),
        ([*base, "--p", 0.7, "--corruption", "fixed_box"], "needs p <= 0.5"),
        ([*base, "--p", 0.5, "--corruption", "averaging"], "invalid choice: 'averaging'"),
        ([*base, "--p", 0.5, "--corruption", "box", "--shared-channels"], "applies to dust only"),
        ([*base, "--p", 0.5, "--resolution", 0], "--resolution must be an integer >= 1, got 0"),
        (base, "give --p"),
        (["--dest", dest, "--p", 0.5], "--source is required"),
        ([*masks("missing")], "1 image(s) have no mask"),
        ([*masks("small")], "is 4x4 but its image is 8x8"),
        ([*masks("grey")], "not binary"),
        ([*masks("nowhere")], "no such folder or .npy file"),
        ([*masks("count.npy")], "holds 2 masks but the source has 3 images"),
        ([*masks("values.npy")], "not binary"),
        ([*masks("channels.npy")], "has 2 channels"),
        ([*masks("count.npy"), "--resolution", 4], "drop --resolution"),
        ([*masks("values.npy"), "--delta", 1.0], "--delta must be a finite number in [0, 1)"),
        (["verify", tmp_path / "nowhere"], "not an ambient-fast data set"),
    ]


def test_prepare_bad_input_errors(tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path):
        code, _, err = run_prepare(capsys, *argv)
        assert code == 1, (argv, err)
        assert message in err, (argv, err)
        assert err.startswith("error: ") and "Traceback" not in err
        assert not (tmp_path / "dest").exists(), argv
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["file.txt"]


def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ambient_fast.prepare", "verify", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "not an ambient-fast data set" in result.stderr


# ----------------------------------------------------------------------------------------------
# Synthetic data set.

def test_synthetic_images_are_deterministic_and_on_the_palette():
    a, b = clean_images(64, 16, seed=1), clean_images(64, 16, seed=1)
    assert a.shape == (64, 3, 16, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, clean_images(64, 16, seed=2))
    assert palette_fraction(a) == 1.0 and palette_fraction(clean_images(16, 32)) == 1.0
    noise = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)
    assert palette_fraction(noise) < 0.1
    colours = {tuple(c) for c in a.transpose(0, 2, 3, 1).reshape(-1, 3)}
    assert len(colours & {tuple(c) for c in palette}) == len(palette)  # every colour occurs
    with pytest.raises(ValueError, match="resolution"):
        clean_images(4, 24)


def test_synthetic_dataset_is_prepared_once_with_a_clean_twin_outside(tmp_path):
    path = synthetic_dataset(tmp_path, n=256, p=0.7, delta=0.2, seed=4)
    assert path.name == dataset_name(resolution=16, n=256, p=0.7, delta=0.2, shared_channels=True, seed=4)
    dataset = CorruptedDataset(path, verify=True)
    assert dataset.corruption == {"kind": "dust", "p": 0.7, "delta": 0.2, "shared_channels": True}
    clean = np.load(path.parent / f"{path.name}-clean" / "images.npy")
    held_out = np.load(path.parent / f"{path.name}-clean" / "held_out.npy")
    np.testing.assert_array_equal(clean, clean_images(256, 16, seed=4))
    assert held_out.shape == clean.shape and not np.array_equal(held_out, clean)
    observed, masks, _ = dataset.get(np.arange(256))
    np.testing.assert_array_equal(observed, clean * masks)
    assert abs(masks.mean() - 0.3) < 0.02 and (masks == masks[:, :1]).all()
    assert sorted(p.name for p in path.iterdir()) == ["masks.npy", "meta.json", "observed.npy"]
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert synthetic_dataset(tmp_path, n=256, p=0.7, delta=0.2, seed=4) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert synthetic_dataset(tmp_path, n=256, p=0.7, delta=0.1, seed=4) != path


# ----------------------------------------------------------------------------------------------
# Loaders.

@pytest.fixture(scope="module")
def dust_set(tmp_path_factory):
    """256 images 3x8x8 with labels, dust p = 0.5 per channel."""
    path, _ = write_random(tmp_path_factory.mktemp("loader") / "set", n=256, label_dim=4, seed=7)
    return CorruptedDataset(path)


def loaders(dataset, **kwargs):
    kinds = ["torch"] + (["dali"] if dali_available() else [])
    return {kind: make_loader(dataset, kind=kind, **kwargs) for kind in kinds}


def assert_same_batches(a, b):
    for name in RawBatch._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert (torch.equal(x, y) if torch.is_tensor(x) else x == y), name


def test_loader_delivers_the_stored_bytes(dust_set):
    """A batch is the stored rows of its indices, as they are (uint8 values, packed bits, int64
    labels), with the flip flags of its positions and the position of its first image."""
    observed, packed, labels = dust_set.get_raw(np.arange(len(dust_set)))
    for kind, loader in loaders(dust_set, batch_size=16, xflip=True, seed=4).items():
        assert loader.steps_per_epoch == 16 and kind in loader.describe()
        for step in range(20):  # into the second epoch
            epoch, index = divmod(step, 16)
            batch = loader.next()
            rows = loader.indices(epoch, index)
            assert batch.observed.dtype == torch.uint8 and batch.mask_bits.dtype == torch.uint8
            assert torch.equal(batch.observed, torch.from_numpy(observed[rows]))
            assert torch.equal(batch.mask_bits, torch.from_numpy(packed[rows]))
            assert torch.equal(batch.labels, torch.from_numpy(labels[rows]))
            assert batch.position == step * 16
            positions = step * 16 + torch.arange(16)
            assert torch.equal(batch.flips, (philox(stream_key(4, Stream.FLIP), positions)[0] >> 31).to(torch.uint8))
            # A set without records: every image masked, no noise, no sigma_min.
            assert batch.masked.tolist() == [1] * 16 and not batch.sigma_n.any() and not batch.sigma_min.any()
        # 3x8x8 images: 192 values, 24 bytes of bits; a label of 8 bytes, a flag of 1; a record of 9
        assert batch.nbytes() == 16 * (192 + 24 + 1 + 8 + 9), kind
    assert 0 < make_loader(dust_set, batch_size=16, xflip=True, seed=4).next().flips.sum() < 16
    assert not make_loader(dust_set, batch_size=16).next().flips.any()  # xflip off


def test_b_is_redrawn_each_epoch_and_survives_as_drawn(dust_set):
    """Through the ambient input: every image keeps its A in both epochs and gets a fresh B; a
    shared B keeps (1 - p)(1 - delta) of the values, one coin per pixel."""
    loader = make_loader(dust_set, batch_size=64, seed=1)
    inputs = AmbientObjective(EDMSchedule(), make_operator("dust", p=0.5, delta=0.3, shared_channels=True),
                              seed=1, shape=dust_set.shape).inputs
    epochs = [[inputs(loader.next()) for _ in range(loader.steps_per_epoch)] for _ in range(2)]
    order = [np.concatenate([loader.indices(epoch, b) for b in range(4)]).argsort() for epoch in (0, 1)]
    A, A_again = (torch.cat([b.A for b in epochs[e]])[order[e]] for e in (0, 1))
    A_hat, A_hat_again = (torch.cat([b.A_hat for b in epochs[e]])[order[e]] for e in (0, 1))
    assert torch.equal(A, A_again)
    assert abs(A_hat.mean().item() - 0.35) < 0.02
    full = (A == 1).all(1, keepdim=True)  # where every channel is observed, B shows unmasked
    assert (A_hat * full == A_hat[:, :1] * full).all()
    assert (A_hat != A_hat_again).flatten(1).any(1).float().mean() > 0.95


def test_sharding_is_disjoint_and_complete(dust_set):
    ranks = [make_loader(dust_set, batch_size=10, rank=r, world_size=2, seed=3, kind="torch") for r in (0, 1)]
    assert ranks[0].steps_per_epoch == 12  # 256 // 20; the last 16 images of each epoch are dropped
    for epoch in (0, 1):
        seen = [np.concatenate([loader.indices(epoch, b) for b in range(12)]) for loader in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == 240
        single = make_loader(dust_set, batch_size=20, seed=3, kind="torch")
        together = np.concatenate([ranks[0].indices(epoch, 4), ranks[1].indices(epoch, 4)])
        np.testing.assert_array_equal(together, single.indices(epoch, 4))  # same global batches
    assert not np.array_equal(ranks[0].indices(0, 0), ranks[0].indices(1, 0))
    # Positions: rank r's batch j starts at (2 j + r) * 10, so no two images of a step share one.
    assert [ranks[r].position(0, 3) for r in (0, 1)] == [60, 70] and ranks[0].position(1, 0) == 240


def test_loaders_resume_bitwise(dust_set):
    for kind in loaders(dust_set, batch_size=48):
        kwargs = dict(batch_size=48, seed=5, xflip=True, kind=kind)
        loader = make_loader(dust_set, **kwargs)
        for _ in range(4):  # into the middle of epoch 0 (5 steps per epoch)
            loader.next()
        state = json.loads(json.dumps(loader.state_dict()))
        assert (state["epoch"], state["batch"]) == (0, 4)
        straight = [loader.next() for _ in range(3)]  # crosses into epoch 1
        resumed = make_loader(dust_set, **kwargs)
        resumed.load_state_dict(state)
        for a, b in zip(straight, [resumed.next() for _ in range(3)]):
            assert_same_batches(a, b)
    with pytest.raises(ValueError, match="batch_size 48 \\(now 16\\)"):
        make_loader(dust_set, batch_size=16, seed=5).load_state_dict(state)


def test_erased_pixels_never_reach_a_batch(tmp_path):
    """The same images prepared with different values in the erased pixels give identical data sets
    and identical batches."""
    rng = np.random.default_rng(0)
    masks = rng.random((32, 8, 8)) < 0.5
    np.save(tmp_path / "masks.npy", masks)
    base = rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    for name, fill in (("a", 0), ("b", 255)):
        images = np.where(masks[..., None], base, rng.integers(0, 256, base.shape, dtype=np.uint8) | fill)
        write_pngs(tmp_path / f"src-{name}", list(images))
        assert prepare(["--source", str(tmp_path / f"src-{name}"), "--masks", str(tmp_path / "masks.npy"),
                        "--dest", str(tmp_path / name)]) == 0
    for file in ("observed.npy", "masks.npy"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    for kind in loaders(CorruptedDataset(tmp_path / "a"), batch_size=8):
        a, b = (make_loader(CorruptedDataset(tmp_path / name), batch_size=8, xflip=True, kind=kind) for name in "ab")
        for _ in range(5):
            assert_same_batches(a.next(), b.next())


def test_loader_bad_arguments(dust_set, monkeypatch):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_loader(dust_set, batch_size=200, world_size=2)
    with pytest.raises(ValueError, match="rank must lie in"):
        make_loader(dust_set, batch_size=8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="loader kind"):
        make_loader(dust_set, batch_size=8, kind="fast")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    monkeypatch.delitem(sys.modules, "ambient_fast.data.dali_loader", raising=False)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[dali\]"'):
        make_loader(dust_set, batch_size=8, kind="dali")
    assert make_loader(dust_set, batch_size=8, kind="auto").kind == "torch"


@needs_dali
def test_dali_pipeline_agrees_with_the_torch_loader_bitwise(dust_set, tmp_path):
    """DALI's asynchronous pipeline (CPU backend here) hands out the torch loader's batches, byte for
    byte, for two epochs, with labels and without."""
    unlabelled, _ = write_random(tmp_path / "unlabelled", n=64)
    for dataset in (dust_set, CorruptedDataset(unlabelled)):
        kwargs = dict(batch_size=16, seed=2, xflip=True)
        torch_loader, dali_loader = (make_loader(dataset, kind=kind, **kwargs) for kind in ("torch", "dali"))
        for _ in range(2 * torch_loader.steps_per_epoch):
            assert_same_batches(torch_loader.next(), dali_loader.next())
        assert (dali_loader.epoch, dali_loader.batch) == (2, 0)  # what it handed out, not what DALI prepared
