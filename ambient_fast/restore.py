"""`python -m ambient_fast.restore --net PATH --input DATA --out DIR`: one-step restoration.

One network evaluation per image (the paper's Table 1 use): the model, trained to predict
E[x0 | A x_t, A], is shown the observed pixels and their mask at a small noise level sigma and
returns the whole image. The input is a prepared data set (`python -m ambient_fast.prepare`) or a
folder of images with `--masks` (imported the same way `prepare --masks` does). With clean
references (`--clean`, or the clean twin of the built-in synthetic set, found automatically) it
reports PSNR, and LPIPS where the `lpips` package and its weights are available locally.
"""
import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ambient_fast.files.checkpoints import load_network
from ambient_fast.files.atomic import check_writable_dir, write_json
from ambient_fast.files.images import from_uint8, grid, save_png, to_uint8
from ambient_fast.evaluation.metrics import psnr


def restore(model, observed: torch.Tensor, mask: torch.Tensor, sigma: float, labels=None,
            generator: Optional[torch.Generator] = None, add_noise: bool = False) -> torch.Tensor:
    """One-step restoration.

    Args:
        model: ambient denoiser (2C input channels).
        observed: (N, C, H, W) observed images in [-1, 1], 0 outside the mask.
        mask: (N, C, H, W) 0/1.
        sigma: noise level the network is evaluated at (the measurement noise when `add_noise`).
        add_noise: add N(0, sigma^2) to the observed pixels first (noisy measurements).
    Returns:
        (N, C, H, W) restored images clamped to [-1, 1].
    """
    y = mask * observed
    if add_noise:
        y = y + mask * sigma * torch.randn(y.shape, generator=generator, device=y.device)
    sigmas = torch.full((y.shape[0],), sigma, device=y.device)
    with torch.no_grad():
        out = model(torch.cat([y, mask], dim=1), sigmas, labels)[:, : y.shape[1]]
    return out.clamp(-1, 1)


def lpips_distance(images: torch.Tensor, references: torch.Tensor):
    """(mean LPIPS, None) or (None, why it could not be computed)."""
    try:
        import lpips
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    try:
        metric = lpips.LPIPS(net="alex", verbose=False)
    except Exception as error:  # its weights come from a download; offline there are none
        return None, f"lpips could not load its weights locally ({type(error).__name__}: {error})"
    with torch.no_grad():
        return metric(images.float().cpu(), references.float().cpu()).mean().item(), None


