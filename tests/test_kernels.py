"""The fused Triton kernels against their PyTorch references.

On CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set before anything here
imports Triton, and again around each test of this module only (the dispatch reads it at every
call), so the other test modules keep running the references. Tests marked `gpu` run the
compiled kernels on CUDA (`pytest -m gpu`) and skip elsewhere.

Outputs the kernels allocate are poisoned with NaN (the `poison` fixture patches torch.empty)
so that an element a kernel forgets to write fails the comparison.
"""
import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported (it may read it at import)

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton): the fused kernels "
                                               "are not tested, their PyTorch references are")

from ambient_fast import kernels  # noqa: E402
from ambient_fast.objective.corruption import FurtherDraw, FurtherKind, coin_threshold  # noqa: E402
from ambient_fast.kernels import (AmbientInput, ambient_input, ambient_input_reference, gated_activation,  # noqa: E402
                                  gated_activation_packed, gated_activation_reference, masked_loss,
                                  masked_loss_reference, sampler_step, sampler_step_reference)
from ambient_fast.kernels.ambient_input import ambient_input_launch  # noqa: E402
from ambient_fast.objective.seeds import philox  # noqa: E402

# Restore the variable for the rest of the session; `_interpreter` sets it per test of this module.
if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

SHAPE = (3, 5, 7, 9)  # N, C, H, W: odd everywhere
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
       torch.float64: dict(rtol=1e-12, atol=1e-12)}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
