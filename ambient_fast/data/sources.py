"""What `prepare` reads: image folders, EDM-style zips, and the masks of already corrupted data.

An image source lists its images by relative path (posix, sorted: that order is the data set's
order) and decodes them to uint8 (C, R, R) arrays. Labels come from an optional `dataset.json`
at its root, EDM's layout: {"labels": [[relative_path, class_index], ...]} (or "labels": null).
"""
from __future__ import annotations

import io
import json
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ambient_fast.data.format import MAX_CLASSES, DataError
from ambient_fast.files import reading
from ambient_fast.files.reading import is_regular_file, special_kind

__all__ = ["ImageSource", "image_extensions", "center_crop_resize", "mask_folder", "read_mask", "mask_array",
           "mask_rows"]

LABELS_FILE = "dataset.json"
GRAY_MODES = {"1", "L", "I", "F"}  # and the 16-bit modes I;16, I;16B, ...


def _is_grey(mode: str) -> bool:
    return mode in GRAY_MODES or mode.startswith("I;16")


def image_extensions() -> set[str]:
    """Lower-case suffixes (with the dot) that PIL can open."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _is_image(name: str, extensions: set[str]) -> bool:
    return PurePosixPath(name).suffix.lower() in extensions


class ImageSource:
    """A folder (searched recursively) or a zip of images, read in sorted relative-path order.

    names: relative posix paths. labels: int64 (N,) aligned with names, or None.
    channels: 1 when every image is greyscale, else 3 (others are converted to RGB).
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        extensions = image_extensions()
        self._zip: Optional[zipfile.ZipFile] = None
        if self.path.is_dir():
            entries = [p for p in self.path.rglob("*") if not p.is_dir()]
            special = [p for p in entries if not is_regular_file(p) and (_is_image(p.name, extensions)
                                                                         or p.name == LABELS_FILE)]
            if special:
                raise DataError(f"source {self.path}: {special[0].relative_to(self.path)} is "
                                f"{special_kind(special[0]) or 'not a regular file'}, not an image file; "
                                "move it out of the source")
            files = [p.relative_to(self.path).as_posix() for p in entries if is_regular_file(p)]
        elif is_regular_file(self.path) and zipfile.is_zipfile(self.path):
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise DataError(f"source {self.path} is a damaged zip file ({error})") from None
            files = [name for name in self._zip.namelist() if not name.endswith("/")]
        elif self.path.exists():
            raise DataError(f"source {self.path} is neither a folder nor a zip file"
                            + (f" (it is {special_kind(self.path)})" if special_kind(self.path) else ""))
        else:
            raise DataError(f"source {self.path} does not exist")
        self.names = sorted(name for name in files if _is_image(name, extensions))
        if not self.names:
            raise DataError(f"source {self.path} holds no images (looked for {', '.join(sorted(extensions)[:8])}, ...)")
        self.labels = self._read_labels(set(files))
        self.sizes, modes = self._scan_headers()
        self.channels = 1 if all(_is_grey(mode) for mode in modes) else 3

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()

    def __len__(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        kind = "zip" if self._zip is not None else "folder"
        return f"{kind} {self.path.resolve()} ({len(self)} images)"

    def _read_bytes(self, name: str) -> bytes:
        """A file's bytes; a zip member that fails its CRC, is cut short or cannot be decompressed is a
        DataError naming it."""
        if self._zip is None:
            return (self.path / name).read_bytes()
        try:
            return self._zip.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as error:
            # BadZipFile: a bad CRC or header; zlib.error and EOFError: a damaged or truncated member;
            # NotImplementedError: an unknown compression; RuntimeError: an encrypted member.
            raise DataError(f"cannot read {name} from the zip {self.path}: {type(error).__name__}: {error}; the zip "
                            "is damaged (or encrypted): make it again") from None

    def _open(self, name: str) -> Image.Image:
        """The image, opened lazily (a folder's file is read up to its header only); DataError
        when PIL cannot read it."""
        try:
            if self._zip is None:
                return Image.open(self.path / name)
            return Image.open(io.BytesIO(self._read_bytes(name)))
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"cannot read image {name} in {self.path}: {error}") from None

    def _scan_headers(self) -> tuple[list[tuple[int, int]], set[str]]:
        """(W, H) of each image and the set of modes, without decoding pixels."""
        sizes, modes = [], set()
        for name in self.names:
            with self._open(name) as image:
                sizes.append(image.size)
                modes.add(image.mode)
        return sizes, modes

    def _read_labels(self, files: set[str]) -> Optional[np.ndarray]:
        if LABELS_FILE not in files:
            return None
        where = f"{self.path}/{LABELS_FILE}"
        try:
            entries = json.loads(self._read_bytes(LABELS_FILE)).get("labels")
        except (ValueError, AttributeError) as error:
            raise DataError(f"{where} is not valid JSON of the form "
                            f'{{"labels": [[file, class], ...]}} ({error})') from None
        if entries is None:
            return None
        table = {}
        try:
            for entry in reading.sequence(entries, '"labels"'):
                name, label = reading.sequence(entry, "each entry of \"labels\" ([file, class index])", 2)
                name = reading.text(name, "an image name")
                label = reading.integer(label, f"the class index of {name}", 0, MAX_CLASSES - 1)
                if table.setdefault(name, label) != label:
                    raise ValueError(f"{name} is labelled twice, as {table[name]} and {label}")
        except ValueError as error:
            raise DataError(f"{where}: {error}") from None
        missing = [name for name in self.names if name not in table]
        if missing:
            raise DataError(f"{where} has no label for {len(missing)} image(s), e.g. {missing[:3]}")
        return np.array([table[name] for name in self.names], np.int64)

    def size_of(self, index: int) -> tuple[int, int]:
        """(H, W) of image `index`."""
        width, height = self.sizes[index]
        return height, width

    def read(self, index: int, resolution: Optional[int] = None) -> np.ndarray:
        """Image `index` as uint8 (C, H, W), center-cropped and resized to a square `resolution`
        when given."""
        name = self.names[index]
        with self._open(name) as image:
            try:
                image = _eight_bit(image, f"{name} in {self.path}").convert("L" if self.channels == 1 else "RGB")
            except OSError as error:  # truncated or corrupt pixel data shows only when decoding
                raise DataError(f"cannot decode image {name} in {self.path}: {error}") from None
            if resolution is not None:
                image = center_crop_resize(image, resolution)
            array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def read_all(self, indices: Iterable[int], resolution: Optional[int] = None) -> np.ndarray:
        """uint8 (B, C, H, W) for the given indices."""
        return np.stack([self.read(index, resolution) for index in indices])


