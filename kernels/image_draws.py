"""Each image's own draws of a training step, in one launch: its noise level sigma, its weights, the
noise to add and the Tweedie multiple of its target, its further corruption B and its one-hot label.

This is the first half of the ambient input (ambient_fast.objective.objective, whose module docstring
gives the maths); `ambient_input` is the second. Its reference is the PyTorch path of
`AmbientObjective.inputs` there (`noise_levels`, `further`, `one_hot`), which this kernel repeats
operation by operation. Per image n at position p = position + n, with (r0, r1, r2, r3) =
Philox(key, p) (ambient_fast.objective.seeds):

    u     = ((r0 >> 8) + 1/2) 2^-24                           (float64)
    bound = max(sigma_n, sigma_min) (sigma_n only with Tweedie targets)
    mass  = P(level > bound): looked up among the data set's distinct bounds, whose tails the objective
            computes once with the schedule's own function (a bound not among them gives NaN)
    sigma = float32(upper_quantile(mass (1 - u))), then at least the float32 after float32(bound)
    weight = float32(mass / share(sigma)) where the set has records (share: the fraction of its images'
            bounds below sigma, counted by binary search), times the noisy images' fall-off
    B     = COIN: the threshold (0 where A hides nothing); ERASE_BOX: the corner from (r2 >> 8, r3 >> 8)
            scaled to the image (no box where A hides nothing); or, for operators whose B reads A, the
            words (r2 >> 8, r3 >> 8) themselves for the objective to place B with

The inverse tails: EDM's exp(P_mean - P_std ndtri(q)), with ndtri Cephes' as torch computes it
(its polynomials and its one multiply-add each as fused multiply-adds, as compilers contract them
there); VP's sigma(1 - q (1 - epsilon_t)); a discrete schedule's level of rank floor(q T) from the
top. float64 throughout, as the reference, and rounded once to float32: bitwise the reference's under
Triton's interpreter, which computes fused multiply-adds exactly (up to the last bits of float64 log
and exp in the rare draw where they reach a float32 rounding boundary, as with `ambient_input`'s
Box-Muller). Compiled with `enable_fp_fusion=False`, so that no other multiply-add is contracted.
"""
from typing import NamedTuple, Optional

import torch

from ambient_fast.objective.corruption import FurtherKind, FurtherSpec

from ._utils import cdiv, kernel, tl

EDM_LEVELS, VP_LEVELS, DISCRETE_LEVELS = range(3)
COIN_B, BOX_B, WORDS_B = range(3)  # the kernel's B_FORM: a threshold, a box, or the words for the objective


class LevelDistribution(NamedTuple):
    """A schedule's noise levels in the form the kernel draws them (`NoiseSchedule.level_distribution`)."""

    kind: int                # EDM_LEVELS, VP_LEVELS or DISCRETE_LEVELS
    params: tuple            # float64 constants: EDM (P_mean, P_std); VP (0.5 beta_d, beta_min, 1 - epsilon_t)
    levels: Optional[torch.Tensor] = None  # DISCRETE_LEVELS: every level, sorted, float64


class BoundTable(NamedTuple):
    """What the kernel looks the records up in (float64, sorted ascending)."""

    known: torch.Tensor              # (K,) the data set's distinct bounds, 0 among them
    mass: torch.Tensor               # (K,) the schedule's tail at each
    bounds: Optional[torch.Tensor]   # (M,) every image's bound, for the share eligible at a level; None: weight 1


class Draws(NamedTuple):
    """What `image_draws` writes for N images."""

    sigma: torch.Tensor              # (N,) float32
    weight: torch.Tensor             # (N,) float32
    noise_std: torch.Tensor          # (N,) float32
    tweedie: Optional[torch.Tensor]  # (N,) float32, with Tweedie targets
    further: torch.Tensor            # COIN_B: (N,) int64 thresholds; BOX_B: (N, 4) int64 boxes; WORDS_B: (N, 2) int64 words
    labels: torch.Tensor             # (N, label_dim) float32 one-hot


