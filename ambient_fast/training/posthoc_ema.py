"""Post-hoc EMA (Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR
2024, section 3): average the weights with power-function profiles during training, store snapshots of
those averages now and then, and afterwards build the average of any other length from the snapshots.

Profiles. Training time t is counted in images seen. A power-function EMA of exponent gamma, read at time
t, weights the weights of time tau by

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 < tau <= t,

a profile whose length scales with t (unlike an exponential EMA's fixed half-life). Its length is given as
the relative standard deviation sigma_rel = std(tau) / t = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),
EDM2's parameterisation (0.05 and 0.10 are its two tracked profiles; its best ImageNet lengths lie around
0.05 to 0.20). Tracking it needs one average per profile, updated after each step that brings the count
to t by avg <- beta avg + (1 - beta) weights with beta = (1 - batch / t)^(gamma + 1): the product of the
betas from step j to the last telescopes to (t_j / t)^(gamma + 1), so the weights of step j (images
t_j - batch to t_j) get exactly the integral of p_t over that interval. The discrete average is the
continuous profile binned by steps, with no approximation.

Reconstruction. Snapshots of the tracked averages at times t_i with exponents gamma_i have profiles p_i.
An average with any other profile p* (a chosen length at a chosen time, usually the last snapshot's) is
approximated by a combination sum_i x_i snapshot_i, with the x_i that make sum_i x_i p_i closest to p* in
L2 over tau, subject to sum_i x_i = 1 (every profile has mass 1, so the combination of weights stays an
average). The inner products of two profiles have a closed form (`profile_inner_product`), so the
solve is a small linear system: the Gram matrix G_ij = <p_i, p_j>, b_i = <p_i, p*>, and the constraint's
Lagrange multiplier (the paper solves G x = b and rescales x to sum 1 afterwards; the constrained
solve is the least-squares optimum among averages, and the two agree closely once the snapshots cover
the target). Its quality depends on how densely snapshots were taken; tests/test_posthoc_ema.py
measures it against an average tracked directly.

Files. A snapshot is our network checkpoint (`ambient_fast.files.checkpoints.save_network`, loadable as
any network) whose metadata also records {"posthoc_ema": {"images", "std", "gamma"}}; `reconstruct`
reads a folder of them and writes the chosen length as a network file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ambient_fast.files.checkpoints import FORMAT, save_network
from ambient_fast.networks import build_model

DEFAULT_STDS = (0.050, 0.100)  # EDM2's two tracked profiles (relative standard deviations)
METADATA_KEY = "posthoc_ema"   # the snapshot's entry in our checkpoint metadata
SNAPSHOT_GLOB = "phema-*.safetensors"


# ----------------------------------------------------------------------------------------------
# The profiles' maths.

def gamma_to_std(gamma):
    """The relative standard deviation of the power-function profile of exponent gamma (> -1)."""
    gamma = np.asarray(gamma, np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_gamma(std):
    """The exponent gamma whose profile has relative standard deviation `std` (in (0, 1/sqrt(12)) =
    (0, 0.2887): gamma = 0, the uniform average over all of training, is the longest profile).

    sigma_rel^-2 = (gamma + 2)^2 (gamma + 3) / (gamma + 1), so gamma is the root above -1 of the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) with s = sigma_rel^-2; the relative std falls
    monotonically in gamma, so that root is unique and found by bisection on the closed form."""
    std = np.asarray(std, np.float64)
    if not np.all((std > 0) & (std < gamma_to_std(0.0))):
        raise ValueError(f"an EMA length (relative std) must lie in (0, {float(gamma_to_std(0.0)):.4f}): gamma >= 0 "
                         f"is the uniform average at the longest; got {std.tolist()}")
    # Bisection on log(1 + gamma): gamma in [0, 1e9] covers relative stds down to ~1e-9.
    low, high = np.zeros_like(std), np.full_like(std, math.log1p(1e9))
    for _ in range(200):
        middle = (low + high) / 2
        too_long = gamma_to_std(np.expm1(middle)) > std  # a larger gamma gives a shorter profile
        low, high = np.where(too_long, middle, low), np.where(too_long, high, middle)
    return np.expm1((low + high) / 2)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral over tau of the two profiles' product, for profiles read at times t_a and
    t_b with exponents gamma_a and gamma_b (broadcast). With t_a <= t_b the product lives on (0, t_a]:

        (ga + 1)(gb + 1) / (t_a^(ga + 1) t_b^(gb + 1)) * t_a^(ga + gb + 1) / (ga + gb + 1)
        = (ga + 1)(gb + 1) / ((ga + gb + 1) t_b) * (t_a / t_b)^gb.
    """
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b)))
    first_shorter = t_a <= t_b
    t_short, t_long = np.where(first_shorter, t_a, t_b), np.where(first_shorter, t_b, t_a)
    gamma_long = np.where(first_shorter, gamma_b, gamma_a)
    return ((gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * t_long)) * (t_short / t_long) ** gamma_long


