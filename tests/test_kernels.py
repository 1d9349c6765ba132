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

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton): the fused kernels "
                                               "are not tested, their PyTorch references are")

from ambient_fast import kernels  # noqa: E402
from ambient_fast.kernels import (ambient_input, ambient_input_reference, gated_activation,  # noqa: E402
                                  gated_activation_packed, gated_activation_reference, masked_loss,
                                  masked_loss_reference, sampler_step, sampler_step_reference)

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
    from ambient_fast.nn.layers import Conv2d

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


def observed(channels_last=False, uint8=True, packed=True, shape=SHAPE, survival=0.7):
    N, C, H, W = shape
    A = torch.rand(shape) < survival
    y = torch.randint(0, 256, shape, dtype=torch.uint8) if uint8 else torch.rand(shape) * 2 - 1
    A_arg = torch.from_numpy(np.packbits(A.numpy().reshape(N, -1), axis=1, bitorder="little")) if packed \
        else layout(A.float(), channels_last)
    return layout(y, channels_last), A_arg, A.float()


@pytest.mark.parametrize("uint8, packed, shared, scale_mask, channels_last", [
    pytest.param(True, True, False, False, False, id="uint8-packed"),
    pytest.param(True, True, True, True, False, id="uint8-packed-shared-scaled"),
    pytest.param(False, False, False, True, True, id="float-float-channels_last-scaled"),
    pytest.param(False, True, True, False, True, id="float-packed-shared-channels_last"),
])
def test_ambient_input_matches_reference_given_the_draws(uint8, packed, shared, scale_mask, channels_last, poison):
    N = SHAPE[0]
    y, A, A_float = observed(channels_last, uint8, packed)
    sigma, c_in = torch.rand(N) * 3 + 0.1, torch.rand(N) + 0.5
    out = ambient_input(y, A, sigma, c_in, delta=0.3, seed=1234, offset=77, shared_channels=shared,
                        scale_mask=scale_mask, return_draws=True)
    assert set(out.B.unique().tolist()) <= {0.0, 1.0}
    if shared:
        assert torch.equal(out.B, out.B[:, :1].expand_as(out.B))
    expected = ambient_input_reference(y, A_float, sigma, c_in, delta=0.3, scale_mask=scale_mask, B=out.B,
                                       noise=out.noise)
    for name in ("net_input", "A_hat", "A", "y"):
        close(getattr(out, name), getattr(expected, name), torch.float32)
    assert out.net_input.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_ambient_input_without_noise_or_further_corruption(poison):
    """delta = 0 and sigma = 0: the whole output is deterministic."""
    y, A, A_float = observed()
    c_in = torch.rand(SHAPE[0]) + 0.5
    out = ambient_input(y, A, 0.0, c_in, delta=0.0, seed=3)
    expected = ambient_input_reference(y, A_float, torch.zeros(SHAPE[0]), c_in, delta=0.0,
                                       noise=torch.randn(SHAPE))
    for name in ("net_input", "A_hat", "A", "y"):
        close(getattr(out, name), getattr(expected, name), torch.float32)


def test_ambient_input_random_stream_is_reproducible_and_resumable():
    y, A, _ = observed()
    N, C, H, W = SHAPE
    kw = dict(delta=0.4, return_draws=True)
    first = ambient_input(y, A, 1.0, seed=5, offset=1000, **kw)
    again = ambient_input(y, A, 1.0, seed=5, offset=1000, **kw)
    assert torch.equal(first.net_input, again.net_input) and torch.equal(first.B, again.B)
    for seed, offset in ((6, 1000), (5, 1001)):
        other = ambient_input(y, A, 1.0, seed=seed, offset=offset, **kw)
        assert not torch.equal(first.noise, other.noise) and not torch.equal(first.B, other.B)
    # Batch [0, 2) then [2, 3), each at offset + index * C*H*W, equals the whole batch at once.
    head = ambient_input(y[:2], A[:2], 1.0, seed=5, offset=1000, **kw)
    tail = ambient_input(y[2:], A[2:], 1.0, seed=5, offset=1000 + 2 * C * H * W, **kw)
    assert torch.equal(torch.cat([head.noise, tail.noise]), first.noise)
    assert torch.equal(torch.cat([head.B, tail.B]), first.B)
    # Offsets past 2^32 (a long run) still give fresh numbers.
    far = ambient_input(y, A, 1.0, seed=5, offset=1000 + 2 ** 32, **kw)
    assert not torch.equal(far.noise, first.noise)


