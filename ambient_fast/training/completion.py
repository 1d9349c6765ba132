"""Completion rounds (`python -m ambient_fast.complete`): expectation-maximisation over the training set's
missing pixels, started from an ambient model (after Rozet et al., NeurIPS 2024, "Learning diffusion
priors from observations by expectation maximization", who start from a Gaussian prior).

Round k (1..N), in OUT/round-k/:
  1. complete   every training image's missing pixels sampled given its observed ones by posterior
                sampling with the current model (round 1: the ambient model; then the previous
                round's), image i from the seed (seed, k, i) alone; the observed pixels kept as
                stored. Expectation-maximisation wants samples; the ambient method (the default)
                returns each missing pixel's conditional mean on these noiseless masks, and
                Tweedie moments through the fixed-mask prior correct only the pixels its sampling
                mask shows, so at low survival they barely use the observed ones. Batches are written as they finish (completion/chunk-*.npy), then the
                completed set (completed/: a prepared set with nothing hidden) is committed.
  2. train      the trainer on the completed set as clean data, warm-started from the current
                model's weights (run/: a training run like any other, snapshots and exact resume).
  3. record     report.json: the images/s of the posterior sampling, unconditional samples of the
                new model (samples.png, samples.npy; the same seeds every round) and, given clean
                held-out images, their Fréchet distance (pixels) to them, and the palette fraction
                on the built-in synthetic set. OUT/round-0/ records the starting model the same way.

Every stage is skipped when its output exists, so the rounds resume wherever they stopped: a
completion continues after its last written batch (an interruption loses at most the batch in
flight), the training from its last training state (SIGTERM or Ctrl-C saves one). Because each
image's completion depends only on its seed, a resumed run completes the same images as an
uninterrupted one.
"""
from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ambient_fast.data.format import CorruptedDataset, DatasetWriter
from ambient_fast.files.atomic import write_json, write_npy
from ambient_fast.files.checkpoints import load_network
from ambient_fast.files.images import grid, save_png, to_uint8
from ambient_fast.objective.seeds import derive_seed
from ambient_fast.sampling.restoration import MaskedImages, PosteriorSettings, posterior_method, posterior_restorations
from ambient_fast.sampling.samplers import ambient_sample, sampling_sigmas, seeded_inputs
from ambient_fast.training.config import TrainConfig
from ambient_fast.training.trainer import Trainer

__all__ = ["CompletionInterrupted", "WarmStartTrainer", "CompletionRounds", "COMPLETE_OUTPUT"]

COMPLETE_OUTPUT = re.compile(r"^(round-\d+|complete\.json|rounds\.json)$")  # what the command writes to --out
CHUNK = re.compile(r"^chunk-(\d{9})\.npy$")
SAMPLE_SEED = 10 ** 9  # unconditional samples of every round: seeds SAMPLE_SEED.., apart from the completions'


class CompletionInterrupted(Exception):
    """SIGTERM or Ctrl-C: the work done so far is kept; the same command with --resume continues."""


class WarmStartTrainer(Trainer):
    """The trainer with its network built from a saved one (architecture and weights): the EMA
    network of the previous round, trained further on the completed set."""

    command = "python -m ambient_fast.complete"

    def __init__(self, cfg: TrainConfig, start: Path, resume: bool, resume_hint: str):
        self.start, self.resume_hint = Path(start), resume_hint
        super().__init__(cfg, resume=resume)

    def build_model(self):
        from ambient_fast.networks import AmbientPrecond, EDMPrecond
        from ambient_fast.objective.objective import EDMSchedule, VPSchedule, unit_hidden_weight

        net = load_network(self.start).model
        if not isinstance(net, AmbientPrecond):
            raise ValueError(f"{self.start}: completion rounds train our own networks (EDM or VP preconditioned), "
                             f"not a {type(net).__name__}")
        self.config_for_checkpoint = net.config
        hidden_weight = unit_hidden_weight(net) if self.cfg.hidden_weight == "unit" else None
        schedule = EDMSchedule if isinstance(net, EDMPrecond) else VPSchedule
        return net.float().train().requires_grad_(True), schedule(hidden_weight=hidden_weight)

    def describe_model(self) -> str:
        params = sum(p.numel() for p in self.net.parameters())
        return f"{type(self.net).__name__} ({params / 1e6:.2f} M params) warm-started from {self.start}"

    def interrupted_message(self) -> str:
        return f"interrupted at step {self.step}: state saved; continue with {self.resume_hint}"

    def write_samples(self, network_path: Path, on_progress=None):
        """None drawn here: the round's record draws the samples (with the completion's solver
        settings) into the round's samples.png, which the trainer's summary names."""
        from ambient_fast.training.reporting import Pictures

        grid_path = self.run_dir.parent / "samples.png"
        return Pictures(overview=grid_path, samples=grid_path)


