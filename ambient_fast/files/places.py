"""What a folder is, from the files that mark it: a prepared data set or a training run.

The output guard (`files.atomic.check_output_place`) refuses outputs inside either, and the data-set
writer and the run directory use the same marks; they live here, beside the guard and below both,
so that recognising a folder needs neither the data stack nor the trainer.
"""
import json
from pathlib import Path

from ambient_fast.files.reading import is_regular_file

DATASET_FORMAT = "ambient-fast-data"  # meta.json's "format" of a prepared data set
DATASET_META = "meta.json"
RUN_LOCK, RUN_CONFIG = ".lock", "config.json"


def is_dataset(path: Path) -> bool:
    """True when `path` holds an ambient-fast meta.json (whatever its state; a meta.json that is not
    a regular file, such as a FIFO, is never read)."""
    meta = Path(path) / DATASET_META
    if not is_regular_file(meta):
        return False
    try:
        return json.loads(meta.read_text()).get("format") == DATASET_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_run_directory(folder: Path) -> bool:
    """A training run's folder: its lock and its config.json (a lock alone is too common a name)."""
    return is_regular_file(Path(folder) / RUN_LOCK) and is_regular_file(Path(folder) / RUN_CONFIG)
