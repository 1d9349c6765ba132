"""`python -m ambient_fast.restore --net PATH --input DATA --out DIR`: one-step restoration.

One network evaluation per image (the paper's Table 1 use; ambient_fast.evaluation.restoration):
the model is shown the observed pixels and their mask at a small noise level sigma and returns the
whole image. The input is a prepared data set (`python -m ambient_fast.prepare`) or a folder of
images with `--masks` (imported the same way `prepare --masks` does). With clean references
(`--clean`, or the clean twin of the built-in synthetic set, found automatically) it reports PSNR,
and LPIPS where the `lpips` package and its weights are available locally.
"""
import re
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.options import (GENERATOR_SEED_BOUNDS, INPUT, OUTPUT, Options, above, at_least, build_parser,
                                  device_option, option, overwrite_option, parse)

RESTORE_OUTPUT = re.compile(r"^(\d+\.png|overview\.png|restore\.json)$")  # what the command writes to --out
EXAMPLES = (
    "python -m ambient_fast.restore --net runs/ambient --input ~/.cache/ambient-fast/synthetic-r16-n4096-p0.6-delta0.1"
    "-shared-seed0 --out restored",
    "python -m ambient_fast.restore --net runs/celeba --input observed/ --masks masks/ --clean clean/ --out restored",
    "python -m ambient_fast.restore --net runs/celeba --input data/celeba-p08 --max-images 64 --sigma 0.05 --add-noise",
)


@dataclass
class RestoreConfig(Options):
    """What `python -m ambient_fast.restore` restores, with what, and where it writes."""

    net: Optional[str] = option(None, "the network: a .safetensors checkpoint, one of our run folders, a reference "
                                ".pkl snapshot or run folder, or a diffusers UNet folder", required=True, role=INPUT)
    training_options: Optional[str] = option(None, "training_options.json of a reference snapshot", role=INPUT,
                                             default_text="the one beside the snapshot")
    input: Optional[str] = option(None, "prepared data set, or a folder of images (with --masks)", required=True,
                                  role=INPUT)
    masks: Optional[str] = option(None, "masks of the --input images: a folder of mask images named like them "
                                  "(white = observed) or a .npy of 0/1 masks", role=INPUT,
                                  default_text="none, --input is a prepared data set")
    out: str = option("restored", "output folder: one PNG per image, overview.png and restore.json", role=OUTPUT)
    overwrite: bool = overwrite_option("the images of an earlier restoration")
    clean: Optional[str] = option(None, "clean references for PSNR / LPIPS: a uint8 .npy (N, C, H, W) or an image "
                                  "folder", role=INPUT, default_text="the clean twin of the built-in synthetic set "
                                  "when --input is that set, else none")
    sigma: float = option(0.02, "noise level the network is evaluated at", bounds=above(0))
    add_noise: bool = option(False, "add N(0, sigma^2) to the observed pixels first (noisy measurements)")
    max_images: Optional[int] = option(None, "restore only the first N images", bounds=at_least(1),
                                       default_text="all")
    batch: int = option(256, "images per network evaluation", bounds=at_least(1))
    seed: int = option(0, "seed of the added noise (--add-noise)", bounds=GENERATOR_SEED_BOUNDS)
    device: str = device_option()


def parser():
    return build_parser(RestoreConfig, prog="python -m ambient_fast.restore", description=__doc__.split("\n\n")[0],
                        examples=EXAMPLES)


def main(argv=None) -> int:
    try:
        cfg = parse(RestoreConfig, parser(), argv)
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as scratch:
            return _run(cfg, Path(scratch))
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _clean_references(cfg: RestoreConfig, count: int):
    """The clean images of --clean or of the synthetic set's twin (uint8 (count, C, H, W)); None."""
    from pathlib import Path

    import numpy as np

    from ambient_fast.data.synthetic import clean_twin

    if cfg.clean:
        path = Path(cfg.clean)
        if path.suffix == ".npy":
            from ambient_fast.files.reading import regular_file

            try:
                clean = np.load(regular_file(path, "--clean"), allow_pickle=False)
            except EOFError:  # numpy's word for an empty file
                raise ValueError(f"--clean {path} is empty: give a .npy of the clean images") from None
        else:
            from ambient_fast.data.sources import ImageSource

            with ImageSource(path) as source:
                clean = source.read_all(range(len(source)))
    else:
        twin = clean_twin(Path(cfg.input)) / "images.npy"
        if not twin.is_file():
            return None
        print(f"clean references: {twin}")
        clean = np.load(twin)
    if len(clean) < count:
        raise ValueError(f"--clean holds {len(clean)} images, the input {count}")
    return clean[:count]


