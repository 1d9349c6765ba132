"""What every reader checks of what it reads: the file is a regular one, and each value of a record
(meta.json, dataset.json, a checkpoint's header, a training state's identity) has the type and
range it must have, with nothing rounded, truncated or flattened on the way.

A FIFO, a socket or a device given where a file is read would block the reader forever (or read
without end): `regular_file` refuses them by their type before anything opens them. The value
checks raise ValueError naming the value (`what`); the caller adds which file it came from.
Nothing here imports numpy or torch (the commands' --help stays fast).
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["regular_file", "is_regular_file", "special_kind", "integer", "number", "boolean", "text", "mapping",
           "sequence", "MAX_IMAGES", "check_corruption", "json_config"]

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def special_kind(path: Union[str, Path]) -> str:
    """What `path` is when it exists and is not a regular file (following links), e.g. 'a FIFO
    (named pipe)'; '' for a regular file or nothing at all."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return ""
    return next((name for test, name in _KINDS if test(mode)), "" if stat.S_ISREG(mode) else "not a regular file")


def is_regular_file(path: Union[str, Path]) -> bool:
    """Whether `path` is a regular file (after links): never blocks, whatever it is."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def regular_file(path: Union[str, Path], what: str) -> Path:
    """`path`, checked to be an existing regular file before anyone opens it (`what` names it in the
    message, e.g. '--sigma-min'): FileNotFoundError when missing, ValueError for a folder, a FIFO,
    a device or a socket, which would be read without end or never."""
    path = Path(path)
    kind = special_kind(path)
    if kind:
        raise ValueError(f"{what} {path} is {kind}, not a regular file: give a file")
    if not is_regular_file(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


# ----------------------------------------------------------------------------------------------
# Values of a parsed record, checked one by one.

def _range(low, high) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    return f" <= {high}" if high is not None else ""


def integer(value: Any, what: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """`value` when it is an integer (not a bool, not a float such as 3.0 or 1e999) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (
            high is not None and value > high):
        raise ValueError(f"{what} must be an integer{_range(low, high)}, got {value!r}")
    return value


def number(value: Any, what: str, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """`value` as a float when it is a finite number (not a bool, not a string) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{what} must be a finite number{_range(low, high)}, got {value!r}")
    return float(value)


def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    return value


def mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object ({{...}}), got {type(value).__name__}")
    return value


def sequence(value: Any, what: str, length: Optional[int] = None) -> list:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValueError(f"{what} must be a list" + (f" of {length}" if length is not None else "")
                         + f", got {value!r}"[:200])
    return value


# ----------------------------------------------------------------------------------------------
# Records that more than one file keeps.

MAX_IMAGES = 2 ** 40  # images a data set may say it holds (meta.json, a mixture's parts), beyond belief


def check_corruption(record: Any, what: str) -> dict:
    """A corruption record ({"kind", "p", "delta", "shared_channels", ...}: a data set's meta.json
    or a checkpoint's header) checked: the known fields of the types and ranges they have, a mix's
    parts each a record with a count in [1, MAX_IMAGES]. Returns it as a dict; ValueError naming the
    field otherwise."""
    record = mapping(record, what)
    if "kind" in record:
        text(record["kind"], f"{what}.kind")
    for key in ("p", "delta", "survival"):
        if key in record:
            number(record[key], f"{what}.{key}", 0, 1)
    for key in ("sigma_n", "sigma_floor"):
        if key in record:
            number(record[key], f"{what}.{key}", 0)
    if "shared_channels" in record:
        boolean(record["shared_channels"], f"{what}.shared_channels")
    for index, part in enumerate(sequence(record.get("parts", []), f"{what}.parts")):
        part = check_corruption(part, f"{what}.parts[{index}]")
        integer(part.get("count"), f"{what}.parts[{index}].count", 1, MAX_IMAGES)
    return dict(record)


_MAX_LIST, _MAX_INTEGER = 64, 2 ** 31 - 1


def json_config(config: Any, what: str) -> dict:
    """A network's constructor arguments as a checkpoint records them: an object whose values are
    booleans, strings, null, integers below 2^31 in size, floats, or short lists of these (at most
    64). Their meaning is the network's to check; these bounds keep a damaged or hostile record from
    building something unbounded."""
    config = mapping(config, what)

    def check(value, name):
        if isinstance(value, list):
            if len(value) > _MAX_LIST:
                raise ValueError(f"{name} must be a list of at most {_MAX_LIST} values, got {len(value)}")
            for item in value:
                check(item, name)
        elif isinstance(value, int) and not isinstance(value, bool):
            integer(value, name, -_MAX_INTEGER, _MAX_INTEGER)
        elif not (value is None or isinstance(value, (bool, str, float))):  # a float may be inf (a VP sigma_max)
            raise ValueError(f"{name} must be a number, a string, a boolean or a list, got {value!r}"[:200])

    for key, value in config.items():
        check(value, f"{what}.{key}")
    return config