def solve_coefficients(times: Sequence[float], gammas: Sequence[float], target_time: float,
                       target_gamma: float) -> np.ndarray:
    """float64 (n,): the weights x of n snapshots (read at `times`, exponents `gammas`) whose combination
    sum_i x_i p_i is the closest, in L2 over tau, to the profile of `target_gamma` read at `target_time`,
    among combinations with sum_i x_i = 1 (module docstring). A least-squares solve of the constrained
    normal equations: snapshots whose profiles nearly coincide leave the Gram matrix near singular, and the
    minimum-norm solution then shares their weight instead of cancelling large ones."""
    times, gammas = np.asarray(times, np.float64), np.asarray(gammas, np.float64)
    n = len(times)
    if n == 0 or gammas.shape != (n,):
        raise ValueError(f"need at least one snapshot, with one gamma per time; got {n} times and {gammas.shape} gammas")
    system = np.zeros((n + 1, n + 1))
    system[:n, :n] = profile_inner_product(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    system[:n, n] = system[n, :n] = 1
    rhs = np.append(profile_inner_product(times, gammas, target_time, target_gamma), 1.0)
    # Scaled by the target's own norm: the entries are O(1 / t) in images, far below lstsq's cut-off otherwise.
    scale = float(profile_inner_product(target_time, target_gamma, target_time, target_gamma))
    system[:n, :n] /= scale
    rhs[:n] /= scale
    solution = np.linalg.lstsq(system, rhs, rcond=1e-12)[0]
    return solution[:n]


def reconstruction_error(times: Sequence[float], gammas: Sequence[float], weights: Sequence[float],
                         target_time: float, target_gamma: float) -> float:
    """||sum_i w_i p_i - p*|| / ||p*||: how far a combination's profile is from the target's (0: exact)."""
    times, gammas, weights = (np.asarray(v, np.float64) for v in (times, gammas, weights))
    gram = profile_inner_product(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    cross = profile_inner_product(times, gammas, target_time, target_gamma)
    target = float(profile_inner_product(target_time, target_gamma, target_time, target_gamma))
    squared = weights @ gram @ weights - 2 * weights @ cross + target
    return math.sqrt(max(squared, 0.0) / target)


# ----------------------------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """Power-function averages of a set of tensors, one per profile, updated after each optimizer step.

    Args:
        params: name -> tensor (parameters; DTensors under FSDP2 work unchanged: the averages are made
            and updated like the tensors themselves).
        stds: the profiles' relative standard deviations (EDM2: 0.05 and 0.10).

    `update(params, images_seen, batch_images)` after the step that brought the count to `images_seen`;
    `averages[k]` is profile k's average (name -> tensor); `state_dict` / `load_state_dict` hold them as
    tensors only (torch.distributed.checkpoint), with the stds to check a resumed run against.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], stds: Sequence[float] = DEFAULT_STDS):
        if not len(stds):
            raise ValueError("post-hoc EMA needs at least one profile (relative std)")
        self.stds = tuple(float(std) for std in stds)
        self.gammas = tuple(float(gamma) for gamma in std_to_gamma(self.stds))
        self.averages = [{name: p.detach().clone() for name, p in params.items()} for _ in self.stds]

    def betas(self, images_seen: int, batch_images: int) -> "list[float]":
        """Each profile's beta for the step ending at `images_seen`: (1 - batch / t)^(gamma + 1)."""
        if not 0 < batch_images <= images_seen:
            raise ValueError(f"need 0 < batch_images <= images_seen, got {batch_images} and {images_seen}")
        return [(1 - batch_images / images_seen) ** (gamma + 1) for gamma in self.gammas]

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], images_seen: int, batch_images: int) -> None:
        """Fold in the weights after the step that brought the count to `images_seen` (batch_images of them
        in that step). The first step (images_seen == batch_images) has beta 0: the averages become the
        weights, whatever they held."""
        names = list(params)
        current = [params[name].detach() for name in names]
        for average, beta in zip(self.averages, self.betas(images_seen, batch_images)):
            torch._foreach_lerp_([average[name] for name in names], current, 1 - beta)

    def state_dict(self) -> dict:
        return {"stds": torch.tensor(self.stds, dtype=torch.float64),
                **{f"profile{k}": average for k, average in enumerate(self.averages)}}

    def load_state_dict(self, state: Mapping) -> None:
        stds = tuple(float(v) for v in state["stds"])
        if stds != self.stds:
            raise ValueError(f"the saved post-hoc EMA tracks profiles {stds}, this run {self.stds}; resume with the "
                             "same --ema-stds")
        for k, average in enumerate(self.averages):
            for name, value in state[f"profile{k}"].items():
                if value is not average[name]:  # DCP may load in place
                    average[name].copy_(value)

    @staticmethod
    def snapshot_due(images_before: int, images_after: int, interval_images: int) -> bool:
        """Whether a step from images_before to images_after crossed a multiple of the snapshot interval."""
        return images_after // interval_images > images_before // interval_images


