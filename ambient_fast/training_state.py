"""Resumable training state: model, EMA and optimizer tensors through torch.distributed.checkpoint
(sharded under FSDP2, one file set per run step), progress and loader position as JSON beside
them. Nothing is unpickled when loading.

A state directory is written under a temporary name and renamed into place once every rank has
finished, so the newest `training-state-*` directory is always complete; the last `keep` are kept.
RNG states need no saving: every random draw of a step is seeded from (seed, rank, step).
"""
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ambient_fast.distributed import World

PREFIX = "training-state-"


def state_dirs(run_dir: Path) -> "list[Path]":
    """Complete state directories of a run, oldest first."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if p.is_dir() and (p / "progress.json").is_file())


def latest_state(run_dir: Path) -> Optional[Path]:
    dirs = state_dirs(run_dir)
    return dirs[-1] if dirs else None


def _tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: "dict[str, torch.Tensor]"):
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(strict=True))
    return {"model": model_state, "optimizer": optim_state["state"], "ema": ema}, optim_state["param_groups"]


def save_training_state(run_dir: Path, step: int, world: World, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, ema: "dict[str, torch.Tensor]", progress: dict,
                        keep: int = 2) -> Path:
    """Write the state of `step` (collective: every rank calls it) and return its directory."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = run_dir / f".{PREFIX}{step:09d}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    tensors, _ = _tensors(model, optimizer, ema)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(tensors, checkpoint_id=str(tmp))
    world.barrier()
    if world.is_main:
        (tmp / "progress.json").write_text(json.dumps(progress, indent=1))
        with open(tmp / "progress.json", "rb") as f:
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in state_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def load_training_state(state_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: "dict[str, torch.Tensor]") -> dict:
    """Load tensors in place into model, optimizer and EMA (collective); return the progress dict."""
    tensors, param_groups = _tensors(model, optimizer, ema)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        dcp.load(tensors, checkpoint_id=str(state_dir))
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"], "param_groups": param_groups})
    return json.loads((Path(state_dir) / "progress.json").read_text())
