"""`python -m ambient_fast.sample --net PATH --out DIR --seeds 0-63`: generate images from an ambient
model (ours, a published reference snapshot, a fine-tuned diffusers UNet, or an EDM2 network).

One PNG per seed, each a function of its seed alone (not of its batch or rank; under torchrun the
seeds are split over the ranks), grid.png and sampling.json (the settings and the images written).
A plain EDM2 network (NVlabs/edm2's, which takes the image alone) samples with a mask of ones; a
model trained on latents (its training record names the autoencoder) samples latents, unclipped,
and decodes them (ambient_fast.data.latents). The samplers live in ambient_fast.sampling.
"""
import collections
import re
import sys
from dataclasses import dataclass
from typing import Optional

from ambient_fast.memory import check_memory, sampling_bytes, seeds_bytes
from ambient_fast.options import (GENERATOR_SEED_BOUNDS, INPUT, OUTPUT, SOLVERS, Options, at_least, between,
                                  build_parser, device_option, option, overwrite_option, parse)

SAMPLE_OUTPUT = re.compile(r"^(\d+\.png|grid\.png|sampling\.json)$")  # what the command writes to --out
EXAMPLES = (
    "python -m ambient_fast.sample --net runs/ambient --out samples --seeds 0-63",
    "python -m ambient_fast.sample --net published-run/network-snapshot-004000.pkl --out samples --seeds 0-999",
    "python -m ambient_fast.sample --net runs/ambient --out guided --guidance-masks 4 --guidance 0.05",
    "python -m ambient_fast.sample --net edm2-img512-s-2147483-0.130.pkl --autoencoder sd-vae/ --out samples --class 1",
    "torchrun --nproc_per_node=8 -m ambient_fast.sample --net runs/celeba --out samples --seeds 0-49999",
)


def seed_ranges(text: str) -> "list[range]":
    """'0-63', '5', '1,4,9-12' -> one range per part, each seed checked to lie in
    GENERATOR_SEED_BOUNDS (each image's generator keeps 32 bits of its seed); nothing expanded."""
    ranges = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-") if "-" in part else (part, "", part)
            first, last = int(first), int(last)
            if last < first:
                raise ValueError
            ranges.append(range(first, last + 1))
    except ValueError:
        raise ValueError(f"--seeds takes a list like '0-63' or '1,4,9-12', got {text!r}") from None
    outside = [r for r in ranges if r.start not in GENERATOR_SEED_BOUNDS or r.stop - 1 not in GENERATOR_SEED_BOUNDS]
    if outside:
        raise ValueError(f"--seeds {text}: seeds must be {GENERATOR_SEED_BOUNDS.describe(True)} (each image's "
                         "generator keeps 32 bits of its seed: larger seeds would repeat the images of smaller ones)")
    return ranges


def parse_seeds(text: str) -> "list[int]":
    """'0-63', '5', '1,4,9-12' -> list of seeds, each at most once (a seed names one image file). A
    list larger than the machine's memory is refused before it is made."""
    ranges = seed_ranges(text)
    count = sum(len(r) for r in ranges)
    check_memory(seeds_bytes(count, 0, 0), f"--seeds {text} ({count} seeds)", "sample fewer seeds at a time")
    seeds = [seed for r in ranges for seed in r]
    repeated = sorted(seed for seed, count in collections.Counter(seeds).items() if count > 1)
    if repeated:
        raise ValueError(f"--seeds {text} lists seed(s) {repeated[:5]} more than once; each seed is one image: "
                         "list every seed once")
    return seeds


@dataclass
class SampleConfig(Options):
    """What `python -m ambient_fast.sample` draws, and how."""

    net: Optional[str] = option(None, "the network: a .safetensors checkpoint, one of our run folders (its "
                                "network-final, else its newest snapshot), a reference .pkl snapshot or run folder, "
                                "or a diffusers UNet folder (e.g. OUT/unet-ema of python -m ambient_fast.finetune)",
                                required=True, role=INPUT)
    training_options: Optional[str] = option(None, "training_options.json of a reference snapshot", role=INPUT,
                                             default_text="the one beside the snapshot")
    autoencoder: Optional[str] = option(None, "the diffusers AutoencoderKL folder that decodes a latent model's "
                                        "samples (a plain EDM2 latent network: with EDM2's SD-VAE scaling)",
                                        role=INPUT, default_text="the one the model's training record names; none for "
                                        "pixel models")
    out: str = option("samples", "output folder: one PNG per seed, grid.png and sampling.json", role=OUTPUT)
    overwrite: bool = overwrite_option("the samples of an earlier sampling")
    seeds: str = option("0-63", "seeds, one image each, e.g. 0-63 or 1,4,9-12")
    batch: int = option(64, "images per network evaluation", bounds=at_least(1))
    steps: int = option(18, "solver steps", bounds=at_least(1))
    solver: str = option("heun", "ODE solver: heun (second order, Euler on the last step) or euler", choices=SOLVERS)
    survival: Optional[float] = option(None, "probability that the sampling mask keeps a pixel",
                                       bounds=between(0, 1, low_open=True),
                                       default_text="the training survival (1 - p)(1 - delta)")
    guidance_masks: int = option(1, "masks per image: 1 = the fixed-mask sampler, K > 1 adds reconstruction guidance "
                                    "from the other K - 1", bounds=at_least(1))
    guidance: float = option(0.0, "reconstruction-guidance scale (with --guidance-masks K > 1)", bounds=at_least(0))
    class_index: Optional[int] = option(None, "class index for a conditional model", flag="--class",
                                        bounds=at_least(0), default_text="none (an unconditional model)")
    churn: float = option(0.0, "EDM's S_churn (0: deterministic)", bounds=at_least(0))
    float32: bool = option(False, "exact path: keep the state in float32, not float64")
    exact: bool = option(False, "the reference-faithful path (float64 state) on a GPU too; the fast path (bf16 "
                                "network in a CUDA graph, float32 state) runs only on CUDA", per_device=("off", "on"))
    device: str = device_option()

    def __post_init__(self):
        super().__post_init__()
        parse_seeds(self.seeds)


