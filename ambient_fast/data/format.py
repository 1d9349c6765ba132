"""The corrupted data-set format: what a training run reads, and nothing clean.

A data set is a directory holding

    observed.npy   uint8 (N, C, R, R)    A * x: every pixel outside the mask A is 0
    masks.npy      uint8 (N, ceil(C*R*R / 8))
                                         A, one bool per value of the flattened (C, R, R) image,
                                         numpy.packbits(..., bitorder="little"): bit k of byte j
                                         is element 8 j + k (channels stored even when shared)
    labels.npy     int64 (N,)            class indices (only when the set has labels)
    values.npy     float16 (N, C, R, R)  every image's values on the [-1, 1] scale, only in a set
                                         with noisy images: A * (x + sigma_n n), never clipped, so
                                         the noise stays Gaussian (observed.npy then holds them
                                         rounded and clipped to uint8, for looking at)
    records.npy    (N,) of (masked u1, sigma_n f4, sigma_min f4)
                                         each image's corruption record: whether A hides anything,
                                         the level of its additive Gaussian noise (0: none), the
                                         noise level below which it must not train (0: none);
                                         absent in sets of one kind of image (then every image is
                                         masked, unless the corruption kind is "none")
    sigma_max.npy  float32 (N,)          each image's highest usable noise level (inf: none), only
                                         in a set with noise-level windows (crops, partial views:
                                         `ambient_fast.objective.windows`)
    meta.json      format version, shape, count, label_dim, the corruption that drew A
                   ({"kind", "p", "delta", "shared_channels", ...}), the fraction of observed
                   values, the records' summary (counts of clean, masked, noisy and masked noisy
                   images, the noise levels), the windows' summary, whether the set holds latents
                   (`latent`: the autoencoder and its scaling, `ambient_fast.data.latents`; then
                   values.npy holds the latents and every mask is full), sha256 of each array file,
                   source description,
                   creation time, and the sha256 of all of that (`content_sha256`: an edited p or
                   delta shows)

Arrays are plain .npy files, memory-mapped when read: no decoding at training time. A set is
written front to back (no memory map: a full disk is an error, not a SIGBUS) into a hidden
sibling directory after a free-space check, fsynced and renamed into place, so a directory under
the final name is always complete; any failure removes the partial directory (a killed process
leaves at most a hidden `.NAME.partial-*` one).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from ambient_fast.files import reading
from ambient_fast.files.atomic import dumps_json, fsync_path, sha256_file, write_error
from ambient_fast.files.places import DATASET_FORMAT, DATASET_META, is_dataset

__all__ = ["FORMAT", "VERSION", "RECORD", "DataError", "DatasetMeta", "DatasetWriter", "CorruptedDataset",
           "write_dataset", "corruption_record", "packed_size", "unpack_masks", "records_summary", "windows_summary", "Stored"]

FORMAT = DATASET_FORMAT
VERSION = 3  # 2 added values.npy and records.npy, 3 sigma_max.npy and latent sets; older sets read unchanged
READABLE = (1, 2, 3)
PLAIN_VERSION = 2  # what a set without windows or latents is written as: readers of version 2 still read it
OBSERVED, MASKS, LABELS, META = "observed.npy", "masks.npy", "labels.npy", DATASET_META
VALUES, RECORDS, SIGMA_MAX = "values.npy", "records.npy", "sigma_max.npy"
DATASET_FILES = (OBSERVED, MASKS, LABELS, VALUES, RECORDS, SIGMA_MAX, META)  # everything a data set folder holds
RECORD = np.dtype([("masked", "u1"), ("sigma_n", "<f4"), ("sigma_min", "<f4")])
CONTENT_DIGEST = "content_sha256"  # meta.json's checksum of its own other fields
_INCIDENTAL = ("created", "source", CONTENT_DIGEST)  # meta.json's fields that do not change what trains
# What meta.json may say, beyond which a number is refused rather than believed: images per set, the
# side of an image (and its channels), classes (a one-hot label and the network's label embedding
# are label_dim wide).
MAX_IMAGES, MAX_SIDE, MAX_CLASSES = reading.MAX_IMAGES, 2 ** 16, 2 ** 20
_CHECK_ROWS = 4096  # images per chunk when a whole array is scanned (bounded memory)
_SPARE_BYTES = 1 << 20  # beyond the arrays: meta.json, directory entries, file-system blocks


class DataError(ValueError):
    """Bad data-set input or a damaged data set; the message says what and what to do."""


def packed_size(shape: tuple[int, int, int]) -> int:
    """Bytes per image of a bit-packed (C, H, W) mask."""
    return math.ceil(math.prod(shape) / 8)


def corruption_record(operator) -> dict[str, Any]:
    """meta.json's `corruption` entry for a mask operator of ambient_fast.objective.corruption:
    {"kind": name, **its parameters, "shared_channels": bool}. Only dust can draw a mask per
    channel; the box-shaped masks are the same for every channel."""
    description = dict(operator.describe())
    record = {"kind": description.pop("name"), **description}
    record.setdefault("shared_channels", True)
    return record


_COUNTS = ("clean", "masked", "noisy", "masked_noisy", "with_sigma_min")


def records_summary(records: np.ndarray) -> dict:
    """meta.json's summary of per-image records (a RECORD array): how many images are clean,
    masked, noisy and masked and noisy, how many carry a sigma_min, and the range of the noise
    levels ([lowest, highest] of the noisy images, None without any)."""
    masked, noisy = records["masked"] != 0, records["sigma_n"] > 0
    levels = records["sigma_n"][noisy]
    return {"clean": int(np.sum(~masked & ~noisy)), "masked": int(np.sum(masked & ~noisy)),
            "noisy": int(np.sum(~masked & noisy)), "masked_noisy": int(np.sum(masked & noisy)),
            "with_sigma_min": int(np.sum(records["sigma_min"] > 0)),
            "sigma_n_range": [float(levels.min()), float(levels.max())] if len(levels) else None}


def _add_summaries(total: Optional[dict], part: dict) -> dict:
    """The records summary of two disjoint sets of images, from theirs."""
    if total is None:
        return part
    ranges = [r for r in (total["sigma_n_range"], part["sigma_n_range"]) if r is not None]
    return {**{key: total[key] + part[key] for key in _COUNTS},
            "sigma_n_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None}


def windows_summary(sigma_max: np.ndarray) -> dict:
    """meta.json's summary of sigma_max.npy: how many images have an upper bound and their range."""
    bounded = sigma_max[np.isfinite(sigma_max)]
    return {"with_sigma_max": int(len(bounded)),
            "sigma_max_range": [float(bounded.min()), float(bounded.max())] if len(bounded) else None}


