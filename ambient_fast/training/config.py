"""The trainer's configuration: one documented, validated dataclass (ambient_fast.options), that of the
fine-tuner, and the architectures and model-size presets by name.

`config_from_args` reads the command line, with `--resume DIR` (continue the run there: its saved
config.json, with only the `resumable` fields changed) and `--overwrite` beside the config's own
fields. Nothing here imports torch: `--help` answers at once.
"""
import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ambient_fast.files.atomic import read_json
from ambient_fast.options import (FINETUNE_WEIGHTINGS, FURTHER_KINDS, GATES, INPUT, LOADER_KINDS, LOGGERS, OUTPUT,
                                  PARALLEL_KINDS, SEED_BOUNDS, Options, above, at_least, between, device_option, option)
from ambient_fast.training.tracking import check_available

__all__ = ["TrainConfig", "FinetuneConfig", "ARCHS", "EDM2", "PRESETS", "preset_for", "add_run_options",
           "config_from_args", "EXIT_INTERRUPTED"]

# The exit status of a run stopped by SIGTERM or Ctrl-C after saving its state (1 stays an error's,
# 0 a finished run's): a script can tell the three apart and resume the interrupted one.
EXIT_INTERRUPTED = 3

ARCHS = {  # --arch -> (model_type, architecture arguments that define it), the gated U-Nets
    "ddpmpp": ("SongUNet", dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                channel_mult_noise=1, resample_filter=[1, 1])),
    "ncsnpp": ("SongUNet", dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                                channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "adm": ("DhariwalUNet", {}),
}
EDM2 = "edm2"  # --arch edm2: EDM2's magnitude-preserving U-Net (networks.edm2) and its training recipe
# Model sizes by name (every architecture takes them): tiny for the built-in 16x16 set, EDM's CIFAR-10
# configuration, the one of the published 64x64 models (AFHQ, CelebA-HQ), and EDM2-S (EDM2's
# ImageNet-64 and ImageNet-512 small network).
PRESETS = {
    "tiny": dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    "cifar10": dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16]),
    "celeba64": dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16]),
    "edm2-s": dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8]),
}
# EDM2's recipe where a run does not say otherwise (Karras et al. 2024; NVlabs/edm2's ImageNet-64 S
# preset): reference learning rate 0.01 (Adam betas 0.9, 0.99), its decay from 35,000 batches of 2,048
# images on, and the two post-hoc EMA profiles it tracks. The gated U-Nets keep EDM's Adam, 2e-3 and
# no decay, and track no post-hoc EMA unless asked.
EDM2_RECIPE = dict(lr=1e-2, betas=(0.9, 0.99), lr_decay_kimg=35000 * 2048 / 1000, ema_stds=[0.05, 0.10])
GATED_RECIPE = dict(lr=2e-3, betas=(0.9, 0.999), lr_decay_kimg=0.0, ema_stds=[])
SNAPSHOTS_PER_RUN = 20  # post-hoc EMA snapshots over a run by default
_PRESET_BY_RESOLUTION = {16: "tiny", 32: "cifar10", 64: "celeba64"}
SIZE_FIELDS = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")


def preset_for(resolution: int) -> str:
    """The size preset a data set of this resolution gets by default (cifar10's beyond the three)."""
    return _PRESET_BY_RESOLUTION.get(resolution, "cifar10")


_ARCHITECTURE = dict(group="architecture")
_GROUP_NORMALISED = ("ddpmpp", "ncsnpp", "adm")  # the architectures whose blocks use group normalisation
_POSITIVE_LIST = ((lambda v: len(v) > 0 and all(isinstance(x, int) and x >= 1 for x in v)),
                  "a list of positive integers")
_EMA_STDS = ((lambda v: all(0 < x < 0.2886 for x in v)), "relative standard deviations in (0, 0.2886), e.g. 0.05,0.1")


