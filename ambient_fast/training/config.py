"""The trainer's configuration: one documented, validated dataclass, the architectures and model-size
presets by name, and the command line generated from the fields.

Every field is declared with `option(default, help, ...)`: its help text, its choices (each set of
choices is spelled once, here) and its check live beside it, and `build_parser` turns the fields
into options (`--name`, or the `flag` given; a boolean gets `--name` / `--no-name`; a list is
comma-separated; the default is quoted in the help). `TrainConfig.__post_init__` validates every
field, so a bad value is an error before any work starts, however the config was made.
"""
import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

from ambient_fast.objective.corruption import FURTHER_KINDS
from ambient_fast.data.loader import LOADER_KINDS
from ambient_fast.files.atomic import read_json
from ambient_fast.networks.layers import GATES
from ambient_fast.training.parallel import PARALLEL_KINDS

__all__ = ["TrainConfig", "ARCHS", "PRESETS", "preset_for", "option", "build_parser", "config_from_args"]

ARCHS = {  # --arch -> (model_type, architecture arguments that define it)
    "ddpmpp": ("SongUNet", dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                                channel_mult_noise=1, resample_filter=[1, 1])),
    "ncsnpp": ("SongUNet", dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                                channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
    "adm": ("DhariwalUNet", {}),
}
# Model sizes by name: tiny for the built-in 16x16 set, EDM's CIFAR-10 configuration and the one of
# the published 64x64 models (AFHQ, CelebA-HQ).
PRESETS = {
    "tiny": dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
    "cifar10": dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16]),
    "celeba64": dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16]),
}
_PRESET_BY_RESOLUTION = {16: "tiny", 32: "cifar10", 64: "celeba64"}
SIZE_FIELDS = ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")


def preset_for(resolution: int) -> str:
    """The size preset a data set of this resolution gets by default (cifar10's beyond the three)."""
    return _PRESET_BY_RESOLUTION.get(resolution, "cifar10")


