"""`python -m ambient_fast.restore --net PATH --input DATA --out DIR`: restore corrupted images.

Two methods. `--method one-step` (the paper's Table 1 use; ambient_fast.evaluation.restoration): one
network evaluation per image, the observed pixels and their mask shown at a small noise level
sigma, the conditional mean E[x0 | y] returned. `--method posterior`: samples of p(x0 | y) with the
model as the prior (ambient_fast.sampling.posterior through ambient_fast.sampling.restoration),
`--samples K` per image with their mean and per-pixel spread; sample k of image i comes from the seed
(--seed, i, k) alone, whatever the batch. The input is a prepared data set (`python -m
ambient_fast.prepare`), a folder of images with `--masks`, or an .npy of measurements (N, *measured
shape) on the [-1, 1] scale with `--operator FILE.json` (gaussian_cs, block_averaging, blur,
downsampling; posterior only). It writes one PNG per image (the restoration, or with K > 1 the mean,
the spread and the samples), overview.png (the measurements beside the restorations) and
restore.json; with clean references (`--clean`, or the clean twin of the built-in synthetic set,
found automatically) PSNR, SSIM, and LPIPS where the `lpips` package and its weights are local.
"""
import re
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.options import (GENERATOR_SEED_BOUNDS, INPUT, OUTPUT, POSTERIOR_METHODS, SOLVERS, Options, above,
                                  at_least, between, build_parser, device_option, option, overwrite_option, parse)

# What the command writes to --out.
RESTORE_OUTPUT = re.compile(r"^(\d+(-spread|-samples)?\.png|overview\.png|restore\.json)$")
EXAMPLES = (
    "python -m ambient_fast.restore --net runs/ambient --input ~/.cache/ambient-fast/synthetic-r16-n4096-p0.6-delta0.1"
    "-shared-seed0 --out restored",
    "python -m ambient_fast.restore --net runs/ambient --input DATA --method posterior --posterior ambient --samples 8 "
    "--max-images 16 --out posterior",
    "python -m ambient_fast.restore --net runs/celeba --input observed/ --masks masks/ --clean clean/ --out restored",
    "python -m ambient_fast.restore --net runs/celeba --input y.npy --operator cs.json --method posterior --out cs",
)