# ----------------------------------------------------------------------------------------------
# Snapshots and reconstruction.

@dataclass(frozen=True)
class Snapshot:
    """One stored average: its file, the images seen when it was taken, its profile."""

    path: Path
    images: int
    std: float
    gamma: float


def snapshot_name(images: int, std: float) -> str:
    return f"phema-{images:012d}-{std:.3f}.safetensors"


def save_snapshot(directory: Union[str, Path], model: torch.nn.Module, images: int, std: float,
                  corruption: Optional[Mapping] = None) -> Path:
    """Write `model` (whose weights are the average of relative std `std` at `images` seen) as a snapshot
    into `directory`: our network checkpoint (atomic, checksummed) with {"images", "std", "gamma"} in its
    metadata. Returns the file's path."""
    path = Path(directory) / snapshot_name(images, std)
    save_network(path, model, corruption, **{METADATA_KEY: {"images": int(images), "std": float(std),
                                                            "gamma": float(std_to_gamma(std))}})
    return path


def _read_header(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} cannot be read as a snapshot ({error}); it is damaged: delete it or take it out of "
                         "the folder") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an ambient-fast checkpoint (format {header.get('format')!r})")
    return header


def read_snapshots(directory: Union[str, Path]) -> "list[Snapshot]":
    """The snapshots in `directory` (files named phema-*.safetensors), oldest first."""
    directory = Path(directory)
    paths = sorted(directory.glob(SNAPSHOT_GLOB))
    if not paths:
        raise FileNotFoundError(f"no post-hoc EMA snapshots ({SNAPSHOT_GLOB}) in {directory}; a run writes them "
                                "when post-hoc EMA is on")
    snapshots = []
    for path in paths:
        entry = json.loads(_read_header(path).get("extra", "{}")).get(METADATA_KEY)
        if not isinstance(entry, dict) or not {"images", "std", "gamma"} <= set(entry):
            raise ValueError(f"{path} records no post-hoc EMA profile ({METADATA_KEY}); it is not a snapshot of one")
        snapshots.append(Snapshot(path, int(entry["images"]), float(entry["std"]), float(entry["gamma"])))
    return sorted(snapshots, key=lambda s: (s.images, s.std))


def reconstruct(directory: Union[str, Path], std: float, out: Union[str, Path], images: Optional[int] = None,
                max_error: float = 0.05) -> dict:
    """Build the average of relative std `std` at `images` seen (default: the last snapshot's) from the
    snapshots in `directory`, and write it as a network file to `out`.

    Every floating-point tensor is the weighted sum of the snapshots' (in float64, stored in its own
    dtype); tensors equal in every snapshot (buffers) are copied. The file records the reconstruction
    (target, snapshots used, weights, the profile's relative L2 error). Raises ValueError when the
    snapshots cannot reach the target within `max_error` (e.g. a length far outside the tracked ones, or
    a time beyond the last snapshot), before writing anything. Returns the recorded reconstruction."""
    snapshots = read_snapshots(directory)
    target_images = snapshots[-1].images if images is None else int(images)
    target_gamma = float(std_to_gamma(std))
    used = [s for s in snapshots if s.images <= target_images]
    if not used:
        raise ValueError(f"no snapshot was taken at or before {target_images} images; the first is at {snapshots[0].images}")
    times, gammas = [s.images for s in used], [s.gamma for s in used]
    weights = solve_coefficients(times, gammas, target_images, target_gamma)
    error = reconstruction_error(times, gammas, weights, target_images, target_gamma)
    if error > max_error:
        raise ValueError(f"the {len(used)} snapshots reach an EMA of relative std {std} at {target_images} images only "
                         f"within {error:.3f} (relative L2 error of the profile, limit {max_error}); choose a length "
                         "nearer the tracked ones or snapshot more often")
    header = _read_header(used[-1].path)
    config = json.loads(header["model"])
    corruption = json.loads(header.get("corruption", "{}"))
    files = [safe_open(str(s.path), framework="pt") for s in used]
    state = {}
    for name in files[-1].keys():
        tensors = [f.get_tensor(name) for f in files]
        if not tensors[-1].is_floating_point() or all(torch.equal(t, tensors[-1]) for t in tensors):
            state[name] = tensors[-1]
            continue
        total = sum(float(w) * t.to(torch.float64) for w, t in zip(weights, tensors))
        state[name] = total.to(tensors[-1].dtype)
    model = build_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    record = {"std": float(std), "gamma": target_gamma, "images": target_images, "profile_error": error,
              "snapshots": [s.path.name for s in used], "weights": [float(w) for w in weights]}
    save_network(out, model, corruption, **{METADATA_KEY + "_reconstruction": record})
    return record
