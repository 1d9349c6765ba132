"""`python -m ambient_fast.prepare`: make a corrupted data set (see ambient_fast.data.format).

    prepare --source SRC --dest DEST --corruption dust --p 0.8 [--delta 0.1] [--shared-channels]
            [--resolution R] [--max-size N] [--seed S]
        corrupt clean images (a folder, searched recursively, or an EDM-style zip with an
        optional dataset.json of labels); only A * x and A are written.
    prepare --source SRC --masks MASKS --dest DEST [--delta 0.1]
        import data that is already corrupted: MASKS is a folder of mask images named like the
        source images (white = observed), or one .npy of 0/1 masks (N, H, W) or (N, C, H, W) in
        sorted-file-name order.
    prepare verify DEST
        check checksums (of the arrays and of meta.json) and recompute what meta.json claims,
        print a summary.

--delta is recorded as the training default; the trainer draws the further corruption B itself,
fresh at every step. Bad input prints one line saying what is wrong and exits with status 1.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ambient_fast.corruption import OPERATORS, MaskOperator, make_operator
from ambient_fast.data.format import CorruptedDataset, DataError, DatasetWriter, corruption_record
from ambient_fast.data.sources import ImageSource, mask_array, mask_folder, mask_rows, read_mask

__all__ = ["MASK_KINDS", "prepare_corrupted", "import_masked", "summary", "main"]

MASK_KINDS = sorted(name for name, cls in OPERATORS.items() if issubclass(cls, MaskOperator))
CHUNK = 256           # images decoded, corrupted and written at a time
PROGRESS_FROM = 1024  # show a progress bar from this many images on


def _progress(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]prepare"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=total < PROGRESS_FROM)


def _common_size(source: ImageSource, count: int, resolution: Optional[int]) -> int:
    """The side of the square images to write; DataError when they are not all the same square
    size and no --resolution was given."""
    if resolution is not None:
        if resolution < 1:
            raise DataError(f"--resolution must be a positive integer, got {resolution}")
        return resolution
    sizes = {source.size_of(i) for i in range(count)}
    if len(sizes) > 1:
        examples = {}
        for i in range(count):
            examples.setdefault(source.size_of(i), source.names[i])
        shown = ", ".join(f"{name} {w}x{h}" for (h, w), name in list(examples.items())[:3])
        raise DataError(f"images have {len(sizes)} different sizes ({shown}); pass --resolution R to "
                        "center-crop and resize them all to R x R")
    (height, width), = sizes
    if height != width:
        raise DataError(f"images are {width}x{height}, not square; pass --resolution R to center-crop "
                        "and resize them to R x R")
    return height


def _count(source: ImageSource, max_size: Optional[int]) -> int:
    if max_size is not None and max_size < 1:
        raise DataError(f"--max-size must be a positive integer, got {max_size}")
    return len(source) if max_size is None else min(len(source), max_size)


def _labels_and_dim(source: ImageSource, count: int) -> tuple[Optional[np.ndarray], int]:
    labels = None if source.labels is None else source.labels[:count]
    return labels, 0 if labels is None else int(labels.max()) + 1


def prepare_corrupted(source_path, dest, *, corruption: str = "dust", p: float, delta: float = 0.1,
                      shared_channels: bool = False, resolution: Optional[int] = None,
                      max_size: Optional[int] = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Corrupt the images of `source_path` with a mask operator and write the data set.

    Masks are drawn from one torch.Generator seeded with `seed`, CHUNK images at a time, in the
    source's sorted order: the same inputs and seed give the same data set. Raises DataError
    (bad input) or ValueError (the operator's parameters).
    """
    if corruption not in MASK_KINDS:
        raise DataError(f"--corruption {corruption!r} does not produce masks; choose one of {MASK_KINDS}")
    params = dict(p=p, delta=delta)
    if corruption == "dust":
        params["shared_channels"] = shared_channels
    elif shared_channels:
        raise DataError(f"--shared-channels applies to dust only ({corruption} masks are the same for every channel)")
    operator = make_operator(corruption, **params)
    with ImageSource(source_path) as source:
        count = _count(source, max_size)
        side = _common_size(source, count, resolution)
        labels, label_dim = _labels_and_dim(source, count)
        shape = (source.channels, side, side)
        generator = torch.Generator().manual_seed(seed)
        with DatasetWriter(dest, count=count, shape=shape, label_dim=label_dim, overwrite=overwrite) as writer, \
                _progress(count) as progress:
            task = progress.add_task("prepare", total=count)
            for start in range(0, count, CHUNK):
                rows = range(start, min(start + CHUNK, count))
                images = source.read_all(rows, resolution)
                # A depends only on the generator, not on the pixels.
                _, A = operator.corrupt(torch.zeros(images.shape), generator)
                masks = A.numpy() != 0
                writer.append(images * masks, masks, None if labels is None else labels[rows.start:rows.stop])
                progress.advance(task, len(rows))
            return writer.commit(corruption_record(operator), f"{source.describe()}, seed {seed}")