def option(default: Any, help: str, *, choices: Optional[Sequence] = None, flag: Optional[str] = None,
           negative: Optional[str] = None, check: Optional[Tuple[Callable[[Any], bool], str]] = None,
           resumable: bool = False, group: str = "training"):
    """A config field. help: the option's help text (the default is appended). choices: allowed
    values. flag / negative: the option's names when not `--name` / `--no-name`. check: (predicate,
    what a valid value is). resumable: may change on --resume. group: 'architecture' fields define
    our own networks (the fine-tuner leaves them out)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, flag=flag, negative=negative,
                                                            check=check, resumable=resumable, group=group))


def _finite_at_least(low: float) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: math.isfinite(v) and v >= low), f"a finite number >= {low:g}"


def _at_least(low: int) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"an integer >= {low}"


def _positive_list() -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or (len(v) > 0 and all(x >= 1 for x in v))), "a list of positive integers"


_ARCHITECTURE = dict(group="architecture")


@dataclass
class TrainConfig:
    """Everything a training run is made of. See `option` and the module docstring."""

    data: Optional[str] = option(None, "prepared data set (python -m ambient_fast.prepare); default: the built-in "
                                       "synthetic set")
    out: str = option("runs/ambient", "run directory (checkpoints, samples, stats.jsonl)")
    arch: str = option("ddpmpp", "network architecture", choices=tuple(ARCHS), **_ARCHITECTURE)
    precond: str = option("edm", "preconditioning and noise schedule", choices=("edm", "vp"), **_ARCHITECTURE)
    mask_aware: bool = option(True, "mask-aware preconditioning (hidden pixels: c_skip 0, c_out sigma_data)",
                              negative="--reference-precond", **_ARCHITECTURE)
    gate: str = option("sigmoid", "gate of the gated convolutions (double_sigmoid: the published checkpoints')",
                       choices=GATES, **_ARCHITECTURE)
    preset: Optional[str] = option(None, "model size: " + ", ".join(PRESETS) + "; default by resolution (16: tiny, "
                                   "32: cifar10, 64: celeba64); --channels etc. override it", choices=tuple(PRESETS),
                                   **_ARCHITECTURE)
    model_channels: Optional[int] = option(None, "U-Net width (default: the preset's)", flag="--channels",
                                           check=((lambda v: v is None or v >= 4),
                                                  "at least 4 (group normalisation needs 4 channels per group)"),
                                           **_ARCHITECTURE)
    channel_mult: Optional[list] = option(None, "per-resolution width multipliers, e.g. 2,2,2", check=_positive_list(),
                                          **_ARCHITECTURE)
    num_blocks: Optional[int] = option(None, "blocks per resolution", flag="--blocks",
                                       check=((lambda v: v is None or v >= 1), "an integer >= 1"), **_ARCHITECTURE)
    attn_resolutions: Optional[list] = option(None, "resolutions with attention, e.g. 16 (empty: none)", flag="--attn",
                                              check=((lambda v: v is None or all(x >= 1 for x in v)),
                                                     "a list of positive resolutions"), **_ARCHITECTURE)
    dropout: float = option(0.0, "dropout inside U-Net blocks", check=((lambda v: 0 <= v < 1), "in [0, 1)"),
                            **_ARCHITECTURE)
    delta: float = option(0.1, "further-corruption level (dust: probability that B hides an observed value; "
                               "box kinds: the second box's relative side)", check=((lambda v: 0 <= v < 1), "in [0, 1)"))
    further: Optional[str] = option(None, "further corruption B; default: the paper's for the data set's masks (dust "
                                          "and imported masks also allow box)", choices=FURTHER_KINDS)
    ignore_noise: bool = option(False, "train noisy images as if they were clean (their noise level ignored): the "
                                       "naive baseline")
    hidden_weight: str = option("lambda", "loss weight on pixels B hid: lambda(sigma) as the reference, or unit "
                                          "(1 / c_out^2)", choices=("lambda", "unit"))
    batch: int = option(16, "global batch size per step (the built-in run's; raise it for real data)",
                        check=_at_least(1))
    batch_gpu: Optional[int] = option(None, "per-rank micro-batch (gradient accumulation); default batch / ranks",
                                      check=((lambda v: v is None or v >= 1), "an integer >= 1"))
    lr: float = option(2e-3, "peak learning rate", check=((lambda v: math.isfinite(v) and v > 0),
                                                          "a positive finite number"))
    lr_rampup_kimg: float = option(1.0, "learning-rate ramp-up, thousands of images", flag="--lr-rampup",
                                   check=_finite_at_least(0))
    ema: float = option(0.5, "EMA half-life, millions of images (0: no averaging)", check=_finite_at_least(0))
    ema_rampup: float = option(0.05, "EMA half-life ramp-up ratio", check=_finite_at_least(0))
    steps: int = option(1000, "total optimiser steps", check=_at_least(1), resumable=True)
    seed: int = option(0, "global seed", check=_at_least(0))
    xflip: bool = option(False, "mirror image and mask together, at random")
    parallel: str = option("auto", "parallelism under torchrun; auto = fsdp there, none in one process",
                           choices=("auto", *PARALLEL_KINDS))
    precision: str = option("auto", "arithmetic; auto = bf16 on CUDA", choices=("auto", "bf16", "fp32"))
    compile: Optional[bool] = option(None, "torch.compile the U-Net blocks; default on CUDA", resumable=True)
    tf32: bool = option(True, "TF32 matmuls and convolutions on CUDA (the reference: off)", resumable=True)
    channels_last: Optional[bool] = option(None, "channels_last memory format; default on CUDA", resumable=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", resumable=True)
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", check=_finite_at_least(0))
    snapshot_every: int = option(500, "steps between snapshots (EMA network + training state)", check=_at_least(1),
                                 resumable=True)
    keep: int = option(2, "training states kept", check=_at_least(1), resumable=True)
    loader: str = option("auto", "data loader; auto = DALI on CUDA when installed", choices=LOADER_KINDS,
                         resumable=True)
    bad_steps: int = option(10, "consecutive non-finite steps before rolling back", check=_at_least(1))
    max_rollbacks: int = option(3, "roll-backs allowed before giving up", check=_at_least(0))
    sample_count: int = option(64, "images in the final sample grid", check=_at_least(1), resumable=True)
    verify_data: bool = option(True, "check the data set's checksums and content at start (off: very large sets)",
                               resumable=True)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, meta = getattr(self, field.name), field.metadata
            name = meta.get("flag") or "--" + field.name.replace("_", "-")
            if meta.get("choices") is not None and value is not None and value not in meta["choices"]:
                raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
            check = meta.get("check")
            if check is not None and not check[0](value):
                raise ValueError(f"{name} must be {check[1]}, got {value!r}")

    def model_size(self, resolution: int) -> dict:
        """The network's size for images of `resolution`: the preset's, with the given fields over it."""
        size = dict(PRESETS[self.preset or preset_for(resolution)])
        size.update({key: getattr(self, key) for key in SIZE_FIELDS if getattr(self, key) is not None})
        return size


# ----------------------------------------------------------------------------------------------
# Command line, generated from the fields.


def _parse_list(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def _value_type(annotation) -> type:
    """The field's type without Optional."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and args else annotation