@dataclass
class RestoreConfig(Options):
    """What `python -m ambient_fast.restore` restores, with what, and where it writes."""

    net: Optional[str] = option(None, "the network: a .safetensors checkpoint, one of our run folders, a reference "
                                ".pkl snapshot or run folder, or a diffusers UNet folder", required=True, role=INPUT)
    training_options: Optional[str] = option(None, "training_options.json of a reference snapshot", role=INPUT,
                                             default_text="the one beside the snapshot")
    input: Optional[str] = option(None, "prepared data set, a folder of images (with --masks) or an .npy of "
                                  "measurements (with --operator)", required=True, role=INPUT)
    masks: Optional[str] = option(None, "masks of the --input images: a folder of mask images named like them "
                                  "(white = observed) or a .npy of 0/1 masks", role=INPUT,
                                  default_text="none, --input is a prepared data set")
    operator: Optional[str] = option(None, "JSON description of the measurement operator of an .npy --input, e.g. "
                                     '{"kind": "gaussian_cs", "m": 256, "seed": 0} (kinds: gaussian_cs, '
                                     "block_averaging (factor), blur (kernel, or size and gaussian_sd), downsampling "
                                     "(factor); optional noise_level)", role=INPUT, default_text="none")
    out: str = option("restored", "output folder: one PNG per image, overview.png and restore.json", role=OUTPUT)
    overwrite: bool = overwrite_option("the images of an earlier restoration")
    clean: Optional[str] = option(None, "clean references for PSNR / SSIM / LPIPS: a uint8 .npy (N, C, H, W) or an "
                                  "image folder", role=INPUT, default_text="the clean twin of the built-in synthetic "
                                  "set when --input is that set, else none")
    method: str = option("one-step", "one-step: one network evaluation, the conditional mean; posterior: samples of "
                         "p(x0 | y)", choices=("one-step", "posterior"))
    posterior: str = option("tweedie", "posterior method: tweedie (Tweedie moments, conjugate gradients through the "
                            "network; any operator), ambient (masks: the network sees the measurement's own mask, "
                            "one call per step), dps (diffusion posterior sampling)", choices=POSTERIOR_METHODS)
    samples: int = option(1, "posterior samples per image (K > 1: their mean, spread and the samples are written)",
                          bounds=at_least(1))
    steps: int = option(18, "posterior: solver steps", bounds=at_least(1))
    solver: str = option("heun", "posterior: ODE solver", choices=SOLVERS)
    noise_level: Optional[float] = option(None, "posterior: the measurements' Gaussian noise level on the [-1, 1] "
                                          "scale", bounds=at_least(0), default_text="the operator's noise_level for "
                                          ".npy measurements, --sigma with --add-noise, else 0")
    survival: Optional[float] = option(None, "posterior: probability that the prior's sampling mask keeps a pixel",
                                       bounds=between(0, 1, low_open=True),
                                       default_text="the training survival, as python -m ambient_fast.sample")
    cg_iterations: int = option(8, "posterior tweedie: conjugate-gradient iterations per evaluation",
                                bounds=at_least(1))
    dps_scale: float = option(0.1, "posterior dps: step scale (depends on the steps and image size: tune it)",
                              bounds=above(0))
    sigma: float = option(0.02, "one-step: noise level the network is evaluated at", bounds=above(0))
    add_noise: bool = option(False, "add N(0, sigma^2) to the observed pixels first (noisy measurements; image i's "
                                    "noise from --seed and i)")
    max_images: Optional[int] = option(None, "restore only the first N images", bounds=at_least(1),
                                       default_text="all")
    batch: int = option(256, "images (posterior: samples) per network evaluation", bounds=at_least(1))
    seed: int = option(0, "seed of the posterior samples and of the added noise", bounds=GENERATOR_SEED_BOUNDS)
    exact: bool = option(False, "posterior: the exact path (float64 state) on a GPU too; the fast path (bf16 "
                                "network, float32 state) runs only on CUDA", per_device=("off", "on"))
    device: str = device_option()

    def __post_init__(self):
        super().__post_init__()
        if self.operator and self.method != "posterior":
            raise ValueError("--operator measurements are restored by --method posterior (one-step takes masks)")
        if self.operator and self.masks:
            raise ValueError("give --masks (images with masks) or --operator (.npy measurements), not both")
        if self.samples > 1 and self.method != "posterior":
            raise ValueError("--samples K draws posterior samples: add --method posterior")


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


def _source(cfg: RestoreConfig, shape, label_dim: int, scratch):
    """The measured images of --input: MaskedImages of a prepared set (or of an imported image folder
    with --masks), or MeasuredArray of an .npy with --operator."""
    import numpy as np

    from ambient_fast.data.format import CorruptedDataset
    from ambient_fast.data.prepare import import_masked
    from ambient_fast.sampling.restoration import MaskedImages, MeasuredArray, read_operator

    if cfg.operator:
        if label_dim:
            raise ValueError("a class-conditional model restores prepared sets (their labels), not .npy measurements")
        return MeasuredArray(np.load(cfg.input, mmap_mode="r", allow_pickle=False), read_operator(cfg.operator), shape)
    dataset = CorruptedDataset(import_masked(cfg.input, cfg.masks, scratch / "imported") if cfg.masks else cfg.input)
    if dataset.shape != shape:
        raise ValueError(f"the network takes {'x'.join(map(str, shape))} images, the data set holds "
                         f"{'x'.join(map(str, dataset.shape))}")
    return MaskedImages(dataset, add_noise=cfg.sigma if cfg.add_noise else 0.0, seed=cfg.seed)


def _check_input(cfg: RestoreConfig) -> None:
    """What --input must be for the other options given (before the network is read)."""
    from pathlib import Path

    data_path = Path(cfg.input)
    if cfg.operator:
        if data_path.suffix != ".npy" or not data_path.is_file():
            raise ValueError(f"--operator describes the measurements of an .npy --input; {data_path} is not an .npy file")
    elif not cfg.masks and not (data_path / "meta.json").is_file():
        raise ValueError(f"{data_path} is not a prepared data set; pass --masks to restore a folder of images, or "
                         "--operator for an .npy of measurements")


