"""`python -m ambient_fast.train`: train an ambient diffusion model on corrupted data.

With no arguments: a complete small run on the built-in synthetic data set (a few minutes on a
laptop CPU) that leaves a checkpoint, a grid of samples beside a grid of the corrupted training
inputs, and `stats.jsonl`. With `--data DIR` (a set made by `python -m ambient_fast.prepare`): the
real thing, unchanged under `torchrun --nproc_per_node=N` (FSDP2 by default, DDP on request; gloo
on CPU).

Exact resumption: progress is counted in steps and images; every random draw of a step (sigma,
noise, dropout) is seeded from (seed, rank, step) and the loader's randomness from its position,
so `--resume` continues bit for bit on the same hardware.
"""
import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ambient_fast import kernels
from ambient_fast.checkpoint import check_finite, save_network
from ambient_fast.distributed import close_world, init_world
from ambient_fast.files import dumps_json, read_json, write_json
from ambient_fast.loss import AmbientLoss, EDMAmbientLoss, VPAmbientLoss, unit_hidden_weight
from ambient_fast.nn import EDMPrecond, VPPrecond
from ambient_fast.parallel import gradient_sync, parallelize
from ambient_fast.run_dir import RunDirectory
from ambient_fast.seeds import derive_seed
from ambient_fast.training_state import load_newest_intact_state, save_training_state

ARCHS = {  # --arch -> (model_type, architecture arguments that define it)
    "ddpmpp": ("SongUNet", dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                channel_mult_noise=1, resample_filter=[1, 1])),
    "ncsnpp": ("SongUNet", dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                                channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "adm": ("DhariwalUNet", {}),
}
# Model size by resolution when not given: tiny for the built-in 16x16 set, EDM's CIFAR-10 and
# 64x64 configurations otherwise.
SIZES = {16: dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
         32: dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16]),
         64: dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16])}
