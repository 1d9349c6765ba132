"""`python -m ambient_fast.sample --net PATH --out DIR --seeds 0-63`: generate images from an ambient
model (ours, a published reference snapshot, or a fine-tuned diffusers UNet). The samplers live in
ambient_fast.sampling."""
import collections
import re

import torch

from ambient_fast.sampling.samplers import PerSeedGenerators, ambient_sample, sampling_sigmas
from ambient_fast.training.settings import SamplingSettings, defaults_target, resolve_sampling

SAMPLE_OUTPUT = re.compile(r"^(\d+\.png|grid\.png|sampling\.json)$")  # what the command writes to --out


def parse_seeds(text: str) -> "list[int]":
    """'0-63', '5', '1,4,9-12' -> list of seeds, each at most once (a seed names one image file)."""
    seeds = []
    try:
        for part in text.split(","):
            if "-" in part:
                first, last = (int(v) for v in part.split("-", 1))
                if last < first:
                    raise ValueError
                seeds.extend(range(first, last + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds takes a list like '0-63' or '1,4,9-12', got {text!r}") from None
    repeated = sorted(seed for seed, count in collections.Counter(seeds).items() if count > 1)
    if repeated:
        raise ValueError(f"--seeds {text} lists seed(s) {repeated[:5]} more than once; each seed is one image: "
                         "list every seed once")
    return seeds


def sampling_settings(args, device: torch.device) -> SamplingSettings:
    """The command's device-dependent choices (memory format, sampler path), from its options."""
    return resolve_sampling(device, exact=args.exact, guidance=args.guidance, churn=args.churn,
                            target=defaults_target(device))


def main(argv=None) -> int:
    import argparse
    import sys
    from pathlib import Path

    from rich.progress import Progress

    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.training.distributed import close_world, init_world
    from ambient_fast.files.atomic import claim_output_dir, write_json
    from ambient_fast.files.images import grid, load_png, save_png, to_uint8

    parser = argparse.ArgumentParser(prog="python -m ambient_fast.sample",
                                     description="Generate images from an ambient model (ours or a reference snapshot).")
    parser.add_argument("--net", required=True, help=".safetensors checkpoint, reference .pkl snapshot or run directory, "
                        "or a diffusers UNet directory (e.g. OUT/unet-ema of python -m ambient_fast.finetune)")
    parser.add_argument("--training-options", help="training_options.json of a reference snapshot, if not beside it")
    parser.add_argument("--out", required=True, help="output directory for one PNG per seed and grid.png (refused "
                        "when it holds files, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the samples of an earlier run in --out")
    parser.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,4,9-12 (default 0-63)")
    parser.add_argument("--batch", type=int, default=64, help="images per network evaluation (default 64)")
    parser.add_argument("--steps", type=int, default=18, help="solver steps (default 18)")
    parser.add_argument("--solver", choices=["heun", "euler"], default="heun")
    parser.add_argument("--survival", type=float, help="probability that the sampling mask keeps a pixel "
                        "(default: the training survival (1 - p)(1 - delta))")
    parser.add_argument("--masks", type=int, default=1, help="masks per image: 1 = fixed mask, K > 1 adds "
                        "reconstruction guidance from the other K - 1 (default 1)")
    parser.add_argument("--guidance", type=float, default=0.0, help="reconstruction-guidance scale (default 0)")
    parser.add_argument("--class", dest="class_index", type=int, help="class index for a conditional model")
    parser.add_argument("--churn", type=float, default=0.0, help="EDM's S_churn (default 0: deterministic)")
    parser.add_argument("--float32", action="store_true", help="exact path: keep the state in float32, not float64")
    parser.add_argument("--exact", action="store_true", help="the reference-faithful path on a GPU too (default there: "
                        "the fast path, bf16 network in a CUDA graph, float32 state)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    args = parser.parse_args(argv)

    try:
        seeds = parse_seeds(args.seeds)
        if args.batch < 1 or args.steps < 1 or args.masks < 1:
            raise ValueError("--batch, --steps and --masks must be at least 1")
        world, device = init_world(args.device)
        settings = sampling_settings(args, device)
        loaded = load_network(args.net, args.training_options)
        # channels_last on GPUs: cuDNN's fast layout for bf16 convolutions (the fused kernels read either)
        model = loaded.model.to(device, memory_format=settings.memory_format)
        survival = args.survival if args.survival is not None else loaded.survival
        if survival is None:
            raise ValueError("the checkpoint does not record its training corruption; pass --survival")
        if not 0 < survival <= 1:
            raise ValueError(f"--survival must be in (0, 1], got {survival}")
        if model.label_dim and (args.class_index is None or not 0 <= args.class_index < model.label_dim):
            raise ValueError(f"this model is conditional on {model.label_dim} classes: pass --class in "
                             f"0..{model.label_dim - 1}")
        # Last of the checks, before any sampling: --overwrite deletes an earlier sampling's images, and
        # without it stale images of another sampling must not mix with ours.
        if world.is_main:
            claim_output_dir(args.out, "--out", owned=SAMPLE_OUTPUT.match, what="samples", overwrite=args.overwrite)
        world.barrier()
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    channels = model.img_channels // 2
    shape = (channels, model.img_resolution, model.img_resolution)
    labels = None

    out = Path(args.out)
    mine = seeds[world.rank::world.size]
    shared = bool(loaded.corruption.get("shared_channels", False))
    fast = settings.fast
    if world.is_main:
        print(f"sampling {len(seeds)} images from {loaded.source} on {device} ({world.size} process(es)): "
              f"{args.steps} {args.solver} steps, survival {survival:.3f}, {args.masks} mask(s), guidance {args.guidance}, "
              f"{'fast' if fast else 'exact'} path ({settings.describe()})")
    with Progress(disable=not world.is_main) as progress:
        task = progress.add_task("sampling", total=len(mine))
        for start in range(0, len(mine), args.batch):
            batch_seeds = mine[start:start + args.batch]
            # The fast path pads every batch to --batch: one static shape, so the same kernels run
            # whatever batch an image lands in (padding images are dropped).
            padded = list(batch_seeds) + [0] * ((args.batch - len(batch_seeds)) if fast else 0)
            generators = PerSeedGenerators(padded)  # latents, masks and churn noise: one stream per seed
            latents, masks = generators.sampling_inputs(shape, args.masks, survival, shared, device)
            if model.label_dim:
                labels = torch.nn.functional.one_hot(torch.full((len(padded),), args.class_index),
                                                     model.label_dim).float().to(device)
            images = ambient_sample(model, latents, masks, num_steps=args.steps, solver=args.solver,
                                    guidance=args.guidance, class_labels=labels, S_churn=args.churn,
                                    randn_like=generators.randn_like,
                                    dtype=torch.float32 if args.float32 else torch.float64, fast=fast,
                                    **sampling_sigmas(loaded))
            for seed, array in zip(batch_seeds, to_uint8(images)):
                save_png(array, out / f"{seed:06d}.png")
            progress.advance(task, len(batch_seeds))
    world.barrier()
    if world.is_main:
        save_png(grid([load_png(out / f"{seed:06d}.png") for seed in seeds]), out / "grid.png")
        write_json(out / "sampling.json", dict(
            net=str(loaded.source), seeds=args.seeds, images=[f"{seed:06d}.png" for seed in seeds], steps=args.steps,
            solver=args.solver, survival=survival, masks=args.masks, guidance=args.guidance, churn=args.churn,
            class_index=args.class_index, **sampling_sigmas(loaded)))
        print(f"wrote {len(seeds)} images and {out / 'grid.png'}")
    close_world()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
