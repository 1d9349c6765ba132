"""Files written safely: atomic replacement, strict JSON, and the output guard every command uses.

Every file the project writes goes through `atomic_write`: the content goes to a hidden
temporary sibling (`.NAME.tmp-PID`), is fsynced and renamed over NAME, and the directory entry is
fsynced; on any failure the temporary file is removed and the error names NAME (not the
temporary) and says what to do. A crash or a kill can leave at most a temporary file, never a
half-written NAME; `remove_temporaries` clears those where no other process writes.

JSON is written strictly (NaN and infinities become null: `Infinity` is not JSON) and read with
errors that name the file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Union

from ambient_fast.files.places import is_dataset, is_run_directory
from ambient_fast.files.reading import regular_file

PathLike = Union[str, Path]

# Hidden temporaries: `.NAME.tmp-PID` (atomic_write) and `.NAME.tmp` (directories written by every
# rank of a run, which cannot share one PID).
TEMPORARY = re.compile(r"^\..+\.tmp(-\d+)?$")

_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this system allows: write elsewhere",
    errno.EROFS: "the file system is read-only: choose another location",
    errno.EACCES: "permission denied: choose a location you can write to",
    errno.EPERM: "permission denied: choose a location you can write to",
}


def write_error(path: PathLike, error: OSError) -> OSError:
    """An OSError that names `path` (not a temporary) and says what to do; keeps the errno."""
    reason = error.strerror or str(error)
    advice = _ADVICE.get(error.errno)
    result = OSError(error.errno, f"cannot write {path}: {reason}" + (f" ({advice})" if advice else ""))
    result.filename = None  # the message already names the file
    return result


def temporary_path(path: PathLike) -> Path:
    """The hidden sibling `atomic_write` writes through before renaming."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's content, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: PathLike) -> None:
    """Flush a file's content, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Write `path` through `write(temporary_path)`, then fsync and rename it into place.

    A crash, a kill or an exception never leaves a partial file under `path`; on an exception the
    temporary is removed and an OSError names `path`. Returns `path`.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as error:
        raise write_error(path, error) from error
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """Standard JSON text for `value` (non-finite floats as null)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def write_json(path: PathLike, value: Any) -> Path:
    return write_text(path, dumps_json(value, indent=1) + "\n")


def read_json(path: PathLike, advice: str = "") -> Any:
    """Parse the JSON file at `path`; a ValueError names the file, where it broke, and `advice`."""
    path = regular_file(path, "the file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})" + (f"; {advice}" if advice else "")) from None


def remove_temporaries(directory: PathLike) -> list[str]:
    """Delete the temporaries (files or folders) left in `directory` by killed writers; returns
    their names. Call it only where no other process is writing (e.g. under a run's lock)."""
    removed = []
    for entry in sorted(Path(directory).iterdir()):
        if TEMPORARY.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
    return removed


# ----------------------------------------------------------------------------------------------
# Output locations, checked before the work starts.

def check_writable_dir(path: PathLike, option: str) -> Path:
    """Create the output folder `path` (given as `option`) if needed and check that files can be
    written there; ValueError otherwise, naming the option and the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path} is not writable ({error.strerror or error}); "
                         "choose a location you can write to") from None
    return path


def check_writable_file(path: PathLike, option: str) -> Path:
    """Check that the output file `path` (given as `option`) can be written: not a folder, in a
    writable folder (created if needed); ValueError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file path")
    try:
        check_writable_dir(path.parent, "the folder")
    except ValueError as error:
        raise ValueError(f"{option} {path}: {error}") from None
    return path


def _protected_folder(folder: Path) -> str:
    """What `folder` is when another command made it and no other output may enter it ('' if not)."""
    if is_dataset(folder):
        return "a prepared data set"
    if is_run_directory(folder):
        return "a training run"
    return ""


def _overlap(a: Path, b: Path) -> str:
    """How path `a` meets path `b`: 'is', 'lies inside', 'holds', or ''."""
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "holds"
    return ""


def check_output_place(path: PathLike, option: str, inputs: Iterable[PathLike] = ()) -> Path:
    """Refuse an output `path` (given as `option`) that lies inside a prepared data set or a training
    run, or that meets one of the command's own `inputs` (is one, lies in one, or holds one)."""
    path = Path(path)
    resolved = path.resolve()
    for folder in resolved.parents:
        kind = _protected_folder(folder)
        if kind:
            raise ValueError(f"{option} {path} lies inside {kind} ({folder}), which belongs to the command that made "
                             "it: choose a location outside it")
    for given in inputs:
        how = _overlap(resolved, Path(given).resolve())
        if how:
            raise ValueError(f"{option} {path} {how} this command's input {given}: choose an output apart from "
                             "the inputs")
    return path


def claim_output(path: PathLike, option: str, *, what: str, owned: Callable[[Path], bool], overwrite: bool,
                 folder: bool = True, inputs: Iterable[PathLike] = (), ignore: frozenset = frozenset(),
                 advice: str = "", make_ready: bool = True) -> Path:
    """The output guard every writing command takes its output through, before its work.

    `path` (given as `option`) is to receive `what` (e.g. "samples"): a folder (created if missing)
    or, with `folder=False`, one file. It may not lie inside a prepared data set or a training run,
    nor meet the command's `inputs` (`check_output_place`). An existing file, or a folder holding
    anything (names in `ignore` aside), is refused unless `overwrite`; even then a file, or a
    folder entry, that `owned(its path)` does not recognise as this command's output is refused, so
    --overwrite replaces only what the command makes. With `make_ready`, the folder is created and
    its earlier outputs deleted now; without, it is only checked (the command creates or replaces
    it itself, e.g. atomically at its end). ValueError for every refusal, saying what to do
    (`advice` replaces the default for an occupied output)."""
    path = check_output_place(path, option, inputs)
    if not folder:
        return _claim_file(path, option, what=what, owned=owned, overwrite=overwrite, advice=advice)
    if make_ready:
        check_writable_dir(path, option)
    elif path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; give a folder path")
    elif not path.exists():
        return path
    entries = sorted(entry.name for entry in path.iterdir() if entry.name not in ignore)
    if not entries:
        return path
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not overwrite:
        raise ValueError(f"{option} {path} is not empty ({shown}); " + (
            advice or f"pass --overwrite to replace {what} in it, or choose another folder"))
    foreign = [name for name in entries if not owned(path / name)]
    if foreign:
        raise ValueError(f"{option} {path} holds files that are not {what} ({', '.join(foreign[:4])}); refusing "
                         "to overwrite them: move them out or choose another folder")
    for name in entries if make_ready else ():
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return path


def _claim_file(path: Path, option: str, *, what: str, owned: Callable[[Path], bool], overwrite: bool,
                advice: str) -> Path:
    check_writable_file(path, option)
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        raise ValueError(f"{option} {path} exists; " + (advice or f"pass --overwrite to replace it with {what}, or "
                                                                  "choose another file"))
    if not path.is_file() or not owned(path):
        raise ValueError(f"{option} {path} is not {what}; refusing to overwrite it: move it or choose another file")
    return path
