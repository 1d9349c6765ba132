"""Samplers for ambient models (Daras et al. 2023, section 3.2): EDM's Euler / Heun solver with a
fixed mask, optionally with reconstruction guidance from further masks.

The model was trained to predict E[x0 | A_hat x_t, A_hat]; the fixed-mask sampler uses that, for
one mask M_0 drawn once, in place of E[x0 | x_t]. Reconstruction guidance adds the gradient of
`K * sum_j 0.5 ||D_0(x, t) - D_j(x, t)||^2` over the other masks, which pulls the predictions
made from different masks together (the factor K and the sum over the whole batch are the
reference's, and its published samples depend on them).

Everything here is a pure function of its inputs: latents, masks and the churn noise source
decide the result, so each image depends only on its own seed.
"""
import collections
import math
import re
from typing import Callable, Optional

import torch

from ambient_fast.graphs import StaticDenoiser
from ambient_fast.kernels import fused_device, sampler_step


def edm_sigma_steps(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """EDM's noise levels t_0 > ... > t_{N-1} = sigma_min, with t_N = 0 appended: (num_steps + 1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    denominator = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denominator * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def ambient_sample(
    net: torch.nn.Module,
    latents: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: str = "heun",
    guidance: float = 0.0,
    class_labels: Optional[torch.Tensor] = None,
    clip: bool = True,
    dtype: torch.dtype = torch.float64,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    fast: bool = False,
) -> torch.Tensor:
    """Sample from an ambient model with a fixed mask (K = 1) or with reconstruction guidance (K > 1).

    Args:
        net: ambient denoiser, `net(cat([M * x, M]) (B, 2C, H, W), sigma, class_labels)` whose first C
            output channels are the denoised image.
        latents: (B, C, H, W) standard normal latents, one per image (per seed).
        masks: (K, B, C, H, W) 0/1 masks. Mask 0 drives the update; masks 1..K-1 the guidance term.
        num_steps, sigma_min, sigma_max, rho: EDM's noise-level discretisation.
        solver: "heun" (2nd order, Euler on the last step) or "euler".
        guidance: scale w of the reconstruction-guidance gradient; 0 disables it (and autograd).
        class_labels: (B, label_dim) or None.
        clip: clamp every prediction to [-1, 1] (the reference's default).
        dtype: dtype of the sampler state (float64 like the reference, or float32).
        S_churn, S_min, S_max, S_noise: EDM's stochastic churn; S_churn = 0 is deterministic.
        randn_like: noise source for churn; pass a per-seed generator to keep images independent of
            their batch.
        fast: the fast path (fixed mask, no churn): float32 state, the network in bf16, its call
            captured in a CUDA graph on GPUs, the elementwise work of each step fused. Off: the
            reference-faithful path.
    Returns:
        (B, C, H, W) samples in `dtype`: the last step's prediction D_0.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    if masks.ndim != 5 or masks.shape[1:] != latents.shape:
        raise ValueError(f"masks must have shape (K, *latents.shape) = (K, {', '.join(map(str, latents.shape))}), "
                         f"got {tuple(masks.shape)}")
    if fast:
        if guidance != 0 or S_churn != 0:
            raise ValueError("the fast path samples with a fixed mask and no churn; use fast=False (--exact) "
                             "for reconstruction guidance or churn")
        dtype = torch.float32
    channels = latents.shape[1]
    masks = masks.to(device=latents.device, dtype=dtype)
    use_guidance = guidance != 0 and masks.shape[0] > 1
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=latents.device)

    def denoise(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = net(torch.cat([mask * x, mask], dim=1), t, class_labels)[:, :channels].to(dtype)
        return out.clamp(-1, 1) if clip else out

    def increment(x: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """dt * (x - D_0(x, t)) / t, minus w * grad_x E(x, t) when guidance is on."""
        if not use_guidance:
            return dt * (x - denoise(x, t, masks[0])) / t
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            d0 = denoise(x, t, masks[0])
            energy = masks.shape[0] * sum(0.5 * (d0 - denoise(x, t, m)).square().sum() for m in masks[1:])
            (grad,) = torch.autograd.grad(energy, x)
        return dt * (x.detach() - d0.detach()) / t - guidance * grad

    def fused_step(x: torch.Tensor, t_hat: torch.Tensor, t_next: torch.Tensor, heun: bool) -> torch.Tensor:
        """The same step with its elementwise work in one kernel per evaluation; `net_input` holds
        cat([M * x, M]) and is updated in place, `evaluate(t)` predicts from it."""
        dt, mask = t_next - t_hat, masks[0]
        if not heun:
            return sampler_step(x, evaluate(t_hat), mask, t_hat, dt, clip=clip, net_input=net_input,
                                write_mask=False).x
        g1 = sampler_step(x, evaluate(t_hat), mask, t_hat, dt, stage="heun_predict", clip=clip,
                          net_input=net_input, write_mask=False).g1
        return sampler_step(x, evaluate(t_next), mask, t_next, dt, stage="heun_correct", g1=g1, clip=clip,
                            net_input=net_input, write_mask=False).x

    x = latents.to(dtype) * t_steps[0]
    # Fused elementwise steps: always on the fast path; on the exact path where the kernels run (CUDA),
    # with the reference's arithmetic in the state's dtype.
    fused = fast or (guidance == 0 and fused_device(x.device))
    net_input = None
    if fused:  # in the network's memory format, so that its first convolution reads it as it is
        net_input = torch.cat([masks[0] * x, masks[0]], dim=1).float().contiguous(memory_format=memory_format(net))

    def evaluate_in_place(t: torch.Tensor) -> torch.Tensor:
        return net(net_input, t, class_labels)[:, :channels]

    evaluate = evaluate_in_place
    if fast:  # one captured graph per network and shape, reused by later calls
        evaluate = StaticDenoiser.cached(net, net_input, class_labels, use_graph=x.is_cuda)
        net_input = evaluate.net_input
    # The churn decisions read the noise levels on the host, computed there: comparing the device's
    # would wait for the GPU at every step.
    t_host = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    with torch.no_grad():
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn and S_min <= t_host[i] <= S_max else 0.0
            t_hat = t_cur + gamma * t_cur if gamma > 0 else t_cur
            if gamma > 0:
                x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
                if fused:
                    net_input[:, :channels] = masks[0] * x
            if fused:
                x = fused_step(x, t_hat, t_next, solver == "heun" and i < num_steps - 1)
                continue
            g1 = increment(x, t_hat, t_next - t_hat)
            if solver == "heun" and i < num_steps - 1:
                x = x + (g1 + increment(x + g1, t_next, t_next - t_hat)) / 2
            else:
                x = x + g1
    return x


def memory_format(net: torch.nn.Module) -> torch.memory_format:
    """channels_last if the network's convolution weights are stored so, else contiguous."""
    weight = next((p for p in net.parameters() if p.ndim == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Command line: python -m ambient_fast.sample --net PATH --out DIR --seeds 0-63

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


def seeded_inputs(seeds, shape, num_masks: int, survival: float, shared_channels: bool, device):
    """Latents (B, C, H, W) and dust masks (K, B, C, H, W), each image's drawn from its own seed only."""
    channels, height, width = shape
    latents, masks = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn(shape, generator=generator))
        mask_shape = (num_masks, 1 if shared_channels else channels, height, width)
        mask = (torch.rand(mask_shape, generator=generator) < survival).float()
        masks.append(mask.expand(num_masks, channels, height, width))
    return torch.stack(latents).to(device), torch.stack(masks, dim=1).to(device)


def sampling_sigmas(net, sigma_floor: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0) -> dict:
    """EDM's sampling range clipped to the noise levels `net` covers (its `sigma_min` / `sigma_max`
    where it has them: a discrete schedule of a diffusers model covers e.g. 0.01..157) and to the
    lowest level it was trained at (`sigma_floor`, recorded by the trainer: a model trained only on
    images with noise of level sigma_n never saw a level below it), as keyword arguments of
    `ambient_sample`. Our own EDM and VP models cover EDM's default range, unchanged.

    Below the floor, the documented choice: the sampler stops at the floor, and its last step
    returns the denoiser's output there, E[x0 | x_floor], Tweedie's estimate of the clean image:
    what the training data can support, rather than levels the model never learned."""
    return dict(sigma_min=max(sigma_min, getattr(net, "sigma_min", 0.0), float(sigma_floor)),
                sigma_max=min(sigma_max, getattr(net, "sigma_max", float("inf"))))


def main(argv=None) -> int:
    import argparse
    import sys
    from pathlib import Path

    from rich.progress import Progress

    from ambient_fast.checkpoint import load_network
    from ambient_fast.distributed import close_world, init_world
    from ambient_fast.files import claim_output_dir, write_json
    from ambient_fast.images import grid, load_png, save_png, to_uint8

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
        loaded = load_network(args.net, args.training_options)
        # channels_last on GPUs: cuDNN's fast layout for bf16 convolutions (the fused kernels read either)
        model = loaded.model.to(device, memory_format=torch.channels_last if device.type == "cuda"
                                else torch.contiguous_format)
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
    fast = device.type == "cuda" and not args.exact and args.guidance == 0 and args.churn == 0
    if world.is_main:
        print(f"sampling {len(seeds)} images from {loaded.source} on {device} ({world.size} process(es)): "
              f"{args.steps} {args.solver} steps, survival {survival:.3f}, {args.masks} mask(s), guidance {args.guidance}, "
              f"{'fast path (bf16, CUDA graph)' if fast else 'exact path'}")
    with Progress(disable=not world.is_main) as progress:
        task = progress.add_task("sampling", total=len(mine))
        for start in range(0, len(mine), args.batch):
            batch_seeds = mine[start:start + args.batch]
            # The fast path pads every batch to --batch: one static shape, so the same kernels run
            # whatever batch an image lands in (padding images are dropped).
            padded = list(batch_seeds) + [0] * ((args.batch - len(batch_seeds)) if fast else 0)
            latents, masks = seeded_inputs(padded, shape, args.masks, survival, shared, device)
            if model.label_dim:
                labels = torch.nn.functional.one_hot(torch.full((len(padded),), args.class_index),
                                                     model.label_dim).float().to(device)
            images = ambient_sample(model, latents, masks, num_steps=args.steps, solver=args.solver,
                                    guidance=args.guidance, class_labels=labels, S_churn=args.churn,
                                    dtype=torch.float32 if args.float32 else torch.float64, fast=fast,
                                    **loaded.sampling_sigmas())
            for seed, array in zip(batch_seeds, to_uint8(images)):
                save_png(array, out / f"{seed:06d}.png")
            progress.advance(task, len(batch_seeds))
    world.barrier()
    if world.is_main:
        save_png(grid([load_png(out / f"{seed:06d}.png") for seed in seeds]), out / "grid.png")
        write_json(out / "sampling.json", dict(
            net=str(loaded.source), seeds=args.seeds, images=[f"{seed:06d}.png" for seed in seeds], steps=args.steps,
            solver=args.solver, survival=survival, masks=args.masks, guidance=args.guidance, churn=args.churn,
            class_index=args.class_index, **loaded.sampling_sigmas()))
        print(f"wrote {len(seeds)} images and {out / 'grid.png'}")
    close_world()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
