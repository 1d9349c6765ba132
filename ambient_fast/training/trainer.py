"""The trainer: data, model, optimiser and EMA built from a TrainConfig; the loop; snapshots and exact
resumption. Stateful: its one state dict (model, optimizer, EMA, counters, loader position) goes
through torch.distributed.checkpoint (ambient_fast.training.state).

A step takes `accumulation` micro-batches from the loader (stored bytes, `RawBatch`), turns each into
the network input in one pass (ambient_fast.objective.inputs: B, sigma and the noise drawn from the run's
counter-based streams at each image's position), grades it with the ambient loss, and applies one
optimiser step unless the gradient is not finite. Every random draw is a function of the run's
position, so `--resume` continues bit for bit on the same hardware.
"""
import contextlib
import dataclasses
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from ambient_fast import kernels
from ambient_fast.training import reporting
from ambient_fast.files.checkpoints import check_finite, save_network
from ambient_fast.training.config import ARCHS, TrainConfig
from ambient_fast.objective.corruption import training_operator
from ambient_fast.training.distributed import init_world
from ambient_fast.files.atomic import write_json
from ambient_fast.objective.inputs import AmbientInputs
from ambient_fast.objective.loss import AmbientLoss, EDMAmbientLoss, VPAmbientLoss, unit_hidden_weight
from ambient_fast.networks import EDMPrecond, VPPrecond
from ambient_fast.training.parallel import gradient_sync, parallelize
from ambient_fast.training.run_dir import RunDirectory
from ambient_fast.training.settings import defaults_target, resolve_training
from ambient_fast.objective.seeds import Stream, stream_key
from ambient_fast.training.state import load_newest_intact_state, save_training_state

# Erasure probability of the built-in synthetic set: high enough that most of every training image is
# missing, low enough that the default run learns the shapes within its few CPU minutes.
SYNTHETIC_P = 0.6
# The counters a state holds beside the tensors of model, optimizer and EMA (as int64 / float64 tensors).
_COUNTERS = ("step", "images_seen", "rollbacks", "skipped")
_LOADER_FIELDS = ("epoch", "batch", "seed", "batch_size", "world_size", "size")