@pytest.mark.parametrize("shared", [False, True], ids=["per_channel", "shared"])
def test_ambient_input_statistics(shared):
    shape = (4, 3, 32, 32)
    y, A, _ = observed(shape=shape, survival=1.0)
    delta = 0.3
    out = ambient_input(y, A, 1.0, delta=delta, seed=11, offset=123, shared_channels=shared, return_draws=True)
    keep = out.B[:, :1] if shared else out.B
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - delta)) < 5 * (delta * (1 - delta) / n) ** 0.5
    noise = out.noise.double()
    m = noise.numel()
    assert abs(noise.mean().item()) < 5 / m ** 0.5
    assert abs(noise.var().item() - 1) < 5 * (2 / m) ** 0.5
    assert abs(((noise > 0).double().mean().item()) - 0.5) < 5 * (0.25 / m) ** 0.5
    # Neighbouring counters must not be correlated (noise from u1, u2; B from u3 of one draw).
    assert abs(torch.corrcoef(torch.stack([noise.flatten()[:-1], noise.flatten()[1:]]))[0, 1].item()) < 5 / m ** 0.5
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), out.B.double().flatten()]))[0, 1].item()) < 5 / m ** 0.5


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
    """torch._inductor imports Triton; kernels must still interpret when TRITON_INTERPRET comes later."""
    code = ("import os, torch, torch._inductor, sys\n"
            "assert 'triton' in sys.modules\n"
            "from ambient_fast import kernels\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "a, g, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(3)\n"
            "out = kernels.gated_activation(a, g, b, True)\n"
            "torch.testing.assert_close(out, kernels.gated_activation_reference(a, g, b, True))\n"
            "y = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)\n"
            "assert kernels.ambient_input(y, torch.ones(2, 3, 4, 4), 1.0, delta=0.5, seed=1).A_hat.isfinite().all()\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr


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
    y, A, A_float = (t.cuda() for t in observed(shape=shape))
    sigma = torch.rand(64, device="cuda") + 0.1
    out = ambient_input(y, A, sigma, delta=0.2, seed=1, offset=2 ** 33, return_draws=True)
    expected = ambient_input_reference(y, A_float, sigma, delta=0.2, B=out.B, noise=out.noise)
    close(out.net_input, expected.net_input, torch.float32)
    assert abs(out.B[A_float.bool()].mean().item() - 0.8) < 0.01

    x = torch.randn(shape, device="cuda", dtype=torch.float64)
    D, mask = torch.randn(64, 6, 64, 64, device="cuda")[:, :3], A_float.double()
    g1 = sampler_step(x, D, mask, 3.0, -0.5, stage="heun_predict").g1
    step = sampler_step(x, D, mask, 2.5, -0.5, stage="heun_correct", g1=g1)
    ref_g1 = sampler_step_reference(x, D, mask, torch.tensor(3.0), torch.tensor(-0.5), stage="heun_predict").g1
    ref = sampler_step_reference(x, D, mask, torch.tensor(2.5), torch.tensor(-0.5), stage="heun_correct", g1=ref_g1)
    close(step.x, ref.x, torch.float64)
    close(step.net_input, ref.net_input, torch.float64)


@pytest.mark.gpu
@needs_cuda
def test_gpu_ambient_sample_fused_matches_unfused(monkeypatch):
    from ambient_fast.nn import EDMPrecond
    from ambient_fast.sample import ambient_sample

    from conftest import TINY_ARCHITECTURES

    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    net = EDMPrecond(img_resolution=8, img_channels=6, model_type=model_type, **kwargs).cuda().eval()
    latents = torch.randn(4, 3, 8, 8, device="cuda")
    masks = (torch.rand(1, 4, 3, 8, 8, device="cuda") < 0.6).float()
    fused = ambient_sample(net, latents, masks, num_steps=6)
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")
    plain = ambient_sample(net, latents, masks, num_steps=6)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
