"""Every command's options, from one typed config: a dataclass whose fields are the options.

A field is declared with `option(default, help, ...)`: its help text, its choices (each set of
choices spelled once, beside the config that offers them), the range of a number, a check for
anything else, whether it names an input or an output of the command, and how its default reads
when the value alone would not say it (`default_text`, or `per_device` for a default that CUDA and
the CPU resolve differently). `Options.__post_init__` validates every field, so a bad value is an
error before any work starts, however the config was made (command line, a saved config.json,
code); every float must be finite whatever else it allows, so a new field cannot forget it.

The sets of choices that torch modules implement (gates, mask kinds, loaders, solvers, ...) are
spelled here too, and the implementing modules import them from here.

`build_parser` turns the fields into argparse options (`--name`, or the `flag` given; a boolean gets
`--name` / `--no-name`; a list is comma-separated; `positional` fields are arguments), with the
default of each generated into its help and the command's examples at the end. Its parser reports
a mistake as a ValueError (`UsageError`), which every command prints as one `error:` line with exit
status 1. This module imports nothing heavy: `--help` of every command stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple

__all__ = ["GATES", "MASK_KINDS", "FURTHER_KINDS", "CORRUPTIONS", "LOADER_KINDS", "PARALLEL_KINDS",
           "FINETUNE_WEIGHTINGS", "SOLVERS", "POSTERIOR_METHODS", "LOGGERS", "Bounds", "SEED_BOUNDS",
           "GENERATOR_SEED_BOUNDS", "Options", "UsageError", "at_least", "above", "between", "option", "device_option",
           "overwrite_option", "build_parser", "parse", "flag_of", "numeric_type", "INPUT", "OUTPUT"]

INPUT, OUTPUT = "input", "output"  # the role of a path field: read by the command, or written by it

# The choices that torch modules implement, spelled once here, on the light side, so that --help
# needs none of them; each implementing module imports its names from here.
GATES = ("sigmoid", "double_sigmoid", "none")                # networks.layers: the gated convolutions
MASK_KINDS = ("box", "dust", "fixed_box", "keep_patch")      # objective.corruption.OPERATORS: the mask operators
FURTHER_KINDS = ("dust", "box", "fixed_box", "keep_patch")   # each mask operator is also a further corruption B
CORRUPTIONS = ("none", *MASK_KINDS)                          # data.prepare; none: nothing masked (clean or noisy)
LOADER_KINDS = ("auto", "dali", "torch")                     # data.loader
PARALLEL_KINDS = ("fsdp", "ddp", "none")                     # training.parallel
FINETUNE_WEIGHTINGS = ("x0", "snr")                          # objective.objective.DiscreteVPSchedule
SOLVERS = ("heun", "euler")                                  # sampling.samplers
POSTERIOR_METHODS = ("ambient", "tweedie", "dps")            # sampling.restoration.posterior_method
LOGGERS = ("none", "tensorboard", "wandb")                   # training.tracking: train --log
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Bounds:
    """The range of a numeric option: low / high (None: unbounded), each end open or closed."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def short(self) -> str:
        """e.g. 'in [0, 1)', '>= 1' ('' when unbounded)."""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""

    def describe(self, integer: bool) -> str:
        """e.g. 'an integer >= 1', 'a finite number in [0, 1)'."""
        return " ".join(filter(None, ("an integer" if integer else "a finite number", self.short())))


def _number(value) -> str:
    """A bound as a person reads it: 0.5, 1, 2^63 - 1."""
    if isinstance(value, int) and value >= 2 ** 32 - 1 and (value + 1) & value == 0:
        return f"2^{value.bit_length()} - 1"
    return f"{value:g}" if isinstance(value, float) else str(value)


def at_least(low: float) -> Bounds:
    return Bounds(low=low)


def above(low: float) -> Bounds:
    return Bounds(low=low, low_open=True)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Bounds:
    return Bounds(low, high, low_open, high_open)


# A seed: stored as a 64-bit signed integer everywhere.
SEED_BOUNDS = Bounds(0, 2 ** 63 - 1)
# A seed that seeds torch's CPU generator itself (prepare's masks, sample's images, restore's noise):
# that generator keeps only the low 32 bits of its seed, so larger seeds would repeat smaller ones'
# draws and are refused instead. A run's seed (SEED_BOUNDS) only keys hashed streams: 63 bits.
GENERATOR_SEED_BOUNDS = Bounds(0, 2 ** 32 - 1)


def option(default: Any, help: str, *, choices: Optional[Sequence] = None, bounds: Optional[Bounds] = None,
           check: Optional[Tuple[Callable[[Any], bool], str]] = None, flag: Optional[str] = None,
           negative: Optional[str] = None, required: bool = False, positional: bool = False,
           nargs: Optional[str] = None, role: Optional[str] = None, default_text: Optional[str] = None,
           per_device: Optional[Tuple[str, str]] = None, resumable: bool = False, group: str = ""):
    """A config field, and so an option of its command.

    help: what it does (its default is appended in --help). choices: the allowed values. bounds:
    the range of a number (every numeric field has one). check: (predicate, what a valid value
    is) for anything else. flag / negative: the option's names when not `--name` / `--no-name`
    (negative "": none; a positional's flag is its metavar).
    required: must be given. positional: an argument, not an option (nargs: argparse's).
    role: INPUT or OUTPUT for a path the command reads or writes (the output guard keeps every
    output off the inputs). default_text: how a default of None (or 'auto') reads, e.g. "the
    preset's". per_device: (on CUDA, on the CPU) for a default the device decides.
    resumable: may change on `train --resume`. group: 'architecture' fields define our own
    networks (the fine-tuner leaves them out)."""
    metadata = dict(help=help, choices=tuple(choices) if choices is not None else None, bounds=bounds, check=check,
                    flag=flag, negative=negative, required=required, positional=positional, nargs=nargs, role=role,
                    default_text=default_text, per_device=per_device, resumable=resumable, group=group)
    return dataclasses.field(default=default, metadata=metadata)


