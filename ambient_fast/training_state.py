"""Resumable training state: model, EMA and optimizer tensors through torch.distributed.checkpoint
(sharded under FSDP2, one file set per run step), progress and loader position as JSON beside
them. Nothing is unpickled when loading.

A state directory is written under a hidden temporary name, given `checksums.json` (the sha256 of
each of its files, written last) and renamed into place once every rank has finished; the last
`keep` are kept. Loading verifies the checksums and falls back to the newest state that is intact,
setting damaged ones aside (renamed, never deleted). RNG states need no saving: every random draw
of a step is seeded from (seed, rank, step).
"""
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ambient_fast.distributed import World
from ambient_fast.files import dumps_json, fsync_path, read_json, sha256_file, write_error

PREFIX = "training-state-"
STATE_NAME = re.compile(rf"^{PREFIX}\d{{9}}$")
PROGRESS, CHECKSUMS = "progress.json", "checksums.json"


def state_dirs(run_dir: Path) -> "list[Path]":
    """State directories of a run (each complete when written: renamed into place last), oldest first."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if STATE_NAME.match(p.name) and p.is_dir())


def _tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: "dict[str, torch.Tensor]"):
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(strict=True))
    return {"model": model_state, "optimizer": optim_state["state"], "ema": ema}, optim_state["param_groups"]


def _cause(error: BaseException) -> BaseException:
    """The first rank's original exception inside a CheckpointException (which every rank raises)."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


def save_training_state(run_dir: Path, step: int, world: World, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, ema: "dict[str, torch.Tensor]", progress: dict,
                        keep: int = 2) -> Path:
    """Write the state of `step` (collective: every rank calls it) and return its directory.
    An OSError names the state directory when it cannot be written (a full disk, ...)."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = run_dir / f".{final.name}.tmp"  # one name for every rank (files.TEMPORARY)
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    tensors, _ = _tensors(model, optimizer, ema)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
            dcp.save(tensors, checkpoint_id=str(tmp))
    except CheckpointException as error:  # raised on every rank
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _cause(error)
        raise (write_error(final, cause) if isinstance(cause, OSError) else
               OSError(f"cannot write {final}: {type(cause).__name__}: {cause}")) from None
    world.barrier()
    if world.is_main:
        try:
            (tmp / PROGRESS).write_text(dumps_json(progress, indent=1))
            checksums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            (tmp / CHECKSUMS).write_text(dumps_json(checksums, indent=1))
            for name in (PROGRESS, CHECKSUMS, "."):
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


def verify_state(state_dir: Path) -> Optional[str]:
    """Why the state in `state_dir` cannot be trusted, or None when its files match their checksums.
    A state written before checksums existed has none to check: None."""
    state_dir = Path(state_dir)
    if not (state_dir / CHECKSUMS).is_file():
        return None if (state_dir / PROGRESS).is_file() else f"{PROGRESS} and {CHECKSUMS} are missing"
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


def load_training_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: "dict[str, torch.Tensor]") -> dict:
    """Load tensors in place into model, optimizer and EMA (collective); return the progress dict.
    Does not verify checksums (see `load_newest_intact_state`)."""
    tensors, param_groups = _tensors(model, optimizer, ema)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        dcp.load(tensors, checkpoint_id=str(state_dir))
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"], "param_groups": param_groups})
    return read_json(Path(state_dir) / PROGRESS)


def load_newest_intact_state(run_dir: Path, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             ema: "dict[str, torch.Tensor]") -> "tuple[Path, dict, list[str]]":
    """Load the newest state of the run that verifies and loads (collective).

    Returns (its directory, its progress dict, one line per newer state refused: which, why, and
    the name it was set aside under). FileNotFoundError when the run has no state; ValueError
    naming every refusal when none is intact.
    """
    refused = []
    for state in reversed(state_dirs(run_dir)):
        problem = verify_state(state)
        if problem is None:
            try:
                return state, load_training_state(state, model, optimizer, ema), refused
            except (CheckpointException, OSError, ValueError, KeyError, RuntimeError) as error:
                cause = _cause(error)
                problem = f"it cannot be loaded ({type(cause).__name__}: {cause})"
        aside = state.with_name(f"{state.name}.damaged-{uuid.uuid4().hex[:8]}")
        world.barrier()  # every rank has read it before it moves
        if world.is_main:
            state.rename(aside)
        world.barrier()
        refused.append(f"refused {state.name}: {problem}; kept as {aside.name}")
    if not refused:
        raise FileNotFoundError(f"no training state in {run_dir}")
    raise ValueError(f"no intact training state in {run_dir}: " + "; ".join(refused)
                     + ". The run cannot be resumed: start it again (--overwrite) or restore its states from a backup")