LAYOUTS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    """CPU tests: the interpreter. GPU tests: the compiled kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if request.node.get_closest_marker("gpu") else "1")
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)


@pytest.fixture
def poison(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled (float) or 0x7B-filled (integer) tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan") if t.is_floating_point() else 123)

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: fill(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: fill(real_empty_like(*args, **kwargs)))


def layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """Compare in fp32 (fp64 for fp64) with the tolerance of `dtype`; atol scaled for sums."""
    tol = dict(TOL[dtype])
    tol["atol"] *= scale
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol)


# ----------------------------------------------------------------------------------------------
# Gated activation


@pytest.mark.parametrize("double", [False, True], ids=["sigmoid", "double_sigmoid"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_gated_activation(packed, dtype, channels_last, double, poison):
    N, C, H, W = SHAPE
    ag = layout(torch.randn(N, 2 * C, H, W) * 3, channels_last).to(dtype).requires_grad_(True)
    bias = torch.randn(C, dtype=dtype, requires_grad=True)
    dout = layout(torch.randn(N, C, H, W), channels_last).to(dtype)
    if packed:
        out = gated_activation_packed(ag, bias, double)
    else:
        a, g = ag.chunk(2, dim=1)  # channel slices of one tensor, as in Conv2d
        out = gated_activation(a, g, bias, double)
    out.backward(dout)

    ref_ag = ag.detach().float().requires_grad_(True)
    ref_bias = bias.detach().float().requires_grad_(True)
    expected = gated_activation_reference(*ref_ag.chunk(2, dim=1), ref_bias, double)
    expected.backward(dout.float())
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last if channels_last
                                                    else torch.contiguous_format)
    close(out, expected, dtype)
    close(ag.grad, ref_ag.grad, dtype)
    close(bias.grad, ref_bias.grad, dtype, scale=10)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16")])
def test_gated_activation_fp16_without_bias(dtype, poison):
    a = torch.randn(SHAPE, dtype=dtype, requires_grad=True)
    g = torch.randn(SHAPE, dtype=dtype, requires_grad=True)
    out = gated_activation(a, g)
    out.sum().backward()
    ra, rg = a.detach().float().requires_grad_(True), g.detach().float().requires_grad_(True)
    gated_activation_reference(ra, rg).sum().backward()
    close(out, gated_activation_reference(ra, rg).detach(), torch.bfloat16)
    close(a.grad, ra.grad, torch.bfloat16)
    close(g.grad, rg.grad, torch.bfloat16)


def test_gated_conv_layer_matches_the_reference_path(monkeypatch):
    from ambient_fast.networks.layers import Conv2d

    layer = Conv2d(4, 5, 3, gate="double_sigmoid", init_bias=1.0)
    x = torch.randn(2, 4, 7, 9)
    out = layer(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.weight, layer.gate_weight, layer.bias)]
    layer.zero_grad()
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")  # the reference path
    expected = layer(x)
    expected.square().sum().backward()
    close(out, expected.detach(), torch.float32)
    for grad, p in zip(grads, (layer.weight, layer.gate_weight, layer.bias)):
        close(grad, p.grad, torch.float32, scale=10)


# ----------------------------------------------------------------------------------------------
# Masked loss


@pytest.mark.parametrize("norm", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_loss(dtype, channels_last, norm, poison):
    N, C, H, W = SHAPE
    output = layout(torch.randn(N, 2 * C, H, W), channels_last).to(dtype).requires_grad_(True)
    D = output[:, :C]  # the image channels of a network output, read in place
    y = torch.rand(N, C, H, W) * 2 - 1
    A = (torch.rand(N, C, H, W) < 0.6).float()
    weight = torch.rand(N, 1, 1, 1) * 4 + 0.5
    loss = masked_loss(D, y, A, weight, norm)
    dloss = torch.randn(N)
    loss.backward(dloss)

    ref_D = D.detach().float().requires_grad_(True)
    expected = masked_loss_reference(ref_D, y, A, weight, norm)
    expected.backward(dloss)
    assert loss.dtype == torch.float32 and loss.shape == (N,)
    close(loss, expected.detach(), torch.float32, scale=10)  # the sums are fp32 whatever D's dtype
    close(output.grad[:, :C], ref_D.grad, dtype)
    assert torch.all(output.grad[:, C:] == 0)


def test_masked_loss_without_grad_matches(poison):
    D, y = torch.randn(SHAPE), torch.randn(SHAPE)
    A, weight = (torch.rand(SHAPE) < 0.5).float(), torch.rand(SHAPE[0]) + 0.1
    close(masked_loss(D, y, A, weight), masked_loss_reference(D, y, A, weight), torch.float32, scale=10)


# ----------------------------------------------------------------------------------------------
# Ambient input


def stored_batch(shape=SHAPE, survival=0.7, uint8=True, seed=0):
    """(observed, mask_bits, flips, A as bool) of a random stored batch: observed 0 outside A (uint8
    levels, or float16 values as a set with noise stores them, beyond [-1, 1] too), every other image
    mirrored."""
    generator = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    A = torch.rand(shape, generator=generator) < survival
    values = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) if uint8 else \
        (torch.randn(shape, generator=generator) * 0.8).to(torch.float16)
    observed = values * A.to(values.dtype)
    bits = torch.from_numpy(np.packbits(A.numpy().reshape(N, -1), axis=1, bitorder="little"))
    flips = (torch.arange(N) % 2).to(torch.uint8)
    return observed.contiguous(), bits, flips, A


def draws(kind, shape=SHAPE, seed=1):
    """A FurtherDraw of each kind for a batch of `shape`: coins per value or per pixel, boxes of random
    corners and sides (some cut by the border, some empty)."""
    N, C, H, W = shape
    generator = torch.Generator().manual_seed(seed)
    if kind in ("coins", "shared_coins"):
        # One threshold per image: 0.3, or 0 (nothing erased) for an image whose A hides nothing.
        thresholds = torch.tensor([coin_threshold(0.3), 0, coin_threshold(0.3)] * N)[:N]
        return FurtherDraw(FurtherKind.COIN, thresholds, shared_channels=kind == "shared_coins")
    boxes = torch.stack([torch.randint(0, H, (N,), generator=generator), torch.randint(0, W, (N,), generator=generator),
                         torch.randint(0, H, (N,), generator=generator), torch.randint(0, W, (N,), generator=generator)], 1)
    return FurtherDraw(FurtherKind.ERASE_BOX if kind == "erase_box" else FurtherKind.KEEP_BOX, boxes=boxes)


B_KINDS = ["coins", "shared_coins", "erase_box", "keep_box"]


@pytest.mark.parametrize("kind", B_KINDS)
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("uint8, tweedie", [pytest.param(True, False, id="uint8"),
                                            pytest.param(False, True, id="float16-noisy")])
@pytest.mark.parametrize("shape", [pytest.param(SHAPE, id="3x5x7x9"), pytest.param((2, 1, 4, 16), id="2x1x4x16")])
def test_ambient_input_equals_the_reference_bitwise(shape, uint8, tweedie, channels_last, kind, poison):
    """The kernel (interpreted) and its reference draw the same Philox words and compute every output
    with the same float32 operations: equal bit for bit, in either layout, with the Tweedie target."""
    observed, bits, flips, _ = stored_batch(shape, uint8=uint8)
    std = torch.rand(shape[0]) * 3 + 0.1
    args = (observed, bits, flips, std, draws(kind, shape), 12345678901, 77 * math.prod(shape[1:]), channels_last,
            torch.rand(shape[0]) if tweedie else None)
    fused, reference = ambient_input_launch(*args), ambient_input_reference(*args)
    for name in AmbientInput._fields:
        assert torch.equal(getattr(fused, name), getattr(reference, name)), name
    assert fused.net_input.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("kind", B_KINDS)
def test_ambient_input_against_an_independent_computation(kind, poison):
    """Without noise the outputs are deterministic: computed here with numpy from the stored bytes
    (unpack, mirror, (2u - 255) / 255 in float64, B from the draw's definition)."""
    shape = N, C, H, W = SHAPE
    observed, bits, flips, _ = stored_batch(shape)
    further = draws(kind)
    out = ambient_input(observed, bits, flips, torch.zeros(N), further, key=3, offset=0)
    A = np.unpackbits(bits.numpy(), axis=1, count=C * H * W, bitorder="little").reshape(shape).astype(np.float32)
    y = ((2 * observed.numpy().astype(np.float64) - 255) / 255).astype(np.float32)
    mirrored = flips.numpy().astype(bool)
    A[mirrored], y[mirrored] = A[mirrored][..., ::-1], y[mirrored][..., ::-1]
    y = A * y
    if kind.endswith("coins"):
        counters = np.arange(N * C * H * W).reshape(shape)
        words = philox(3, torch.from_numpy(counters))[2].numpy() >> 8
        keep = (words[:, :1] if kind == "shared_coins" else words) >= further.thresholds.numpy()[:, None, None, None]
        keep = np.broadcast_to(keep, shape)
    else:
        rows, cols = np.arange(H)[None, :, None], np.arange(W)[None, None, :]
        top, left, height, width = (further.boxes[:, i].numpy()[:, None, None] for i in range(4))
        inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
        keep = np.broadcast_to((inside if kind == "keep_box" else ~inside)[:, None], shape)
    A_hat = A * keep
    for got, want in ((out.A, A), (out.y, y), (out.A_hat, A_hat), (out.net_input, np.concatenate([A_hat * y, A_hat], 1))):
        np.testing.assert_array_equal(got.numpy(), want)


def test_every_stored_level_maps_to_one_value_on_every_path(poison):
    """All 256 uint8 levels: the kernel and the reference give (2u - 255) / 255 rounded once to float32."""
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    bits = torch.full((1, 32), 255, dtype=torch.uint8)
    args = (levels, bits, torch.zeros(1, dtype=torch.uint8), torch.zeros(1),
            FurtherDraw(FurtherKind.COIN, torch.zeros(1, dtype=torch.int64)), 0, 0, False)
    exact = torch.tensor([np.float32((2 * u - 255) / 255) for u in range(256)]).reshape(1, 1, 16, 16)
    for out in (ambient_input_launch(*args), ambient_input_reference(*args)):
        assert torch.equal(out.y, exact)
    assert torch.equal(kernels.LEVELS, exact.flatten())


def test_ambient_input_random_stream_is_a_function_of_position():
    """Same key and offset: the same draws. Another key or offset: others. A batch split in two at
    offsets that continue the counters equals the whole batch, past 2^32 too."""
    observed, bits, flips, _ = stored_batch()
    N, C, H, W = SHAPE
    std, further = torch.ones(N), draws("coins")

    def run(key, offset, rows=slice(None)):
        part = FurtherDraw(further.kind, further.thresholds[rows], further.shared_channels)
        return ambient_input(observed[rows], bits[rows], flips[rows], std[rows], part, key=key, offset=offset)

    first = run(5, 1000)
    assert torch.equal(first.net_input, run(5, 1000).net_input)
    for key, offset in ((6, 1000), (5, 1001)):
        assert not torch.equal(first.net_input, run(key, offset).net_input)
    whole = run(5, 2 ** 32 - C * H * W)
    head, tail = run(5, 2 ** 32 - C * H * W, slice(0, 1)), run(5, 2 ** 32, slice(1, None))
    assert torch.equal(torch.cat([head.net_input, tail.net_input]), whole.net_input)
    assert torch.equal(torch.cat([head.A_hat, tail.A_hat]), whole.A_hat)


@pytest.mark.parametrize("shared", [False, True], ids=["per_channel", "shared"])
def test_ambient_input_statistics(shared):
    """Everything observed and y = 0 (level 127.5 is not stored; use the noise channel directly):
    the noise is standard normal and uncorrelated with its neighbours and with B; B keeps 1 - delta."""
    shape = N, C, H, W = (4, 3, 32, 32)
    observed = torch.full(shape, 0, dtype=torch.float32)
    bits = torch.full((N, C * H * W // 8), 255, dtype=torch.uint8)
    delta = 0.3
    further = FurtherDraw(FurtherKind.COIN, torch.full((N,), coin_threshold(delta)), shared)
    out = ambient_input(observed, bits, torch.zeros(N, dtype=torch.uint8), torch.ones(N), further, key=11, offset=123)
    keep = out.A_hat[:, :1] if shared else out.A_hat
    if shared:
        assert torch.equal(out.A_hat, keep.expand_as(out.A_hat))
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - delta)) < 5 * (delta * (1 - delta) / n) ** 0.5
    noise = out.net_input[:, :C][out.A_hat > 0].double()  # x = A_hat * noise
    m = noise.numel()
    assert abs(noise.mean().item()) < 5 / m ** 0.5
    assert abs(noise.var().item() - 1) < 5 * (2 / m) ** 0.5
    # Normal, not merely unit variance: the fourth moment is 3 and the tails are Gaussian's.
    assert abs((noise ** 4).mean().item() - 3) < 5 * (96 / m) ** 0.5
    assert abs((noise.abs() > 2).double().mean().item() - 0.0455) < 5 * (0.0455 / m) ** 0.5
    flat = out.net_input[:, :C].double().flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 5 / flat.numel() ** 0.5


# ----------------------------------------------------------------------------------------------
# Sampler step


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("stage", ["euler", "heun_predict", "heun_correct"])
def test_sampler_step(stage, dtype, channels_last, clip, poison):
    N, C, H, W = SHAPE
    x = layout(torch.randn(SHAPE, dtype=dtype) * 5, channels_last)
    prediction = layout(torch.randn(N, 2 * C, H, W) * 2, channels_last)  # the net's float32 output
    D = prediction[:, :C]
    mask = layout((torch.rand(SHAPE) < 0.5).to(dtype), channels_last)
    t, dt = torch.tensor(3.7, dtype=dtype), torch.tensor(-1.3, dtype=dtype)
    g1 = torch.randn(SHAPE, dtype=dtype) if stage == "heun_correct" else None
    net_input = torch.full((N, 2 * C, H, W), float("nan"), dtype=dtype)
    step = sampler_step(x, D, mask, t, dt, stage=stage, g1=g1, clip=clip, net_input=net_input)
    expected = sampler_step_reference(x, D, mask, t, dt, stage=stage, g1=g1, clip=clip)
    close(step.net_input, expected.net_input, dtype)
    if stage == "heun_predict":
        assert step.x is None
        close(step.g1, expected.g1, dtype)
    else:
        close(step.x, expected.x, dtype)


def test_sampler_step_keeps_mask_channels_and_updates_in_place():
    N, C, H, W = SHAPE
    x, D = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE)
    mask = (torch.rand(SHAPE) < 0.5).double()
    net_input = torch.full((N, 2 * C, H, W), 7.0, dtype=torch.float64)
    expected = sampler_step_reference(x, D, mask, torch.tensor(2.0), torch.tensor(-0.5))
    step = sampler_step(x, D, mask, 2.0, -0.5, net_input=net_input, write_mask=False, out=x)
    assert step.x is x
    close(x, expected.x, torch.float64)
    close(net_input[:, :C], expected.net_input[:, :C], torch.float64)
    assert torch.all(net_input[:, C:] == 7.0)