def _check_windows(sigma_max: np.ndarray, low: np.ndarray) -> Optional[str]:
    """What is wrong with per-image upper bounds `sigma_max` above lower bounds `low`, or None."""
    if np.isnan(sigma_max).any():
        return "sigma_max must not be NaN (inf: no upper bound)"
    empty = int(np.count_nonzero(sigma_max <= low))
    if empty:
        return (f"{empty} images have sigma_max at or below their lowest usable level max(sigma_n, sigma_min): "
                "they could never train; raise their sigma_max or drop them")
    return None


def content_digest(meta_json: dict) -> str:
    """sha256 of meta.json's fields other than the digest itself (canonical JSON)."""
    content = {key: value for key, value in meta_json.items() if key != CONTENT_DIGEST}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class DatasetMeta:
    """The validated content of meta.json.

    shape: (C, R, R) of one image. label_dim: number of classes, 0 without labels.
    corruption: {"kind", "p", "delta", "shared_channels", ...}; delta is the training default.
    files: sha256 hex digest of each array file, by file name.
    values: whether values.npy holds the images' values (a set with noisy images).
    records: the summary of records.npy (`records_summary`), None without per-image records.
    windows: the summary of sigma_max.npy (`windows_summary`), None without it.
    latent: the autoencoder and scaling of a latent set (`ambient_fast.data.latents`), None for pixels.
    """

    count: int
    shape: tuple[int, int, int]
    label_dim: int
    corruption: dict
    observed_fraction: float
    files: dict
    source: str
    created: str
    version: int = VERSION
    values: bool = False
    records: Optional[dict] = None
    windows: Optional[dict] = None
    latent: Optional[dict] = None

    def __post_init__(self):
        C, H, W = self.shape
        problems = [
            (self.count >= 1, f"count must be at least 1, got {self.count}"),
            (C >= 1 and H >= 1 and H == W, f"images must be square (C, R, R), got shape {self.shape}"),
            (self.label_dim >= 0, f"label_dim must be >= 0, got {self.label_dim}"),
            ("kind" in self.corruption, "corruption must record its 'kind'"),
            (set(self.files) == set(self.array_files), f"files must list {self.array_files}, got {sorted(self.files)}"),
            (self.latent is None or self.values, "a latent set stores its latents in values.npy"),
        ]
        for ok, message in problems:
            if not ok:
                raise DataError(f"invalid data-set metadata: {message}")

    @property
    def array_files(self) -> list[str]:
        return ([OBSERVED, MASKS] + ([LABELS] if self.label_dim else []) + ([VALUES] if self.values else [])
                + ([RECORDS] if self.records is not None else []) + ([SIGMA_MAX] if self.windows is not None else []))

    def to_json(self) -> dict:
        extra = {} if self.version < 2 else {"values": self.values, "records": self.records}
        if self.version >= 3:
            extra.update(windows=self.windows, latent=self.latent)
        return {"format": FORMAT, "version": self.version, "count": self.count, "shape": list(self.shape),
                "label_dim": self.label_dim, "corruption": self.corruption,
                "observed_fraction": self.observed_fraction, "files": {k: {"sha256": v} for k, v in self.files.items()},
                "source": self.source, "created": self.created, **extra}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "DatasetMeta":
        """The metadata of meta.json's content `data`, every field checked for its type and range
        (nothing rounded or truncated); DataError naming the field otherwise."""
        if data.get("format") != FORMAT:
            raise DataError(f"{where} is not an ambient-fast data set (format {data.get('format')!r}, "
                            f"expected {FORMAT!r})")
        if data.get("version") not in READABLE or isinstance(data.get("version"), bool):
            raise DataError(f"{where}: data-set format version {data.get('version')!r} is not supported "
                            f"(this ambient-fast reads versions {', '.join(map(str, READABLE))}); prepare the set again")
        try:
            records, windows, latent = data.get("records"), data.get("windows"), data.get("latent")
            count = reading.integer(data["count"], "count", 1, MAX_IMAGES)
            shape = tuple(reading.integer(v, "shape", 1, MAX_SIDE) for v in reading.sequence(data["shape"], "shape", 3))
            files = reading.mapping(data["files"], "files")
            meta = cls(count=count, shape=shape,
                       label_dim=reading.integer(data["label_dim"], "label_dim", 0, MAX_CLASSES),
                       corruption=reading.check_corruption(data["corruption"], "corruption"),
                       observed_fraction=reading.number(data["observed_fraction"], "observed_fraction", 0, 1),
                       files={name: _sha256(reading.mapping(entry, f"files.{name}").get("sha256"), f"files.{name}")
                              for name, entry in files.items()},
                       source=reading.text(data["source"], "source"), created=reading.text(data["created"], "created"),
                       version=data["version"], values=reading.boolean(data.get("values", False), "values"),
                       records=None if records is None else _check_records(records, count),
                       windows=None if windows is None else _check_windows_summary(windows, count),
                       latent=None if latent is None else reading.mapping(latent, "latent"))
        except KeyError as error:
            raise DataError(f"{where}: malformed meta.json (no {error}); prepare the set again") from None
        except (TypeError, ValueError) as error:
            raise DataError(f"{where}: malformed meta.json ({error}); prepare the set again") from None
        return meta