def _posterior_settings(cfg: RestoreConfig, loaded, source, fast: bool):
    from ambient_fast.sampling.restoration import MeasuredArray, PosteriorSettings, posterior_method
    from ambient_fast.sampling.samplers import sampling_sigmas

    if cfg.posterior == "ambient" and isinstance(source, MeasuredArray):
        raise ValueError("--posterior ambient feeds the network the measurement's mask: it restores masked images; "
                         "use tweedie or dps for --operator measurements")
    survival = cfg.survival if cfg.survival is not None else loaded.survival
    if survival is None:
        raise ValueError("the checkpoint does not record its training corruption; pass --survival")
    if cfg.noise_level is not None:
        noise_level = cfg.noise_level
    elif isinstance(source, MeasuredArray):
        noise_level = float(source.description["noise_level"])
    else:
        noise_level = cfg.sigma if cfg.add_noise else 0.0
    sigmas = sampling_sigmas(loaded)
    method = posterior_method(cfg.posterior, cg_iterations=cfg.cg_iterations, dps_scale=cfg.dps_scale,
                              sigma_floor=sigmas["sigma_min"])
    return PosteriorSettings(method, noise_level, survival, bool(loaded.corruption.get("shared_channels", False)),
                             num_steps=cfg.steps, solver=cfg.solver, fast=fast, **sigmas)