def import_masked(source_path, masks_path, dest, *, delta: float = 0.1, max_size: Optional[int] = None,
                  overwrite: bool = False) -> Path:
    """Write a data set from images that are already corrupted and their masks (a folder of mask
    images or one .npy, see the module docstring). Pixels outside the masks are zeroed, whatever
    the images hold there. Images are used at their own (common, square) size."""
    if not 0 <= delta < 1:
        raise DataError(f"--delta must lie in [0, 1), got {delta}")
    masks_path = Path(masks_path)
    with ImageSource(source_path) as source:
        count = _count(source, max_size)
        side = _common_size(source, count, None)
        if masks_path.suffix == ".npy":
            array, files = mask_array(masks_path, source), None
        else:
            array, files = None, mask_folder(masks_path, source.names[:count])
        labels, label_dim = _labels_and_dim(source, count)
        C = source.channels
        observed_values, shared = 0, True
        with DatasetWriter(dest, count=count, shape=(C, side, side), label_dim=label_dim,
                           overwrite=overwrite) as writer, _progress(count) as progress:
            task = progress.add_task("import", total=count)
            for start in range(0, count, CHUNK):
                rows = range(start, min(start + CHUNK, count))
                images = source.read_all(rows)
                if files is None:
                    masks = mask_rows(array, slice(rows.start, rows.stop), C, f"masks {masks_path}")
                else:
                    masks = np.stack([read_mask(files[i], source.size_of(i), C) for i in rows])
                shared = shared and bool((masks == masks[:, :1]).all())
                observed_values += int(np.count_nonzero(masks))
                writer.append(images * masks, masks, None if labels is None else labels[rows.start:rows.stop])
                progress.advance(task, len(rows))
            erased = 1 - observed_values / (count * C * side * side)
            record = dict(kind="user", p=round(erased, 6), delta=delta, shared_channels=shared,
                          masks=str(masks_path.resolve()))
            return writer.commit(record, source.describe())


def summary(dataset: CorruptedDataset, headline: str) -> str:
    """`headline` and a few lines describing the data set."""
    meta = dataset.meta
    C, R, _ = meta.shape
    return "\n".join([
        f"{headline}: {dataset.path} (format version {meta.version})",
        f"  images      {meta.count} x {C}x{R}x{R} uint8 (observed A*x only)",
        f"  labels      {f'{meta.label_dim} classes' if meta.label_dim else 'none'}",
        f"  corruption  {meta.corruption}",
        f"  observed    {100 * meta.observed_fraction:.1f}% of values",
        f"  source      {meta.source}",
        f"  created     {meta.created}",
    ])


# ----------------------------------------------------------------------------------------------
# Command line.

class _UsageError(DataError):
    """A command-line mistake; argparse's own exit (status 2) is replaced by our status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(f"{message} (see {self.prog} --help)")


def number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ambient_fast.prepare", description=__doc__.split("\n\n")[0],
                     epilog="prepare verify DEST checks a data set.")
    add = parser.add_argument
    add("--source", required=True, help="image folder (recursive) or EDM-style zip")
    add("--dest", required=True, help="data-set directory to create")
    add("--corruption", default="dust", choices=MASK_KINDS, help="mask operator (default dust)")
    add("--p", type=number, help="corruption level, e.g. the erased fraction for dust")
    add("--delta", type=number, default=0.1, help="further corruption recorded as the training default (0.1)")
    add("--shared-channels", action="store_true", help="dust: one mask for all colour channels")
    add("--resolution", type=int, help="center-crop and resize every image to R x R")
    add("--max-size", type=int, help="use the first N images (sorted by path)")
    add("--seed", type=int, default=0, help="seed of the masks (default 0)")
    add("--masks", help="import already corrupted images: folder of mask images or a .npy of 0/1 masks")
    add("--overwrite", action="store_true", help="replace an existing data set at --dest")
    return parser


def _run(argv: list[str]) -> str:
    """Run one command; returns what to print."""
    if argv[:1] == ["verify"]:
        verify = _Parser(prog="python -m ambient_fast.prepare verify", description="check a data set")
        verify.add_argument("dest")
        dataset = CorruptedDataset(verify.parse_args(argv[1:]).dest)
        notes = dataset.verify()
        return "\n".join([summary(dataset, "ok, checksums and content verified"), *(f"  note: {n}" for n in notes)])
    args = build_parser().parse_args(argv)
    if args.masks is not None:
        given = [flag for flag, value in (("--p", args.p), ("--resolution", args.resolution)) if value is not None]
        if given or args.shared_channels:
            raise DataError(f"--masks imports masks as they are: drop {', '.join(given) or '--shared-channels'} "
                            "(resizing would blend erased pixels into observed ones; resize images and masks "
                            "beforehand)")
        path = import_masked(args.source, args.masks, args.dest, delta=args.delta, max_size=args.max_size,
                             overwrite=args.overwrite)
    else:
        if args.p is None:
            raise DataError("give --p (with --corruption) to corrupt clean images, or --masks to import masks")
        path = prepare_corrupted(args.source, args.dest, corruption=args.corruption, p=args.p, delta=args.delta,
                                 shared_channels=args.shared_channels, resolution=args.resolution,
                                 max_size=args.max_size, seed=args.seed, overwrite=args.overwrite)
    return summary(CorruptedDataset(path), "wrote")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 1 with a one-line error on bad input."""
    try:
        print(_run(sys.argv[1:] if argv is None else list(argv)))
    except (ValueError, OSError) as error:  # DataError is a ValueError; the operators raise ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
