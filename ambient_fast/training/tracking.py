"""The ecosystem's experiment trackers, for `--log`: TensorBoard (extra `[tensorboard]`) and Weights &
Biases (extra `[wandb]`). A tracker receives every stats.jsonl line as scalars (at the line's step)
and the run's pictures (the `--eval-every` sample grids, the final overview); the main rank alone
holds one.

- TensorBoard: event files in OUT/tensorboard/. A resumed run purges the events logged after the
  step it resumed from (a killed run may have logged past its last training state), as stats.jsonl
  is cut back.
- W&B: `wandb.init` in OUT (its files in OUT/wandb/), resuming the run's own W&B run (its id kept in
  OUT/wandb-id.txt). Online or offline as wandb is set up (`WANDB_MODE=offline`: nothing leaves the
  machine; `wandb sync` sends it later). W&B keeps only increasing steps: lines a resumed run logs
  again for steps it had logged before are dropped by W&B.
"""
from __future__ import annotations

import importlib.util
import secrets
from pathlib import Path

__all__ = ["PACKAGES", "check_available", "open_tracker", "scalars"]

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log kind -> the package it needs
TENSORBOARD_DIR, WANDB_DIR, WANDB_ID = "tensorboard", "wandb", "wandb-id.txt"


def check_available(kind: str) -> None:
    """ValueError saying what to install when `--log kind` cannot run here (no import: --help and
    the config stay light)."""
    package = PACKAGES.get(kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"--log {kind} needs the {package} package: pip install {package} (or the extra: "
                         f"pip install -e \".[{kind}]\"), or log with --log none")


def scalars(entry: dict) -> "dict[str, float]":
    """A stats.jsonl line as tracker scalars: each number under its own name, a statistic
    ({"mean", "std", "num"}) as its mean; the timestamp (the wall time) and empty values left out."""
    out = {}
    for name, value in entry.items():
        if name == "timestamp":
            continue
        if isinstance(value, dict):
            value = value.get("mean")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what earlier sessions logged at this step and after.
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step if start_step else None)

    def log(self, entry: dict, step: int) -> None:
        for name, value in scalars(entry).items():
            self.writer.add_scalar(name, value, global_step=step, walltime=entry.get("timestamp"))
        self.writer.flush()

    def image(self, tag: str, array, step: int) -> None:
        """`array`: (H, W, C) uint8."""
        self.writer.add_image(tag, array, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        from ambient_fast.files.atomic import write_text

        id_file = run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
        write_text(id_file, run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project="ambient-fast", name=run_dir.resolve().name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config)

    def log(self, entry: dict, step: int) -> None:
        self.run.log(scalars(entry), step=step)

    def image(self, tag: str, array, step: int) -> None:
        self.run.log({tag: self.wandb.Image(array)}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, run_dir: Path, config: dict, start_step: int):
    """The tracker of `--log kind` for the run in `run_dir` starting (or resuming) at `start_step`;
    None for `none`."""
    check_available(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(Path(run_dir), start_step)
    if kind == "wandb":
        return WandbTracker(Path(run_dir), config)
    return None
