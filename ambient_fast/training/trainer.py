"""The trainer: data, model, optimiser and EMA built from a TrainConfig; the loop; snapshots and exact
resumption. Stateful: its one state dict (model, optimizer, EMA, counters, loader position) goes
through torch.distributed.checkpoint (ambient_fast.training.state).

A step (`train_step`) is `forward_backward` (the objective of `accumulation` micro-batches from the
loader, stored bytes as `RawBatch`: `loss = objective(model, raw)`, ambient_fast.objective.objective;
autocast; backward) and then the update: clipping, the optimiser step and the EMA, both skipped on
the device when the gradient is not finite. The step never waits on the host: the skipped steps and
the streak of them are counted on the device and read where the run reads anyway (logging interval,
snapshots, the end), and a streak of `bad_steps` found there rolls back to the newest training state,
as if it had been seen at once (the steps between change nothing). Every random draw is a function
of the run's position, so `--resume` continues bit for bit on the same hardware.
"""
import contextlib
import dataclasses
import os
import shlex
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from ambient_fast import kernels
from ambient_fast.training import console, reporting, tracking
from ambient_fast.files.checkpoints import check_finite, save_network
from ambient_fast.files.loaded import LoadedNetwork
from ambient_fast.training.config import ARCHS, EDM2, EXIT_INTERRUPTED, TrainConfig
from ambient_fast.objective.corruption import training_operator
from ambient_fast.training.distributed import init_world
from ambient_fast.files.atomic import write_json
from ambient_fast.memory import check_memory, sampling_bytes
from ambient_fast.objective.edm2 import EDM2Objective, edm2_schedule
from ambient_fast.objective.objective import AmbientObjective, EDMSchedule, NoiseSchedule, VPSchedule, unit_hidden_weight
from ambient_fast.networks import EDM2Precond, EDMPrecond, VPPrecond
from ambient_fast.training.parallel import gradient_sync, parallelize
from ambient_fast.training.posthoc_ema import PowerFunctionEMA, save_snapshot, snapshot_name
from ambient_fast.training.schedule import edm2_learning_rate
from ambient_fast.training.run_dir import RunDirectory
from ambient_fast.training.settings import defaults_target, resolve_training
from ambient_fast.objective.seeds import Stream, stream_key
from ambient_fast.training.state import load_newest_intact_state, save_training_state

# Erasure probability of the built-in synthetic set: high enough that most of every training image is
# missing, low enough that the default run learns the shapes within its few CPU minutes.
SYNTHETIC_P = 0.6
DEFAULT_DELTA = 0.1  # the further corruption of a data set that records none (and of the built-in set)
# The counters a state holds beside the tensors of model, optimizer and EMA (as int64 / float64 tensors).
_COUNTERS = ("step", "images_seen", "rollbacks", "skipped")
_LOADER_FIELDS = ("epoch", "batch", "seed", "batch_size", "world_size", "size")