def _sha256(value, what: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise ValueError(f"{what}.sha256 must be 64 hexadecimal digits, got {value!r}"[:200])
    return value


def _check_records(summary, count: int) -> dict:
    """meta.json's records summary: counts of images in [0, count] that add up to count."""
    summary = reading.mapping(summary, "records")
    kinds = [reading.integer(summary.get(key), f"records.{key}", 0, count) for key in _COUNTS]
    if sum(kinds[:4]) != count:
        raise ValueError(f"records count {sum(kinds[:4])} images of {count}")
    levels = summary.get("sigma_n_range")
    if levels is not None:
        low, high = (reading.number(v, "records.sigma_n_range", 0) for v in reading.sequence(levels, "records.sigma_n_range", 2))
        if low > high:
            raise ValueError(f"records.sigma_n_range must be [lowest, highest], got {levels}")
    return dict(summary)


def _check_windows_summary(summary, count: int) -> dict:
    summary = reading.mapping(summary, "windows")
    reading.integer(summary.get("with_sigma_max"), "windows.with_sigma_max", 0, count)
    levels = summary.get("sigma_max_range")
    if levels is not None:
        for value in reading.sequence(levels, "windows.sigma_max_range", 2):
            reading.number(value, "windows.sigma_max_range", 0)
    return dict(summary)


def _check_destination(dest: Path, overwrite: bool) -> None:
    """Refuse a destination we must not replace."""
    if dest.exists() and not dest.is_dir():
        raise DataError(f"destination {dest} is a file; choose a directory path for the data set")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise DataError(f"destination in use: {dest} exists and is not empty; choose another destination "
                            "or overwrite it (--overwrite, overwrite=True)")
        # Overwriting replaces the folder as a whole: only ever do that to a data set and nothing else.
        if not is_dataset(dest):
            raise DataError(f"destination in use: {dest} holds files that are not an ambient-fast data set; "
                            "refusing to overwrite it (choose another destination)")
        others = sorted(set(os.listdir(dest)) - set(DATASET_FILES))
        if others:
            raise DataError(f"destination in use: {dest} is a data set but also holds other files "
                            f"({', '.join(others[:4])}); refusing to overwrite them: move them out or choose "
                            "another destination")


class _ArrayFile:
    """One .npy file written front to back (header, then rows in order), hashed as it is written."""

    def __init__(self, path: Path, dtype, shape: tuple):
        self.dtype = np.dtype(dtype)
        self.file = open(path, "wb")
        self.digest = hashlib.sha256()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": tuple(shape)})
        self._write(header.getvalue())

    def _write(self, data) -> None:
        self.file.write(data)
        self.digest.update(data)

    def append(self, rows: np.ndarray) -> None:
        self._write(memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B"))

    def finish(self) -> str:
        """Flush to disk and close; returns the file's sha256."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.digest.hexdigest()

    def discard(self) -> None:
        """Close without caring whether the last buffered bytes reach the disk (being removed)."""
        try:
            self.file.close()
        except OSError:  # e.g. the disk is full: the original error is already on its way
            pass


class DatasetWriter:
    """Streams a data set into a hidden sibling directory; `commit` renames it into place.

    Use as a context manager: leaving the block without `commit` (an exception) removes the
    partial directory, and the destination is never touched before `commit`.

        with DatasetWriter(dest, count=N, shape=(C, R, R), label_dim=K) as writer:
            writer.append(observed, masks, labels)      # any number of chunks, in order
            path = writer.commit(corruption, source)
    """

    def __init__(self, dest: Union[str, Path], *, count: int, shape: tuple[int, int, int], label_dim: int = 0,
                 overwrite: bool = False, values: bool = False, records: bool = False, sigma_max: bool = False,
                 latent: Optional[dict] = None):
        """values: the set stores float16 values (it has noisy images, or latents); records: per-image
        records; sigma_max: per-image upper noise levels; latent: the set holds latents (values, full
        masks) made as this record says (`ambient_fast.data.latents`)."""
        self.dest = Path(dest)
        self.count, self.shape, self.label_dim = int(count), tuple(int(v) for v in shape), int(label_dim)
        self.overwrite, self.values, self.records = overwrite, bool(values), bool(records)
        self.sigma_max, self.latent = bool(sigma_max), None if latent is None else dict(latent)
        if self.count < 1:
            raise DataError("a data set needs at least one image")
        if self.latent is not None and not self.values:
            raise DataError("a latent set stores its latents as values: pass values=True")
        C, H, W = self.shape
        if H != W:
            raise DataError(f"images must be square, got {H}x{W}; resize them (prepare --resolution R)")
        if self.label_dim < 0:
            raise DataError(f"label_dim must be >= 0, got {label_dim}")
        _check_destination(self.dest, overwrite)
        self._arrays: dict[str, _ArrayFile] = {}
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self._check_free_space()
            self.tmp = self.dest.parent / f".{self.dest.name}.partial-{uuid.uuid4().hex[:12]}"
            self.tmp.mkdir()
        except OSError as error:
            raise write_error(self.dest, error) from error
        try:
            self._arrays[OBSERVED] = _ArrayFile(self.tmp / OBSERVED, np.uint8, (self.count, *self.shape))
            self._arrays[MASKS] = _ArrayFile(self.tmp / MASKS, np.uint8, (self.count, packed_size(self.shape)))
            if self.label_dim:
                self._arrays[LABELS] = _ArrayFile(self.tmp / LABELS, np.int64, (self.count,))
            if self.values:
                self._arrays[VALUES] = _ArrayFile(self.tmp / VALUES, np.float16, (self.count, *self.shape))
            if self.records:
                self._arrays[RECORDS] = _ArrayFile(self.tmp / RECORDS, RECORD, (self.count,))
            if self.sigma_max:
                self._arrays[SIGMA_MAX] = _ArrayFile(self.tmp / SIGMA_MAX, np.float32, (self.count,))
        except BaseException as error:
            self.abort()  # leave nothing behind
            if isinstance(error, OSError):
                raise write_error(self.dest, error) from error
            raise
        self.filled = 0
        self._observed_values = 0
        self._summary: Optional[dict] = None
        self._sigma_max_parts: list[np.ndarray] = []

    def _check_free_space(self) -> None:
        per_image = (math.prod(self.shape) * (1 + 2 * self.values) + packed_size(self.shape)
                     + (8 if self.label_dim else 0) + (RECORD.itemsize if self.records else 0) + 4 * self.sigma_max)
        needed = self.count * per_image + _SPARE_BYTES
        free = shutil.disk_usage(self.dest.parent).free
        if free < needed:
            raise DataError(f"not enough free space for {self.dest}: the data set needs {needed / 2 ** 20:.1f} MiB "
                            f"and {free / 2 ** 20:.1f} MiB are free there; free some space or choose another "
                            "destination")

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def append(self, observed: np.ndarray, masks: np.ndarray, labels: Optional[np.ndarray] = None,
               values: Optional[np.ndarray] = None, records: Optional[np.ndarray] = None,
               sigma_max: Optional[np.ndarray] = None) -> None:
        """Add the next images: observed uint8 (B, C, R, R), masks bool (B, C, R, R), labels int (B,)
        (required iff label_dim > 0), values float16 (B, C, R, R) (iff the writer stores values),
        records RECORD (B,) (iff it stores records), sigma_max float32 (B,) (iff it stores windows;
        inf: no upper bound). Observed and values must be 0 wherever the mask is 0; an image recorded
        as not masked has a full mask; a noisy one needs values; a latent set's masks are full; a
        window must lie above the image's noise level and sigma_min."""
        B = len(observed)
        if observed.dtype != np.uint8 or observed.shape[1:] != self.shape:
            raise DataError(f"observed must be uint8 of shape (B, {', '.join(map(str, self.shape))}), "
                            f"got {observed.dtype} {observed.shape}")
        if masks.dtype != np.bool_ or masks.shape != observed.shape:
            raise DataError(f"masks must be bool with the shape of observed {observed.shape}, got {masks.dtype} "
                            f"{masks.shape}")
        if self.filled + B > self.count:
            raise DataError(f"too many images: {self.filled + B} for a data set of {self.count}")
        leaked = np.count_nonzero(observed[~masks])
        if leaked:
            raise DataError(f"{leaked} values are non-zero where the mask is 0: a data set holds only A * x "
                            "(zero every erased value before writing)")
        if (labels is not None) != (LABELS in self._arrays):
            raise DataError("labels must be given with every chunk iff the data set has labels (label_dim > 0)")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (B,) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"labels must be integers of shape ({B},), got {labels.dtype} {labels.shape}")
            if B and (labels.min() < 0 or labels.max() >= self.label_dim):
                raise DataError(f"labels must lie in [0, {self.label_dim}), got {labels.min()}..{labels.max()}")
        if ((values is not None) != self.values or (records is not None) != self.records
                or (sigma_max is not None) != self.sigma_max):
            raise DataError("values, records and sigma_max must be given with every chunk iff the writer stores them")
        if self.latent is not None and not masks.all():
            raise DataError("masks do not live in latent space: a latent set's masks must be full (all True)")
        if values is not None:
            if values.dtype != np.float16 or values.shape != observed.shape:
                raise DataError(f"values must be float16 of shape {observed.shape}, got {values.dtype} {values.shape}")
            if not np.isfinite(values).all() or np.count_nonzero(values[~masks]):
                raise DataError("values must be finite and 0 wherever the mask is 0")
        if records is not None:
            if records.dtype != RECORD or records.shape != (B,):
                raise DataError(f"records must be a ({B},) array of {RECORD}, got {records.dtype} {records.shape}")
            levels = np.stack([records["sigma_n"], records["sigma_min"]])
            if not (np.isfinite(levels).all() and (levels >= 0).all()):
                raise DataError("sigma_n and sigma_min must be finite and >= 0")
            if (~masks[records["masked"] == 0]).any():
                raise DataError("an image recorded as not masked must have a full mask")
            if values is None and (records["sigma_n"] > 0).any():
                raise DataError("noisy images (sigma_n > 0) need their values (values.npy)")
        if sigma_max is not None:
            sigma_max = np.asarray(sigma_max)
            if sigma_max.shape != (B,) or not np.issubdtype(sigma_max.dtype, np.floating):
                raise DataError(f"sigma_max must be floats of shape ({B},), got {sigma_max.dtype} {sigma_max.shape}")
            low = np.zeros(B) if records is None else np.maximum(records["sigma_n"], records["sigma_min"])
            problem = _check_windows(sigma_max.astype(np.float32), low)
            if problem:
                raise DataError(problem)
        try:
            self._arrays[OBSERVED].append(observed)
            self._arrays[MASKS].append(np.packbits(masks.reshape(B, -1), axis=1, bitorder="little"))
            if labels is not None:
                self._arrays[LABELS].append(labels)
            if values is not None:
                self._arrays[VALUES].append(values)
            if records is not None:
                self._arrays[RECORDS].append(records)
            if sigma_max is not None:
                self._arrays[SIGMA_MAX].append(sigma_max)
                self._sigma_max_parts.append(sigma_max.astype(np.float32))
        except OSError as error:
            raise write_error(self.dest, error) from error
        if records is not None and B:
            self._summary = _add_summaries(self._summary, records_summary(records))
        self._observed_values += int(np.count_nonzero(masks))
        self.filled += B

    def commit(self, corruption: dict, source: str) -> Path:
        """Checksum, write meta.json, fsync, rename into place; returns the data set's path."""
        if self.filled != self.count:
            raise DataError(f"only {self.filled} of {self.count} images were written")
        try:
            files = {name: array.finish() for name, array in self._arrays.items()}
            self._arrays = {}
            meta = DatasetMeta(
                count=self.count, shape=self.shape, label_dim=self.label_dim, corruption=dict(corruption),
                observed_fraction=self._observed_values / (self.count * math.prod(self.shape)), files=files,
                source=source, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), values=self.values,
                records=self._summary if self.records else None,
                windows=windows_summary(np.concatenate(self._sigma_max_parts)) if self.sigma_max else None,
                latent=self.latent, version=VERSION if self.sigma_max or self.latent is not None else PLAIN_VERSION)
            content = meta.to_json()
            (self.tmp / META).write_text(dumps_json({**content, CONTENT_DIGEST: content_digest(content)}, indent=1))
            for name in [*files, META, "."]:
                fsync_path(self.tmp / name)
            self._move_into_place()
        except OSError as error:
            raise write_error(self.dest, error) from error
        return self.dest

    def _move_into_place(self) -> None:
        # Checked again: another process may have claimed the destination meanwhile.
        _check_destination(self.dest, self.overwrite)
        old = None
        if self.dest.is_dir() and any(self.dest.iterdir()):
            old = self.dest.parent / f".{self.dest.name}.replaced-{uuid.uuid4().hex[:12]}"
            os.rename(self.dest, old)
        elif self.dest.is_dir():
            self.dest.rmdir()
        os.rename(self.tmp, self.dest)
        fsync_path(self.dest.parent)
        if old is not None:
            shutil.rmtree(old)

    def abort(self) -> None:
        """Remove the partial directory (nothing if committed)."""
        for array in self._arrays.values():
            array.discard()
        self._arrays = {}
        if self.tmp.exists():
            shutil.rmtree(self.tmp)


