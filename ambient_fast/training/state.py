"""Resumable training state: the trainer's one state dict (model, optimizer, EMA, counters and loader
position, every entry a tensor) through torch.distributed.checkpoint, sharded under FSDP2, one file
set per run step. Nothing in it is unpickled as code.

A state directory is written under a hidden temporary name, given `checksums.json` (the sha256 of
each of its files, written last) and renamed into place once every rank has finished; the last
`keep` are kept. Loading verifies the checksums and falls back to the newest state that is intact,
setting damaged ones aside (renamed, never deleted). RNG states need no saving: every random draw
derives from the run's position (ambient_fast.objective.seeds).

DCP keeps its index (`.metadata`) as a pickle and would load it with `pickle.load`, and any
non-tensor entry through `torch.load(weights_only=False)`: before loading, the index is read with an
unpickler that admits only DCP's own metadata records, torch sizes and dtypes; anything else (a
non-tensor entry's record, any other object) refuses the state.
"""
import contextlib
import os
import pickle
import re
import shutil
import uuid
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from ambient_fast.training.distributed import World
from ambient_fast.files.atomic import dumps_json, fsync_path, read_json, sha256_file, write_error

PREFIX = "training-state-"
STATE_NAME = re.compile(rf"^{PREFIX}\d{{9}}$")
CHECKSUMS, METADATA = "checksums.json", ".metadata"
EARLIER_FORMAT = "progress.json"  # states of earlier versions kept progress beside the tensors
KEY = "trainer"  # the one entry of the checkpoint


def state_dirs(run_dir: Path) -> "list[Path]":
    """State directories of a run (each complete when written: renamed into place last), oldest first."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if STATE_NAME.match(p.name) and p.is_dir())


def _cause(error: BaseException) -> BaseException:
    """The first rank's original exception inside a CheckpointException (which every rank raises)."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


@contextlib.contextmanager
def _quiet():
    """DCP warns that one process saves or loads alone; that is what a one-process run does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def save_training_state(run_dir: Path, step: int, world: World, state: Stateful, keep: int = 2) -> Path:
    """Write `state` (the trainer) as the state of `step` (collective: every rank calls it) and
    return its directory. An OSError names the state directory when it cannot be written."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = run_dir / f".{final.name}.tmp"  # one name for every rank (files.TEMPORARY)
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    try:
        with _quiet():
            dcp.save({KEY: state}, checkpoint_id=str(tmp))
    except CheckpointException as error:  # raised on every rank
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _cause(error)
        raise (write_error(final, cause) if isinstance(cause, OSError) else
               OSError(f"cannot write {final}: {type(cause).__name__}: {cause}")) from None
    world.barrier()
    if world.is_main:
        try:
            checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / CHECKSUMS).write_text(dumps_json(checksums, indent=1))
            for name in (CHECKSUMS, "."):
                fsync_path(tmp / name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_path(run_dir)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(final, error) from error
        for old in state_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


# ----------------------------------------------------------------------------------------------
# Checks before loading


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "StorageMeta",
                                              "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    """Admits DCP's metadata records, torch sizes and dtypes, and nothing else."""

    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                            torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor's record")


def check_index(state_dir: Path) -> None:
    """Raise ValueError unless the state's DCP index holds only tensor records."""
    try:
        with open(Path(state_dir) / METADATA, "rb") as f:
            _IndexUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as error:
        raise ValueError(f"its {METADATA} holds more than tensor records ({error}); it is not loaded, since loading "
                         "it could run code") from None


def verify_state(state_dir: Path) -> "str | None":
    """Why the state in `state_dir` cannot be trusted, or None when its files match their checksums."""
    state_dir = Path(state_dir)
    if not (state_dir / CHECKSUMS).is_file():
        return f"{CHECKSUMS} is missing"
    try:
        expected = read_json(state_dir / CHECKSUMS)
        expected = {str(name): str(digest) for name, digest in expected.items()}
    except (ValueError, AttributeError) as error:
        return f"{CHECKSUMS} is damaged ({error})"
    missing = [name for name in sorted(expected) if not (state_dir / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    for name, digest in expected.items():
        if sha256_file(state_dir / name) != digest:
            return f"{name} does not match its checksum (the file was damaged after it was written)"
    return None


def load_training_state(state_dir: Path, state: Stateful) -> None:
    """Load the state in `state_dir` into `state` in place (collective). Checks the index, not the
    checksums (see `load_newest_intact_state`)."""
    check_index(state_dir)
    with _quiet():
        dcp.load({KEY: state}, checkpoint_id=str(state_dir))


def load_newest_intact_state(run_dir: Path, world: World, state: Stateful) -> "tuple[Path, list[str]]":
    """Load the newest state of the run that verifies and loads into `state` (collective).

    Returns (its directory, one line per newer state refused: which, why, and the name it was set
    aside under). FileNotFoundError when the run has no state; ValueError naming every refusal when
    none is intact, or for a state of an earlier version (left as it is).
    """
    refused = []
    for candidate in reversed(state_dirs(run_dir)):
        if (candidate / EARLIER_FORMAT).is_file():
            raise ValueError(f"{candidate} was written by an earlier version of ambient-fast, whose random streams "
                             "differ: resume it with that version, or start again (--overwrite)")
        problem = verify_state(candidate)
        if problem is None:
            try:
                load_training_state(candidate, state)
                return candidate, refused
            except (CheckpointException, OSError, ValueError, KeyError, RuntimeError) as error:
                cause = _cause(error)
                problem = f"it cannot be loaded ({type(cause).__name__}: {cause})"
        aside = candidate.with_name(f"{candidate.name}.damaged-{uuid.uuid4().hex[:8]}")
        world.barrier()  # every rank has read it before it moves
        if world.is_main:
            candidate.rename(aside)
        world.barrier()
        refused.append(f"refused {candidate.name}: {problem}; kept as {aside.name}")
    if not refused:
        raise FileNotFoundError(f"no training state in {run_dir}")
    raise ValueError(f"no intact training state in {run_dir}: " + "; ".join(refused)
                     + ". The run cannot be resumed: start it again (--overwrite) or restore its states from a backup")
