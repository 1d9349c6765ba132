"""Resumable training state: the trainer's one state dict (model, optimizer, EMA, counters and loader
position, every entry a tensor) through torch.distributed.checkpoint, sharded under FSDP2, one file
set per run step. Nothing in it is unpickled as code.

A state directory is written under a hidden temporary name, given `identity.json` (what the state
belongs to: the data set's checksum, the number of ranks and the micro-batch, the network's parameter
shapes) and `checksums.json` (the sha256 of each of its files, written last), and renamed into place
once every rank has finished; the last `keep` are kept. RNG states need no saving: every random draw
derives from the run's position (ambient_fast.objective.seeds).

Loading tells two kinds of refusal apart. A state that fails its checksums (or whose index could run
code) is damaged: it is set aside (renamed `*.damaged-*`, never deleted) and the next older one is
tried. A state that verifies but does not fit the present run (the data set changed, another number
of ranks, another network) is incompatible: loading stops with `IncompatibleState`, saying what
differs and how to go on, and the state stays as it is, so that the run resumes once the original
conditions are back.

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
CHECKSUMS, METADATA, IDENTITY = "checksums.json", ".metadata", "identity.json"
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


class IncompatibleState(ValueError):
    """An intact training state that does not fit the present run; the message says what differs and
    how to go on. The state is left as it is."""


def save_training_state(run_dir: Path, step: int, world: World, state: Stateful, keep: int = 2,
                        identity: "dict | None" = None) -> Path:
    """Write `state` (the trainer) as the state of `step` (collective: every rank calls it) with
    `identity` (what it belongs to, `describe_identity`'s fields) and return its directory. An
    OSError names the state directory when it cannot be written."""
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
            if identity is not None:
                (tmp / IDENTITY).write_text(dumps_json(identity, indent=1))
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


def _data_text(data: dict) -> str:
    shape = "x".join(map(str, data.get("shape", ())))
    return f"{data.get('images')} images of {shape}, checksum {str(data.get('checksum'))[:12]}"


def identity_differences(saved: dict, present: dict) -> "list[str]":
    """How the run a state was saved by (`saved`, its identity.json) differs from the present one
    (`present`), one phrase each, saying how to resume it; [] when it fits."""
    differences = []
    data, now = saved.get("data") or {}, present.get("data") or {}
    if data.get("checksum") != now.get("checksum"):
        differences.append(f"it trained on another data set at {data.get('path')} ({_data_text(data)}; now "
                           f"{_data_text(now)}): put the original data set back there and resume")
    if saved.get("ranks") != present.get("ranks"):
        differences.append(f"it was saved by {saved.get('ranks')} rank(s) and this run has {present.get('ranks')}: "
                           f"resume with {saved.get('ranks')} (torchrun --nproc_per_node={saved.get('ranks')} for "
                           "more than one)")
    network, now_network = saved.get("network") or {}, present.get("network") or {}
    if network != now_network:
        changed = sorted(set(network) ^ set(now_network)) + sorted(
            name for name in set(network) & set(now_network) if network[name] != now_network[name])
        shown = ", ".join(f"{name} {network.get(name, 'absent')} (now {now_network.get(name, 'absent')})"
                          for name in changed[:2])
        differences.append(f"its network differs in {len(changed)} parameter(s), e.g. {shown}: resume with the "
                           "options and the version of ambient-fast that made it")
    return differences


def _incompatible(state_dir: Path, reasons: "list[str]") -> IncompatibleState:
    return IncompatibleState(f"the training state {state_dir} is intact but does not fit this run: "
                             + "; ".join(reasons) + ". Or start a new run on the present data and options (another "
                             "--out, or --overwrite). The state is left as it is.")


def load_newest_intact_state(run_dir: Path, world: World, state: Stateful,
                             identity: "dict | None" = None) -> "tuple[Path, list[str]]":
    """Load the newest state of the run that verifies into `state` (collective), after checking that
    it fits the present run, whose `identity` it was saved with (`save_training_state`).

    Returns (its directory, one line per newer state that was damaged: which, why, and the name it was
    set aside under). FileNotFoundError when the run has no state; IncompatibleState (a ValueError)
    for the newest intact state when it does not fit, or does not load (a state of an earlier
    version, which kept no identity), leaving it as it is; ValueError naming every refusal when
    none is intact, or for a state of an earlier version's format (left as it is).
    """
    refused = []
    for candidate in reversed(state_dirs(run_dir)):
        if (candidate / EARLIER_FORMAT).is_file():
            raise ValueError(f"{candidate} was written by an earlier version of ambient-fast, whose random streams "
                             "differ: resume it with that version, or start again (--overwrite)")
        problem = verify_state(candidate)
        if problem is None:
            try:
                check_index(candidate)
            except ValueError as error:
                problem = str(error)
        if problem is None:
            saved = read_json(candidate / IDENTITY) if (candidate / IDENTITY).is_file() else None
            if saved is not None and identity is not None:
                differences = identity_differences(saved, identity)
                if differences:
                    raise _incompatible(candidate, differences)
            try:
                load_training_state(candidate, state)
                return candidate, refused
            except (CheckpointException, OSError, ValueError, KeyError, RuntimeError) as error:
                cause = _cause(error)
                # Its files are as written (they verify): what fails is the fit, not the state.
                raise _incompatible(candidate, [f"it does not load into this run ({type(cause).__name__}: "
                                                f"{cause})"]) from None
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