def _eight_bit(image: Image.Image, where: str) -> Image.Image:
    """16-bit greyscale scaled to 8-bit L (value / 257, rounded): PIL's own convert clips at 255.
    PNG decodes 16-bit greyscale as I;16 (older Pillow: I); any other I or F image has no known
    range and is refused."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG"):
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.round(values / 257).astype(np.uint8))  # 2-D uint8: mode L
    if image.mode in ("I", "F"):
        raise DataError(f"image {where} holds {'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels "
                        "of unknown range; save it as an 8- or 16-bit image")
    return image


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square, resized to resolution x resolution (Lanczos)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if side != width or side != height:
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


# ----------------------------------------------------------------------------------------------
# User masks. White (or 1) = observed. A single-channel mask applies to every channel.

def _binary(values: np.ndarray, on: int, where: str) -> np.ndarray:
    """values in {0, on} -> bool; DataError otherwise."""
    if values.dtype == np.bool_:
        return values
    bad = (values != 0) & (values != on)
    if bad.any():
        found = np.unique(values[bad])[:5].tolist()
        raise DataError(f"{where} is not binary: values must be 0 (erased) or {on} (observed), found {found}")
    return values == on


def _fit_channels(mask: np.ndarray, channels: int, where: str) -> np.ndarray:
    """bool (..., c, H, W) with c in {1, channels} -> (..., channels, H, W)."""
    found = mask.shape[-3]
    if found not in (1, channels):
        raise DataError(f"{where} has {found} channels; masks need 1 (shared) or {channels} (one per channel)")
    return np.repeat(mask, channels // found, axis=-3)


def mask_folder(folder: Union[str, Path], names: list[str]) -> list[Path]:
    """The mask file of each image name (relative path), in order: same relative folder and
    stem, any image extension. Read each with `read_mask`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--masks {folder}: no such folder or .npy file")
    extensions = image_extensions()
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in extensions:
            key = path.relative_to(folder).with_suffix("").as_posix()
            if key in by_stem:
                raise DataError(f"two masks for {key}: {by_stem[key].name} and {path.name}; keep one")
            by_stem[key] = path
    keys = [PurePosixPath(name).with_suffix("").as_posix() for name in names]
    missing = [key for key in keys if key not in by_stem]
    if missing:
        raise DataError(f"{len(missing)} image(s) have no mask in {folder}, e.g. {missing[:3]} "
                        "(a mask must have the image's relative path and stem)")
    return [by_stem[key] for key in keys]


def read_mask(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """A mask image (1-bit, greyscale or RGB; 255 = observed) as bool (channels, H, W), checked
    to be binary and of the image's size (H, W)."""
    try:
        with Image.open(path) as image:
            mode, array = image.mode, np.asarray(image)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read mask {path}: {error}") from None
    if mode not in ("1", "L", "RGB"):
        raise DataError(f"mask {path} has mode {mode}; save masks as 1-bit, greyscale or RGB images")
    mask = _binary(array, 255, f"mask {path}")
    mask = mask[None] if mask.ndim == 2 else mask.transpose(2, 0, 1)
    if mask.shape[1:] != tuple(size):
        raise DataError(f"mask {path} is {mask.shape[2]}x{mask.shape[1]} but its image is {size[1]}x{size[0]}")
    return _fit_channels(mask, channels, f"mask {path}")


def mask_array(path: Union[str, Path], source: ImageSource) -> np.ndarray:
    """One .npy of 0/1 masks in the source's (sorted-name) order, (N, H, W) or (N, C, H, W):
    returns it memory-mapped, its shape checked; read rows with `mask_rows`."""
    path = Path(path)
    try:
        masks = np.load(reading.regular_file(path, "--masks"), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
        raise DataError(f"cannot read masks {path}: {error}") from None
    if not (masks.dtype == np.bool_ or np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
        raise DataError(f"masks {path} hold {masks.dtype} values; save them as an array of 0/1 numbers")
    if masks.ndim not in (3, 4):
        raise DataError(f"masks {path} must be (N, H, W) or (N, C, H, W), got shape {masks.shape}")
    if len(masks) != len(source):
        raise DataError(f"masks {path} holds {len(masks)} masks but the source has {len(source)} images")
    sizes = {source.size_of(i) for i in range(len(source))}
    if sizes != {tuple(masks.shape[-2:])}:
        raise DataError(f"masks {path} are {masks.shape[-1]}x{masks.shape[-2]} but the images are "
                        f"{', '.join(f'{w}x{h}' for h, w in sorted(sizes))}")
    return masks


def mask_rows(masks: np.ndarray, rows: slice, channels: int, where: str) -> np.ndarray:
    """bool (B, C, H, W) for rows of an array from `mask_array`, checked to be binary."""
    chunk = _binary(np.asarray(masks[rows]), 1, where)
    return _fit_channels(chunk[:, None] if chunk.ndim == 3 else chunk, channels, where)