def _run(cfg: RestoreConfig, scratch) -> int:
    import math
    import time

    import numpy as np
    import torch

    from ambient_fast.evaluation.metrics import psnr, ssim
    from ambient_fast.evaluation.restoration import lpips_distance, restore
    from ambient_fast.files.atomic import check_output_place, claim_output, write_json
    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.files.images import from_uint8, grid, save_png, to_uint8
    from ambient_fast.memory import check_memory, sampling_bytes
    from ambient_fast.sampling.restoration import MaskedImages, least_squares, posterior_restorations
    from ambient_fast.sampling.samplers import sampling_sigmas
    from ambient_fast.training.settings import defaults_target, resolve_sampling
    from ambient_fast.training.console import WorkProgress

    check_output_place(cfg.out, "--out", cfg.paths(INPUT))
    _check_input(cfg)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = resolve_sampling(device, exact=cfg.exact, target=defaults_target(device))
    loaded = load_network(cfg.net, cfg.training_options)
    # The network's own largest level (a diffusers schedule's, e.g. 157), else EDM's sampling range.
    covered = getattr(loaded.model, "sigma_max", math.inf)
    largest = covered if math.isfinite(covered) else sampling_sigmas(loaded)["sigma_max"]
    if cfg.sigma > largest:  # the network never saw it (and far above, float32 overflows)
        raise ValueError(f"--sigma {cfg.sigma:g} is above the largest noise level the network covers ({largest:g}): "
                         f"give a level in (0, {largest:g}]")
    model = loaded.model.to(device, memory_format=settings.memory_format)
    shape = (model.img_channels // 2, model.img_resolution, model.img_resolution)
    # Before reading the images: an earlier restoration's outputs go (--overwrite), anything else stays.
    out = claim_output(cfg.out, "--out", owned=lambda entry: bool(RESTORE_OUTPUT.match(entry.name)),
                       what="restored images", overwrite=cfg.overwrite, inputs=cfg.paths(INPUT))
    source = _source(cfg, shape, model.label_dim, scratch)
    posterior = _posterior_settings(cfg, loaded, source, settings.fast) if cfg.method == "posterior" else None
    count = min(source.count, cfg.max_images or source.count)
    C, R = shape[0], shape[1]
    check_memory(sampling_bytes(min(cfg.batch, count * cfg.samples), C, R), f"--batch {cfg.batch} ({C}x{R}x{R} images)",
                 "lower --batch", device=str(device))
    clean = _clean_references(cfg, count) if not cfg.masks or cfg.clean else None
    if clean is not None and clean.shape[1:] != shape:
        raise ValueError(f"--clean holds {'x'.join(map(str, clean.shape[1:]))} images, the network restores "
                         f"{'x'.join(map(str, shape))}")

    # What each measurement says without a prior: the observed pixels of a mask, else least squares.
    inputs = []
    for start in range(0, count, cfg.batch):
        measurement, y, _ = source.measurements(np.arange(start, min(start + cfg.batch, count)), device, torch.float64)
        inputs.append(to_uint8(y if isinstance(source, MaskedImages) else least_squares(measurement, y)))
    inputs = np.concatenate(inputs)

    restored, spreads = np.empty((count, shape[1], shape[2], shape[0]), np.uint8), []
    began = time.perf_counter()
    with WorkProgress("restoring", count, "images") as progress:
        if posterior is None:
            for start in range(0, count, cfg.batch):
                measurement, y, labels = source.measurements(np.arange(start, min(start + cfg.batch, count)),
                                                             device, torch.float32)
                result = restore(model, y, measurement.mask, cfg.sigma, labels if model.label_dim else None)
                restored[start:start + len(y)] = to_uint8(result)
                for index in range(start, start + len(y)):
                    save_png(restored[index], out / f"{index:06d}.png")
                progress.update(advance=len(y))
        else:
            for index, samples in posterior_restorations(model, source, range(count), samples=cfg.samples, seed=cfg.seed,
                                                         batch=cfg.batch, settings=posterior, device=device):
                restored[index] = to_uint8(samples.mean(0, keepdim=True))[0]
                save_png(restored[index], out / f"{index:06d}.png")
                if cfg.samples > 1:
                    # The spread: each value's standard deviation over the samples, x 255 (sd 1 = the full range).
                    spread = (samples.std(0) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                    spreads.append(spread)
                    save_png(spread, out / f"{index:06d}-spread.png")
                    save_png(grid(list(to_uint8(samples)), columns=cfg.samples), out / f"{index:06d}-samples.png")
                progress.update(advance=1)
    seconds = time.perf_counter() - began

    shown = min(count, 32)
    rows = [inputs[:shown], restored[:shown]] + ([np.stack(spreads[:shown])] if spreads else [])
    report = dict(net=loaded.source, input=str(cfg.input), operator=getattr(source, "description", None),
                  images=count, method=cfg.method, added_noise=cfg.add_noise, seed=cfg.seed,
                  images_per_second=count / max(seconds, 1e-9))
    if posterior is None:
        report.update(sigma=cfg.sigma)
    else:
        report.update(posterior=cfg.posterior, samples=cfg.samples, steps=cfg.steps, solver=cfg.solver,
                      noise_level=posterior.noise_level, survival=posterior.survival, fast=posterior.fast,
                      sigma_min=posterior.sigma_min, sigma_max=posterior.sigma_max)
        if spreads:
            report.update(mean_spread=float(np.mean([s.mean() for s in spreads]) / 255))
    if clean is not None:
        clean_hwc = np.ascontiguousarray(clean.transpose(0, 2, 3, 1))
        rows.append(clean_hwc[:shown])
        nchw = np.ascontiguousarray(restored.transpose(0, 3, 1, 2))
        report.update(psnr_restored=float(psnr(restored, clean_hwc).mean()),
                      psnr_input=float(psnr(inputs, clean_hwc).mean()))
        if min(shape[1:]) >= 11:
            report.update(ssim_restored=float(ssim(nchw, clean).mean()),
                          ssim_input=float(ssim(np.ascontiguousarray(inputs.transpose(0, 3, 1, 2)), clean).mean()))
        value, why = lpips_distance(from_uint8(torch.from_numpy(nchw)), from_uint8(torch.from_numpy(clean)))
        report.update(lpips=value, lpips_note=why)
    columns = math.ceil(math.sqrt(shown))
    panels = [grid(list(r), columns=columns) for r in rows]
    gap = np.full((4, panels[0].shape[1], panels[0].shape[2]), 255, np.uint8)
    save_png(np.concatenate([part for p in panels for part in (p, gap)][:-1]), out / "overview.png")
    write_json(out / "restore.json", report)

    what = (f"one network evaluation each, sigma {cfg.sigma}" if posterior is None else
            f"{cfg.samples} {cfg.posterior} posterior sample(s) each, {cfg.steps} {cfg.solver} steps, noise level "
            f"{posterior.noise_level:g}, {'fast' if posterior.fast else 'exact'} path: {settings.describe()}")
    print(f"restored {count} images from {cfg.input} with {loaded.source} ({what}) -> {out} "
          f"({report['images_per_second']:.2f} images/s)")
    print(f"  overview (measurements / restored{' / spread' if spreads else ''}{' / clean' if clean is not None else ''}):"
          f" {out / 'overview.png'}")
    if clean is not None:
        print(f"  PSNR: restored {report['psnr_restored']:.2f} dB, measurements {report['psnr_input']:.2f} dB")
        if "ssim_restored" in report:
            print(f"  SSIM: restored {report['ssim_restored']:.4f}, measurements {report['ssim_input']:.4f}")
        print(f"  LPIPS: {report['lpips']:.4f}" if report["lpips"] is not None else f"  LPIPS: not computed: {report['lpips_note']}")
    else:
        print("  no clean references given (--clean): PSNR not computed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
