"""What a training run shows and leaves for people to look at, kept out of the trainer: the progress
bar, the stats.jsonl lines, the GPU line, and the sample grids beside the corrupted training inputs."""
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch

from ambient_fast.files.atomic import dumps_json

__all__ = ["progress_bar", "StatsLog", "gpu_info", "sample_grids"]


def progress_bar(enabled: bool):
    """A rich progress bar on the main rank, nothing elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not enabled)


class StatsLog:
    """stats.jsonl: one EDM-style line per reporting window (main rank), the losses of the window's
    steps read from the device only then. `reduce` (collective, optional) turns the window's losses
    (steps,) into what the line reports, e.g. their means over the ranks."""

    def __init__(self, path: Path, enabled: bool,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.path, self.enabled, self.reduce = Path(path), enabled, reduce
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


def sample_grids(network_path: Path, dataset, out: Path, count: int, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> Path:
    """Sample `count` images from the network saved at `network_path` (the fixed-mask sampler at its
    training survival) and write samples.png, inputs.png (the first corrupted training images) and
    overview.png (inputs | samples) to `out`; returns overview.png's path. A latent set's samples and
    inputs are decoded by its autoencoder."""
    from ambient_fast.data.latents import LatentCodec
    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.files.images import grid, save_png, to_uint8
    from ambient_fast.sampling.samplers import ambient_sample, sampling_sigmas, seeded_inputs

    loaded = load_network(network_path)
    model = loaded.model.to(device, memory_format=memory_format)
    shape = (dataset.channels, dataset.resolution, dataset.resolution)
    latents, masks = seeded_inputs(range(count), shape, 1, loaded.survival,
                                   bool(loaded.corruption.get("shared_channels")), device)
    labels: Optional[torch.Tensor] = None
    if model.label_dim:
        labels = torch.eye(model.label_dim, device=device)[torch.arange(count) % model.label_dim]
    codec = LatentCodec.for_dataset(dataset, device=device) if dataset.is_latent else None
    samples = ambient_sample(model, latents, masks, class_labels=labels, clip=codec is None, **sampling_sigmas(loaded))
    shown = np.arange(min(count, len(dataset)))
    if codec is None:
        samples, inputs = to_uint8(samples), dataset.get(shown)[0].transpose(0, 2, 3, 1)
    else:
        stored = torch.from_numpy(dataset.get_stored(shown).values.astype(np.float32))
        samples, inputs = codec.images(samples), codec.images(stored)
    sample_grid, input_grid = grid(list(samples)), grid(list(inputs))
    save_png(sample_grid, out / "samples.png")
    save_png(input_grid, out / "inputs.png")
    gap = np.full((input_grid.shape[0], 4, input_grid.shape[2]), 255, np.uint8)
    overview = out / "overview.png"
    save_png(np.concatenate([input_grid, gap, sample_grid[: input_grid.shape[0]]], axis=1), overview)
    return overview