def device_option(**kwargs):
    """The --device every command takes (kwargs: more of `option`'s)."""
    return option("auto", "where the work runs: auto, cpu, cuda or cuda:N",
                  check=(lambda v: bool(_DEVICE.match(str(v))), "auto, cpu, cuda or cuda:N"),
                  default_text="auto, CUDA when a GPU is present, else the CPU", **kwargs)


def overwrite_option(what: str):
    """--overwrite of a command that writes `what`."""
    return option(False, f"replace {what} at the output (only what this command writes there; anything else "
                         "is refused)", negative="")


def flag_of(field: dataclasses.Field) -> str:
    """The option's name on the command line (a positional argument's metavar)."""
    meta = field.metadata
    return meta.get("flag") or (field.name.upper() if meta.get("positional") else "--" + field.name.replace("_", "-"))


def _value_type(annotation) -> Any:
    """The field's type without Optional."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and args else annotation


def numeric_type(config_cls, field: dataclasses.Field) -> Optional[type]:
    """int or float for a numeric field, else None."""
    kind = _value_type(typing.get_type_hints(config_cls)[field.name])
    return kind if kind in (int, float) else None


@dataclass
class Options:
    """Base of every command's config: `__post_init__` checks every field (choices, range, check,
    required; every float finite). A config that needs checks across fields extends it."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            _check_field(type(self), field, getattr(self, field.name))

    def paths(self, role: str) -> "list[str]":
        """The given paths of the fields of `role` (INPUT or OUTPUT); lists are flattened."""
        found = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get("role") == role and value is not None:
                found.extend(value if isinstance(value, list) else [value])
        return [str(v) for v in found]


def _check_field(config_cls, field: dataclasses.Field, value: Any) -> None:
    meta, name = field.metadata, flag_of(field)
    if "help" not in meta:  # a plain dataclass field, not an option
        return
    if value is None:
        if meta["required"]:
            raise ValueError(f"{name} is required")
        return
    kind = numeric_type(config_cls, field)
    if kind is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # an int is finite (and may exceed a float)
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if meta["bounds"] is not None and value not in meta["bounds"]:
            raise ValueError(f"{name} must be {meta['bounds'].describe(kind is int)}, got {value!r}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ValueError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    check = meta["check"]
    if check is not None and not check[0](value):
        raise ValueError(f"{name} must be {check[1]}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Command line, generated from the fields.


class UsageError(ValueError):
    """A command-line mistake (argparse's own exit, status 2, becomes our one-line error, status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Options' help wrapped, the description and the examples kept as written."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


def _parse_list(text: str) -> list:
    """'2,2,2' -> [2, 2, 2], '0.05,0.1' -> [0.05, 0.1]: integers where they are, other numbers as floats (the
    field's check says which it takes)."""
    def number(v: str):
        try:
            return int(v)
        except ValueError:
            return float(v)

    try:
        return [number(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 2,2,2, got {text!r}") from None


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def default_help(field: dataclasses.Field) -> str:
    """What --help adds to the field's help: its range and default, e.g. '(>= 1; default: 18)'."""
    meta = field.metadata
    if meta["required"]:
        default = "required"
    elif meta["per_device"] is not None:
        default = "default: {} for CUDA, {} on the CPU".format(*meta["per_device"])
    elif meta["default_text"] is not None:
        default = f"default: {meta['default_text']}"
    else:
        default = f"default: {_shown(field.default)}"
    bounds = meta["bounds"].short() if meta["bounds"] is not None else ""
    return f"({bounds}; {default})" if bounds else f"({default})"


def build_parser(config_cls, prog: str, description: str = "", examples: Sequence[str] = (),
                 leave_out: Sequence[str] = (), extras: Callable[[argparse.ArgumentParser], None] = None
                 ) -> argparse.ArgumentParser:
    """The options of `config_cls`'s fields (all but those of the groups in `leave_out`), then any
    `extras` (a function adding options that are not part of the config, e.g. train's --resume),
    then `examples` (command lines) at the end of --help. Unset options are absent from the
    result (argparse.SUPPRESS), so a caller can tell what was given."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
    parser = _Parser(prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter,
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        if "help" not in meta or meta["group"] in leave_out:
            continue
        flag, kind = flag_of(field), _value_type(hints[field.name])
        text = f"{meta['help']} {default_help(field)}"
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action="store_true", help=text)
            if meta["negative"] != "":
                parser.add_argument(meta["negative"] or "--no-" + flag[2:], dest=field.name, action="store_false",
                                    help=f"the opposite of {flag}")
            continue
        kwargs = dict(help=text, type=_parse_list if kind is list and not meta["nargs"] else
                      (str if kind is list else kind))
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["positional"]:
            parser.add_argument(field.name, metavar=flag, nargs=meta["nargs"], **kwargs)
            continue
        metavar = "{" + ",".join(map(str, meta["choices"])) + "}" if meta["choices"] else flag[2:].upper().replace("-", "_")
        # Required options are checked by the config, not argparse: `train --resume` supplies them.
        parser.add_argument(flag, dest=field.name, metavar=metavar, **kwargs)
    if extras is not None:
        extras(parser)
    return parser


def parse(config_cls, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """The config of the command line `argv` (sys.argv when None); ValueError for a bad one."""
    return config_cls(**vars(parser.parse_args(None if argv is None else [str(a) for a in argv])))