class CompletionRounds:
    """The rounds of one `complete` invocation. `cfg`: ambient_fast.complete.CompleteConfig; `data`:
    the training set; `held_out`: clean uint8 (N, C, H, W) images or None; `synthetic`: score the
    palette fraction."""

    def __init__(self, cfg, data: Path, held_out: Optional[np.ndarray], synthetic: bool, device: torch.device,
                 fast: bool, resume_hint: str):
        self.cfg, self.out, self.device, self.fast, self.resume_hint = cfg, Path(cfg.out), device, fast, resume_hint
        self.dataset, self.held_out, self.synthetic = CorruptedDataset(data), held_out, synthetic
        self.count = min(len(self.dataset), cfg.max_images or len(self.dataset))
        self.stop_requested = False

    def model_of(self, round_index: int) -> Path:
        """The network round `round_index` ends with (round 0: the starting model)."""
        if round_index == 0:
            return Path(self.cfg.net)
        return self.out / f"round-{round_index}" / "run" / "network-final.safetensors"

    # -- the rounds ------------------------------------------------------------------------------

    def run(self) -> list:
        """Every round not yet recorded; returns the reports of rounds 0..N. Raises
        CompletionInterrupted on SIGTERM / Ctrl-C (the stage in progress keeps what it finished)."""
        handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            reports = [self.record(0, None)]
            for k in range(1, self.cfg.rounds + 1):
                folder = self.out / f"round-{k}"
                rate = self.complete(k, folder)
                self.train(k, folder)
                reports.append(self.record(k, rate))
            write_json(self.out / "rounds.json", reports)
            return reports
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def complete(self, k: int, folder: Path) -> Optional[float]:
        """Stage 1: the completed set of round k (kept if it exists); the posterior sampling's images/s
        in this invocation (None when nothing was sampled)."""
        completed = folder / "completed"
        if (completed / "meta.json").is_file():
            return None
        loaded = load_network(self.model_of(k - 1))
        model = loaded.model.to(self.device)
        survival = self.cfg.survival if self.cfg.survival is not None else loaded.survival
        sigmas = sampling_sigmas(loaded)
        settings = PosteriorSettings(posterior_method(self.cfg.posterior, cg_iterations=self.cfg.cg_iterations,
                                                      dps_scale=self.cfg.dps_scale, sigma_floor=sigmas["sigma_min"]),
                                     noise_level=0.0, survival=1.0 if survival is None else survival,
                                     shared_channels=bool(loaded.corruption.get("shared_channels", False)),
                                     num_steps=self.cfg.sampling_steps, solver=self.cfg.solver, fast=self.fast, **sigmas)
        chunks = folder / "completion"
        chunks.mkdir(parents=True, exist_ok=True)
        batch, source = self.cfg.sampling_batch, MaskedImages(self.dataset)
        done = sorted(int(m.group(1)) for m in map(CHUNK.match, (p.name for p in chunks.iterdir())) if m)
        # Batches finish in order: the completion resumes after the last run of consecutive ones.
        start = 0
        while start in done:
            start += batch
        seed = derive_seed(self.cfg.seed, k)
        began, sampled = time.perf_counter(), 0
        print(f"round {k}: completing images {start}..{self.count - 1} of {self.dataset.path} with "
              f"{self.model_of(k - 1)} ({self.cfg.posterior} posterior, {self.cfg.sampling_steps} {self.cfg.solver} "
              f"steps, {'fast' if self.fast else 'exact'} path)", flush=True)
        from rich.progress import Progress

        with Progress() as progress:
            task = progress.add_task(f"round {k}: completing", total=self.count, completed=start)
            for chunk_start in range(start, self.count, batch):
                indices = np.arange(chunk_start, min(chunk_start + batch, self.count))
                samples = torch.cat([s for _, s in posterior_restorations(
                    model, source, indices, samples=1, seed=seed, batch=batch, settings=settings, device=self.device)])
                observed, masks, _ = self.dataset.get(indices)
                # The observed pixels as stored (the measurement is exact); the missing ones sampled.
                completions = np.where(masks, observed, np.ascontiguousarray(to_uint8(samples).transpose(0, 3, 1, 2)))
                self.after_chunk(chunk_start)
                write_npy(chunks / f"chunk-{chunk_start:09d}.npy", completions)
                sampled += len(indices)
                progress.advance(task, len(indices))
                if self.stop_requested:
                    raise CompletionInterrupted(f"round {k}: completion interrupted after {chunk_start + len(indices)} "
                                                f"of {self.count} images")
        rate = sampled / max(time.perf_counter() - began, 1e-9) if sampled else None
        self._commit(chunks, completed, k)
        return rate

    def after_chunk(self, chunk_start: int) -> None:
        """Called before each completed batch is written (a hook for tests that interrupt there)."""

    def _commit(self, chunks: Path, completed: Path, k: int) -> None:
        """The completed set from the chunks (labels kept), then the chunks removed."""
        files = sorted(chunks.glob("chunk-*.npy"))
        _, _, labels = self.dataset.get_raw(np.arange(self.count))
        shape = self.dataset.shape
        with DatasetWriter(completed, count=self.count, shape=shape, label_dim=self.dataset.label_dim) as writer:
            written = 0
            for file in files:
                images = np.load(file, allow_pickle=False)
                rows = slice(written, written + len(images))
                writer.append(images, np.ones(images.shape, bool), None if labels is None else labels[rows])
                written += len(images)
            writer.commit({"kind": "none", "p": 0.0, "delta": 0.0, "shared_channels": True},
                          f"completion round {k} of {self.dataset.path} ({self.cfg.posterior} posterior samples of "
                          f"the missing pixels)")
        for file in files:
            file.unlink()
        chunks.rmdir()

    def train(self, k: int, folder: Path) -> None:
        """Stage 2: the round's training run on the completed set, warm-started (resumed if begun)."""
        run = folder / "run"
        if (run / "network-final.safetensors").is_file():
            return
        cfg = TrainConfig(data=str(folder / "completed"), out=str(run), steps=self.cfg.steps, batch=self.cfg.batch,
                          lr=self.cfg.lr, lr_rampup_kimg=self.cfg.lr_rampup_kimg, ema=self.cfg.ema,
                          seed=derive_seed(self.cfg.seed, k) % 2 ** 31, snapshot_every=max(self.cfg.steps // 4, 1),
                          sample_count=16, device=self.cfg.device)
        trainer = WarmStartTrainer(cfg, self.model_of(k - 1), resume=(run / "config.json").is_file(),
                                   resume_hint=self.resume_hint)
        try:
            trainer.train()
        finally:
            trainer.close()
        if not (run / "network-final.safetensors").is_file():
            raise CompletionInterrupted(f"round {k}: training interrupted at step {trainer.step} of {self.cfg.steps}")

    def record(self, k: int, rate: Optional[float]) -> dict:
        """Stage 3: round k's report (kept if written; a rate measured now replaces a missing one)."""
        folder = self.out / f"round-{k}"
        path = folder / "report.json"
        if path.is_file():
            return json.loads(path.read_text())
        loaded = load_network(self.model_of(k))
        model = loaded.model.to(self.device)
        shape = self.dataset.shape
        latents, masks = seeded_inputs(range(SAMPLE_SEED, SAMPLE_SEED + self.cfg.samples), shape, 1,
                                       loaded.survival or 1.0, bool(loaded.corruption.get("shared_channels")),
                                       self.device)
        images = []
        for start in range(0, self.cfg.samples, self.cfg.sampling_batch):
            part = slice(start, start + self.cfg.sampling_batch)
            images.append(to_uint8(ambient_sample(model, latents[part], masks[:, part], num_steps=self.cfg.sampling_steps,
                                                  solver=self.cfg.solver, **sampling_sigmas(loaded))))
        images = np.concatenate(images)
        folder.mkdir(parents=True, exist_ok=True)
        save_png(grid(list(images[:64])), folder / "samples.png")
        samples = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        write_npy(folder / "samples.npy", samples)
        report = dict(round=k, network=str(self.model_of(k)), samples=self.cfg.samples,
                      completion_images_per_second=rate, completed_images=self.count if k else 0)
        if self.held_out is not None:
            from ambient_fast.evaluation.metrics import frechet_distance, pixel_features

            report["frechet_distance"] = frechet_distance(pixel_features(samples), pixel_features(self.held_out))
        if self.synthetic:
            from ambient_fast.data.synthetic import palette_fraction

            report["palette_fraction"] = palette_fraction(samples)
        write_json(path, report)
        print(f"round {k}: " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                         for key, value in report.items() if key not in ("network", "round")),
              flush=True)
        return report