# ----------------------------------------------------------------------------------------------
# Kernel

# Cephes' ndtri coefficients (torch's calc_ndtri): P0/Q0 for |y - 1/2| <= 3/8, P1/Q1 for
# z = sqrt(-2 ln y) in [2, 8), P2/Q2 for z >= 8.
_P0 = (-5.99633501014107895267E1, 9.80010754185999661536E1, -5.66762857469070293439E1, 1.39312609387279679503E1,
       -1.23916583867381258016E0)
_Q0 = (1.0, 1.95448858338141759834E0, 4.67627912898881538453E0, 8.63602421390890590575E1, -2.25462687854119370527E2,
       2.00260212380060660359E2, -8.20372256168333339912E1, 1.59056225126211695515E1, -1.18331621121330003142E0)
_P1 = (4.05544892305962419923E0, 3.15251094599893866154E1, 5.71628192246421288162E1, 4.40805073893200834700E1,
       1.46849561928858024014E1, 2.18663306850790267539E0, -1.40256079171354495875E-1, -3.50424626827848203418E-2,
       -8.57456785154685413611E-4)
_Q1 = (1.0, 1.57799883256466749731E1, 4.53907635128879210584E1, 4.13172038254672030440E1, 1.50425385692907503408E1,
       2.50464946208309415979E0, -1.42182922854787788574E-1, -3.80806407691578277194E-2, -9.33259480895457427372E-4)
_P2 = (3.23774891776946035970E0, 6.91522889068984211695E0, 3.93881025292474443415E0, 1.33303460815807542389E0,
       2.01485389549179081538E-1, 1.23716634817820021358E-2, 3.01581553508235416007E-4, 2.65806974686737550832E-6,
       6.23974539184983293730E-9)
_Q2 = (1.0, 6.02427039364742014255E0, 3.67983563856160859403E0, 1.37702099489081330271E0, 2.16236993594496635890E-1,
       1.34204006088543189037E-2, 3.28014464682127739104E-4, 2.89247864745380683936E-6, 6.79019408009981274425E-9)
_EXP_M2 = 0.13533528323661269189  # exp(-2): where ndtri's tails begin
# The polynomials (P0 at 0, Q0 at 5, P1 at 14, Q1 at 23, P2 at 32, Q2 at 41), then exp(-2), 1 - exp(-2) and
# sqrt(2 pi): float64 values from memory (a Python float in a kernel may be taken as a float32 constant).
_COEFFICIENTS = torch.tensor(_P0 + _Q0 + _P1 + _Q1 + _P2 + _Q2 + (_EXP_M2, 1.0 - _EXP_M2, 2.50662827463100050242E0),
                             dtype=torch.float64)


@kernel(do_not_specialize=["key", "position", "N", "K", "K_STEPS", "M", "M_STEPS", "T", "threshold", "box_h", "box_w",
                           "H", "W", "label_dim"])