def _clean_references(args, data_path: Path, count: int) -> Optional[np.ndarray]:
    from ambient_fast.data.synthetic import clean_twin

    if args.clean:
        path = Path(args.clean)
        if path.suffix == ".npy":
            clean = np.load(path)
        else:
            from ambient_fast.data.sources import ImageSource

            with ImageSource(path) as source:
                clean = source.read_all(range(len(source)))
    else:
        twin = clean_twin(data_path) / "images.npy"
        if not twin.is_file():
            return None
        print(f"clean references: {twin}")
        clean = np.load(twin)
    if len(clean) < count:
        raise ValueError(f"--clean holds {len(clean)} images, the input {count}")
    return clean[:count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ambient_fast.restore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", required=True, help=".safetensors checkpoint or reference .pkl / run directory")
    parser.add_argument("--training-options", help="training_options.json of a reference snapshot, if not beside it")
    parser.add_argument("--input", required=True, help="prepared data set, or a folder of images (with --masks)")
    parser.add_argument("--masks", help="masks of --input images: folder named like the images (white = observed) or .npy")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--clean", help="clean references (.npy (N, C, H, W) uint8 or an image folder) for PSNR/LPIPS")
    parser.add_argument("--sigma", type=float, default=0.02, help="noise level of the evaluation (default 0.02)")
    parser.add_argument("--add-noise", action="store_true", help="add N(0, sigma^2) to the observed pixels first")
    parser.add_argument("--max-images", type=int, help="restore only the first N images")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the added noise")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            return _run(args, Path(scratch))
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _run(args, scratch: Path) -> int:
    from ambient_fast.data.format import CorruptedDataset
    from ambient_fast.data.prepare import import_masked

    if args.sigma <= 0:
        raise ValueError(f"--sigma must be positive, got {args.sigma}")
    out = check_writable_dir(args.out, "--out")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data_path = Path(args.input)
    if args.masks:
        data_path = import_masked(args.input, args.masks, scratch / "imported")
    elif not (data_path / "meta.json").is_file():
        raise ValueError(f"{data_path} is not a prepared data set; pass --masks to restore a folder of images")
    dataset = CorruptedDataset(data_path)
    loaded = load_network(args.net, args.training_options)
    model = loaded.model.to(device)
    if model.img_channels != 2 * dataset.channels or model.img_resolution != dataset.resolution:
        raise ValueError(f"the network takes {model.img_channels // 2}x{model.img_resolution}x{model.img_resolution} "
                         f"images, the data set holds {dataset.channels}x{dataset.resolution}x{dataset.resolution}")
    count = min(len(dataset), args.max_images or len(dataset))
    clean = _clean_references(args, Path(args.input), count) if not args.masks or args.clean else None

    generator = torch.Generator(device=device).manual_seed(args.seed)
    restored, inputs = [], []
    for start in range(0, count, args.batch):
        indices = np.arange(start, min(start + args.batch, count))
        observed, mask, labels = dataset.get(indices)
        mask_t = torch.from_numpy(mask).float().to(device)
        y = from_uint8(torch.from_numpy(observed).to(device)) * mask_t
        label_t = torch.from_numpy(labels).to(device) if model.label_dim else None
        restored.append(to_uint8(restore(model, y, mask_t, args.sigma, label_t, generator, args.add_noise)))
        inputs.append(to_uint8(y))
    restored, inputs = np.concatenate(restored), np.concatenate(inputs)
    for index, array in enumerate(restored):
        save_png(array, out / f"{index:06d}.png")

    shown = min(count, 32)
    rows = [inputs[:shown], restored[:shown]]
    report = dict(net=loaded.source, input=str(args.input), images=count, sigma=args.sigma, added_noise=args.add_noise)
    if clean is not None:
        clean_hwc = clean.transpose(0, 2, 3, 1)
        rows.append(clean_hwc[:shown])
        report.update(psnr_restored=float(psnr(restored, clean_hwc).mean()),
                      psnr_input=float(psnr(inputs, clean_hwc).mean()))
        value, why = lpips_distance(from_uint8(torch.from_numpy(restored).permute(0, 3, 1, 2)),
                                    from_uint8(torch.from_numpy(np.ascontiguousarray(clean_hwc)).permute(0, 3, 1, 2)))
        report.update(lpips=value, lpips_note=why)
    columns = math.ceil(math.sqrt(shown))
    gap = np.full((4, 1, 3), 255, np.uint8)
    panels = [grid(list(r), columns=columns) for r in rows]
    overview = np.concatenate([np.concatenate([p, np.repeat(gap, p.shape[1], axis=1)]) for p in panels])
    save_png(overview, out / "overview.png")
    write_json(out / "restore.json", report)

    print(f"restored {count} images from {args.input} with {loaded.source} (one network evaluation each, "
          f"sigma {args.sigma}) -> {out}")
    print(f"  overview (inputs / restored{' / clean' if clean is not None else ''}): {out / 'overview.png'}")
    if clean is not None:
        print(f"  PSNR: restored {report['psnr_restored']:.2f} dB, corrupted input {report['psnr_input']:.2f} dB")
        print(f"  LPIPS: {report['lpips']:.4f}" if report["lpips"] is not None else f"  LPIPS: not computed: {report['lpips_note']}")
    else:
        print("  no clean references given (--clean): PSNR not computed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
