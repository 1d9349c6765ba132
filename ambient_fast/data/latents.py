"""Latent data sets: images encoded once by a diffusers `AutoencoderKL` (the SD VAE, as EDM2 and Ambient-o
train on ImageNet-512), stored in our data-set format, and decoded again for the sampler's output.

The autoencoder is read from a local folder (`save_pretrained`'s layout: config.json and the weights),
never downloaded. Its latents are scaled as NVlabs/edm2's `StabilityVAEEncoder` scales them, so that a
network trained here sees what EDM2's and Ambient-o's see:

- pixels enter the encoder on [0, 1] (uint8 / 255; EDM2's convention, which its constants were measured
  with), and the decoder's output is clamped to [0, 1] and rounded to uint8;
- raw latents are standardised per channel to the final ones, final = (raw - raw_mean) / raw_std *
  final_std + final_mean, with EDM2's constants for the SD VAE's 4 channels: raw_mean (5.81, 3.25, 0.12,
  -2.15), raw_std (4.17, 4.62, 3.71, 3.28), final_mean 0, final_std 0.5 (sigma_data); another autoencoder
  takes its own `LatentScaling`.

One departure: EDM2 stores the posterior's mean and standard deviation and draws a fresh latent from it
each time it reads an image; we store the posterior mean only (one float16 latent per image, the
format's values), so the small spread of the SD VAE's posterior is not sampled. Everything else a set
holds is as for pixels: labels, per-image records (sigma_min) and noise-level windows (sigma_max).

Masks do not live in latent space (a latent mixes a neighbourhood of pixels, so hiding pixels hides
no latent value): a latent set's masks are full, `meta.json` says it is latent, and training refuses a
mask corruption on it (`refuse_masks`); such sets train with noise-level windows only.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ambient_fast.data.format import RECORD, CorruptedDataset, DataError, DatasetWriter

__all__ = ["EDM2_SD_VAE_SCALING", "LatentScaling", "LatentCodec", "write_latent_dataset", "refuse_masks"]

ENCODE_BATCH = 8  # images through the autoencoder at a time (EDM2's batch for its VAE)
PROGRESS_FROM = 64  # show the encoding's progress bar from this many images on


@dataclass(frozen=True)
class LatentScaling:
    """The per-channel standardisation of raw latents: final = (raw - raw_mean) / raw_std * final_std + final_mean."""

    raw_mean: tuple
    raw_std: tuple
    final_mean: float = 0.0
    final_std: float = 0.5

    def _scale_bias(self, like: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        scale = self.final_std / torch.tensor(self.raw_std, dtype=torch.float64)
        bias = self.final_mean - torch.tensor(self.raw_mean, dtype=torch.float64) * scale
        shape = (1, -1, 1, 1)
        return scale.to(like).reshape(shape), bias.to(like).reshape(shape)

    def to_final(self, raw: torch.Tensor) -> torch.Tensor:
        scale, bias = self._scale_bias(raw)
        return raw * scale + bias

    def to_raw(self, final: torch.Tensor) -> torch.Tensor:
        scale, bias = self._scale_bias(final)
        return (final - bias) / scale


EDM2_SD_VAE_SCALING = LatentScaling(raw_mean=(5.81, 3.25, 0.12, -2.15), raw_std=(4.17, 4.62, 3.71, 3.28))


def _load_autoencoder(folder: Path):
    """The AutoencoderKL saved in `folder`, in eval mode without gradients; DataError when it cannot be."""
    if not (folder / "config.json").is_file():
        raise DataError(f"{folder} holds no autoencoder (no config.json): give the local folder of a diffusers "
                        "AutoencoderKL (its save_pretrained layout); nothing is downloaded")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DataError("latent data sets need diffusers: pip install -e '.[diffusers]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, EnvironmentError) as error:
        raise DataError(f"cannot read the autoencoder in {folder} ({error}); give the folder of a diffusers "
                        "AutoencoderKL") from None
    return vae.eval().requires_grad_(False)


class LatentCodec:
    """A diffusers AutoencoderKL with the latent scaling (module docstring): `encode` uint8 pixels to
    final latents, `decode` final latents to uint8 pixels.

    Build it with `LatentCodec.load(folder)`; `record()` is what a latent set's meta.json keeps (and a
    network trained on the set, in its training record), and `LatentCodec.from_record(record)` (or
    `for_dataset`) loads the autoencoder it names, checked against it, to decode.
    """

    def __init__(self, vae: torch.nn.Module, folder: Path, scaling: Optional[LatentScaling] = None,
                 batch: int = ENCODE_BATCH):
        self.vae, self.folder, self.batch = vae, Path(folder), int(batch)
        self.channels = int(vae.config.latent_channels)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # one downsampling per block but the last
        if scaling is None:
            if self.channels != len(EDM2_SD_VAE_SCALING.raw_mean):
                raise DataError(f"the autoencoder in {folder} has {self.channels} latent channels; EDM2's scaling is "
                                f"for the SD VAE's {len(EDM2_SD_VAE_SCALING.raw_mean)}: give its own LatentScaling")
            scaling = EDM2_SD_VAE_SCALING
        if not len(scaling.raw_mean) == len(scaling.raw_std) == self.channels or min(scaling.raw_std) <= 0:
            raise DataError(f"a latent scaling needs {self.channels} means and {self.channels} positive standard "
                            f"deviations, got {scaling}")
        self.scaling = scaling

    @classmethod
    def load(cls, folder: Union[str, Path], scaling: Optional[LatentScaling] = None, device="cpu",
             batch: int = ENCODE_BATCH) -> "LatentCodec":
        folder = Path(folder)
        return cls(_load_autoencoder(folder).to(device), folder, scaling, batch)

    @classmethod
    def from_record(cls, record: dict, folder: Union[str, Path, None] = None, device="cpu",
                    what: str = "the latents") -> "LatentCodec":
        """The codec a latent record describes (`record()`, kept by a latent set and by a network trained
        on one): the autoencoder in `folder` (default: the folder the record names), checked against the
        record (the same config), with the record's scaling. `what` names the record's owner in errors."""
        folder = Path(record["folder"] if folder is None else folder)
        scaling = LatentScaling(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["scaling"].items()})
        try:
            codec = cls.load(folder, scaling, device)
        except DataError as error:
            raise DataError(f"{error} ({what} were encoded by the autoencoder in {record['folder']}: give its folder "
                            "if it moved)") from None
        if codec.config_digest() != record["config_sha256"]:
            raise DataError(f"the autoencoder in {folder} is not the one {what} were encoded with (its config differs; "
                            f"the record names {record['folder']}); give that autoencoder's folder")
        return codec

    @classmethod
    def for_dataset(cls, dataset: CorruptedDataset, folder: Union[str, Path, None] = None,
                    device="cpu") -> "LatentCodec":
        """The codec of a latent set (`from_record` of its meta.json's record)."""
        if not dataset.is_latent:
            raise DataError(f"{dataset.path} holds pixels, not latents: it needs no autoencoder")
        return cls.from_record(dataset.meta.latent, folder, device, what=f"the latents of {dataset.path}")

    def config_digest(self) -> str:
        return hashlib.sha256((self.folder / "config.json").read_bytes()).hexdigest()

    def latent_shape(self, pixel_shape: Sequence[int]) -> "tuple[int, int, int]":
        """(c, h, w) of the latents of images of shape (C, H, W)."""
        _, height, width = pixel_shape
        if height % self.factor or width % self.factor:
            raise DataError(f"images of {height}x{width} do not divide into the autoencoder's {self.factor}x"
                            f"{self.factor} cells; choose a resolution that is a multiple of {self.factor}")
        return self.channels, height // self.factor, width // self.factor

    def record(self, pixel_shape: Sequence[int]) -> dict:
        """What a latent set's meta.json keeps of the codec (JSON-serialisable)."""
        return {"autoencoder": "diffusers AutoencoderKL", "folder": str(self.folder.resolve()),
                "config_sha256": self.config_digest(), "downsampling": self.factor,
                "pixel_shape": [int(v) for v in pixel_shape], "posterior": "mean",
                "scaling": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.scaling).items()}}

    @torch.no_grad()
    def encode(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 final latents (N, c, H / f, W / f): the posterior mean, scaled."""
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] != self.vae.config.in_channels:
            raise DataError(f"the autoencoder encodes uint8 images of {self.vae.config.in_channels} channels "
                            f"(N, C, H, W); got {pixels.dtype} {pixels.shape}")
        self.latent_shape(pixels.shape[1:])
        device = next(self.vae.parameters()).device
        parts = []
        for start in range(0, len(pixels), self.batch):
            x = torch.from_numpy(pixels[start:start + self.batch]).to(device, torch.float32) / 255
            parts.append(self.vae.encode(x).latent_dist.mean.to(torch.float32))
        return self.scaling.to_final(torch.cat(parts)).cpu()

    def images(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents (N, c, h, w) -> (N, H, W, 3) uint8 images, the layout PNGs and grids take
        (`ambient_fast.files.images`)."""
        return self.decode(latents).transpose(0, 2, 3, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Final latents (N, c, h, w) -> uint8 pixels (N, 3, h f, w f), the decoder's [0, 1] output rounded."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise DataError(f"the autoencoder decodes latents of {self.channels} channels (N, {self.channels}, h, w); "
                            f"got {tuple(latents.shape)}")
        device = next(self.vae.parameters()).device
        parts = []
        for start in range(0, len(latents), self.batch):
            raw = self.scaling.to_raw(latents[start:start + self.batch].to(device, torch.float32))
            parts.append(self.vae.decode(raw).sample.clamp(0, 1).mul(255).round().to(torch.uint8).cpu())
        return torch.cat(parts).numpy()


def _progress(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]encode"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=total < PROGRESS_FROM)


def write_latent_dataset(dest: Union[str, Path], codec: LatentCodec, images: Union[np.ndarray, Callable],
                         count: Optional[int] = None, *, labels: Optional[np.ndarray] = None,
                         sigma_min: Optional[np.ndarray] = None, sigma_max: Optional[np.ndarray] = None,
                         source: str = "", overwrite: bool = False, chunk: int = 256) -> Path:
    """Encode images and write them as a latent data set.

    Args:
        dest: the data set's directory (the format's rules: refused when in use unless `overwrite`).
        codec: the autoencoder and scaling (`LatentCodec.load`).
        images: uint8 (N, 3, R, R), or a function (start, stop) -> uint8 (stop - start, 3, R, R) that reads
            them a chunk at a time (then `count` gives N).
        labels: int (N,) class indices or None.
        sigma_min, sigma_max: float (N,) per-image noise-level windows (0 / inf: no bound), or None.
        source: where the images came from, for the record.
        chunk: images read and encoded per chunk (the autoencoder runs `codec.batch` at a time), with a
            progress bar on stderr.
    Returns the data set's path. Values: the final latents as float16; observed: their rounding to
    uint8 levels on [-1, 1] (for looking at); masks: full; corruption kind "none".
    """
    read = images if callable(images) else (lambda start, stop: images[start:stop])
    count = len(images) if count is None and not callable(images) else count
    if count is None or count < 1:
        raise DataError("write_latent_dataset needs at least one image (and `count` when images is a function)")
    first = read(0, min(chunk, count))
    pixel_shape = first.shape[1:]
    shape = codec.latent_shape(pixel_shape)
    label_dim = 0 if labels is None else int(np.max(labels)) + 1
    with DatasetWriter(dest, count=count, shape=shape, label_dim=label_dim, overwrite=overwrite, values=True,
                       records=sigma_min is not None, sigma_max=sigma_max is not None,
                       latent=codec.record(pixel_shape)) as writer, _progress(count) as progress:
        task = progress.add_task("encode", total=count)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            pixels = first if start == 0 else read(start, stop)
            if pixels.shape != (stop - start, *pixel_shape):
                raise DataError(f"images {start}..{stop - 1} have shape {pixels.shape[1:]}, the first ones {pixel_shape}: "
                                "every image of a set must have the same size")
            values = codec.encode(pixels).numpy().astype(np.float16)
            if not np.isfinite(values).all():
                raise DataError(f"the autoencoder gave non-finite latents (or beyond float16) for images {start}..{stop - 1}")
            observed = np.clip(np.round((values.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)
            records = None
            if sigma_min is not None:
                records = np.zeros(stop - start, RECORD)
                records["sigma_min"] = sigma_min[start:stop]
            writer.append(observed, np.ones(values.shape, bool), None if labels is None else labels[start:stop],
                          values, records, None if sigma_max is None else sigma_max[start:stop])
            progress.advance(task, stop - start)
        corruption = {"kind": "none", "p": 0.0, "delta": 0.0, "shared_channels": True}
        return writer.commit(corruption, source or f"{count} images encoded by {codec.folder}")


def refuse_masks(dataset: CorruptedDataset, what: str) -> None:
    """Raise DataError when `dataset` is latent and `what` (e.g. "--further dust") would put masks on it."""
    if dataset.is_latent:
        raise DataError(f"masks do not live in latent space: {dataset.path} holds latents of an autoencoder, and "
                        f"{what} needs masks on pixels; train a latent set with noise-level windows only (sigma_min, "
                        "sigma_max), or prepare a pixel set for masked training")