def _image_draws_kernel(
    sn_ptr,      # (N,) float32 each image's sigma_n (read with TWEEDIE)
    smin_ptr,    # (N,) float32 each image's sigma_min
    masked_ptr,  # (N,) uint8 1 where A hides something
    label_ptr,   # (N,) int64 class indices (read when label_dim > 0)
    known_ptr,   # (K,) float64 sorted distinct bounds
    mass_ptr,    # (K,) float64 the tail at each
    bounds_ptr,  # (M,) float64 every image's bound, sorted (read with WEIGHTED)
    levels_ptr,  # (T,) float64 a discrete schedule's sorted levels (DISCRETE_LEVELS)
    const_ptr,   # (3,) float64 the distribution's constants (LevelDistribution.params)
    coef_ptr,    # (53,) float64 ndtri's coefficients and constants (_COEFFICIENTS)
    sigma_ptr, weight_ptr, std_ptr, tw_ptr,  # (N,) float32 out (tw_ptr written with TWEEDIE)
    b_ptr,       # out, int64: (N,) thresholds, (N, 4) boxes or (N, 2) words, by B_FORM
    onehot_ptr,  # (N, label_dim) float32 out
    key, position, N, K, K_STEPS, M, M_STEPS, T, threshold, box_h, box_w, H, W, label_dim,
    LEVELS: tl.constexpr, TWEEDIE: tl.constexpr, WEIGHTED: tl.constexpr, B_FORM: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """See the module docstring; one lane per image."""
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = n < N
    r0, _, r2, r3 = tl.randint4x(key, position + n)
    u = ((r0 >> 8).to(tl.float64) + 0.5) * 5.9604644775390625e-08  # times 2^-24
    sigma_min = tl.load(smin_ptr + n, mask=inside, other=0.0).to(tl.float64)
    sigma_n = tl.zeros_like(sigma_min)
    if TWEEDIE:
        sigma_n = tl.load(sn_ptr + n, mask=inside, other=0.0).to(tl.float64)
    bound = tl.maximum(sigma_n, sigma_min)

    # mass: the bound's entry among the distinct bounds (binary search: the first one >= bound)
    lo = tl.zeros_like(n)
    hi = tl.zeros_like(n) + K
    for _ in range(K_STEPS):
        mid = (lo + hi) // 2
        below = tl.load(known_ptr + mid, mask=lo < hi, other=0.0) < bound
        lo = tl.where((lo < hi) & below, mid + 1, lo)
        hi = tl.where((lo < hi) & ~below, mid, hi)
    found = (lo < K) & (tl.load(known_ptr + lo, mask=lo < K, other=-1.0) == bound)
    mass = tl.where(found, tl.load(mass_ptr + lo, mask=found, other=0.0), float("nan"))
    q = mass * (1.0 - u)

    if LEVELS == 0:  # EDM: exp(P_mean - P_std ndtri(q)), ndtri as torch's calc_ndtri
        exp_m2 = tl.load(coef_ptr + 50)
        upper = q > tl.load(coef_ptr + 51)
        y = tl.where(upper, 1.0 - q, q)
        # |y - 1/2| <= 3/8: a rational function of (y - 1/2)^2
        ym = y - 0.5
        y2 = ym * ym
        p = tl.zeros_like(y2)
        for i in tl.static_range(5):
            p = tl.fma(p, y2, tl.load(coef_ptr + 0 + i))
        r = tl.zeros_like(y2)
        for i in tl.static_range(9):
            r = tl.fma(r, y2, tl.load(coef_ptr + 5 + i))
        central = tl.fma(ym, y2 * p / r, ym) * tl.load(coef_ptr + 52)
        # the tails: z = sqrt(-2 ln y)
        safe = tl.where(y > 0.0, y, 0.5)
        z = tl.sqrt(-2.0 * tl.log(safe))
        z0 = z - tl.log(z) / z
        w = 1.0 / z
        near = z < 8.0
        p = tl.zeros_like(w)
        r = tl.zeros_like(w)
        for i in tl.static_range(9):
            p = tl.fma(p, w, tl.where(near, tl.load(coef_ptr + 14 + i), tl.load(coef_ptr + 32 + i)))
            r = tl.fma(r, w, tl.where(near, tl.load(coef_ptr + 23 + i), tl.load(coef_ptr + 41 + i)))
        tail = z0 - w * p / r
        tail = tl.where(upper, tail, -tail)
        x = tl.where(y > exp_m2, central, tail)
        x = tl.where(q == 0.0, float("-inf"), tl.where(q == 1.0, float("inf"), x))
        level = tl.exp(tl.load(const_ptr) - tl.load(const_ptr + 1) * x)
    elif LEVELS == 1:  # VP: sigma(t), t = 1 - q (1 - epsilon_t)
        t = 1.0 - q * tl.load(const_ptr + 2)
        level = tl.sqrt(tl.exp(tl.load(const_ptr) * (t * t) + tl.load(const_ptr + 1) * t) - 1.0)
    else:  # discrete: the level of rank floor(q T) counted from the top
        rank = tl.minimum(tl.maximum(tl.floor(q * T).to(tl.int64), 0), T - 1)
        level = tl.load(levels_ptr + (T - 1 - rank), mask=inside, other=1.0)
    floor = (bound.to(tl.float32).to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)  # next float32 up
    sigma = tl.where(found, tl.maximum(level.to(tl.float32), floor), float("nan"))

    weight = tl.full([BLOCK], 1.0, tl.float32)
    if WEIGHTED:  # mass over the share of the set's bounds below sigma
        lo = tl.zeros_like(n)
        hi = tl.zeros_like(n) + M
        s64 = sigma.to(tl.float64)
        for _ in range(M_STEPS):
            mid = (lo + hi) // 2
            below = tl.load(bounds_ptr + mid, mask=lo < hi, other=0.0) < s64
            lo = tl.where((lo < hi) & below, mid + 1, lo)
            hi = tl.where((lo < hi) & ~below, mid, hi)
        share = lo.to(tl.float32) / M.to(tl.float32)
        weight = (mass / share.to(tl.float64)).to(tl.float32)
    std = sigma
    if TWEEDIE:
        s64 = sigma.to(tl.float64)
        variance = s64 * s64 - sigma_n * sigma_n
        kept = variance / (s64 * s64) / 0.5  # 1 - sigma_n^2 / sigma^2 over objective.FULL_WEIGHT_FROM
        weight = weight * tl.minimum(kept * kept, 1.0).to(tl.float32)
        root = tl.sqrt(variance)
        std = root.to(tl.float32)
        tl.store(tw_ptr + n, (sigma_n * sigma_n / root).to(tl.float32), mask=inside)
    tl.store(sigma_ptr + n, sigma, mask=inside)
    tl.store(weight_ptr + n, weight, mask=inside)
    tl.store(std_ptr + n, std, mask=inside)

    masked = tl.load(masked_ptr + n, mask=inside, other=0) != 0
    word2 = (r2 >> 8).to(tl.int64)
    word3 = (r3 >> 8).to(tl.int64)
    if B_FORM == 0:  # COIN: nothing erased where A hides nothing
        tl.store(b_ptr + n, tl.where(masked, threshold, 0).to(tl.int64), mask=inside)
    elif B_FORM == 1:  # ERASE_BOX: an empty box where A hides nothing
        tl.store(b_ptr + 4 * n, tl.where(masked, (word2 * H) >> 24, 0), mask=inside)
        tl.store(b_ptr + 4 * n + 1, tl.where(masked, (word3 * W) >> 24, 0), mask=inside)
        tl.store(b_ptr + 4 * n + 2, tl.where(masked, box_h, 0).to(tl.int64), mask=inside)
        tl.store(b_ptr + 4 * n + 3, tl.where(masked, box_w, 0).to(tl.int64), mask=inside)
    else:
        tl.store(b_ptr + 2 * n, word2, mask=inside)
        tl.store(b_ptr + 2 * n + 1, word3, mask=inside)

    if BLOCK_L > 0:
        label = tl.load(label_ptr + n, mask=inside, other=-1)
        for start in range(0, label_dim, BLOCK_L):
            column = start + tl.arange(0, BLOCK_L)
            hot = (label[:, None] == column[None, :]).to(tl.float32)
            tl.store(onehot_ptr + n[:, None] * label_dim + column[None, :], hot,
                     mask=inside[:, None] & (column[None, :] < label_dim))


# ----------------------------------------------------------------------------------------------
# Launcher

_BLOCK = 128
_BLOCK_L = 16
_ON_DEVICE = {}


def _constants(distribution: LevelDistribution, device: torch.device) -> "tuple[torch.Tensor, torch.Tensor]":
    """The distribution's constants and ndtri's coefficients on `device`, as float64 tensors (a
    Python float reaches a Triton kernel as float32)."""
    key = (distribution.kind, tuple(distribution.params), device)
    if key not in _ON_DEVICE:
        params = torch.tensor((tuple(distribution.params) + (0.0, 0.0, 0.0))[:3], dtype=torch.float64)
        _ON_DEVICE[key] = (params.to(device), _COEFFICIENTS.to(device))
    return _ON_DEVICE[key]


def _steps(count: int) -> int:
    """Halvings a binary search over `count` entries takes."""
    return max(int(count), 1).bit_length()


def image_draws(*, key: int, position: int, count: int, device: torch.device, distribution: LevelDistribution,
                table: BoundTable, tweedie: bool, further: Optional[FurtherSpec], shape,
                masked: Optional[torch.Tensor] = None, sigma_n: Optional[torch.Tensor] = None,
                sigma_min: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                label_dim: int = 0) -> Draws:
    """The draws of `count` images from `position` on, in one launch (see the module docstring).

    Args:
        key: the IMAGE stream's key; position: the first image's position in the run.
        distribution, table: the schedule's levels and the records' look-up tables, on `device`.
        tweedie: noisy images get Tweedie targets (sigma_n is read).
        further: B as a FurtherSpec, or None for an operator whose draw reads A (the words come back).
        shape: (N, C, H, W) of the images.
        masked, sigma_n, sigma_min: (N,) records, as the loader delivers them (None: every image
            masked, no noise, no sigma_min); labels: (N,) int64 or None; label_dim: the one-hot width.
    """
    N, _, H, W = shape
    f32 = dict(dtype=torch.float32, device=device)
    sigma_n = torch.zeros(count, **f32) if sigma_n is None else sigma_n
    sigma_min = torch.zeros(count, **f32) if sigma_min is None else sigma_min
    masked = torch.ones(count, dtype=torch.uint8, device=device) if masked is None else masked
    sigma, weight, std = (torch.empty(count, **f32) for _ in range(3))
    tw = torch.empty(count, **f32) if tweedie else sigma
    if further is None:
        form, b_out = WORDS_B, torch.empty((count, 2), dtype=torch.int64, device=device)
    elif further.kind == FurtherKind.COIN:
        form, b_out = COIN_B, torch.empty(count, dtype=torch.int64, device=device)
    else:
        form, b_out = BOX_B, torch.empty((count, 4), dtype=torch.int64, device=device)
    onehot = torch.empty((count, label_dim), **f32)
    with_labels = labels is not None and label_dim > 0
    if label_dim > 0 and labels is None:
        onehot.zero_()
    params, coefficients = _constants(distribution, device)
    levels = distribution.levels if distribution.levels is not None else table.known
    bounds = table.bounds if table.bounds is not None else table.known
    spec = further or FurtherSpec(FurtherKind.COIN)
    _image_draws_kernel[(cdiv(count, _BLOCK),)](
        sigma_n, sigma_min, masked, labels if with_labels else masked, table.known, table.mass, bounds, levels,
        params, coefficients, sigma, weight, std, tw, b_out, onehot,
        int(key), int(position), count, len(table.known), _steps(len(table.known)), len(bounds), _steps(len(bounds)),
        len(levels), spec.threshold, spec.height, spec.width, H, W, label_dim,
        LEVELS=distribution.kind, TWEEDIE=bool(tweedie), WEIGHTED=table.bounds is not None, B_FORM=form,
        BLOCK=_BLOCK, BLOCK_L=_BLOCK_L if with_labels else 0, num_warps=4, enable_fp_fusion=False)
    return Draws(sigma, weight, std, tw if tweedie else None, b_out, onehot)
