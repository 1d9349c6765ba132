"""What a training run shows and leaves for people to look at, kept out of the trainer: the stats.jsonl
lines (and the trackers that receive them), the GPU line, the samples drawn with progress per
network evaluation, the final pictures (labelled panels: corrupted training inputs / samples / clean
images, and held-out images restored in one step, with PSNR) and the evaluations of `--eval-every`
(a sample grid and the Fréchet distance against clean reference images)."""
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ambient_fast.files.atomic import dumps_json

__all__ = ["StatsLog", "gpu_info", "sampler_evaluations", "progress_per_evaluation", "draw_samples",
           "final_pictures", "Pictures", "TrainingEvaluation"]

RESTORE_SIGMA = 0.02  # the noise level of the run's one-step restorations (the restore command's default)
OVERVIEW_IMAGES, RESTORED_IMAGES, COLUMNS = 36, 12, 6  # images per panel of overview.png, in 6 columns
TILE = 64  # pixels a tile of overview.png is at least: small images are upscaled (nearest) to it

Progress = Callable[[float], None]  # told the images done so far (fractional within a batch)


class StatsLog:
    """stats.jsonl: one EDM-style line per reporting window (main rank), the losses of the window's
    steps read from the device only then. `reduce` (collective, optional) turns the window's losses
    (steps,) into what the line reports, e.g. their means over the ranks. `tracker` (optional, main
    rank: ambient_fast.training.tracking) receives every line too."""

    def __init__(self, path: Path, enabled: bool,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, tracker=None):
        self.path, self.enabled, self.reduce, self.tracker = Path(path), enabled, reduce, tracker
        self.window: List[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.window.append(loss)

    def flush(self, **progress) -> float:
        """Append the window's line with `progress` (step, kimg, lr, ...: names as in EDM's log) and
        return its mean finite loss (NaN when every step was skipped)."""
        losses = torch.stack([loss.detach() for loss in self.window])
        if self.reduce is not None:
            losses = self.reduce(losses)
        losses = losses.cpu().double()
        self.window = []
        finite = losses[torch.isfinite(losses)]
        mean = finite.mean().item() if len(finite) else float("nan")
        if self.enabled:
            entry = {"Loss/loss": dict(num=len(finite), mean=mean if len(finite) else None,
                                       std=finite.std().item() if len(finite) > 1 else 0.0),
                     **progress, "timestamp": time.time()}
            with open(self.path, "a") as f:  # appended; a line torn by a kill is dropped on resume
                f.write(dumps_json(entry) + "\n")
            if self.tracker is not None:
                self.tracker.log(entry, step=int(progress["Progress/step"]))
        return mean


def gpu_info(device: torch.device) -> str:
    """' | GPU 87% 12.3 GiB' (utilisation from NVML where it answers, the peak memory) on CUDA, else ''."""
    if device.type != "cuda":
        return ""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
    except Exception:  # nvidia-ml-py missing or no NVML: show memory only
        util = None
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return f" | GPU {util}% {memory:.1f} GiB" if util is not None else f" | GPU {memory:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# Sampling with progress.


def sampler_evaluations(num_steps: int, solver: str = "heun", masks: int = 1) -> int:
    """The network calls of one sampler run (ambient_fast.sampling.samplers.ambient_sample): Heun
    2N - 1 (Euler on its last step), Euler N; times `masks` where reconstruction guidance evaluates
    the network once per mask."""
    return (2 * num_steps - 1 if solver == "heun" else num_steps) * masks


@contextlib.contextmanager
def progress_per_evaluation(net: torch.nn.Module, images: int, evaluations: int, on_progress: Progress,
                            done: float = 0.0):
    """While `images` images are sampled with `net` in one batch (`evaluations` network calls), tell
    `on_progress` the images done (`done` before the batch, plus the batch's share of the calls
    made), after every call of the network on the CPU, and at the batch's end. On a GPU the count
    moves per batch: the host queues calls ahead of the device, and a CUDA graph replays them
    without calling the module, so a count per call would not be the work done."""
    calls = 0

    def called(*_):
        nonlocal calls
        calls += 1
        on_progress(done + images * min(calls / evaluations, 1.0))

    on_cpu = next(net.parameters()).device.type == "cpu"
    handle = net.register_forward_hook(called) if on_cpu else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
    on_progress(done + images)


def draw_samples(loaded, model: torch.nn.Module, seeds: Sequence[int], device: torch.device, steps: int,
                 on_progress: Optional[Progress] = None) -> np.ndarray:
    """Samples of `model` (a `LoadedNetwork`'s, `loaded` saying what it trained on), one per seed, each
    a function of its seed alone: the fixed-mask sampler at the training survival, `steps` Heun
    steps. Returns uint8 (N, H, W, C); `on_progress` is told the images done as it goes. A model
    trained on latents samples them unclamped and decodes them through the autoencoder its training
    record names."""
    from ambient_fast.files.images import to_uint8
    from ambient_fast.sampling.samplers import ambient_sample, sampling_sigmas, seeded_inputs

    channels = model.img_channels // 2
    shape = (channels, model.img_resolution, model.img_resolution)
    latents, masks = seeded_inputs(list(seeds), shape, 1, loaded.survival,
                                   bool(loaded.corruption.get("shared_channels")), device)
    labels: Optional[torch.Tensor] = None
    if model.label_dim:
        labels = torch.eye(model.label_dim, device=device)[torch.arange(len(latents)) % model.label_dim]
    codec = _codec(loaded, device)
    with progress_per_evaluation(model, len(latents), sampler_evaluations(steps), on_progress or (lambda _: None)):
        images = ambient_sample(model, latents, masks, num_steps=steps, class_labels=labels,
                                clip=codec is None, **sampling_sigmas(loaded))
    return to_uint8(images) if codec is None else codec.images(images)


def _codec(loaded, device: torch.device):
    """The LatentCodec that decodes a latent model's samples (`loaded.corruption["latent"]`), else None."""
    from ambient_fast.data.latents import LatentCodec

    record = loaded.corruption.get("latent")
    return None if record is None else LatentCodec.from_record(record, device=device)


# ----------------------------------------------------------------------------------------------
# The final pictures.


@dataclass
class Pictures:
    """What `final_pictures` wrote: overview.png, samples.png, inputs.png, and the PSNR of the
    restored and of the corrupted images against their clean originals (None without those)."""

    overview: Path
    samples: Path
    psnr_restored: Optional[float] = None
    psnr_corrupted: Optional[float] = None
    held_out: bool = False
    overview_array: Optional[np.ndarray] = None


def _clean_twin(dataset, name: str, count: int) -> Optional[np.ndarray]:
    """The first `count` images of the built-in synthetic set's clean twin file `name` (uint8 (N, C, H, W));
    None for other sets."""
    from ambient_fast.data.synthetic import clean_twin, is_synthetic

    path = clean_twin(dataset.path) / name
    if not is_synthetic(dataset) or not path.is_file():
        return None
    return np.load(path, mmap_mode="r")[:count].copy()


def restoration_examples(model: torch.nn.Module, dataset, count: int, device: torch.device):
    """One-step restorations (ambient_fast.evaluation.restoration) for the final pictures: (corrupted
    (missing values black, as stored), restored, clean or None), uint8 (N, H, W, C). On the built-in set, held-out clean images (never
    trained on) under the masks of the first training images, which follow the data set's p(A);
    elsewhere the first training images themselves, with no clean references."""
    from ambient_fast.evaluation.restoration import restore
    from ambient_fast.files.images import from_uint8, to_uint8

    indices = np.arange(min(count, len(dataset)))
    observed, mask, labels = dataset.get(indices)
    clean = _clean_twin(dataset, "held_out.npy", len(indices))
    if clean is not None:
        observed = clean * mask
    mask_t = torch.from_numpy(mask).float().to(device)
    y = from_uint8(torch.from_numpy(np.ascontiguousarray(observed)).to(device)) * mask_t
    label_t = torch.from_numpy(labels).to(device) if model.label_dim else None
    restored = to_uint8(restore(model, y, mask_t, RESTORE_SIGMA, label_t))
    return observed.transpose(0, 2, 3, 1), restored, None if clean is None else clean.transpose(0, 2, 3, 1)


def _panel(images: np.ndarray, label: str) -> np.ndarray:
    """A labelled grid of (N, H, W, C) uint8 images, tiles upscaled (nearest) to about TILE pixels."""
    from ambient_fast.files.images import grid, labelled, upscale

    factor = max(1, TILE // images.shape[1])
    return labelled(grid([upscale(image, factor) for image in images], columns=min(COLUMNS, len(images)),
                         pad=2), label)


def final_pictures(network_path: Path, dataset, out: Path, count: int, steps: int, device: torch.device,
                   memory_format: torch.memory_format = torch.contiguous_format,
                   on_progress: Optional[Progress] = None) -> Pictures:
    """Sample `count` images from the network saved at `network_path` and write to `out`: samples.png
    (all of them), inputs.png (as many corrupted training inputs) and overview.png, the picture of
    the run: labelled panels of corrupted training inputs, samples and (built-in set) their clean
    originals; below, one-step restorations of corrupted images (held-out ones with their clean
    originals and PSNR on the built-in set; data sets with noisy images have none)."""
    from ambient_fast.evaluation.metrics import psnr
    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.files.images import arrange, grid, save_png

    loaded = load_network(network_path)
    model = loaded.model.to(device, memory_format=memory_format)
    samples = draw_samples(loaded, model, range(count), device, steps, on_progress)
    shown_inputs = np.arange(min(count, len(dataset)))
    if dataset.is_latent:  # decoded by the set's autoencoder
        from ambient_fast.data.latents import LatentCodec

        stored = torch.from_numpy(dataset.get_stored(shown_inputs).values.astype(np.float32))
        inputs = LatentCodec.for_dataset(dataset, device=device).images(stored)
    else:
        inputs = dataset.get(shown_inputs)[0].transpose(0, 2, 3, 1)
    pictures = Pictures(overview=out / "overview.png", samples=out / "samples.png")
    save_png(grid(list(samples)), pictures.samples)
    save_png(grid(list(inputs)), out / "inputs.png")

    shown = min(OVERVIEW_IMAGES, count, len(inputs))
    missing = 1 - dataset.meta.observed_fraction
    top = [_panel(inputs[:shown], f"corrupted training inputs ({missing:.0%} of values missing, black)"),
           _panel(samples[:shown], f"samples ({steps} Heun steps, fixed mask)")]
    clean = _clean_twin(dataset, "images.npy", shown)
    if clean is not None:
        top.append(_panel(clean.transpose(0, 2, 3, 1), "their clean originals (never seen in training)"))
    rows = [top]
    if dataset.corruption.get("kind") != "none" and not dataset.has_noise:
        corrupted, restored, references = restoration_examples(model, dataset, RESTORED_IMAGES, device)
        pictures.held_out = references is not None
        if references is None:
            rows.append([_panel(corrupted, "training inputs"), _panel(restored, "restored in one step")])
        else:
            pictures.psnr_restored = float(psnr(restored, references).mean())
            pictures.psnr_corrupted = float(psnr(corrupted, references).mean())
            rows.append([_panel(corrupted, f"held-out images, corrupted ({pictures.psnr_corrupted:.1f} dB PSNR)"),
                         _panel(restored, f"restored in one step ({pictures.psnr_restored:.1f} dB PSNR)"),
                         _panel(references, "clean")])
    pictures.overview_array = arrange(rows, gap=2 * TILE // 4)
    save_png(pictures.overview_array, pictures.overview)
    return pictures


# ----------------------------------------------------------------------------------------------
# --eval-every


class TrainingEvaluation:
    """`--eval-every`'s evaluation of the EMA network during training: `count` samples at fixed seeds
    (0..count-1: successive grids show one set of seeds changing), `steps` Heun steps each, and their
    Fréchet distance in pixel space against clean reference images
    (ambient_fast.evaluation.report.load_clean: a folder, a .npy, or the built-in set's held-out clean
    twin), with the reference's own floor (its halves against each other)."""

    def __init__(self, reference: str, count: int, steps: int, shape: Sequence[int]):
        from ambient_fast.evaluation.metrics import pixel_features
        from ambient_fast.evaluation.report import load_clean, reference_floor, small_count_warnings

        images = load_clean(reference, "--eval-reference", "held_out.npy", "held-out clean images of the synthetic set")
        if tuple(images.array.shape[1:]) != tuple(shape):
            raise ValueError(f"--eval-reference {reference} holds {images.shape_text} images, the run trains on "
                             f"{'x'.join(map(str, shape))} ones; give clean images of the training images' size")
        self.source, self.count, self.steps = images.source, count, steps
        self.features = pixel_features(images.array)
        floor = reference_floor(self.features)
        self.floor = None if floor is None else floor["value"]
        self.warnings = small_count_warnings({"--eval-samples": count, "--eval-reference": len(images.array)},
                                             self.features.shape[1])

    def describe(self) -> str:
        floor = "" if self.floor is None else f" (its floor: {self.floor:.2f})"
        return (f"{self.count} samples, Fréchet distance in pixels against {len(self.features)} images of "
                f"{self.source}{floor}")

    def __call__(self, loaded, device: torch.device, grid_path: Path, on_progress: Optional[Progress] = None):
        """Sample, write the grid to `grid_path`, and return (stats.jsonl's fields, the grid)."""
        from ambient_fast.evaluation.metrics import frechet_distance, pixel_features
        from ambient_fast.files.images import grid, save_png

        samples = draw_samples(loaded, loaded.model.to(device), range(self.count), device, self.steps, on_progress)
        picture = grid(list(samples))
        save_png(picture, grid_path)
        fields = {"Eval/frechet_distance": frechet_distance(pixel_features(samples.transpose(0, 3, 1, 2)),
                                                            self.features),
                  "Eval/samples": self.count}
        if self.floor is not None:
            fields["Eval/reference_floor"] = self.floor
        return fields, picture