# Erasure probability of the built-in synthetic set: high enough that most of every training image is
# missing, low enough that the default run learns the shapes within its few CPU minutes.
SYNTHETIC_P = 0.6
# What may change when a run is resumed; everything else is the run's own configuration.
RESUMABLE_OVERRIDES = {"steps", "snapshot_every", "device", "loader", "compile", "tf32", "channels_last", "keep",
                       "sample_count", "verify_data"}


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps and no roll-back left."""


@dataclass
class TrainConfig:
    data: Optional[str] = None          # prepared data set; None = the built-in synthetic set
    out: str = "runs/ambient"           # run directory (checkpoints, samples, stats.jsonl)
    arch: str = "ddpmpp"                # ddpmpp | ncsnpp | adm
    precond: str = "edm"                # edm | vp
    mask_aware: bool = True             # mask-aware preconditioning (False: the reference's)
    gate: str = "sigmoid"               # sigmoid | double_sigmoid (as the published checkpoints) | none
    delta: float = 0.1                  # further-corruption probability; p comes from the data set
    hidden_weight: str = "lambda"       # loss weight on pixels B hid: lambda (the reference's) | unit (1 / c_out^2)
    batch: int = 16                     # global batch size per step (the built-in run's; raise it for real data)
    batch_gpu: Optional[int] = None     # per-rank micro-batch (gradient accumulation); None = batch / ranks
    lr: float = 2e-3                    # peak learning rate
    lr_rampup_kimg: float = 1           # learning-rate ramp-up, thousands of images
    ema: float = 0.5                    # EMA half-life, millions of images (as EDM's --ema)
    ema_rampup: float = 0.05            # EMA half-life ramp-up ratio
    steps: int = 1000                   # total optimiser steps
    seed: int = 0                       # global seed
    dropout: float = 0.0                # dropout inside U-Net blocks
    model_channels: Optional[int] = None  # U-Net width; None = by resolution
    channel_mult: Optional[list] = None   # per-resolution multipliers; None = by resolution
    num_blocks: Optional[int] = None      # blocks per resolution; None = by resolution
    attn_resolutions: Optional[list] = None  # resolutions with attention; None = by resolution
    xflip: bool = False                 # flip image and mask together
    parallel: str = "auto"              # fsdp | ddp | none; auto = fsdp under torchrun
    precision: str = "auto"             # bf16 | fp32; auto = bf16 on CUDA
    compile: Optional[bool] = None      # torch.compile the blocks; None = on CUDA
    tf32: bool = True                   # TF32 matmuls and convolutions on CUDA (the reference: off)
    channels_last: Optional[bool] = None  # channels_last memory format (cuDNN's fast layout); None = on CUDA
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    max_grad_norm: float = 1.0          # gradient clipping; 0 = off
    snapshot_every: int = 500           # steps between snapshots (EMA network + training state)
    keep: int = 2                       # training states kept
    loader: str = "auto"                # auto | dali | torch
    bad_steps: int = 10                 # consecutive non-finite steps before rolling back
    max_rollbacks: int = 3              # roll-backs allowed before giving up
    sample_count: int = 64              # images in the final sample grid
    verify_data: bool = True            # check the data set's checksums and content at start (off: very large sets)

    def __post_init__(self):
        def at_least(value, low):  # finite and >= low (rejects NaN and infinities)
            return math.isfinite(value) and value >= low

        def positive_ints(values):
            return values is None or all(value >= 1 for value in values)

        checks = [
            (self.arch in ARCHS, f"--arch must be one of {sorted(ARCHS)}"),
            (self.precond in ("edm", "vp"), "--precond must be edm or vp"),
            (self.gate in ("sigmoid", "double_sigmoid", "none"), "--gate must be sigmoid, double_sigmoid or none"),
            (0 <= self.delta < 1, f"--delta must be in [0, 1), got {self.delta}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.hidden_weight in ("lambda", "unit"), "--hidden-weight must be lambda or unit"),
            (self.batch >= 1 and (self.batch_gpu is None or self.batch_gpu >= 1), "--batch and --batch-gpu must be >= 1"),
            (self.steps >= 1, "--steps must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive finite number, got {self.lr}"),
            (at_least(self.lr_rampup_kimg, 0), f"--lr-rampup must be >= 0 kimg, got {self.lr_rampup_kimg}"),
            (at_least(self.ema, 0), f"--ema must be >= 0 Mimg (0: no averaging), got {self.ema}"),
            (at_least(self.ema_rampup, 0), f"ema_rampup must be >= 0, got {self.ema_rampup}"),
            (at_least(self.max_grad_norm, 0), f"--max-grad-norm must be >= 0 (0: no clipping), got {self.max_grad_norm}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.model_channels is None or self.model_channels >= 4,
             f"--channels must be >= 4 (group normalisation needs 4 channels per group), got {self.model_channels}"),
            (positive_ints(self.channel_mult) and self.channel_mult != [],
             f"--channel-mult must list positive integers, got {self.channel_mult}"),
            (self.num_blocks is None or self.num_blocks >= 1, f"--blocks must be >= 1, got {self.num_blocks}"),
            (positive_ints(self.attn_resolutions), f"--attn must list positive resolutions, got {self.attn_resolutions}"),
            (self.sample_count >= 1, f"--sample-count must be >= 1, got {self.sample_count}"),
            (self.bad_steps >= 1 and self.max_rollbacks >= 0, "bad_steps must be >= 1 and max_rollbacks >= 0"),
            (self.parallel in ("auto", "fsdp", "ddp", "none"), "--parallel must be fsdp, ddp or none"),
            (self.precision in ("auto", "bf16", "fp32"), "--precision must be bf16 or fp32"),
            (self.loader in ("auto", "dali", "torch"), "--loader must be auto, dali or torch"),
            (self.snapshot_every >= 1 and self.keep >= 1, "--snapshot-every and --keep must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class Trainer:
    """Builds data, model, optimiser and EMA from a TrainConfig, then trains, snapshots and resumes."""

    command = "python -m ambient_fast.train"  # how the user continues an interrupted run

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
        """`resume`: continue the run in cfg.out; otherwise start one there, which must be empty
        unless `overwrite`. The main rank locks the run directory until `close()`."""
        self.cfg = cfg
        self.world, self.device = init_world(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        self.run_dir = Path(cfg.out)
        self.run = RunDirectory(self.run_dir, resume=resume, overwrite=overwrite) if self.world.is_main else None
        try:
            self.stop_requested = False
            self._setup_data()
            self._setup_model()
            self.step = 0
            self.images_seen = 0
            self.lr_factor = 1.0
            self.rollbacks = 0
            self.skipped = 0
            self.bad_streak = 0
            if resume:
                self._resume()
            elif self.world.is_main:
                write_json(self.run_dir / "config.json", dataclasses.asdict(cfg))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory (its lock); the trainer is not used afterwards."""
        if self.run is not None:
            self.run.close()
            self.run = None

    # -- set-up ----------------------------------------------------------------------------------

    def _setup_data(self):
        from ambient_fast.data.format import CorruptedDataset, DataError
        from ambient_fast.data.loader import make_loader

        cfg, world = self.cfg, self.world
        if cfg.data is None:
            from ambient_fast.data.synthetic import synthetic_dataset

            root = Path(os.environ.get("AMBIENT_FAST_CACHE", Path.home() / ".cache" / "ambient-fast"))
            if world.is_main:  # prepared once by the main rank, then opened by all
                synthetic_dataset(root, p=SYNTHETIC_P, delta=cfg.delta)
            world.barrier()
            path = synthetic_dataset(root, p=SYNTHETIC_P, delta=cfg.delta)
        else:
            path = Path(cfg.data)
        self.dataset = CorruptedDataset(path)
        if cfg.verify_data and world.is_main:
            try:
                self.dataset.verify()
            except DataError as error:
                raise DataError(f"{error} (training checks its data set first; --no-verify-data skips that for "
                                "very large sets)") from None
        per_rank, remainder = divmod(cfg.batch, world.size)
        if remainder:
            raise ValueError(f"--batch {cfg.batch} does not split evenly over {world.size} ranks")
        micro = min(cfg.batch_gpu or per_rank, per_rank)
        if per_rank % micro:
            raise ValueError(f"--batch-gpu {micro} does not divide the per-rank batch {per_rank}")
        self.per_rank, self.micro, self.accumulation = per_rank, micro, per_rank // micro
        # Where the fused ambient-input kernel runs it draws B (with the noise) in the loss's
        # single pass over the batch; elsewhere the loader draws B.
        self.b_in_kernel = kernels.fused_device(self.device)
        self.loader = make_loader(self.dataset, batch_size=micro, rank=world.rank, world_size=world.size,
                                  seed=cfg.seed, delta=cfg.delta, xflip=cfg.xflip, device=self.device, kind=cfg.loader,
                                  further_corruption=not self.b_in_kernel)

    def _setup_model(self):
        cfg, device = self.cfg, self.device
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        try:
            self.net, self.loss_fn = self.build_model()
        except (ValueError, RuntimeError, KeyError, IndexError) as error:
            raise ValueError(f"the model options do not make a network for {self.dataset.resolution}x"
                             f"{self.dataset.resolution} images: {type(error).__name__}: {error}") from None
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net = self.net.to(device, memory_format=self.memory_format).train()
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.parallel = cfg.parallel if cfg.parallel != "auto" else ("fsdp" if self.world.size > 1 else "none")
        if self.parallel != "none" and self.world.size == 1:
            self.parallel = "none"
        use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.model = parallelize(self.net, self.parallel, self.world, device, use_compile)
        self.compiled = use_compile
        self.params = {name: p for name, p in self.net.named_parameters()}
        self.ema = {name: p.detach().clone() for name, p in self.params.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                          fused=device.type == "cuda")
        # bf16 by autocast under every kind of parallelism (ambient_fast.parallel: one numerical policy)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def summary(self) -> str:
        return (f"{self.describe_model()} | "
                f"data {self.dataset.path} ({len(self.dataset)} images {self.dataset.resolution}x{self.dataset.resolution}, "
                f"corruption {self.dataset.corruption}, delta {self.cfg.delta}) | {self.world.size} rank(s) on "
                f"{self.device}, parallel {self.parallel}, {'bf16' if self.bf16 else 'fp32'}, "
                f"compile {'on' if self.compiled else 'off'}, {'channels_last' if self.channels_last else 'NCHW'}, TF32 {'on' if self.cfg.tf32 and self.device.type == 'cuda' else 'off'}, loader {self.loader.describe()} | "
                f"batch {self.cfg.batch} = {self.world.size} x {self.accumulation} x {self.micro} | "
                f"kernels: {kernels.active_path(self.device)}")

    # -- the model family: what ambient_fast.finetune's FinetuneTrainer overrides -----------------

    def build_model(self) -> "tuple[torch.nn.Module, AmbientLoss]":
        """The denoiser (an AmbientPrecond: `net(x, sigma, labels)`, with `blocks()` for parallelize)
        and its loss, built from the config and the data set."""
        cfg = self.cfg
        model_type, arch_kwargs = ARCHS[cfg.arch]
        size = dict(SIZES.get(self.dataset.resolution, SIZES[32]))
        for key in size:
            if getattr(cfg, key) is not None:
                size[key] = getattr(cfg, key)
        precond = EDMPrecond if cfg.precond == "edm" else VPPrecond
        net = precond(img_resolution=self.dataset.resolution, img_channels=2 * self.dataset.channels,
                      label_dim=self.dataset.label_dim, mask_aware=cfg.mask_aware, model_type=model_type,
                      gate=cfg.gate, dropout=cfg.dropout, **arch_kwargs, **size)
        self.config_for_checkpoint = net.config
        hidden_weight = unit_hidden_weight(net) if cfg.hidden_weight == "unit" else None
        loss_cls = EDMAmbientLoss if cfg.precond == "edm" else VPAmbientLoss
        return net, loss_cls(hidden_weight=hidden_weight)

    def describe_model(self) -> str:
        params = sum(p.numel() for p in self.net.parameters())
        return (f"{self.cfg.arch} ({params / 1e6:.2f} M params, gate {self.cfg.gate}, "
                f"{'mask-aware' if self.cfg.mask_aware else 'reference'} {self.cfg.precond} preconditioning, "
                f"hidden-pixel weight {self.cfg.hidden_weight})")

    def write_networks(self, final: bool) -> Path:
        """Write the EMA network of this step (collective: every rank calls it; the main rank writes)
        and return its path: a snapshot, or the final network at the end of the run."""
        name = "network-final.safetensors" if final else f"network-snapshot-{self.step:09d}.safetensors"
        ema_state = self._full_state_dict(ema=True)
        path = self.run_dir / name
        check_finite(ema_state, path)  # on every rank (each holds the full EMA): all stop together
        if self.world.is_main:
            network = _bare_model(self.config_for_checkpoint, ema_state)
            save_network(path, network, self.dataset.corruption | {"delta": self.cfg.delta},
                         step=self.step, images_seen=self.images_seen, config=dataclasses.asdict(self.cfg))
        return path

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> int:
        cfg, world = self.cfg, self.world
        if world.is_main:
            print(self.summary(), flush=True)
            for note in self.run.notes:
                print(f"note: {note}", flush=True)
        handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        stats = self.run_dir / "stats.jsonl"
        tick = max(1, min(50, cfg.steps // 20))
        window = []
        start_step, start_time = self.step, time.time()
        try:
            with _progress_bar(world.is_main) as progress:
                task = progress.add_task("training", total=cfg.steps, completed=self.step, info="")
                while self.step < cfg.steps:
                    loss = self.train_step()
                    window.append(loss)
                    if self.step % cfg.snapshot_every == 0 and self.step < cfg.steps:
                        self.snapshot()
                    if self.step % tick == 0 or self.step == cfg.steps:
                        rate = (self.step - start_step) * cfg.batch / max(time.time() - start_time, 1e-9)
                        mean = self._report(stats, window, rate)
                        eta = (cfg.steps - self.step) * cfg.batch / max(rate, 1e-9)
                        progress.update(task, info=f"loss {mean:.4g} | lr {self.lr:.2e} | "
                                        f"{rate:.0f} img/s | ETA {eta:.0f} s{self._gpu_info()}")
                        window = []
                    progress.update(task, completed=self.step)
                    if self._should_stop():
                        self.snapshot()
                        if world.is_main:
                            print(f"interrupted at step {self.step}: state saved; continue with "
                                  f"{self.command} --resume {self.run_dir}", flush=True)
                        return 0
            self.finish()
            return 0
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    @property
    def lr(self) -> float:
        rampup = self.cfg.lr_rampup_kimg * 1000
        return self.cfg.lr * self.lr_factor * (min(self.images_seen / rampup, 1.0) if rampup > 0 else 1.0)

    def train_step(self) -> torch.Tensor:
        """One optimiser step over `batch` images; returns the mean objective per image (a 0-d
        tensor on the device, NaN for a skipped step: reading it is left to the reporting)."""
        cfg = self.cfg
        torch.manual_seed(derive_seed(cfg.seed, self.world.rank, self.step))
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for index in range(self.accumulation):
            batch = self._in_layout(self.loader.next())
            in_kernel = {}
            if batch.A_hat is None:  # B drawn in the loss's fused pass, seeded by the position like the rest
                in_kernel = dict(delta=cfg.delta, shared_channels=self.loader.shared_channels,
                                 seed=derive_seed(cfg.seed, self.world.rank, self.step, index))
            with gradient_sync(self.model, self.parallel, index == self.accumulation - 1), self.autocast:
                terms = self.loss_fn(self.model, batch.y, batch.A, batch.A_hat, labels=batch.labels, **in_kernel)
                loss = terms.loss.sum() / self.per_rank
            loss.backward()
            total += loss.detach()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm or float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # One host sync per step: a non-finite step must be skipped, not applied.
        if torch.isfinite(norm).item():
            self.optimizer.step()
            self._update_ema()
            self.bad_streak = 0
        else:
            self.skipped += 1
            self.bad_streak += 1
            if self.bad_streak >= cfg.bad_steps:
                self._roll_back()
                return torch.tensor(float("nan"))
        self.step += 1
        self.images_seen += cfg.batch
        if self.world.size > 1:
            dist.all_reduce(total)
            total /= self.world.size
        return total

    def _in_layout(self, batch):
        """The batch's images and masks in the model's memory format (the network input is built in
        theirs)."""
        if not self.channels_last:
            return batch
        return batch._replace(**{name: getattr(batch, name).contiguous(memory_format=self.memory_format)
                                 for name in ("y", "A", "A_hat") if getattr(batch, name) is not None})

    def _update_ema(self):
        cfg = self.cfg
        halflife = cfg.ema * 1e6
        if cfg.ema_rampup:
            halflife = min(halflife, self.images_seen * cfg.ema_rampup)
        beta = 0.5 ** (cfg.batch / max(halflife, 1e-8))
        with torch.no_grad():
            names = list(self.params)
            torch._foreach_lerp_([self.ema[n] for n in names], [self.params[n].detach() for n in names], 1 - beta)

    def _roll_back(self):
        diverged = f"training diverged: {self.bad_streak} consecutive non-finite steps at step {self.step}"
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingDiverged(f"{diverged} and no roll-back left ({self.rollbacks} used)")
        # The counters describe the whole run, not the state rolled back to.
        skipped, rollbacks, lr_factor = self.skipped, self.rollbacks, self.lr_factor
        try:
            state = self._load_newest_state()
        except FileNotFoundError:
            raise TrainingDiverged(f"{diverged} and no training state saved to roll back to") from None
        self.skipped, self.rollbacks, self.lr_factor = skipped, rollbacks + 1, lr_factor * 0.5
        self.bad_streak = 0
        if self.world.is_main:
            print(f"{self.cfg.bad_steps} consecutive non-finite steps: rolled back to {state.name} "
                  f"(step {self.step}) with the learning rate halved (roll-back {self.rollbacks} of "
                  f"{self.cfg.max_rollbacks})", flush=True)

    # -- checkpoints -----------------------------------------------------------------------------

    def _progress_dict(self) -> dict:
        return dict(step=self.step, images_seen=self.images_seen, lr_factor=self.lr_factor,
                    rollbacks=self.rollbacks, skipped=self.skipped, loader=self.loader.state_dict())

    def _load_newest_state(self) -> Path:
        """Load the newest intact training state (collective), report the newer ones refused, and
        return its directory."""
        state, progress, refused = load_newest_intact_state(self.run_dir, self.world, self.net, self.optimizer,
                                                            self.ema)
        self.step, self.images_seen = progress["step"], progress["images_seen"]
        self.lr_factor, self.rollbacks, self.skipped = progress["lr_factor"], progress["rollbacks"], progress["skipped"]
        self.loader.load_state_dict(progress["loader"])
        if self.world.is_main:
            for line in refused:
                print(line, flush=True)
        return state

    def _resume(self):
        try:
            state = self._load_newest_state()
        except FileNotFoundError:
            raise FileNotFoundError(f"--resume {self.run_dir}: no training state in that directory") from None
        if self.world.is_main:
            self.run.truncate_stats(self.step)
            print(f"resumed {self.run_dir} from {state.name} at step {self.step}", flush=True)

    def _full_state_dict(self, ema: bool) -> dict:
        """Full (unsharded) weights and buffers on CPU, the EMA's or the trained ones, gathered on
        every rank (collective)."""
        out = {}
        for name, value in self.net.state_dict().items():
            value = self.ema.get(name, value) if ema else value
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[name] = value.detach().float().cpu()
        return out

    def snapshot(self):
        self.write_networks(final=False)
        save_training_state(self.run_dir, self.step, self.world, self.net, self.optimizer, self.ema,
                            self._progress_dict(), keep=self.cfg.keep)

    def finish(self):
        state = save_training_state(self.run_dir, self.step, self.world, self.net, self.optimizer, self.ema,
                                    self._progress_dict(), keep=self.cfg.keep)
        final = self.write_networks(final=True)
        if self.world.is_main:
            overview = self._sample_grids(final)
            print(f"done: {self.step} steps, {self.images_seen} images ({self.skipped} skipped steps)\n"
                  f"  network (EMA):   {final}\n  samples/inputs:  {overview}\n"
                  f"  stats:           {self.run_dir / 'stats.jsonl'}\n  training state:  {state}",
                  flush=True)

    def _sample_grids(self, network_path: Path) -> Path:
        """Write samples.png, inputs.png and overview.png (inputs | samples) to the run directory."""
        from ambient_fast.checkpoint import load_network
        from ambient_fast.images import grid, save_png, to_uint8
        from ambient_fast.sample import ambient_sample, sampling_sigmas, seeded_inputs

        import numpy as np

        loaded = load_network(network_path)
        model = loaded.model.to(self.device, memory_format=self.memory_format)
        count = self.cfg.sample_count
        shape = (self.dataset.channels, self.dataset.resolution, self.dataset.resolution)
        latents, masks = seeded_inputs(range(count), shape, 1, loaded.survival,
                                       bool(loaded.corruption.get("shared_channels")), self.device)
        labels = None
        if model.label_dim:
            labels = torch.eye(model.label_dim, device=self.device)[torch.arange(count) % model.label_dim]
        samples = to_uint8(ambient_sample(model, latents, masks, class_labels=labels, **sampling_sigmas(model)))
        observed, _, _ = self.dataset.get(np.arange(min(count, len(self.dataset))))
        inputs = observed.transpose(0, 2, 3, 1)
        sample_grid, input_grid = grid(list(samples)), grid(list(inputs))
        save_png(sample_grid, self.run_dir / "samples.png")
        save_png(input_grid, self.run_dir / "inputs.png")
        gap = np.full((input_grid.shape[0], 4, input_grid.shape[2]), 255, np.uint8)
        overview = self.run_dir / "overview.png"
        save_png(np.concatenate([input_grid, gap, sample_grid[: input_grid.shape[0]]], axis=1), overview)
        return overview

    # -- reporting and signals -------------------------------------------------------------------

    def _report(self, path: Path, window: "list[torch.Tensor]", rate: float) -> float:
        """Append one EDM-style line to stats.jsonl (main rank); return the window's mean loss."""
        losses = torch.stack([loss.detach().cpu().double() for loss in window])
        finite = losses[torch.isfinite(losses)]
        mean = finite.mean().item() if len(finite) else float("nan")
        if not self.world.is_main:
            return mean
        entry = {
            "Loss/loss": dict(num=len(finite), mean=mean if len(finite) else None,
                              std=finite.std().item() if len(finite) > 1 else 0.0),
            "Progress/step": self.step, "Progress/kimg": self.images_seen / 1000,
            "Progress/lr": self.lr, "Progress/skipped_steps": self.skipped, "Progress/rollbacks": self.rollbacks,
            "Timing/images_per_sec": rate, "timestamp": time.time(),
        }
        with open(path, "a") as f:  # appended; a line torn by a kill is dropped on resume
            f.write(dumps_json(entry) + "\n")
        return mean

    def _gpu_info(self) -> str:
        if self.device.type != "cuda":
            return ""
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except Exception:  # nvidia-ml-py missing or no NVML: show memory only
            util = None
        memory = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return f" | GPU {util}% {memory:.1f} GiB" if util is not None else f" | GPU {memory:.1f} GiB"

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def _should_stop(self) -> bool:
        """Whether any rank was asked to stop (collective under torchrun)."""
        if self.world.size == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _bare_model(config: dict, state: dict):
    from ambient_fast.nn import build_model

    model = build_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _progress_bar(enabled: bool):
    """A rich progress bar on the main rank, nothing elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[info]}"), disable=not enabled)


# ----------------------------------------------------------------------------------------------
# Command line.

def build_parser(prog: str = "python -m ambient_fast.train", description: str = __doc__.split("\n\n")[0],
                 defaults=TrainConfig, architecture: bool = True) -> argparse.ArgumentParser:
    """The trainer's options; `architecture=False` leaves out those that define our own networks
    (ambient_fast.finetune trains a given one). Help texts quote the defaults of `defaults`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--data", help="prepared data set (python -m ambient_fast.prepare)"
        + ("; default: the built-in synthetic set" if architecture else " (required)"))
    add("--out", help=f"run directory (default {defaults.out})")
    add("--resume", metavar="DIR", help="continue the run in DIR up to --steps in total")
    add("--overwrite", action="store_true", help="replace the run in --out (by default a non-empty --out is refused)")
    if architecture:
        add("--arch", choices=sorted(ARCHS))
        add("--precond", choices=["edm", "vp"])
        add("--mask-aware", dest="mask_aware", action="store_true", help="mask-aware preconditioning (default)")
        add("--reference-precond", dest="mask_aware", action="store_false", help="the reference's preconditioning")
        add("--gate", choices=["sigmoid", "double_sigmoid", "none"])
        add("--hidden-weight", dest="hidden_weight", choices=["lambda", "unit"],
            help="loss weight on pixels B hid: lambda(sigma) as the reference (default), or unit (1 / c_out^2)")
        add("--dropout", type=float)
        add("--channels", dest="model_channels", type=int, help="U-Net width (default by resolution)")
        add("--channel-mult", dest="channel_mult", type=lambda s: [int(v) for v in s.split(",")], help="e.g. 2,2,2")
        add("--blocks", dest="num_blocks", type=int, help="blocks per resolution")
        add("--attn", dest="attn_resolutions", type=lambda s: [int(v) for v in s.split(",") if v], help="e.g. 16")
    add("--delta", type=float, help=f"further-corruption probability (default {defaults.delta})")
    add("--batch", type=int, help=f"global batch size (default {defaults.batch})")
    add("--batch-gpu", dest="batch_gpu", type=int, help="per-rank micro-batch for gradient accumulation")
    add("--lr", type=float, help=f"peak learning rate (default {defaults.lr:g})")
    add("--lr-rampup", dest="lr_rampup_kimg", type=float,
        help=f"learning-rate ramp-up in kimg (default {defaults.lr_rampup_kimg:g})")
    add("--ema", type=float, help=f"EMA half-life in Mimg (default {defaults.ema:g})")
    add("--steps", type=int, help=f"total optimiser steps (default {defaults.steps})")
    add("--seed", type=int)
    add("--xflip", action="store_true", help="flip image and mask together")
    add("--parallel", choices=["fsdp", "ddp", "none"])
    add("--precision", choices=["bf16", "fp32"])
    add("--compile", dest="compile", action="store_true")
    add("--no-compile", dest="compile", action="store_false")
    add("--tf32", dest="tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA (default)")
    add("--no-tf32", dest="tf32", action="store_false", help="full fp32 matmuls and convolutions, as the reference")
    add("--channels-last", dest="channels_last", action="store_true", help="channels_last memory format (default on CUDA)")
    add("--no-channels-last", dest="channels_last", action="store_false", help="contiguous (NCHW) memory format")
    add("--device", help="auto, cpu, cuda or cuda:N")
    add("--max-grad-norm", dest="max_grad_norm", type=float, help="gradient clipping (default 1.0; 0 = off)")
    add("--snapshot-every", dest="snapshot_every", type=int,
        help=f"steps between snapshots (default {defaults.snapshot_every})")
    add("--keep", type=int, help="training states kept (default 2)")
    add("--loader", choices=["auto", "dali", "torch"])
    add("--sample-count", dest="sample_count", type=int, help="images in the final sample grid (default 64)")
    add("--no-verify-data", dest="verify_data", action="store_false",
        help="skip checking the data set's checksums and content at start (for very large sets)")
    return parser


def config_from_args(argv=None, parser: Optional[argparse.ArgumentParser] = None,
                     config_cls=TrainConfig) -> "tuple[TrainConfig, bool, bool]":
    """(config, resume, overwrite) from the command line."""
    given = vars((parser or build_parser()).parse_args(argv))
    resume, overwrite = given.pop("resume", None), given.pop("overwrite", False)
    if resume is None:
        return config_cls(**given), False, overwrite
    if overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces one: give only one of them")
    saved_path = Path(resume) / "config.json"
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.json there (is it a run directory?)")
    saved = read_json(saved_path, "the run's configuration is damaged: restore it, or start again with --overwrite")
    unknown = set(saved) - {field.name for field in dataclasses.fields(config_cls)}
    if unknown:
        raise ValueError(f"{saved_path} holds options this version does not know: {sorted(unknown)}")
    changed = {key for key, value in given.items() if saved.get(key) != value} - RESUMABLE_OVERRIDES - {"out"}
    if changed:
        raise ValueError(f"--resume keeps the run's configuration; these options differ from {saved_path}: "
                         f"{sorted(changed)} (only {sorted(RESUMABLE_OVERRIDES)} may change)")
    return config_cls(**{**saved, **given, "out": str(resume)}), True, False


def main(argv=None, parser: Optional[argparse.ArgumentParser] = None, config_cls=TrainConfig,
         trainer_cls=Trainer) -> int:
    """Parse, build the trainer, train; bad input, refused writes, a diverged run and missing
    optional packages end with a message."""
    trainer = None
    try:
        cfg, resume, overwrite = config_from_args(argv, parser, config_cls)
        trainer = trainer_cls(cfg, resume=resume, overwrite=overwrite)
        return trainer.train()
    except (ValueError, OSError, TrainingDiverged, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if trainer is not None:
            raise  # a failure inside training keeps its traceback
        print(f"error: {error}", file=sys.stderr)  # e.g. --device cuda without a GPU
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        close_world()


if __name__ == "__main__":
    sys.exit(main())