def write_dataset(dest: Union[str, Path], observed: np.ndarray, masks: np.ndarray, corruption: dict,
                  labels: Optional[np.ndarray] = None, source: str = "", overwrite: bool = False,
                  values: Optional[np.ndarray] = None, records: Optional[np.ndarray] = None,
                  sigma_max: Optional[np.ndarray] = None, latent: Optional[dict] = None) -> Path:
    """Write a data set in one call.

    Args:
        dest: directory to create (refused when it exists and is not empty, unless `overwrite`,
            which replaces only an existing data set).
        observed: uint8 (N, C, R, R), A * x: 0 wherever the mask is 0.
        masks: bool (N, C, R, R), A (True = observed).
        corruption: {"kind", "p", "delta", "shared_channels", ...} (see `corruption_record`).
        labels: int (N,) class indices or None; label_dim = max + 1.
        source: where the images came from, for the record.
        values: float16 (N, C, R, R) on [-1, 1] for a set with noisy images, else None.
        records: RECORD (N,) per-image records, or None (every image of the set's one kind).
        sigma_max: float32 (N,) per-image upper noise levels (inf: none), or None (no windows).
        latent: the latent record of a set of latents (`ambient_fast.data.latents`), or None.
    """
    label_dim = 0 if labels is None or not len(labels) else int(np.max(labels)) + 1
    with DatasetWriter(dest, count=len(observed), shape=observed.shape[1:], label_dim=label_dim, overwrite=overwrite,
                       values=values is not None, records=records is not None, sigma_max=sigma_max is not None,
                       latent=latent) as writer:
        writer.append(observed, masks, labels, values, records, sigma_max)
        return writer.commit(corruption, source)