# ----------------------------------------------------------------------------------------------
# Dispatch


def test_dispatch_follows_the_switches(monkeypatch):
    a, g = torch.randn(SHAPE), torch.randn(SHAPE)
    assert "interpreter" in kernels.active_path("cpu")
    calls = []
    real = kernels.gated_activation.__globals__["gated_forward"]
    monkeypatch.setitem(kernels.gated_activation.__globals__, "gated_forward",
                        lambda *args: calls.append(1) or real(*args))
    gated_activation(a, g)
    assert calls == [1]
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")
    gated_activation(a, g)
    assert kernels.active_path("cpu") == "PyTorch references (AMBIENT_FAST_KERNELS=0)"
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: the reference
    gated_activation(a, g)
    assert calls == [1]
    assert kernels.active_path("cpu").startswith("PyTorch references (fused kernels need CUDA")


def test_package_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from ambient_fast import kernels\n"
            "a, g = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)\n"
            "assert torch.equal(kernels.gated_activation(a, g), kernels.gated_activation_reference(a, g))\n"
            "print(kernels.active_path('cuda'))\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Triton is not installed" in result.stdout


def test_interpreter_works_when_triton_was_imported_first():
    """torch._inductor imports Triton; kernels must still interpret when TRITON_INTERPRET comes later
    (with the interpreter's fixes installed, as the tests and benchmarks that interpret do)."""
    code = ("import os, torch, torch._inductor, sys\n"
            "assert 'triton' in sys.modules\n"
            "from ambient_fast import kernels\n"
            "from ambient_fast.kernels import interpreter\n"
            "fixes = interpreter.fixes()  # what tests/conftest.py installs for a test session\n"
            "fixes.__enter__()\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "a, g, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(3)\n"
            "out = kernels.gated_activation(a, g, b, True)\n"
            "torch.testing.assert_close(out, kernels.gated_activation_reference(a, g, b, True))\n"
            "from ambient_fast.objective.corruption import FurtherDraw, FurtherKind\n"
            "from ambient_fast.kernels.ambient_input import ambient_input_launch\n"
            "args = (torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8), torch.full((2, 6), 255, dtype=torch.uint8),\n"
            "        torch.zeros(2, dtype=torch.uint8), torch.ones(2), FurtherDraw(FurtherKind.COIN, torch.full((2,), 1 << 23)),\n"
            "        1, 0, False)\n"
            "fused, reference = ambient_input_launch(*args), kernels.ambient_input_reference(*args)\n"
            "assert all(torch.equal(a, b) for a, b in zip(fused, reference))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_package_launches_kernels_without_tooling():
    """Production's launch path is only the launch: no module of the package (the kernels' own
    tooling aside) imports the AOT recorder or the interpreter's fixes, and no launch hook is
    installed, so `kernel[grid]` goes straight to Triton's launcher."""
    code = ("import importlib, pkgutil, sys\n"
            "import ambient_fast\n"
            "TOOLING = ('ambient_fast.kernels.aot', 'ambient_fast.kernels.interpreter')\n"
            "for info in pkgutil.walk_packages(ambient_fast.__path__, 'ambient_fast.'):\n"
            "    if info.name not in TOOLING:\n"
            "        importlib.import_module(info.name)\n"
            "from ambient_fast.kernels import _utils\n"
            "assert _utils._hook is None\n"
            "loaded = [name for name in TOOLING if name in sys.modules]\n"
            "assert not loaded, loaded\n"
            "print(len([m for m in sys.modules if m.startswith('ambient_fast.')]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) > 30  # every module of the package was imported


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernels at realistic sizes (pytest -m gpu)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gpu_gated_activation_and_loss(dtype, channels_last):
    N, C, H, W = 16, 129, 33, 31
    ag = layout(torch.randn(N, 2 * C, H, W, device="cuda"), channels_last).to(dtype).requires_grad_(True)
    bias = torch.randn(C, device="cuda", dtype=dtype, requires_grad=True)
    out = gated_activation_packed(ag, bias, True)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_ag, ref_bias = ag.detach().float().requires_grad_(True), bias.detach().float().requires_grad_(True)
    expected = gated_activation_reference(*ref_ag.chunk(2, dim=1), ref_bias, True)
    expected.backward(dout.float())
    close(out, expected.detach(), dtype)
    close(ag.grad, ref_ag.grad, dtype)
    close(bias.grad, ref_bias.grad, dtype, scale=100)

    D = ag[:, :C].detach().requires_grad_(True)
    y = torch.rand(D.shape, device="cuda") * 2 - 1
    A, w = (torch.rand(D.shape, device="cuda") < 0.5).float(), torch.rand(N, device="cuda")
    masked_loss(D, y, A, w).sum().backward()
    ref_D = D.detach().float().requires_grad_(True)
    masked_loss_reference(ref_D, y, A, w).sum().backward()
    close(D.grad, ref_D.grad, dtype)


@pytest.mark.gpu
@needs_cuda
def test_gpu_ambient_input_and_sampler():
    shape = (64, 3, 64, 64)
    observed, bits, flips, A = stored_batch(shape)
    std = torch.rand(64) + 0.1
    for kind in B_KINDS:
        further = draws(kind, shape)
        cuda_further = FurtherDraw(further.kind, None if further.thresholds is None else further.thresholds.cuda(),
                                   further.shared_channels, None if further.boxes is None else further.boxes.cuda())
        out = ambient_input(observed.cuda(), bits.cuda(), flips.cuda(), std.cuda(), cuda_further, key=1,
                            offset=2 ** 33)
        expected = ambient_input_reference(observed, bits, flips, std, further, 1, 2 ** 33)
        for name in ("A", "y", "A_hat"):  # no transcendental function: bitwise
            assert torch.equal(getattr(out, name).cpu(), getattr(expected, name)), (kind, name)
        # The noise's float64 logarithm and cosine may differ in CUDA's last bits, before rounding.
        close(out.net_input.cpu(), expected.net_input, torch.float32)
    A_float = A.double().cuda()

    x = torch.randn(shape, device="cuda", dtype=torch.float64)
    D, mask = torch.randn(64, 6, 64, 64, device="cuda")[:, :3], A_float
    g1 = sampler_step(x, D, mask, 3.0, -0.5, stage="heun_predict").g1
    step = sampler_step(x, D, mask, 2.5, -0.5, stage="heun_correct", g1=g1)
    ref_g1 = sampler_step_reference(x, D, mask, torch.tensor(3.0), torch.tensor(-0.5), stage="heun_predict").g1
    ref = sampler_step_reference(x, D, mask, torch.tensor(2.5), torch.tensor(-0.5), stage="heun_correct", g1=ref_g1)
    close(step.x, ref.x, torch.float64)
    close(step.net_input, ref.net_input, torch.float64)


@pytest.mark.gpu
@needs_cuda
def test_gpu_ambient_sample_fused_matches_unfused(monkeypatch):
    from ambient_fast.networks import EDMPrecond
    from ambient_fast.sampling.samplers import ambient_sample

    from conftest import TINY_ARCHITECTURES

    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    net = EDMPrecond(img_resolution=8, img_channels=6, model_type=model_type, **kwargs).cuda().eval()
    latents = torch.randn(4, 3, 8, 8, device="cuda")
    masks = (torch.rand(1, 4, 3, 8, 8, device="cuda") < 0.6).float()
    fused = ambient_sample(net, latents, masks, num_steps=6)
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")
    plain = ambient_sample(net, latents, masks, num_steps=6)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