def parser():
    return build_parser(SampleConfig, prog="python -m ambient_fast.sample", description=__doc__.split("\n\n")[0],
                        examples=EXAMPLES)


def sampling_settings(cfg: SampleConfig, device):
    """The command's device-dependent choices (memory format, sampler path), from its options."""
    from ambient_fast.training.settings import defaults_target, resolve_sampling

    return resolve_sampling(device, exact=cfg.exact, guidance=cfg.guidance, churn=cfg.churn,
                            target=defaults_target(device))


def main(argv=None) -> int:
    try:
        cfg = parse(SampleConfig, parser(), argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return sample(cfg)


def sample(cfg: SampleConfig) -> int:
    """Check everything, then draw and write the images; 1 with one `error:` line for bad input."""
    from pathlib import Path

    import torch

    from ambient_fast.files.atomic import check_output_place, claim_output, write_json
    from ambient_fast.files.checkpoints import load_network
    from ambient_fast.files.images import grid, load_png, save_png, to_uint8
    from ambient_fast.sampling.samplers import PerSeedGenerators, ambient_sample, sampling_sigmas
    from ambient_fast.training.console import WorkProgress
    from ambient_fast.training.distributed import close_world, init_world
    from ambient_fast.training.reporting import progress_per_evaluation, sampler_evaluations

    try:
        seeds = parse_seeds(cfg.seeds)
        check_output_place(cfg.out, "--out", cfg.paths(INPUT))
        world, device = init_world(cfg.device)
        settings = sampling_settings(cfg, device)
        loaded = load_network(cfg.net, cfg.training_options)
        # channels_last on GPUs: cuDNN's fast layout for bf16 convolutions (the fused kernels read either)
        model, codec, survival, clip = sampling_model(loaded, cfg, device, settings.memory_format)
        C, R = model.img_channels // 2, model.img_resolution
        check_memory(seeds_bytes(len(seeds), C, R), f"--seeds {cfg.seeds} ({len(seeds)} images of {C}x{R}x{R})",
                     "sample fewer seeds at a time")
        # The fast path pads every batch to --batch; the exact one samples at most the seeds given.
        batch = cfg.batch if settings.fast else min(cfg.batch, len(seeds))
        check_memory(sampling_bytes(batch, C, R, cfg.guidance_masks),
                     f"--batch {cfg.batch} with --guidance-masks {cfg.guidance_masks} ({C}x{R}x{R} images)",
                     "lower --batch or --guidance-masks", device=str(device))
        if model.label_dim and (cfg.class_index is None or not 0 <= cfg.class_index < model.label_dim):
            raise ValueError(f"this model is conditional on {model.label_dim} classes: pass --class in "
                             f"0..{model.label_dim - 1}")
        # Last of the checks, before any sampling: --overwrite deletes an earlier sampling's images, and
        # without it stale images of another sampling must not mix with ours.
        if world.is_main:
            claim_output(cfg.out, "--out", owned=lambda entry: bool(SAMPLE_OUTPUT.match(entry.name)), what="samples",
                         overwrite=cfg.overwrite, inputs=cfg.paths(INPUT))
        world.barrier()
    except (OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    channels = model.img_channels // 2
    shape = (channels, model.img_resolution, model.img_resolution)
    labels = None

    out = Path(cfg.out)
    mine = seeds[world.rank::world.size]
    shared = bool(loaded.corruption.get("shared_channels", False))
    fast = settings.fast
    if world.is_main:
        print(f"sampling {len(seeds)} images from {loaded.source} on {device} ({world.size} process(es)): "
              f"{cfg.steps} {cfg.solver} steps, survival {survival:.3f}, {cfg.guidance_masks} mask(s), "
              f"guidance {cfg.guidance}, {'fast' if fast else 'exact'} path ({settings.describe()})")
    # Progress in images, moved per network evaluation on the CPU (this rank's images: the ranks go at one pace).
    evaluations = sampler_evaluations(cfg.steps, cfg.solver, cfg.guidance_masks if cfg.guidance else 1)
    with WorkProgress("sampling", len(mine), "images", enabled=world.is_main) as progress:
        for start in range(0, len(mine), cfg.batch):
            batch_seeds = mine[start:start + cfg.batch]
            # The fast path pads every batch to --batch: one static shape, so the same kernels run
            # whatever batch an image lands in (padding images are dropped).
            padded = list(batch_seeds) + [0] * ((cfg.batch - len(batch_seeds)) if fast else 0)
            generators = PerSeedGenerators(padded)  # latents, masks and churn noise: one stream per seed
            latents, masks = generators.sampling_inputs(shape, cfg.guidance_masks, survival, shared, device)
            if model.label_dim:
                labels = torch.nn.functional.one_hot(torch.full((len(padded),), cfg.class_index),
                                                     model.label_dim).float().to(device)
            with progress_per_evaluation(model, len(batch_seeds), evaluations,
                                         lambda done: progress.update(completed=done), done=start):
                images = ambient_sample(model, latents, masks, num_steps=cfg.steps, solver=cfg.solver,
                                        guidance=cfg.guidance, class_labels=labels, S_churn=cfg.churn,
                                        randn_like=generators.randn_like, clip=clip,
                                        dtype=torch.float32 if cfg.float32 else torch.float64, fast=fast,
                                        **sampling_sigmas(loaded))
            arrays = to_uint8(images) if codec is None else codec.images(images[: len(batch_seeds)])
            for seed, array in zip(batch_seeds, arrays):
                save_png(array, out / f"{seed:06d}.png")
    world.barrier()
    if world.is_main:
        save_png(grid([load_png(out / f"{seed:06d}.png") for seed in seeds]), out / "grid.png")
        write_json(out / "sampling.json", dict(
            net=str(loaded.source), seeds=cfg.seeds, images=[f"{seed:06d}.png" for seed in seeds], steps=cfg.steps,
            solver=cfg.solver, survival=survival, guidance_masks=cfg.guidance_masks, guidance=cfg.guidance,
            churn=cfg.churn, class_index=cfg.class_index, **sampling_sigmas(loaded),
            **({} if codec is None else {"autoencoder": str(codec.folder)})))
        print(f"wrote {len(seeds)} images and {out / 'grid.png'}")
    close_world()
    return 0


def sampling_model(loaded, cfg: SampleConfig, device, memory_format):
    """(the ambient denoiser to sample with, the LatentCodec that decodes its samples or None, the
    sampling mask's survival, whether to clamp each prediction to [-1, 1]) for a loaded network;
    ValueError for options that do not fit it. Ambient pixel models clamp, as the reference's sampler
    does; latents and plain EDM2 networks do not, as EDM2's sampler does not (`edm2_sample`)."""
    from ambient_fast.data.latents import LatentCodec
    from ambient_fast.networks import EDM2Precond
    from ambient_fast.sampling.edm2 import plain_denoiser

    model = loaded.model.to(device, memory_format=memory_format)
    survival = cfg.survival if cfg.survival is not None else loaded.survival
    plain = isinstance(model, EDM2Precond) and not model.ambient
    if plain:  # takes the image alone: no mask to sample with
        if cfg.survival not in (None, 1.0) or cfg.guidance_masks > 1:
            raise ValueError("a plain EDM2 network takes no mask: drop --survival and --guidance-masks")
        model, survival = plain_denoiser(model), 1.0
    if survival is None:
        raise ValueError("the checkpoint does not record its training corruption; pass --survival")
    record = loaded.corruption.get("latent")
    codec = None
    if record is not None:
        codec = LatentCodec.from_record(record, cfg.autoencoder, device, what=f"the training latents of {cfg.net}")
    elif cfg.autoencoder is not None:
        codec = LatentCodec.load(cfg.autoencoder, device=device)  # EDM2's SD-VAE scaling
    channels = model.img_channels // 2
    if codec is not None and codec.channels != channels:
        raise ValueError(f"the network makes {channels}-channel samples, the autoencoder in {codec.folder} decodes "
                         f"{codec.channels}-channel latents: give the autoencoder the model was trained with")
    if codec is None and channels not in (1, 3):
        raise ValueError(f"the network makes {channels}-channel samples, which are not images: if they are latents, "
                         "give --autoencoder DIR (the diffusers AutoencoderKL that decodes them)")
    return model, codec, survival, codec is None and not plain


if __name__ == "__main__":
    sys.exit(main())