class CorruptedDataset:
    """A data set on disk, memory-mapped.

    `get(indices)` -> (observed uint8 (B, C, R, R), mask bool (B, C, R, R), labels float32 one-hot
    (B, label_dim)); `get_raw(indices)` -> (observed, packed masks uint8 (B, packed_size), label
    indices int64 (B,) or None), what the loaders feed on. `verify()` checks checksums and content.
    """

    def __init__(self, path: Union[str, Path], verify: bool = False):
        self.path = Path(path)
        meta_path = self.path / META
        kind = reading.special_kind(self.path) if self.path.exists() and not self.path.is_dir() else ""
        kind = kind or reading.special_kind(meta_path)
        if kind:
            raise DataError(f"{self.path} is not an ambient-fast data set ({kind} where a folder with a {META} file "
                            "should be)")
        if not meta_path.is_file():
            raise DataError(f"{self.path} is not an ambient-fast data set (no {META}); make one with "
                            "python -m ambient_fast.prepare")
        try:
            data = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(f"{meta_path} is not valid JSON ({error}); prepare the set again") from None
        if not isinstance(data, dict):
            raise DataError(f"{meta_path} is not an ambient-fast data set's metadata; prepare the set again")
        self.meta = DatasetMeta.from_json(data, self.path)
        self._meta_json = data
        self._arrays = {}
        expected = {OBSERVED: (np.uint8, (self.meta.count, *self.meta.shape)),
                    MASKS: (np.uint8, (self.meta.count, packed_size(self.meta.shape))),
                    LABELS: (np.int64, (self.meta.count,)),
                    VALUES: (np.float16, (self.meta.count, *self.meta.shape)),
                    RECORDS: (RECORD, (self.meta.count,)),
                    SIGMA_MAX: (np.float32, (self.meta.count,))}
        for name in self.meta.array_files:
            try:
                array = np.load(reading.regular_file(self.path / name, "array file"), mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
                raise DataError(f"{self.path / name} cannot be read ({error}); the data set is damaged") from None
            dtype, shape = expected[name]
            if array.dtype != dtype or array.shape != shape:
                raise DataError(f"{self.path / name} holds {array.dtype} {array.shape}, meta.json says "
                                f"{np.dtype(dtype)} {shape}; the data set is damaged")
            self._arrays[name] = array
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.meta.count

    def __repr__(self) -> str:
        C, R, _ = self.meta.shape
        return f"CorruptedDataset({str(self.path)!r}: {len(self)} x {C}x{R}x{R}, labels {self.label_dim}, {self.corruption})"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, R, R) of one image."""
        return self.meta.shape

    @property
    def resolution(self) -> int:
        return self.meta.shape[1]

    @property
    def channels(self) -> int:
        return self.meta.shape[0]

    @property
    def label_dim(self) -> int:
        return self.meta.label_dim

    @property
    def checksum(self) -> str:
        """sha256 of what a model trains on: meta.json's record of the arrays (their checksums), the
        corruption, the shapes and counts; not when or from what description the set was made (a
        set prepared again from the same images and seed has the same checksum)."""
        return content_digest({key: value for key, value in self._meta_json.items() if key not in _INCIDENTAL})

    @property
    def corruption(self) -> dict:
        return dict(self.meta.corruption)

    def _check_indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise IndexError(f"indices must be a 1-D integer array, got {indices.dtype} {indices.shape}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        return indices

    @property
    def has_noise(self) -> bool:
        """Whether the set holds noisy images (and so float16 values; a latent set's values are latents)."""
        return self.meta.values and self.meta.latent is None

    @property
    def is_latent(self) -> bool:
        """Whether the set holds latents of an autoencoder (`meta.latent` says which) rather than pixels."""
        return self.meta.latent is not None

    def records(self, indices=None) -> np.ndarray:
        """The RECORD of each image (all when `indices` is None). Sets without records.npy: every
        image masked (unless the corruption kind is "none"), no noise, no sigma_min."""
        array = self._arrays.get(RECORDS)
        if array is not None:
            return np.asarray(array if indices is None else array[self._check_indices(indices)])
        count = len(self) if indices is None else len(self._check_indices(indices))
        records = np.zeros(count, RECORD)
        records["masked"] = self.corruption.get("kind") != "none"
        return records

    def sigma_bounds(self) -> np.ndarray:
        """float32 (N,): each image's lowest usable noise level, max(sigma_n, sigma_min)."""
        records = self.records()
        return np.maximum(records["sigma_n"], records["sigma_min"]).astype(np.float32)

    def sigma_max(self, indices=None) -> np.ndarray:
        """float32: each image's highest usable noise level (all when `indices` is None); inf (no
        upper bound) in sets without sigma_max.npy."""
        array = self._arrays.get(SIGMA_MAX)
        if array is not None:
            return np.asarray(array if indices is None else array[self._check_indices(indices)])
        return np.full(len(self) if indices is None else len(self._check_indices(indices)), np.inf, np.float32)

    def get_stored(self, indices) -> "Stored":
        """What a loader moves to the device for these images (see `Stored`)."""
        indices = self._check_indices(indices)
        values = self._arrays.get(VALUES, self._arrays[OBSERVED])
        labels = self._arrays.get(LABELS)
        sigma_max = self._arrays.get(SIGMA_MAX)
        return Stored(np.asarray(values[indices]), np.asarray(self._arrays[MASKS][indices]),
                      None if labels is None else np.asarray(labels[indices]), self.records(indices),
                      None if sigma_max is None else np.asarray(sigma_max[indices]))

    def get_raw(self, indices) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(observed uint8 (B, C, R, R), packed masks uint8 (B, packed_size), labels int64 (B,) or None)."""
        indices = self._check_indices(indices)
        labels = self._arrays.get(LABELS)
        return (self._arrays[OBSERVED][indices], self._arrays[MASKS][indices],
                None if labels is None else np.asarray(labels[indices]))

    def get(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(observed uint8 (B, C, R, R), mask bool (B, C, R, R), labels float32 one-hot (B, label_dim))."""
        observed, packed, labels = self.get_raw(indices)
        one_hot = np.zeros((len(observed), self.label_dim), np.float32)
        if labels is not None:
            one_hot[np.arange(len(labels)), labels] = 1
        return observed, unpack_masks(packed, self.shape), one_hot

    def verify(self) -> list[str]:
        """Check meta.json against its own checksum, each array file against its checksum, then
        recompute what meta.json claims from the arrays (the observed fraction, the records'
        summary; the counts are checked on opening), that observed (and values) are 0 outside the
        mask, that values are finite, that an image recorded as unmasked has a full mask and that
        labels lie in range. Raises DataError naming every problem found; returns notes on what
        could not be checked."""
        notes, problems = [], []
        digest = self._meta_json.get(CONTENT_DIGEST)
        if digest is None:
            notes.append(f"{META} has no checksum of its own content (written by an older version): its corruption "
                         "record could not be verified")
        elif digest != content_digest(self._meta_json):
            problems.append(f"{META}: its content changed after it was written (e.g. an edited p or delta) and no "
                            "longer matches its checksum")
        problems += [f"{name}: checksum mismatch (the file changed after it was written)"
                     for name in self.meta.array_files if sha256_file(self.path / name) != self.meta.files[name]]
        if not problems:
            observed_values = 0
            for start in range(0, len(self), _CHECK_ROWS):
                rows = np.arange(start, min(start + _CHECK_ROWS, len(self)))
                observed, packed, _ = self.get_raw(rows)  # labels are checked below, not used
                masks = unpack_masks(packed, self.shape)
                observed_values += int(np.count_nonzero(masks))
                if np.count_nonzero(observed[~masks]):
                    problems.append(f"{OBSERVED}: non-zero values where the mask is 0 (images {start}..)")
                    break
                if self.meta.values:
                    values = np.asarray(self._arrays[VALUES][rows])
                    if not np.isfinite(values).all() or np.count_nonzero(values[~masks]):
                        problems.append(f"{VALUES}: non-finite values, or non-zero ones where the mask is 0 "
                                        f"(images {start}..)")
                        break
                unmasked = self.records(rows)["masked"] == 0
                if (~masks[unmasked]).any():
                    problems.append(f"{RECORDS}: images recorded as not masked have erased values (images {start}..)")
                    break
            fraction = observed_values / (len(self) * math.prod(self.shape))
            if not problems and not math.isclose(fraction, self.meta.observed_fraction, rel_tol=1e-9, abs_tol=1e-12):
                problems.append(f"{META}: observed fraction {self.meta.observed_fraction} but the masks observe "
                                f"{fraction}")
            labels = self._arrays.get(LABELS)
            if labels is not None and (labels.min() < 0 or labels.max() >= self.label_dim):
                problems.append(f"{LABELS}: labels outside [0, {self.label_dim})")
            if self.meta.records is not None:
                records = self.records()
                levels = np.stack([records["sigma_n"], records["sigma_min"]])
                if not (np.isfinite(levels).all() and (levels >= 0).all()):
                    problems.append(f"{RECORDS}: noise levels that are negative or not finite")
                elif records_summary(records) != self.meta.records:
                    problems.append(f"{META}: records {self.meta.records} but {RECORDS} holds {records_summary(records)}")
                if not self.has_noise and (records["sigma_n"] > 0).any():
                    problems.append(f"{RECORDS}: noisy images without {VALUES}")
            if self.meta.windows is not None:
                problem = _check_windows(self.sigma_max(), self.sigma_bounds())
                if problem:
                    problems.append(f"{SIGMA_MAX}: {problem}")
                elif windows_summary(self.sigma_max()) != self.meta.windows:
                    problems.append(f"{META}: windows {self.meta.windows} but {SIGMA_MAX} holds "
                                    f"{windows_summary(self.sigma_max())}")
            if self.is_latent and self.meta.observed_fraction != 1:
                problems.append(f"{MASKS}: a latent set's masks must be full (masks do not live in latent space)")
        if problems:
            raise DataError(f"{self.path} failed verification: " + "; ".join(problems)
                            + ". Prepare the data set again.")
        return notes


class Stored(NamedTuple):
    """The stored rows of some images, as a loader moves them: values (uint8 levels, or float16 on
    [-1, 1] in a set with noise, or a latent set's latents) (B, C, R, R), packed masks uint8
    (B, packed_size), labels int64 (B,) or None, records RECORD (B,), sigma_max float32 (B,) or None
    (a set without windows)."""

    values: np.ndarray
    packed: np.ndarray
    labels: Optional[np.ndarray]
    records: np.ndarray
    sigma_max: Optional[np.ndarray] = None


def unpack_masks(packed: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """packed uint8 (B, packed_size(shape)) -> bool (B, C, H, W)."""
    bits = np.unpackbits(packed, axis=1, count=math.prod(shape), bitorder="little")
    return bits.reshape(len(packed), *shape).view(np.bool_)
