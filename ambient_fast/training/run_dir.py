"""A training run's directory: claimed when a run starts, locked for the run's life, tidied on start.

- A new run claims its folder through the output guard (files.atomic.claim_output): not inside a
  data set or another run, not on the run's inputs, and not a folder that is not empty unless
  told `overwrite`, which deletes only what a run writes and refuses a folder holding anything else.
- `.lock` keeps a second training out of a run in use: the main rank holds an flock on it for
  the run's life and records its PID and host in it, emptied when the run ends. The kernel
  drops the flock when a process dies, so a killed run never blocks the next one, and the PID it
  left behind is reported.
- On start, temporaries of killed writers are removed; on resume, stats.jsonl is cut back to the
  step resumed from (a killed run may have logged steps past its last saved state).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
from pathlib import Path
from typing import Optional

from ambient_fast.files.atomic import (TEMPORARY, check_output_place, check_writable_dir, claim_output,
                                      remove_temporaries, write_text)
from ambient_fast.files.places import RUN_CONFIG, RUN_LOCK

LOCK, STATS, CONFIG = RUN_LOCK, "stats.jsonl", RUN_CONFIG
# Everything a run writes (training states set aside as damaged included; unet* are the fine-tuner's
# diffusers folders; eval-* the --eval-every grids; tensorboard, wandb* what --log writes; phema holds the
# post-hoc EMA's snapshots).
RUN_OUTPUT = re.compile(r"^(config\.json|stats\.jsonl|log\.txt|samples\.png|inputs\.png|overview\.png|eval-\d+\.png"
                        r"|network-(snapshot-\d+|final)\.safetensors|training-state-\d+(\.damaged-[0-9a-f]+)?"
                        r"|unet|unet-ema(-snapshot-\d+)?|tensorboard|wandb|wandb-id\.txt|phema)$")


class RunInUse(ValueError):
    """Another live process holds the run directory's lock."""


def is_run_output(name: str) -> bool:
    return bool(RUN_OUTPUT.match(name) or TEMPORARY.match(name))



class RunDirectory:
    """The run directory of the main rank: `RunDirectory(path, resume, overwrite, inputs)` checks and
    locks it (ValueError, saying what to do, when it cannot); `close()` releases the lock.
    `inputs`: what the run reads (no new run lands on them). `notes` lists what was found and
    tidied, for the log."""

    def __init__(self, path, *, resume: bool, overwrite: bool, inputs=()):
        self.path = Path(path)
        self.notes: list[str] = []
        option = "--resume" if resume else "--out"
        if not resume:  # before the folder and its lock are made
            check_output_place(self.path, option, inputs)
        self.created = not self.path.exists()
        check_writable_dir(self.path, option)
        self._lock_fd: Optional[int] = None
        made_lock = not (self.path / LOCK).exists()
        self._lock(option)
        try:
            if not resume:
                # After the lock: --overwrite never deletes the files of a run still in progress.
                claim_output(self.path, option, owned=lambda entry: is_run_output(entry.name), what="a training run",
                             overwrite=overwrite, inputs=inputs, ignore=frozenset({LOCK}),
                             advice=f"continue the run there with --resume {self.path}, replace it with "
                                    "--overwrite, or choose another --out")
            removed = remove_temporaries(self.path)
            if removed:
                self.notes.append(f"removed {len(removed)} temporary file(s) left by killed writers "
                                  f"({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
        except BaseException:
            self.close()
            if made_lock:  # a refused folder is left as it was found
                (self.path / LOCK).unlink(missing_ok=True)
            raise

    def _lock(self, option: str) -> None:
        lock = self.path / LOCK
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").split() or ["?", "?"]
            os.close(fd)
            raise RunInUse(f"{option} {self.path} is in use by another training (process {holder[0]} on "
                           f"{holder[-1]}); wait for it to end, or choose another folder") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            self.notes.append(f"this file system does not support locks: nothing keeps a second training out "
                              f"of {self.path}")
        previous = os.read(fd, 256).decode(errors="replace").split()
        if previous:
            self.notes.append(f"took over the lock of process {previous[0]} on {previous[-1]}, which ended "
                              "without releasing it (killed?)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._lock_fd = fd

    def truncate_stats(self, step: int) -> None:
        """Keep only the stats.jsonl lines of steps up to `step` (and drop a line torn by a kill)."""
        path = self.path / STATS
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= step]
        if len(kept) < len(lines):
            write_text(path, "".join(line + "\n" for line in kept))
            self.notes.append(f"{STATS}: dropped {len(lines) - len(kept)} line(s) logged after step {step} "
                              "(or torn) by the previous run")

    def abandon(self) -> None:
        """Release the lock and, when this run made the folder and wrote nothing into it but the lock
        (it was refused during its set-up), remove both: a refused run leaves nothing behind."""
        self.close()
        if self.created and {entry.name for entry in self.path.iterdir()} <= {LOCK}:
            (self.path / LOCK).unlink(missing_ok=True)
            self.path.rmdir()

    def close(self) -> None:
        """Release the lock; an empty lock file tells the next run this one ended cleanly."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None


def _logged_step(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["Progress/step"])
    except (ValueError, KeyError, TypeError):
        return None