@dataclass
class TrainConfig(Options):
    """Everything a training run is made of. See ambient_fast.options."""

    data: Optional[str] = option(None, "prepared data set (python -m ambient_fast.prepare)", role=INPUT,
                                 default_text="the built-in synthetic set")
    out: str = option("runs/ambient", "run directory (checkpoints, samples, stats.jsonl)", role=OUTPUT)
    arch: str = option("ddpmpp", "network architecture (edm2: EDM2's magnitude-preserving U-Net and its recipe)",
                       choices=(*ARCHS, EDM2), **_ARCHITECTURE)
    precond: str = option("edm", "preconditioning and noise schedule", choices=("edm", "vp"), **_ARCHITECTURE)
    mask_aware: bool = option(True, "mask-aware preconditioning (hidden pixels: c_skip 0, c_out sigma_data)",
                              negative="--reference-precond", **_ARCHITECTURE)
    gate: str = option("sigmoid", "gate of the gated convolutions (double_sigmoid: the published checkpoints')",
                       choices=GATES, **_ARCHITECTURE)
    preset: Optional[str] = option(None, "model size; --channels etc. override it", choices=tuple(PRESETS),
                                   default_text="by resolution: 16 tiny, 32 cifar10, 64 celeba64", **_ARCHITECTURE)
    model_channels: Optional[int] = option(None, "U-Net width (group normalisation needs 4 channels per group)",
                                           flag="--channels", bounds=at_least(4), default_text="the preset's",
                                           **_ARCHITECTURE)
    channel_mult: Optional[list] = option(None, "per-resolution width multipliers, e.g. 2,2,2", check=_POSITIVE_LIST,
                                          default_text="the preset's", **_ARCHITECTURE)
    num_blocks: Optional[int] = option(None, "blocks per resolution", flag="--blocks", bounds=at_least(1),
                                       default_text="the preset's", **_ARCHITECTURE)
    attn_resolutions: Optional[list] = option(None, "resolutions with attention, e.g. 16 (empty: none)", flag="--attn",
                                              check=((lambda v: all(isinstance(x, int) and x >= 1 for x in v)),
                                                     "a list of positive resolutions"),
                                              default_text="the preset's", **_ARCHITECTURE)
    dropout: float = option(0.0, "dropout inside U-Net blocks", bounds=between(0, 1, high_open=True),
                            **_ARCHITECTURE)
    delta: Optional[float] = option(None, "further-corruption level (dust: probability that B hides an observed "
                                          "value; box kinds: the second box's relative side)",
                                    bounds=between(0, 1, high_open=True),
                                    default_text="the data set's recorded delta (0.1 where it records none, and for "
                                                 "the built-in set)")
    further: Optional[str] = option(None, "further corruption B (dust and imported masks also allow box)",
                                    choices=FURTHER_KINDS, default_text="the paper's for the data set's masks")
    ignore_noise: bool = option(False, "train noisy images as if they were clean (their noise level ignored): the "
                                       "naive baseline")
    hidden_weight: str = option("lambda", "loss weight on pixels B hid: lambda(sigma) as the reference, or unit "
                                          "(1 / c_out^2)", choices=("lambda", "unit"))
    batch: int = option(16, "global batch size per step (the built-in run's; raise it for real data)",
                        bounds=at_least(1))
    batch_gpu: Optional[int] = option(None, "per-rank micro-batch (gradient accumulation)", bounds=at_least(1),
                                      default_text="batch / ranks")
    lr: Optional[float] = option(None, "peak (reference) learning rate", bounds=above(0),
                                 default_text="2e-3; edm2: 1e-2")
    lr_rampup_kimg: float = option(1.0, "learning-rate ramp-up, thousands of images", flag="--lr-rampup",
                                   bounds=at_least(0))
    lr_decay_kimg: Optional[float] = option(None, "decay the learning rate as 1 / sqrt(images) after this many "
                                            "thousand images (EDM2's schedule; 0: no decay)", flag="--lr-decay",
                                            bounds=at_least(0), default_text="none; edm2: 71680, EDM2's 35,000 "
                                            "batches of 2,048")
    ema: float = option(0.5, "EMA half-life, millions of images (0: no averaging)", bounds=at_least(0))
    ema_rampup: float = option(0.05, "EMA half-life ramp-up ratio", bounds=at_least(0))
    ema_stds: Optional[list] = option(None, "post-hoc EMA: the relative standard deviations of the power-function "
                                      "profiles tracked, snapshots in RUN/phema (python -m ambient_fast.ema builds any "
                                      "other length from them; empty: none)", check=_EMA_STDS,
                                      default_text="none; edm2: 0.05,0.1, EDM2's", group="posthoc_ema")
    ema_snapshot_kimg: Optional[float] = option(None, "post-hoc EMA: thousands of images between snapshots of the "
                                                "profiles", bounds=above(0), resumable=True,
                                                default_text=f"1/{SNAPSHOTS_PER_RUN} of the run, --steps x --batch / "
                                                f"{SNAPSHOTS_PER_RUN * 1000}", group="posthoc_ema")
    steps: int = option(1000, "total optimiser steps", bounds=at_least(1), resumable=True)
    seed: int = option(0, "global seed", bounds=SEED_BOUNDS)
    xflip: bool = option(False, "mirror image and mask together, at random")
    parallel: str = option("auto", "parallelism under torchrun", choices=("auto", *PARALLEL_KINDS),
                           default_text="auto, fsdp under torchrun, none in one process")
    precision: str = option("auto", "arithmetic", choices=("auto", "bf16", "fp32"), per_device=("bf16", "fp32"))
    compile: Optional[bool] = option(None, "torch.compile the U-Net blocks", per_device=("on", "off"), resumable=True)
    tf32: bool = option(True, "TF32 matmuls and convolutions (the reference: off; the CPU has no TF32)",
                        per_device=("on", "off"), resumable=True)
    channels_last: Optional[bool] = option(None, "channels_last memory format", per_device=("on", "off"),
                                           resumable=True)
    device: str = device_option(resumable=True)
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", bounds=at_least(0))
    snapshot_every: int = option(500, "steps between snapshots (EMA network + training state)", bounds=at_least(1),
                                 resumable=True)
    keep: int = option(2, "training states kept", bounds=at_least(1), resumable=True)
    loader: str = option("auto", "data loader", choices=LOADER_KINDS, resumable=True,
                         per_device=("DALI when installed, else torch", "torch"))
    bad_steps: int = option(10, "consecutive non-finite steps before rolling back", bounds=at_least(1))
    max_rollbacks: int = option(3, "roll-backs allowed before giving up", bounds=at_least(0))
    sample_count: int = option(64, "images in the final sample grid", bounds=at_least(1), resumable=True)
    sample_steps: int = option(18, "Heun steps of the final sample grid and of --eval-every's samples (EDM's 18, "
                                   "the sample command's; fewer: sooner and rougher)", bounds=at_least(1),
                               resumable=True)
    verify_data: bool = option(True, "check the data set's checksums and content at start (off: very large sets)",
                               resumable=True)
    log: str = option("none", "also send stats.jsonl's scalars and the sample grids to TensorBoard (OUT/tensorboard/) "
                              "or Weights & Biases (online or offline as wandb is set up, e.g. WANDB_MODE=offline)",
                      choices=LOGGERS, resumable=True)
    eval_every: int = option(0, "steps between evaluations during training: a grid of --eval-samples samples of the "
                                "EMA network (OUT/eval-STEP.png) and their Fréchet distance in pixels against "
                                "--eval-reference, in stats.jsonl (0: none)", bounds=at_least(0), resumable=True)
    eval_samples: int = option(256, "samples drawn at each evaluation (fixed seeds 0..N-1)", bounds=at_least(2),
                               resumable=True)
    eval_reference: Optional[str] = option(None, "clean reference images for --eval-every: a folder of PNGs or a "
                                           "uint8 .npy (N, C, H, W)", role=INPUT, resumable=True,
                                           default_text="the built-in set's held-out clean images (required for "
                                                        "other data)")

    def __post_init__(self):
        super().__post_init__()
        check_available(self.log)
        if self.eval_reference is not None and not self.eval_every:
            raise ValueError("--eval-reference is only used with --eval-every N")
        if self.arch == EDM2:
            given = [flag for flag, wrong in (("--precond vp", self.precond != "edm"),
                                              (f"--gate {self.gate}", self.gate != "sigmoid")) if wrong]
            if given:
                raise ValueError(f"EDM2 networks have EDM's preconditioning and no gated convolutions: drop "
                                 f"{' and '.join(given)}")

    def recipe(self, name: str):
        """The run's lr, betas, lr_decay_kimg or ema_stds: the given value, else its architecture's
        (EDM2_RECIPE for edm2, GATED_RECIPE for the others)."""
        given = getattr(self, name, None)
        return given if given is not None else (EDM2_RECIPE if self.arch == EDM2 else GATED_RECIPE)[name]

    def ema_snapshot_images(self) -> int:
        """Images between post-hoc EMA snapshots (at least one batch)."""
        kimg = self.ema_snapshot_kimg
        images = kimg * 1000 if kimg is not None else self.steps * self.batch / SNAPSHOTS_PER_RUN
        return max(int(round(images)), 1)

    def model_size(self, resolution: int) -> dict:
        """The network's size for images of `resolution`: the preset's, with the given fields over it."""
        size = dict(PRESETS[self.preset or preset_for(resolution)])
        size.update({key: getattr(self, key) for key in SIZE_FIELDS if getattr(self, key) is not None})
        return size

    def network_problems(self, resolution: int) -> "list[str]":
        """What keeps the network these options describe from taking `resolution` x `resolution`
        images, one line each naming the option to change ([] when nothing does). The U-Net halves
        the images once per level after the first; attention goes at resolutions it has; group
        normalisation splits every width into min(32, width / 4) groups."""
        size = self.model_size(resolution)
        mult, channels = size["channel_mult"], size["model_channels"]
        levels, problems = len(mult), []
        if resolution % 2 ** (levels - 1):
            fits = max(n for n in range(1, levels + 1) if resolution % 2 ** (n - 1) == 0)
            problems.append(f"--channel-mult {','.join(map(str, mult))} has {levels} levels, which halve the images "
                            f"{levels - 1} times, but {resolution} is not divisible by {2 ** (levels - 1)}: give at most "
                            f"{fits} level(s) with --channel-mult, or prepare the data at a resolution divisible by "
                            f"{2 ** (levels - 1)}")
        resolutions = [resolution >> level for level in range(levels)]
        absent = [r for r in size["attn_resolutions"] if r not in resolutions]
        if absent:
            problems.append(f"--attn {','.join(map(str, absent))}: the network works at resolutions "
                            f"{', '.join(map(str, resolutions))}; choose attention among them (--attn '' for none)")
        if self.arch in _GROUP_NORMALISED:
            widths = sorted({channels, *(channels * m for m in mult)})
            unsplit = [w for w in widths if w < 4 or w % min(32, w // 4)]
            if unsplit or channels % 2:
                problems.append(f"--channels {channels} with --channel-mult {','.join(map(str, mult))} gives widths "
                                f"{', '.join(map(str, widths))}; each must be even and split into min(32, width / 4) "
                                "equal groups for group normalisation: use a multiple of 32 (e.g. "
                                f"{max(32, channels // 32 * 32)}) for --channels")
        return problems

    def training_bytes(self, resolution: int, channels: int, micro_batch: int, ranks: int) -> int:
        """The least device memory a step of this network needs on micro-batches of `micro_batch`
        images, over `ranks` ranks (ambient_fast.memory.unet_training_bytes)."""
        from ambient_fast.memory import unet_training_bytes

        size = self.model_size(resolution)
        return unet_training_bytes(micro_batch, channels, resolution, size["model_channels"], size["channel_mult"],
                                   size["num_blocks"], ranks)

    def input_paths(self) -> "list[str]":
        """What the run reads: no output of it may land on these (the output guard)."""
        return self.paths(INPUT)


def _with_default(name: str, value):
    """The TrainConfig field `name` with another default (its help and checks kept)."""
    return dataclasses.field(default=value, metadata=TrainConfig.__dataclass_fields__[name].metadata)


@dataclass
class FinetuneConfig(TrainConfig):
    """A training run of a diffusers UNet (python -m ambient_fast.finetune): the trainer's options but
    those of our own networks, and these."""

    unet: Optional[str] = option(None, "diffusers UNet directory written by save_pretrained (safetensors), its "
                                 "scheduler_config.json beside it or in ../scheduler/; or a pipeline root with unet/ "
                                 "and scheduler/", required=True, role=INPUT)
    prompt_embeddings: Optional[str] = option(None, "safetensors file with 'prompt_embeddings' (K, L, D) for a "
                                              "UNet2DConditionModel: K = 1 conditions every image on it (e.g. the "
                                              "empty prompt), K > 1 picks by the data set's labels", role=INPUT,
                                              default_text="none (an unconditional UNet)")
    loss_weight: str = option("snr", "snr: the noise-prediction error where the network saw the pixel, the x0 error "
                              "where B hid it; x0: weight 1 on the x0 error everywhere, as the authors' DeepFloyd "
                              "script (bench/results/finetune.md: it leaves the hidden pixels untrained far longer)",
                              choices=FINETUNE_WEIGHTINGS)
    # Fine-tuning defaults: a pre-trained model moves with a small learning rate.
    out: str = _with_default("out", "runs/finetune")
    lr: float = _with_default("lr", 1e-4)
    lr_rampup_kimg: float = _with_default("lr_rampup_kimg", 0.5)
    ema: float = _with_default("ema", 0.01)
    steps: int = _with_default("steps", 2000)

    def __post_init__(self):
        super().__post_init__()
        if self.data is None:
            raise ValueError("--data DIR (a prepared data set) is required: fine-tuning has no built-in set")

    def network_problems(self, resolution: int) -> "list[str]":
        """None from the options: the UNet is given (the fine-tuner checks that it takes the data's images)."""
        return []

    def training_bytes(self, resolution: int, channels: int, micro_batch: int, ranks: int) -> int:
        """Not estimated from the options: the UNet is given, its size on disk."""
        return 0


# ----------------------------------------------------------------------------------------------
# Command line: the config's fields, --resume and --overwrite.


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--resume and --overwrite: how a run treats the folder it trains in (not part of its config)."""
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR up to --steps in total, with its "
                        "saved options (only those marked resumable may change); a finished run does nothing unless "
                        f"--steps grows. A run stopped by SIGTERM or Ctrl-C saves its state and exits with status "
                        f"{EXIT_INTERRUPTED} (0: finished, 1: an error)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (only what a run writes; by default a non-empty --out is "
                             "refused)")


def config_from_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
                     config_cls=TrainConfig) -> "tuple[TrainConfig, bool, bool]":
    """(config, resume, overwrite) from the command line. --resume keeps the run's saved config.json
    and allows only the `resumable` fields to change; it trains in DIR, so an --out elsewhere is
    refused rather than guessed at."""
    given = vars(parser.parse_args(None if argv is None else [str(a) for a in argv]))
    resume, overwrite = given.pop("resume", None), given.pop("overwrite", False)
    if resume is None:
        return config_cls(**given), False, overwrite
    if overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces one: give only one of them")
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ValueError(f"--resume {resume} continues the run in {resume}, but --out names {out}: to continue that "
                         f"run, drop --out; to start a new run in {out}, drop --resume")
    saved_path = Path(resume) / "config.json"
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.json there (is it a run directory?)")
    saved = read_json(saved_path, "the run's configuration is damaged: restore it, or start again with --overwrite")
    if not isinstance(saved, dict):
        raise ValueError(f"{saved_path} does not hold a run's options: restore it, or start again with --overwrite")
    fields = {field.name: field for field in dataclasses.fields(config_cls)}
    unknown = set(saved) - set(fields)
    if unknown:
        raise ValueError(f"{saved_path} holds options this version does not know: {sorted(unknown)}")
    resumable = {name for name, field in fields.items() if field.metadata.get("resumable")}
    changed = {key for key, value in given.items() if saved.get(key, fields[key].default) != value} - resumable
    if changed:
        raise ValueError(f"--resume keeps the run's configuration; these options differ from {saved_path}: "
                         f"{sorted(changed)} (only {sorted(resumable)} may change)")
    return config_cls(**{**saved, **given, "out": str(resume)}), True, False
