"""Latent data sets (ambient_fast.data.latents) with a tiny randomly initialised diffusers AutoencoderKL
saved with save_pretrained: EDM2's scaling against a direct computation, encoding into our format and
decoding, and the refusals (masks in latent space, another autoencoder, a missing folder)."""
import json

import numpy as np
import pytest
import torch

from ambient_fast.data.format import CorruptedDataset, DataError, DatasetWriter
from ambient_fast.data.latents import (EDM2_SD_VAE_SCALING, LatentCodec, LatentScaling, refuse_masks,
                                       write_latent_dataset)

diffusers = pytest.importorskip("diffusers", reason="latent sets need diffusers (the test extra installs it)")


def tiny_autoencoder(folder, latent_channels: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                                  layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                                  sample_size=16)
    vae.save_pretrained(folder)
    return vae.eval()


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    return folder, tiny_autoencoder(folder)


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3, 16, 16), dtype=np.uint8)


def test_encode_and_decode_are_edm2s(autoencoder):
    folder, vae = autoencoder
    codec = LatentCodec.load(folder, batch=3)
    assert (codec.channels, codec.factor) == (4, 2)
    pixels = images(7)
    latents = codec.encode(pixels)
    with torch.no_grad():  # EDM2's arithmetic written out: [0, 1] input, per-channel standardisation to std 0.5
        raw = vae.encode(torch.from_numpy(pixels).float() / 255).latent_dist.mean
        mean, std = torch.tensor([5.81, 3.25, 0.12, -2.15]), torch.tensor([4.17, 4.62, 3.71, 3.28])
        expected = (raw - mean[None, :, None, None]) / std[None, :, None, None] * 0.5
        decoded = vae.decode(raw).sample.clamp(0, 1) * 255
    assert latents.shape == (7, 4, 8, 8)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    back = codec.decode(latents)
    assert back.dtype == np.uint8 and back.shape == pixels.shape
    assert np.abs(back.astype(np.float64) - decoded.numpy()).max() <= 0.5 + 1e-3  # rounded, nothing else
    torch.testing.assert_close(EDM2_SD_VAE_SCALING.to_raw(EDM2_SD_VAE_SCALING.to_final(raw)), raw)


def test_latent_data_set_round_trip(autoencoder, tmp_path):
    folder, _ = autoencoder
    codec = LatentCodec.load(folder)
    pixels, labels = images(5), np.array([0, 2, 1, 2, 0])
    sigma_min = np.array([0, 0, 0.4, 1.5, 0], np.float32)
    sigma_max = np.array([np.inf, 0.2, np.inf, np.inf, 1.0], np.float32)
    reads = []
    read = lambda start, stop: reads.append((start, stop)) or pixels[start:stop]
    path = write_latent_dataset(tmp_path / "latents", codec, read, count=5, labels=labels, sigma_min=sigma_min,
                                sigma_max=sigma_max, chunk=2)
    assert reads == [(0, 2), (2, 4), (4, 5)]  # read a chunk at a time
    dataset = CorruptedDataset(path, verify=True)
    assert dataset.is_latent and not dataset.has_noise and dataset.meta.version == 3
    assert dataset.shape == (4, 8, 8) and dataset.label_dim == 3
    record = dataset.meta.latent
    assert record["pixel_shape"] == [3, 16, 16] and record["downsampling"] == 2 and record["posterior"] == "mean"
    assert record["scaling"]["raw_std"] == [4.17, 4.62, 3.71, 3.28]
    stored = dataset.get_stored(np.arange(5))
    # float16 of the latents (encoded in other batches here: the convolutions' last bits may differ)
    np.testing.assert_allclose(stored.values.astype(np.float32), codec.encode(pixels).numpy(), rtol=1e-3, atol=1e-4)
    assert stored.packed.min() == 255 and dataset.meta.observed_fraction == 1  # full masks
    np.testing.assert_array_equal(stored.labels, labels)
    np.testing.assert_array_equal(dataset.records()["sigma_min"], sigma_min)
    np.testing.assert_array_equal(dataset.sigma_max(), sigma_max)
    # The sampler's decode, through the set's own record.
    decoded = LatentCodec.for_dataset(dataset, folder).decode(torch.from_numpy(stored.values.astype(np.float32)))
    assert decoded.shape == (5, 3, 16, 16)


def test_refusals(autoencoder, tmp_path):
    folder, _ = autoencoder
    codec = LatentCodec.load(folder)
    path = write_latent_dataset(tmp_path / "latents", codec, images(2))
    dataset = CorruptedDataset(path)
    with pytest.raises(DataError, match="masks do not live in latent space"):
        refuse_masks(dataset, "--further dust")
    with pytest.raises(DataError, match="masks do not live in latent space"):
        with DatasetWriter(tmp_path / "bad", count=1, shape=(4, 8, 8), values=True, latent=codec.record((3, 16, 16))) as w:
            masks = np.ones((1, 4, 8, 8), bool)
            masks[0, 0, 0, 0] = False
            w.append(np.zeros((1, 4, 8, 8), np.uint8), masks, values=np.zeros((1, 4, 8, 8), np.float16))
    other = tmp_path / "other-vae"
    tiny_autoencoder(other, seed=3)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "sample_size": 32}))
    with pytest.raises(DataError, match="not the one"):
        LatentCodec.for_dataset(dataset, other)
    with pytest.raises(DataError, match="no config.json"):
        LatentCodec.load(tmp_path / "nowhere")
    three = tmp_path / "three-channel-vae"
    tiny_autoencoder(three, latent_channels=3)
    with pytest.raises(DataError, match="own LatentScaling"):
        LatentCodec.load(three)
    LatentCodec.load(three, LatentScaling(raw_mean=(0, 0, 0), raw_std=(1, 1, 1)))
    with pytest.raises(DataError, match="multiple of 2"):
        codec.encode(np.zeros((1, 3, 15, 15), np.uint8))