def _run(cfg: RestoreConfig, scratch) -> int:
    import math
    from pathlib import Path

    import numpy as np
    import torch

    from ambient_fast.data.format import CorruptedDataset
    from ambient_fast.data.prepare import import_masked
    from ambient_fast.evaluation.metrics import psnr
    from ambient_fast.evaluation.restoration import lpips_distance, restore
    from ambient_fast.files.atomic import check_output_place, claim_output, write_json
    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.files.images import from_uint8, grid, save_png, to_uint8
    from ambient_fast.memory import check_memory, sampling_bytes
    from ambient_fast.sampling.samplers import sampling_sigmas

    check_output_place(cfg.out, "--out", cfg.paths(INPUT))
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data_path = Path(cfg.input)
    if not cfg.masks and not (data_path / "meta.json").is_file():
        raise ValueError(f"{data_path} is not a prepared data set; pass --masks to restore a folder of images")
    loaded = load_network(cfg.net, cfg.training_options)
    # The network's own largest level (a diffusers schedule's, e.g. 157), else EDM's sampling range.
    covered = getattr(loaded.model, "sigma_max", math.inf)
    largest = covered if math.isfinite(covered) else sampling_sigmas(loaded)["sigma_max"]
    if cfg.sigma > largest:  # the network never saw it (and far above, float32 overflows)
        raise ValueError(f"--sigma {cfg.sigma:g} is above the largest noise level the network covers ({largest:g}): "
                         f"give a level in (0, {largest:g}]")
    model = loaded.model.to(device)
    # Before reading the images: an earlier restoration's outputs go (--overwrite), anything else stays.
    out = claim_output(cfg.out, "--out", owned=lambda entry: bool(RESTORE_OUTPUT.match(entry.name)),
                       what="restored images", overwrite=cfg.overwrite, inputs=cfg.paths(INPUT))
    if cfg.masks:
        data_path = import_masked(cfg.input, cfg.masks, scratch / "imported")
    dataset = CorruptedDataset(data_path)
    if model.img_channels != 2 * dataset.channels or model.img_resolution != dataset.resolution:
        raise ValueError(f"the network takes {model.img_channels // 2}x{model.img_resolution}x{model.img_resolution} "
                         f"images, the data set holds {dataset.channels}x{dataset.resolution}x{dataset.resolution}")
    count = min(len(dataset), cfg.max_images or len(dataset))
    C, R = dataset.channels, dataset.resolution
    check_memory(sampling_bytes(min(cfg.batch, count), C, R), f"--batch {cfg.batch} ({C}x{R}x{R} images)",
                 "lower --batch", device=str(device))
    clean = _clean_references(cfg, count) if not cfg.masks or cfg.clean else None

    from ambient_fast.training.console import WorkProgress

    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    restored, inputs = [], []
    with WorkProgress("restoring", count, "images") as progress:  # then writing: one more pass over the images
        for start in range(0, count, cfg.batch):
            indices = np.arange(start, min(start + cfg.batch, count))
            observed, mask, labels = dataset.get(indices)
            mask_t = torch.from_numpy(mask).float().to(device)
            y = from_uint8(torch.from_numpy(observed).to(device)) * mask_t
            label_t = torch.from_numpy(labels).to(device) if model.label_dim else None
            restored.append(to_uint8(restore(model, y, mask_t, cfg.sigma, label_t, generator, cfg.add_noise)))
            inputs.append(to_uint8(y))
            progress.update(advance=len(indices))
    restored, inputs = np.concatenate(restored), np.concatenate(inputs)
    with WorkProgress("writing", count, "images") as progress:
        for index, array in enumerate(restored):
            save_png(array, out / f"{index:06d}.png")
            progress.update(advance=1)

    shown = min(count, 32)
    rows = [inputs[:shown], restored[:shown]]
    report = dict(net=loaded.source, input=str(cfg.input), images=count, sigma=cfg.sigma, added_noise=cfg.add_noise)
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

    print(f"restored {count} images from {cfg.input} with {loaded.source} (one network evaluation each, "
          f"sigma {cfg.sigma}) -> {out}")
    print(f"  overview (inputs / restored{' / clean' if clean is not None else ''}): {out / 'overview.png'}")
    if clean is not None:
        print(f"  PSNR: restored {report['psnr_restored']:.2f} dB, corrupted input {report['psnr_input']:.2f} dB")
        print(f"  LPIPS: {report['lpips']:.4f}" if report["lpips"] is not None else f"  LPIPS: not computed: {report['lpips_note']}")
    else:
        print("  no clean references given (--clean): PSNR not computed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