def build_parser(config_cls=TrainConfig, prog: str = "python -m ambient_fast.train", description: str = "",
                 leave_out: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The options of `config_cls`'s fields (all but those in groups `leave_out`), plus --resume and
    --overwrite. Unset options are absent from the result (argparse.SUPPRESS), so that --resume can
    tell what was given."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR up to --steps in total")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --out (by default a non-empty --out is refused)")
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        if meta.get("group") in leave_out or "help" not in meta:
            continue
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        kind = _value_type(hints[field.name])
        default = "" if field.default is None else f" (default {field.default})"
        if kind is bool:
            on = "" if field.default is not True else " (default)"
            parser.add_argument(flag, dest=field.name, action="store_true", help=meta["help"] + on)
            off_flag = meta["negative"] or "--no-" + flag[2:]
            parser.add_argument(off_flag, dest=field.name, action="store_false",
                                help=f"the opposite of {flag}" + (" (default)" if field.default is False else ""))
            continue
        kwargs = dict(dest=field.name, help=meta["help"] + default, metavar=flag[2:].upper().replace("-", "_"))
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        kwargs["type"] = _parse_list if kind is list else kind
        parser.add_argument(flag, **kwargs)
    return parser


def config_from_args(argv=None, parser: Optional[argparse.ArgumentParser] = None,
                     config_cls=TrainConfig) -> "tuple[TrainConfig, bool, bool]":
    """(config, resume, overwrite) from the command line. --resume keeps the run's saved config.json
    and allows only the `resumable` fields to change."""
    given = vars((parser or build_parser(config_cls)).parse_args(argv))
    resume, overwrite = given.pop("resume", None), given.pop("overwrite", False)
    if resume is None:
        return config_cls(**given), False, overwrite
    if overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces one: give only one of them")
    saved_path = Path(resume) / "config.json"
    if not saved_path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no config.json there (is it a run directory?)")
    saved = read_json(saved_path, "the run's configuration is damaged: restore it, or start again with --overwrite")
    fields = {field.name: field for field in dataclasses.fields(config_cls)}
    unknown = set(saved) - set(fields)
    if unknown:
        raise ValueError(f"{saved_path} holds options this version does not know: {sorted(unknown)}")
    resumable = {name for name, field in fields.items() if field.metadata.get("resumable")}
    changed = {key for key, value in given.items() if saved.get(key, fields[key].default) != value} - resumable - {"out"}
    if changed:
        raise ValueError(f"--resume keeps the run's configuration; these options differ from {saved_path}: "
                         f"{sorted(changed)} (only {sorted(resumable)} may change)")
    return config_cls(**{**saved, **given, "out": str(resume)}), True, False
