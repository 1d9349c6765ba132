"""Image files: tensors in [-1, 1] to uint8 PNGs and back, and grids, labels and layouts for looking at
many at once."""
import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from ambient_fast.files.atomic import atomic_write


def from_uint8(levels: torch.Tensor) -> torch.Tensor:
    """uint8 levels (any shape) -> float32 on [-1, 1], (2u - 255) / 255 rounded once: the one table
    the training input uses too (ambient_fast.kernels.LEVELS)."""
    from ambient_fast.kernels import levels as table

    return table(levels.device)[levels.long()]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def save_png(array: np.ndarray, path: Union[str, Path]) -> None:
    """Save one (H, W, C) uint8 image, C in {1, 3, 4} (atomically)."""
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def load_png(path: Union[str, Path]) -> np.ndarray:
    """(H, W, C) uint8, C in {1, 3, 4}: what `save_png` writes. Other modes (palette, 1-bit,
    16-bit, ...) raise ValueError: their raw arrays are not 8-bit pixel values."""
    with Image.open(path) as image:
        if image.mode not in ("L", "RGB", "RGBA"):
            raise ValueError(f"{path} is a {image.mode!r} image; save it as 8-bit greyscale (L), RGB or RGBA")
        array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def grid(arrays: Sequence[np.ndarray], columns: int = 0, pad: int = 1, background: int = 255) -> np.ndarray:
    """Tile (H, W, C) uint8 images into one (rows, columns) grid separated by `pad` pixels;
    `columns` = 0 picks a near-square layout."""
    if not len(arrays):
        raise ValueError("grid needs at least one image")
    h, w, c = arrays[0].shape
    columns = columns or math.ceil(math.sqrt(len(arrays)))
    rows = math.ceil(len(arrays) / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), background, dtype=np.uint8)
    for index, array in enumerate(arrays):
        r, col = divmod(index, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = array
    return out


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, C) -> (factor H, factor W, C), each pixel a factor x factor block (nearest: no blur
    invented between pixels)."""
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def labelled(array: np.ndarray, label: str, size: int = 14, background: int = 255) -> np.ndarray:
    """(H, W, C) uint8 under a strip with `label` written in black, in PIL's default font (built into
    Pillow: no font file), as wide as the image or the label."""
    from PIL import ImageDraw, ImageFont, features

    font = ImageFont.load_default(size) if features.check("freetype2") else ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), label, font=font)
    pad = max(2, size // 3)
    height, width = bottom + 2 * pad, max(array.shape[1], right + 2 * pad)
    strip = Image.new("RGB", (width, height), (background,) * 3)
    ImageDraw.Draw(strip).text((pad, pad), label, fill=(0, 0, 0), font=font)
    strip = np.asarray(strip)[:, :, : array.shape[2]]  # greyscale images: one channel of it
    body = np.full((array.shape[0], width, array.shape[2]), background, np.uint8)
    body[:, : array.shape[1]] = array
    return np.concatenate([strip, body], axis=0)


def arrange(rows: Sequence[Sequence[np.ndarray]], gap: int = 12, background: int = 255) -> np.ndarray:
    """Rows of (H, W, C) uint8 images, left-aligned, `gap` pixels apart, into one image."""
    channels = rows[0][0].shape[2]
    lines = []
    for row in rows:
        height = max(image.shape[0] for image in row)
        parts = []
        for image in row:
            tile = np.full((height, image.shape[1] + gap, channels), background, np.uint8)
            tile[: image.shape[0], : image.shape[1]] = image
            parts.append(tile)
        lines.append(np.concatenate(parts, axis=1)[:, :-gap])
    width = max(line.shape[1] for line in lines)
    out = np.full((sum(line.shape[0] for line in lines) + gap * (len(lines) - 1), width, channels), background,
                  np.uint8)
    top = 0
    for line in lines:
        out[top: top + line.shape[0], : line.shape[1]] = line
        top += line.shape[0] + gap
    return out