def synthetic_root() -> Path:
    """Where the built-in synthetic set is prepared: $AMBIENT_FAST_CACHE, else ~/.cache/ambient-fast."""
    return Path(os.environ.get("AMBIENT_FAST_CACHE", Path.home() / ".cache" / "ambient-fast"))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (FSDP2 shards parameters, their optimizer state and the EMA)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _gated_lerp_(averages: dict, params: dict, weight: float, counts: "torch.Tensor | bool") -> None:
    """averages <- lerp(averages, params, weight) where `counts` (see `Trainer._gate`), else as they
    were: on the device selected rather than moved with a weight of 0, which would turn an average of
    -0.0 into +0.0. Both dicts map the parameters' names to tensors (this rank's shards under FSDP2)."""
    with torch.no_grad():
        names = list(params)
        old = [_local(averages[n]) for n in names]
        new = [_local(params[n].detach()) for n in names]
        if isinstance(counts, bool):
            if counts:
                torch._foreach_lerp_(old, new, weight)
            return
        for before, after in zip(old, torch._foreach_lerp(old, new, weight)):
            torch.where(counts, after, before, out=before)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps and no roll-back left."""


class Trainer(Stateful):
    """Builds data, model, optimiser and EMA from a TrainConfig, then trains, snapshots and resumes."""

    command = "python -m ambient_fast.train"  # how the user continues an interrupted run
    final_name = "network-final.safetensors"  # what write_networks(final=True) writes in the run folder

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
            self.tracker = None  # the --log tracker while train() runs (main rank)
            self._started = time.time()  # train() restarts it: the session's time in the final message
            self.step = self.images_seen = self.rollbacks = self.skipped = 0
            self.lr_factor = 1.0
            self._setup_data()
            self._setup_model()
            noise = self.dataset.has_noise and not cfg.ignore_noise
            self.sigma_bounds = self.dataset.sigma_bounds() if noise else self.dataset.records()["sigma_min"]
            self._check_noise_levels()
            # An EDM2 network's loss is weighted by its own log-variance head.
            objective = EDM2Objective if isinstance(self.net, EDM2Precond) else AmbientObjective
            windows = self.dataset.sigma_max() if self.dataset.meta.windows is not None else None
            self.objective = objective(self.schedule, training_operator(self.dataset.corruption, self.delta, cfg.further),
                                       seed=cfg.seed, shape=self.dataset.shape, label_dim=self.dataset.label_dim,
                                       channels_last=self.settings.channels_last, bounds=self.sigma_bounds, noise=noise,
                                       sigma_max=windows)
            # What the device counts of the steps (`_count_step`), int64: the skipped steps, the streak
            # of them, whether a roll-back is due (0/1), and the steps run since it fell due.
            self._health = torch.zeros(4, dtype=torch.int64, device=self.device)
            if resume:
                self._resume()
            elif self.world.is_main:
                write_json(self.run_dir / "config.json", dataclasses.asdict(cfg))
        except BaseException:
            if self.run is not None:
                self.run.abandon()  # a run refused at its set-up leaves no folder it made
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
            delta = DEFAULT_DELTA if cfg.delta is None else cfg.delta
            if world.is_main:  # prepared once by the main rank, then opened by all
                synthetic_dataset(root, p=SYNTHETIC_P, delta=delta)
            world.barrier()
            path = synthetic_dataset(root, p=SYNTHETIC_P, delta=delta)
        else:
            path = Path(cfg.data)
        self.dataset = CorruptedDataset(path)
        if cfg.further is not None:
            from ambient_fast.data.latents import refuse_masks

            refuse_masks(self.dataset, f"--further {cfg.further}")
        self.delta, self.delta_source = self._resolve_delta()
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
        self._check_memory()
        self.loader = make_loader(self.dataset, batch_size=micro, rank=world.rank, world_size=world.size,
                                  seed=cfg.seed, xflip=cfg.xflip, device=self.device, kind=self.settings.loader)

    def _resolve_delta(self) -> "tuple[float, str]":
        """(delta, where it came from): the data set's recorded corruption is what trains, its delta
        included, unless --delta says otherwise."""
        given, recorded = self.cfg.delta, self.dataset.corruption.get("delta")
        if given is not None:
            return given, "--delta" + (f"; the data set records {recorded}" if recorded not in (None, given) else "")
        if recorded is not None:
            return recorded, "the data set's"
        return DEFAULT_DELTA, "the default; the data set records none"

    def _setup_model(self):
        cfg, device, settings = self.cfg, self.device, self.settings
        resolution = self.dataset.resolution
        problems = cfg.network_problems(resolution)
        if problems:
            raise ValueError(f"the model options do not make a network for the data's {resolution}x{resolution} "
                             "images: " + "; ".join(problems))
        torch.manual_seed(stream_key(cfg.seed, Stream.INIT))  # the same initial weights on every rank
        try:
            self.net, self.schedule = self.build_model()
            self._check_network_takes_images()
        except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as error:
            raise ValueError(f"the model options do not make a network for {resolution}x{resolution} images: "
                             f"{type(error).__name__}: {error}") from None
        # Contiguous parameters under every kind of parallelism; channels_last is the activations'
        # (ambient_fast.training.parallel: FSDP2 refuses channels_last parameters).
        self.net = self.net.to(device).train()
        self.model = parallelize(self.net, settings.parallel, self.world, device, settings.compile,
                                 channels_last=settings.channels_last)
        self.params = {name: p for name, p in self.net.named_parameters()}
        self.ema = {name: p.detach().clone() for name, p in self.params.items()}
        stds = cfg.recipe("ema_stds")
        self.posthoc_ema = PowerFunctionEMA(self.params, stds) if stds else None
        self.optimizer = torch.optim.Adam(self.params.values(), lr=cfg.recipe("lr"), betas=cfg.recipe("betas"),
                                          eps=1e-8, fused=settings.fused_optimizer,
                                          # CPU's default is one tensor at a time: the same arithmetic,
                                          # bit for bit, in ~180 times fewer calls
                                          foreach=None if settings.fused_optimizer else True)
        # bf16 by autocast under every kind of parallelism (ambient_fast.training.parallel: one numerical policy)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)

    def _check_memory(self) -> None:
        """Refuse, before anything is built, what the device surely cannot hold: a training step on
        the micro-batch, and the final grid of --sample-count images sampled at once."""
        C, R, _ = self.dataset.shape
        device = str(self.device)
        check_memory(self.cfg.training_bytes(R, C, self.micro, self.world.size),
                     f"a step on micro-batches of {self.micro} {C}x{R}x{R} images with this network",
                     "lower --batch-gpu (gradient accumulation) or --batch, or choose a smaller network", device)
        check_memory(sampling_bytes(self.cfg.sample_count, C, R), f"--sample-count {self.cfg.sample_count}",
                     "lower --sample-count", device)

    def _check_network_takes_images(self) -> None:
        """One image of the data's shape through the network, before anything is written: a shape
        the network cannot take fails here, not at the first step. No gradient, eval mode (no
        dropout), torch's generator restored: training is as if it had not run."""
        C, R, _ = self.dataset.shape
        channels = getattr(self.net, "img_channels", 2 * C)  # the observed image and its mask, as a rule
        x = torch.zeros(1, channels, R, R, device=self.device)
        labels = torch.zeros(1, self.dataset.label_dim, device=self.device) if self.dataset.label_dim else None
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            self.net.to(self.device).eval()
            try:
                self.net(x, torch.ones(1, device=self.device), labels)
            finally:
                self.net.train()

    def _check_noise_levels(self) -> None:
        """Refuse images whose lowest usable noise level (max(sigma_n, sigma_min)) reaches the largest
        one the model samples from: they could never be trained on or sampled."""
        from ambient_fast.files.loaded import LoadedNetwork
        from ambient_fast.sampling.samplers import sampling_sigmas

        largest = sampling_sigmas(LoadedNetwork(self.net))["sigma_max"]
        above = self.sigma_bounds >= largest
        if above.any():
            raise ValueError(f"{int(above.sum())} image(s) of {self.dataset.path} have a noise level (sigma_n or "
                             f"sigma_min, up to {float(self.sigma_bounds.max()):.4g}) at or above {largest:.4g}, the "
                             "largest the model samples from: the model could never denoise them; prepare the data "
                             "with lower levels (--noise, --sigma-min) or leave those images out")

    # What the step and the benchmarks read of the settings.
    parallel = property(lambda self: self.settings.parallel)
    bf16 = property(lambda self: self.settings.bf16)
    compiled = property(lambda self: self.settings.compile)

    def summary_rows(self, evaluation: "Optional[reporting.TrainingEvaluation]" = None) -> "list[tuple[str, str]]":
        """The short labelled summary printed at the start (`summary()`, the full detail, goes to log.txt)."""
        cfg, data, settings = self.cfg, self.dataset, self.settings
        corruption = dict(data.corruption)
        kind = corruption.pop("kind", "none")
        described = ", ".join(f"{name} {value}" for name, value in corruption.items())
        missing = 1 - data.meta.observed_fraction
        defaults = f" (defaults as on {self.target})" if self.target != self.device.type else ""
        precision = "bf16 autocast over fp32 weights" if settings.bf16 else "fp32"
        rows = [
            ("data", f"{data.path}{' (the built-in synthetic set)' if cfg.data is None else ''}: {len(data):,} images "
                     f"{data.channels}x{data.resolution}x{data.resolution}"),
            ("corruption", f"{kind}{': ' + described if described else ''} ({missing:.0%} of values missing); "
                           f"further corruption B: {self.objective.operator!r}"),
            ("model", self.describe_model()),
            ("training", f"{cfg.steps:,} steps of batch {cfg.batch} ({self.world.size} rank(s) x {self.accumulation} "
                         f"x {self.micro}), lr {cfg.recipe('lr'):g}, EMA half-life {cfg.ema:g} Mimg, seed {cfg.seed}"),
            ("parallelism", f"{settings.parallel} ({self.world.size} process{'es' if self.world.size > 1 else ''} on "
                            f"{self.device}){defaults}"),
            ("precision", f"{precision}, TF32 {'on' if settings.tf32 else 'off'}"),
            ("settings", settings.describe()),
            ("kernels", kernels.active_path(self.device)),
            ("run", f"{self.run_dir}" + (f" (resumed at step {self.step:,})" if self.step else "")
                    + "; log.txt holds the full detail"),
        ]
        if evaluation is not None:
            rows.append(("evaluation", f"every {cfg.eval_every:,} steps: {evaluation.describe()}"))
        if cfg.log != "none":
            rows.append(("tracking", f"{cfg.log}" + (f" (tensorboard --logdir {self.run_dir / tracking.TENSORBOARD_DIR})"
                                                   if cfg.log == "tensorboard" else "")))
        return rows

    def summary(self) -> str:
        """Every detail of the run's set-up on one line (log.txt keeps it)."""
        defaults = f" (defaults as on {self.target})" if self.target != self.device.type else ""
        return (f"{self.describe_model()} | "
                f"data {self.dataset.path} ({len(self.dataset)} images {self.dataset.resolution}x{self.dataset.resolution}, "
                f"corruption {self.dataset.corruption}, delta {self.delta}: {self.delta_source}) | "
                f"{self.world.size} rank(s) on {self.device}: {self.settings.describe()}{defaults} | {self.loader.describe()} | "
                f"{self.objective.describe()} | batch {self.cfg.batch} = {self.world.size} x {self.accumulation} x "
                f"{self.micro} | kernels: {kernels.active_path(self.device)}")

    # -- the model family: what ambient_fast.finetune's FinetuneTrainer overrides -----------------

    def build_model(self) -> "tuple[torch.nn.Module, NoiseSchedule]":
        """The denoiser (an AmbientPrecond or EDM2Precond: `net(x, sigma, labels)`, with `blocks()` for
        parallelize) and its noise schedule (the objective's levels and weights), from the config and
        the data set (a latent set's shape is its latents')."""
        cfg = self.cfg
        if cfg.arch == EDM2:
            net = EDM2Precond(img_resolution=self.dataset.resolution, img_channels=2 * self.dataset.channels,
                              label_dim=self.dataset.label_dim, ambient=True, mask_aware=cfg.mask_aware,
                              dropout=cfg.dropout, **cfg.model_size(self.dataset.resolution))
            # Forced weight normalisation as a step of its own (`train_step`), not inside the forward:
            # compiled blocks stay whole graphs, and FSDP2 would drop a write to its gathered weights.
            net.normalize_in_forward(False)
            self.config_for_checkpoint = net.config
            hidden_weight = unit_hidden_weight(net) if cfg.hidden_weight == "unit" else None
            return net, edm2_schedule(latent=self.dataset.is_latent, hidden_weight=hidden_weight)
        model_type, arch_kwargs = ARCHS[cfg.arch]
        precond = EDMPrecond if cfg.precond == "edm" else VPPrecond
        net = precond(img_resolution=self.dataset.resolution, img_channels=2 * self.dataset.channels,
                      label_dim=self.dataset.label_dim, mask_aware=cfg.mask_aware, model_type=model_type,
                      gate=cfg.gate, dropout=cfg.dropout, **arch_kwargs, **cfg.model_size(self.dataset.resolution))
        self.config_for_checkpoint = net.config
        hidden_weight = unit_hidden_weight(net) if cfg.hidden_weight == "unit" else None
        schedule = EDMSchedule if cfg.precond == "edm" else VPSchedule
        return net, schedule(hidden_weight=hidden_weight)

    def describe_model(self) -> str:
        params = sum(p.numel() for p in self.net.parameters())
        if isinstance(self.net, EDM2Precond):
            ema = self.cfg.recipe("ema_stds")
            return (f"{self.net.describe()}, EDM2's recipe (lr {self.cfg.recipe('lr'):g}, decay after "
                    f"{self.cfg.recipe('lr_decay_kimg'):g} kimg, uncertainty-weighted loss"
                    + (f", post-hoc EMA {','.join(f'{v:g}' for v in ema)})" if ema else ")"))
        return (f"{self.cfg.arch} ({params / 1e6:.2f} M params, gate {self.cfg.gate}, "
                f"{'mask-aware' if self.cfg.mask_aware else 'reference'} {self.cfg.precond} preconditioning, "
                f"hidden-pixel weight {self.cfg.hidden_weight})")

    def training_record(self) -> dict:
        """What a saved network records of its training data: the data set's corruption, the delta
        it trained with, the lowest noise level any image trained at (`sigma_floor`: the sampler
        stops there) and, when some images had nothing hidden, the sampling survival 1."""
        record = self.dataset.corruption | {"delta": self.delta, "sigma_floor": float(self.sigma_bounds.min())}
        if (self.dataset.records()["masked"] == 0).any():
            record["survival"] = 1.0
        elif "p" not in record:  # a mixture of masked sets: the fraction the model saw, A's then B's
            record["survival"] = self.dataset.meta.observed_fraction * (1 - self.delta)
        if self.dataset.is_latent:  # the sampler decodes through this autoencoder (data.latents.LatentCodec)
            record["latent"] = self.dataset.meta.latent
        return record

    def network_from(self, state: dict) -> torch.nn.Module:
        """A network of this run's kind holding `state` (full weights, as `_full_state_dict` gives them),
        in eval mode on the CPU."""
        from ambient_fast.networks import build_model

        network = build_model(self.config_for_checkpoint)
        network.load_state_dict(state, strict=True)
        return network.eval()

    def ema_network(self) -> Optional[torch.nn.Module]:
        """The EMA's network as of this step (collective: every rank gathers the EMA); None on the
        ranks other than the main one."""
        state = self._full_state_dict(ema=True)
        return self.network_from(state) if self.world.is_main else None

    def write_networks(self, final: bool) -> Path:
        """Write the EMA network of this step (collective: every rank calls it; the main rank writes)
        and return its path: a snapshot, or the final network at the end of the run."""
        name = self.final_name if final else f"network-snapshot-{self.step:09d}.safetensors"
        ema_state = self._full_state_dict(ema=True)
        path = self.run_dir / name
        check_finite(ema_state, path)  # on every rank (each holds the full EMA): all stop together
        if self.world.is_main:
            save_network(path, self.network_from(ema_state), self.training_record(), step=self.step,
                         images_seen=self.images_seen, config=dataclasses.asdict(self.cfg))
        return path

    def write_samples(self, network_path: Path, on_progress=None) -> "reporting.Pictures":
        """The final pictures (main rank): samples, inputs and the labelled overview."""
        return reporting.final_pictures(network_path, self.dataset, self.run_dir, self.cfg.sample_count,
                                        self.cfg.sample_steps, self.device, self.settings.memory_format, on_progress)

    # -- the loop --------------------------------------------------------------------------------

    def train(self) -> int:
        """Train up to `steps`, then finish (the final network and pictures). Returns the exit status:
        0 when finished (or when the run was finished already: then nothing is done unless `steps`
        grew), EXIT_INTERRUPTED when SIGTERM or Ctrl-C stopped it (its state saved)."""
        cfg, world = self.cfg, self.world
        if self.step >= cfg.steps and (self.run_dir / self.final_name).exists():
            if world.is_main:
                print(f"{self.run_dir} is finished (step {self.step:,} of --steps {cfg.steps:,}): nothing to do. To "
                      f"train it further, give a larger --steps: {self.command} --resume {shlex.quote(str(self.run_dir))} "
                      f"--steps {2 * self.step}", flush=True)
            return 0
        self._started = time.time()
        evaluation = self._evaluation() if cfg.eval_every and world.is_main else None
        if world.is_main:
            console.print_rows(self.summary_rows(evaluation))
            console.log_only(f"detail: {self.summary()}")
            for note in self.run.notes:
                print(f"note: {note}", flush=True)
            for warning in evaluation.warnings if evaluation is not None else ():
                print(f"warning: --eval-every: {warning}", flush=True)
            self.tracker = tracking.open_tracker(cfg.log, self.run_dir, dataclasses.asdict(cfg), self.step)
        handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        stats = reporting.StatsLog(self.run_dir / "stats.jsonl", world.is_main,
                                   reduce=self._mean_over_ranks if world.size > 1 else None, tracker=self.tracker)
        tick = max(1, min(50, cfg.steps // 20))  # the logging interval: where the run reads the device
        evaluation_due = (lambda: bool(cfg.eval_every) and self.step % cfg.eval_every == 0)
        logging_due = (lambda: self.step % tick == 0 or self.step == cfg.steps or evaluation_due())
        start_step, start_time, self._paused = self.step, time.time(), 0.0
        try:
            with console.WorkProgress("training", cfg.steps, "steps", completed=self.step,
                                      enabled=world.is_main) as progress:
                while self.step < cfg.steps:
                    stats.add(self.train_step())
                    log_step = logging_due()
                    if log_step or self.step % cfg.snapshot_every == 0:
                        self.check_health()  # a roll-back due moves self.step back: the tests below see it
                    if self.step % cfg.snapshot_every == 0 and self.step < cfg.steps:
                        self.snapshot()
                    progress.update(completed=self.step)  # before an evaluation: it shows the step it scores
                    if logging_due():
                        fields = self.evaluate(evaluation, progress) if evaluation_due() else {}
                        rate = (self.step - start_step) * cfg.batch / max(time.time() - start_time - self._paused, 1e-9)
                        mean = stats.flush(**{"Progress/step": self.step, "Progress/kimg": self.images_seen / 1000,
                                              "Progress/lr": self.lr, "Progress/skipped_steps": self.skipped,
                                              "Progress/rollbacks": self.rollbacks, "Timing/images_per_sec": rate},
                                           **fields)
                        scored = fields.get("Eval/frechet_distance")
                        progress.update(info=f"loss {mean:.4g} | lr {self.lr:.2e} | {rate:.0f} img/s"
                                             + (f" | Fréchet distance {scored:.3g}" if scored is not None else "")
                                             + reporting.gpu_info(self.device))
                    if self._should_stop(collective=log_step):
                        self.snapshot()
                        if world.is_main:
                            print(self.interrupted_message(), flush=True)
                        return EXIT_INTERRUPTED
            self.finish()
            return 0
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.tracker is not None:
                self.tracker.close()
                self.tracker = None

    def _evaluation(self) -> "reporting.TrainingEvaluation":
        """--eval-every's reference and scorer (main rank), before any training."""
        return reporting.TrainingEvaluation(self.cfg.eval_reference or str(self.dataset.path), self.cfg.eval_samples,
                                            self.cfg.sample_steps, self.dataset.shape)

    def evaluate(self, evaluation: "Optional[reporting.TrainingEvaluation]", progress: console.WorkProgress) -> dict:
        """--eval-every's evaluation of the EMA network at this step (collective: every rank gathers the
        EMA; the main rank samples and scores it): stats.jsonl's fields ({} on other ranks), the
        grid in OUT/eval-STEP.png and to the tracker. Its time is left out of the img/s."""
        began = time.time()
        model = self.ema_network()
        if evaluation is None:
            return {}
        loaded = LoadedNetwork(model, self.training_record(), f"the EMA at step {self.step}")
        fields, picture = evaluation(loaded, self.device, self.run_dir / f"eval-{self.step:09d}.png", lambda done: progress.update(
            info=f"evaluating: sampling {done:.0f}/{evaluation.count} images"))
        if self.tracker is not None:
            self.tracker.image("Eval/samples", picture, self.step)
        self._paused += time.time() - began
        return fields

    @property
    def lr(self) -> float:
        """The learning rate of the step from `images_seen` on: a linear ramp-up over lr_rampup_kimg, then
        1 / sqrt decay after lr_decay_kimg (EDM2's schedule; none by default for the gated U-Nets)."""
        cfg = self.cfg
        return edm2_learning_rate(self.images_seen, cfg.batch, cfg.recipe("lr") * self.lr_factor,
                                  cfg.recipe("lr_decay_kimg") * 1000 / cfg.batch, cfg.lr_rampup_kimg * 1000)

    def train_step(self) -> torch.Tensor:
        """One optimiser step over `batch` images, with no read of the device: `forward_backward`, then
        the update. Returns this rank's mean objective per image (a 0-d tensor on the device; NaN for a
        step that will be rolled back: reading it is left to the reporting)."""
        if isinstance(self.net, EDM2Precond):
            self.net.normalize_weights_()  # EDM2's forced weight normalisation (build_model)
        self.optimizer.zero_grad(set_to_none=True)
        with self._dropout_stream():
            loss = self.forward_backward()
        counts, void = self._count_step(self._clip_gradient())
        counts = self._gate(counts)
        self._optimizer_step(counts)
        self._update_ema(counts)
        self.step += 1
        self.images_seen += self.cfg.batch
        return torch.where(void, float("nan"), loss)

    def forward_backward(self) -> torch.Tensor:
        """This rank's gradient of the mean objective per image over its `accumulation` micro-batches
        (autocast; the gradient reduced across ranks with the last); returns that mean (0-d, on the device)."""
        total = torch.zeros((), device=self.device)
        for index in range(self.accumulation):
            raw = self.loader.next()
            # autocast casts the network's layers only: the objective's draws are integer, float32
            # and float64 element-wise operations it leaves as they are.
            with gradient_sync(self.model, self.parallel, index == self.accumulation - 1), self.autocast:
                loss = self.objective(self.model, raw).sum() / self.per_rank
            loss.backward()
            total += loss.detach()
        return total

    def _clip_gradient(self) -> torch.Tensor:
        """Clip the gradient to `max_grad_norm`; returns its norm before (0-d, the same on every rank)."""
        norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.max_grad_norm or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _count_step(self, norm: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """Count this step on the device from its gradient norm: a non-finite one is skipped and extends
        the streak, a finite one ends it; a streak of `bad_steps` makes a roll-back due, after which no
        step changes anything until `check_health` rolls back. Returns (counts: the optimiser and the
        EMA step, void: the step's loss must not be reported), 0-d bool."""
        bad = ~torch.isfinite(norm)
        skipped, streak, due, since_due = self._health.unbind()
        live = due == 0
        skip, counts = bad & live, ~bad & live
        streak = torch.where(counts, 0, streak + skip)
        now_due = skip & (streak >= self.cfg.bad_steps)
        self._health = torch.stack([skipped + skip, streak, due + now_due, since_due + ~live])
        return counts, now_due | ~live

    def _gate(self, counts: torch.Tensor) -> "torch.Tensor | bool":
        """`counts` as the update takes it: on the device for CUDA's fused Adam, which takes it as
        GradScaler's `found_inf`; read on the host for the plain Adam, the CPU's, where the flag is host
        memory and reading it waits on nothing. (Stepping and then undoing the step on the device cost
        the CPU's default run 15 ms of its ~330 ms step: a copy of every parameter and moment.)"""
        return counts if self.optimizer.defaults.get("fused") else bool(counts)

    def _optimizer_step(self, counts: "torch.Tensor | bool") -> None:
        """optimizer.step(), changing nothing where `counts` (see `_gate`) is false."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        if isinstance(counts, bool):
            if counts:
                self.optimizer.step()
            return
        self.optimizer.grad_scale, self.optimizer.found_inf = None, (~counts).to(torch.float32)
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.grad_scale, self.optimizer.found_inf

    def _update_ema(self, counts: "torch.Tensor | bool") -> None:
        """EMA of the weights, and the post-hoc EMA's profiles, kept as they were where the step does
        not count (`counts`, see `_gate`); a post-hoc EMA snapshot when the step crosses
        its interval (`_snapshot_posthoc_ema`)."""
        cfg = self.cfg
        halflife = cfg.ema * 1e6
        if cfg.ema_rampup:
            halflife = min(halflife, self.images_seen * cfg.ema_rampup)
        _gated_lerp_(self.ema, self.params, 1 - 0.5 ** (cfg.batch / max(halflife, 1e-8)), counts)
        if self.posthoc_ema is not None:
            after = self.images_seen + cfg.batch  # the count this step brings the run to
            for average, beta in zip(self.posthoc_ema.averages, self.posthoc_ema.betas(after, cfg.batch)):
                _gated_lerp_(average, self.params, 1 - beta, counts)
            if PowerFunctionEMA.snapshot_due(self.images_seen, after, cfg.ema_snapshot_images()):
                self._snapshot_posthoc_ema(after)

    def _snapshot_posthoc_ema(self, images: int) -> None:
        """Write each post-hoc EMA profile as a snapshot into RUN/phema (collective: every rank gathers;
        the main rank writes). A step whose roll-back falls due later only repeats the snapshots of its
        image counts: they are written again, with the same names, by the steps that replace it."""
        directory = self.run_dir / "phema"
        if self.world.is_main:
            directory.mkdir(exist_ok=True)
        for std, average in zip(self.posthoc_ema.stds, self.posthoc_ema.averages):
            state = self._gathered(average)
            check_finite(state, directory / snapshot_name(images, std))
            if self.world.is_main:
                save_snapshot(directory, self.network_from(state), images, std, self.training_record())

    @contextlib.contextmanager
    def _dropout_stream(self):
        """Dropout (and label dropout) draw from torch's global generator, as they take no other: it
        is seeded from (seed, rank, step) inside a fork that restores it afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(stream_key(self.cfg.seed, Stream.DROPOUT, self.world.rank, self.step))
            yield

    def _mean_over_ranks(self, losses: torch.Tensor) -> torch.Tensor:
        """Each step's mean objective over the ranks, from this rank's (collective)."""
        losses = losses.clone()
        dist.all_reduce(losses)
        return losses / self.world.size

    def check_health(self) -> None:
        """Read the device's counts of the steps since the last read (the one read of the device
        between logging intervals) and roll back if a streak of non-finite steps made it due. The
        steps after the streak changed nothing, and the roll-back restores the position, so the run
        goes on exactly as if the roll-back had happened at once. Every rank reads the same counts."""
        skipped, streak, due, since_due = self._health.tolist()
        self.skipped = skipped
        if due:
            self._roll_back(streak, self.step - since_due - 1)

    def _roll_back(self, streak: int, at_step: int):
        diverged = f"training diverged: {streak} consecutive non-finite steps at step {at_step}"
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingDiverged(f"{diverged} and no roll-back left ({self.rollbacks} used)")
        # The counters describe the whole run, not the state rolled back to.
        skipped, rollbacks, lr_factor = self.skipped, self.rollbacks, self.lr_factor
        try:
            state = self._load_newest_state()
        except FileNotFoundError:
            raise TrainingDiverged(f"{diverged} and no training state saved to roll back to") from None
        self.skipped, self.rollbacks, self.lr_factor = skipped, rollbacks + 1, lr_factor * 0.5
        self._health = self._fresh_health()
        if self.world.is_main:
            print(f"{self.cfg.bad_steps} consecutive non-finite steps: rolled back to {state.name} "
                  f"(step {self.step}) with the learning rate halved (roll-back {self.rollbacks} of "
                  f"{self.cfg.max_rollbacks})", flush=True)

    def _fresh_health(self) -> torch.Tensor:
        """The device's counts as of now: `self.skipped`, no streak, no roll-back due."""
        return torch.tensor([self.skipped, 0, 0, 0], dtype=torch.int64).to(self.device)

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Model, optimizer state, EMA, and the counters and loader position as tensors (nothing that
        DCP would pickle). The optimizer's hyper-parameters come from the config, not the state."""
        model_state, optim_state = get_state_dict(self.net, self.optimizer, options=StateDictOptions(strict=True))
        loader = self.loader.state_dict()
        progress = {name: torch.tensor(getattr(self, name), dtype=torch.int64) for name in _COUNTERS}
        progress["lr_factor"] = torch.tensor(self.lr_factor, dtype=torch.float64)
        progress.update({f"loader_{name}": torch.tensor(loader[name], dtype=torch.int64) for name in _LOADER_FIELDS})
        state = {"model": model_state, "optimizer": optim_state["state"], "ema": self.ema, "progress": progress}
        if self.posthoc_ema is not None:
            state["posthoc_ema"] = self.posthoc_ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        _, optim_state = get_state_dict(self.net, self.optimizer, options=StateDictOptions(strict=True))
        set_state_dict(self.net, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optimizer"], "param_groups": optim_state["param_groups"]})
        with torch.no_grad():
            for name, value in state["ema"].items():
                if value is not self.ema[name]:
                    self.ema[name].copy_(value)
            if self.posthoc_ema is not None:
                self.posthoc_ema.load_state_dict(state["posthoc_ema"])
        progress = state["progress"]
        for name in _COUNTERS:
            setattr(self, name, int(progress[name]))
        self.lr_factor = float(progress["lr_factor"])
        self._health = self._fresh_health()
        self.loader.load_state_dict({name: int(progress[f"loader_{name}"]) for name in _LOADER_FIELDS})

    def state_identity(self) -> dict:
        """What a training state of this run belongs to (ambient_fast.training.state): the data set
        (its checksum, count and shape), the number of ranks, the network's parameter shapes."""
        data = dict(path=str(self.dataset.path), checksum=self.dataset.checksum, images=len(self.dataset),
                    shape=list(self.dataset.shape))
        return dict(data=data, ranks=self.world.size,
                    network={name: list(p.shape) for name, p in self.net.named_parameters()})

    def _load_newest_state(self) -> Path:
        """Load the newest intact training state (collective), report the newer ones refused as
        damaged, and return its directory; IncompatibleState when it does not fit this run."""
        state, refused = load_newest_intact_state(self.run_dir, self.world, self, self.state_identity())
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
        return self._gathered(self.ema if ema else {})

    def _gathered(self, averages: dict) -> dict:
        """The network's full (unsharded) state on CPU, float32, with the parameters in `averages` (name ->
        tensor, e.g. an EMA's) in place of the trained ones; gathered on every rank (collective)."""
        out = {}
        for name, value in self.net.state_dict().items():
            value = averages.get(name, value)
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[name] = value.detach().float().cpu()
        return out

    def _save_state(self) -> Path:
        return save_training_state(self.run_dir, self.step, self.world, self, keep=self.cfg.keep,
                                   identity=self.state_identity())

    def snapshot(self):
        self.check_health()  # never save a state that a roll-back due would have replaced
        self.write_networks(final=False)
        self._save_state()

    def finish(self):
        """The end of the run: its training state, the final network, and (main rank) the pictures, a
        list of what was written and the commands to try next."""
        self.check_health()
        state = self._save_state()
        final = self.write_networks(final=True)
        if not self.world.is_main:
            return
        with console.WorkProgress("sampling", self.cfg.sample_count, "images") as progress:
            pictures = self.write_samples(final, lambda done: progress.update(completed=done))
        if self.tracker is not None:
            self.tracker.image("Samples/overview", pictures.overview_array, self.step)
        restored = ""
        if pictures.psnr_restored is not None:
            restored = (f"; held-out images restored in one step: {pictures.psnr_restored:.1f} dB PSNR, "
                        f"{pictures.psnr_corrupted:.1f} dB as corrupted")
        data = shlex.quote(str(self.dataset.path))
        net, run = shlex.quote(str(final)), self.run_dir
        reference = data if self.cfg.data is None else "CLEAN_IMAGES/   # a folder of clean images of the kind"
        print(f"done: {self.step:,} steps, {self.images_seen:,} images ({self.skipped} skipped steps) in "
              f"{console.duration(time.time() - self._started)}\n"
              f"  overview:        {pictures.overview}  (training inputs / samples"
              f"{' / clean originals' if self.cfg.data is None else ''}{restored})\n"
              f"  network (EMA):   {final}\n  samples/inputs:  {pictures.samples}, {run / 'inputs.png'}\n"
              f"  stats:           {run / 'stats.jsonl'}\n  log:             {run / 'log.txt'}\n"
              f"  training state:  {state}\n"
              f"next:\n"
              f"  python -m ambient_fast.sample --net {net} --out samples --seeds 0-63\n"
              f"  python -m ambient_fast.restore --net {net} --input {data} --out restored\n"
              f"  python -m ambient_fast.evaluate --samples samples --reference {reference}"
              + (f"\n  tensorboard --logdir {shlex.quote(str(run / tracking.TENSORBOARD_DIR))}"
                 if self.cfg.log == "tensorboard" else ""), flush=True)

    # -- signals ---------------------------------------------------------------------------------

    def interrupted_message(self) -> str:
        """What a run stopped by a signal prints: how to continue it."""
        return (f"interrupted at step {self.step}: state saved; continue with {self.command} "
                f"--resume {shlex.quote(str(self.run_dir))} (exit status {EXIT_INTERRUPTED})")

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def _should_stop(self, collective: bool) -> bool:
        """Whether any rank was asked to stop. Under torchrun the ranks agree on it (a collective and a
        read of the device) only where `collective`: the loop asks at its logging intervals."""
        if self.world.size == 1:
            return self.stop_requested
        if not collective:
            return False
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