def synthetic_root() -> Path:
    """Where the built-in synthetic set is prepared: $AMBIENT_FAST_CACHE, else ~/.cache/ambient-fast."""
    return Path(os.environ.get("AMBIENT_FAST_CACHE", Path.home() / ".cache" / "ambient-fast"))


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps and no roll-back left."""


class Trainer(Stateful):
    """Builds data, model, optimiser and EMA from a TrainConfig, then trains, snapshots and resumes."""

    command = "python -m ambient_fast.train"  # how the user continues an interrupted run

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False):
        """`resume`: continue the run in cfg.out; otherwise start one there, which must be empty
        unless `overwrite`. The main rank locks the run directory until `close()`."""
        self.cfg = cfg
        self.world, self.device = init_world(cfg.device)
        self.target = defaults_target(self.device)
        self.settings = resolve_training(cfg, self.device, self.world.size, self.target)
        if self.target == "cuda":
            self.settings.set_backend_flags()
        self.run_dir = Path(cfg.out)
        self.run = (RunDirectory(self.run_dir, resume=resume, overwrite=overwrite, inputs=cfg.input_paths())
                    if self.world.is_main else None)
        try:
            self.stop_requested = False
            self.step = self.images_seen = self.rollbacks = self.skipped = self.bad_streak = 0
            self.lr_factor = 1.0
            self._setup_data()
            self._setup_model()
            noise = self.dataset.has_noise and not cfg.ignore_noise
            self.sigma_bounds = self.dataset.sigma_bounds() if noise else self.dataset.records()["sigma_min"]
            self.inputs = AmbientInputs(training_operator(self.dataset.corruption, cfg.delta, cfg.further),
                                        self.loss_fn, seed=cfg.seed, shape=self.dataset.shape,
                                        label_dim=self.dataset.label_dim, channels_last=self.settings.channels_last,
                                        bounds=self.sigma_bounds, noise=noise)
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

            root = synthetic_root()
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
        self.loader = make_loader(self.dataset, batch_size=micro, rank=world.rank, world_size=world.size,
                                  seed=cfg.seed, xflip=cfg.xflip, device=self.device, kind=self.settings.loader)

    def _setup_model(self):
        cfg, device, settings = self.cfg, self.device, self.settings
        torch.manual_seed(stream_key(cfg.seed, Stream.INIT))  # the same initial weights on every rank
        try:
            self.net, self.loss_fn = self.build_model()
        except (ValueError, RuntimeError, KeyError, IndexError) as error:
            raise ValueError(f"the model options do not make a network for {self.dataset.resolution}x"
                             f"{self.dataset.resolution} images: {type(error).__name__}: {error}") from None
        # Contiguous parameters under every kind of parallelism; channels_last is the activations'
        # (ambient_fast.training.parallel: FSDP2 refuses channels_last parameters).
        self.net = self.net.to(device).train()
        self.model = parallelize(self.net, settings.parallel, self.world, device, settings.compile,
                                 channels_last=settings.channels_last)
        self.params = {name: p for name, p in self.net.named_parameters()}
        self.ema = {name: p.detach().clone() for name, p in self.params.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                          fused=settings.fused_optimizer)
        # bf16 by autocast under every kind of parallelism (ambient_fast.training.parallel: one numerical policy)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)

    # What the step and the benchmarks read of the settings.
    parallel = property(lambda self: self.settings.parallel)
    bf16 = property(lambda self: self.settings.bf16)
    compiled = property(lambda self: self.settings.compile)

    def summary(self) -> str:
        defaults = f" (defaults as on {self.target})" if self.target != self.device.type else ""
        return (f"{self.describe_model()} | "
                f"data {self.dataset.path} ({len(self.dataset)} images {self.dataset.resolution}x{self.dataset.resolution}, "
                f"corruption {self.dataset.corruption}, delta {self.cfg.delta}) | {self.world.size} rank(s) on "
                f"{self.device}: {self.settings.describe()}{defaults} | {self.loader.describe()} | "
                f"{self.inputs.describe()} | batch {self.cfg.batch} = {self.world.size} x {self.accumulation} x "
                f"{self.micro} | kernels: {kernels.active_path(self.device)}")

    # -- the model family: what ambient_fast.finetune's FinetuneTrainer overrides -----------------

    def build_model(self) -> "tuple[torch.nn.Module, AmbientLoss]":
        """The denoiser (an AmbientPrecond: `net(x, sigma, labels)`, with `blocks()` for parallelize)
        and its loss, built from the config and the data set."""
        cfg = self.cfg
        model_type, arch_kwargs = ARCHS[cfg.arch]
        precond = EDMPrecond if cfg.precond == "edm" else VPPrecond
        net = precond(img_resolution=self.dataset.resolution, img_channels=2 * self.dataset.channels,
                      label_dim=self.dataset.label_dim, mask_aware=cfg.mask_aware, model_type=model_type,
                      gate=cfg.gate, dropout=cfg.dropout, **arch_kwargs, **cfg.model_size(self.dataset.resolution))
        self.config_for_checkpoint = net.config
        hidden_weight = unit_hidden_weight(net) if cfg.hidden_weight == "unit" else None
        loss_cls = EDMAmbientLoss if cfg.precond == "edm" else VPAmbientLoss
        return net, loss_cls(hidden_weight=hidden_weight)

    def describe_model(self) -> str:
        params = sum(p.numel() for p in self.net.parameters())
        return (f"{self.cfg.arch} ({params / 1e6:.2f} M params, gate {self.cfg.gate}, "
                f"{'mask-aware' if self.cfg.mask_aware else 'reference'} {self.cfg.precond} preconditioning, "
                f"hidden-pixel weight {self.cfg.hidden_weight})")

    def training_record(self) -> dict:
        """What a saved network records of its training data: the data set's corruption, the delta
        it trained with, the lowest noise level any image trained at (`sigma_floor`: the sampler
        stops there) and, when some images had nothing hidden, the sampling survival 1."""
        record = self.dataset.corruption | {"delta": self.cfg.delta, "sigma_floor": float(self.sigma_bounds.min())}
        if (self.dataset.records()["masked"] == 0).any():
            record["survival"] = 1.0
        return record

    def write_networks(self, final: bool) -> Path:
        """Write the EMA network of this step (collective: every rank calls it; the main rank writes)
        and return its path: a snapshot, or the final network at the end of the run."""
        name = "network-final.safetensors" if final else f"network-snapshot-{self.step:09d}.safetensors"
        ema_state = self._full_state_dict(ema=True)
        path = self.run_dir / name
        check_finite(ema_state, path)  # on every rank (each holds the full EMA): all stop together
        if self.world.is_main:
            from ambient_fast.networks import build_model

            network = build_model(self.config_for_checkpoint)
            network.load_state_dict(ema_state, strict=True)
            save_network(path, network.eval(), self.training_record(), step=self.step, images_seen=self.images_seen,
                         config=dataclasses.asdict(self.cfg))
        return path

    def write_samples(self, network_path: Path) -> Path:
        """The final sample grids (main rank); returns overview.png's path."""
        return reporting.sample_grids(network_path, self.dataset, self.run_dir, self.cfg.sample_count, self.device,
                                      self.settings.memory_format)

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> int:
        cfg, world = self.cfg, self.world
        if world.is_main:
            print(self.summary(), flush=True)
            for note in self.run.notes:
                print(f"note: {note}", flush=True)
        handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        stats = reporting.StatsLog(self.run_dir / "stats.jsonl", world.is_main)
        tick = max(1, min(50, cfg.steps // 20))
        start_step, start_time = self.step, time.time()
        try:
            with reporting.progress_bar(world.is_main) as progress:
                task = progress.add_task("training", total=cfg.steps, completed=self.step, info="")
                while self.step < cfg.steps:
                    stats.add(self.train_step())
                    if self.step % cfg.snapshot_every == 0 and self.step < cfg.steps:
                        self.snapshot()
                    if self.step % tick == 0 or self.step == cfg.steps:
                        rate = (self.step - start_step) * cfg.batch / max(time.time() - start_time, 1e-9)
                        mean = stats.flush(**{"Progress/step": self.step, "Progress/kimg": self.images_seen / 1000,
                                              "Progress/lr": self.lr, "Progress/skipped_steps": self.skipped,
                                              "Progress/rollbacks": self.rollbacks, "Timing/images_per_sec": rate})
                        eta = (cfg.steps - self.step) * cfg.batch / max(rate, 1e-9)
                        progress.update(task, info=f"loss {mean:.4g} | lr {self.lr:.2e} | {rate:.0f} img/s | "
                                        f"ETA {eta:.0f} s{reporting.gpu_info(self.device)}")
                    progress.update(task, completed=self.step)
                    if self._should_stop():
                        self.snapshot()
                        if world.is_main:
                            print(self.interrupted_message(), flush=True)
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
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        with self._dropout_stream():
            for index in range(self.accumulation):
                batch = self.inputs(self.loader.next())
                with gradient_sync(self.model, self.parallel, index == self.accumulation - 1), self.autocast:
                    loss = self.loss_fn(self.model, batch).sum() / self.per_rank
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

    @contextlib.contextmanager
    def _dropout_stream(self):
        """Dropout (and label dropout) draw from torch's global generator, as they take no other: it
        is seeded from (seed, rank, step) inside a fork that restores it afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(stream_key(self.cfg.seed, Stream.DROPOUT, self.world.rank, self.step))
            yield

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

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Model, optimizer state, EMA, and the counters and loader position as tensors (nothing that
        DCP would pickle). The optimizer's hyper-parameters come from the config, not the state."""
        model_state, optim_state = get_state_dict(self.net, self.optimizer, options=StateDictOptions(strict=True))
        loader = self.loader.state_dict()
        progress = {name: torch.tensor(getattr(self, name), dtype=torch.int64) for name in _COUNTERS}
        progress["lr_factor"] = torch.tensor(self.lr_factor, dtype=torch.float64)
        progress.update({f"loader_{name}": torch.tensor(loader[name], dtype=torch.int64) for name in _LOADER_FIELDS})
        return {"model": model_state, "optimizer": optim_state["state"], "ema": self.ema, "progress": progress}

    def load_state_dict(self, state: dict) -> None:
        _, optim_state = get_state_dict(self.net, self.optimizer, options=StateDictOptions(strict=True))
        set_state_dict(self.net, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optimizer"], "param_groups": optim_state["param_groups"]})
        with torch.no_grad():
            for name, value in state["ema"].items():
                if value is not self.ema[name]:
                    self.ema[name].copy_(value)
        progress = state["progress"]
        for name in _COUNTERS:
            setattr(self, name, int(progress[name]))
        self.lr_factor = float(progress["lr_factor"])
        self.loader.load_state_dict({name: int(progress[f"loader_{name}"]) for name in _LOADER_FIELDS})

    def _load_newest_state(self) -> Path:
        """Load the newest intact training state (collective), report the newer ones refused, and
        return its directory."""
        state, refused = load_newest_intact_state(self.run_dir, self.world, self)
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

    def _save_state(self) -> Path:
        return save_training_state(self.run_dir, self.step, self.world, self, keep=self.cfg.keep)

    def snapshot(self):
        self.write_networks(final=False)
        self._save_state()

    def finish(self):
        state = self._save_state()
        final = self.write_networks(final=True)
        if self.world.is_main:
            overview = self.write_samples(final)
            print(f"done: {self.step} steps, {self.images_seen} images ({self.skipped} skipped steps)\n"
                  f"  network (EMA):   {final}\n  samples/inputs:  {overview}\n"
                  f"  stats:           {self.run_dir / 'stats.jsonl'}\n  training state:  {state}",
                  flush=True)

    # -- signals ---------------------------------------------------------------------------------

    def interrupted_message(self) -> str:
        """What a run stopped by a signal prints: how to continue it."""
        return f"interrupted at step {self.step}: state saved; continue with {self.command} --resume {self.run_dir}"

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def _should_stop(self) -> bool:
        """Whether any rank was asked to stop (collective under torchrun)."""
        if self.world.size == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
