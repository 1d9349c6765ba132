"""Samplers: reference fixtures, an analytic ODE, per-seed independence, the command line."""
import json
import math
import subprocess
import sys

import pytest
import torch

from ambient_fast.files.checkpoints import save_network
from ambient_fast.files.images import load_png
from ambient_fast.networks import EDMPrecond, from_reference
from ambient_fast.sample import main as sample_main, parse_seeds
from ambient_fast.sampling.samplers import PerSeedGenerators, ambient_sample, edm_sigma_steps, seeded_inputs

from conftest import TINY_ARCHITECTURES, load_fixture, torchrun
from test_nn import randomize_


@pytest.fixture(scope="module")
def reference():
    config, weights, cases = load_fixture("ddpmpp_tiny")
    return from_reference(config, weights), cases


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-4), (torch.float32, 2e-3)])
def test_fixed_mask_sampler_matches_reference(reference, dtype, tolerance):
    model, cases = reference
    out = ambient_sample(model, cases["sample_latents"], cases["sample_fixed_mask_masks"], dtype=dtype)
    assert out.dtype == dtype
    err = (out.double() - cases["sample_fixed_mask_out"]).abs().max().item()
    assert err < tolerance, f"fixed-mask sampler differs from the reference by {err:.3g}"


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-4), (torch.float32, 2e-3)])
def test_guidance_sampler_matches_reference(reference, dtype, tolerance):
    model, cases = reference
    out = ambient_sample(model, cases["sample_latents"], cases["sample_guidance_masks"], guidance=0.05, dtype=dtype)
    err = (out.double() - cases["sample_guidance_out"]).abs().max().item()
    assert err < tolerance, f"guidance sampler differs from the reference by {err:.3g}"


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of N(0, s^2 I) data: D(x, t) = s^2 / (s^2 + t^2) x. The probability-flow
    ODE dx/dt = (x - D) / t then has the solution x(t) = x(T) sqrt(s^2 + t^2) / sqrt(s^2 + T^2)."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x, t, labels=None):
        assert not torch.is_grad_enabled(), "guidance 0 must not use autograd"
        channels = x.shape[1] // 2
        t = torch.as_tensor(t, dtype=x.dtype)
        return torch.cat([self.s ** 2 / (self.s ** 2 + t ** 2) * x[:, :channels], x[:, channels:]], dim=1)


def test_solvers_on_the_analytic_ode():
    s, T = 0.5, 80.0
    latents = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    masks = torch.ones(1, *latents.shape, dtype=torch.float64)
    net = GaussianDenoiser(s)
    # The last step maps to t = 0 with an Euler step, which lands on D(x, sigma_min): exact is x(sigma_min)
    # times the denoiser's factor at sigma_min.
    sigma_min = 0.002
    exact = latents * T * math.sqrt(s ** 2 + sigma_min ** 2) / math.sqrt(s ** 2 + T ** 2) * s ** 2 / (s ** 2 + sigma_min ** 2)

    def error(solver, steps):
        out = ambient_sample(net, latents, masks, num_steps=steps, solver=solver, clip=False)
        return (out - exact).abs().max().item() / exact.abs().max().item()

    heun18, heun36 = error("heun", 18), error("heun", 36)
    euler18, euler36 = error("euler", 18), error("euler", 36)
    # Measured: Heun 0.055 -> 0.012 (x4.5, second order), Euler 0.154 -> 0.078 (x2.0, first order).
    assert heun18 < 0.1 and 3 < heun18 / heun36 < 6, (heun18, heun36)
    assert euler18 > 2 * heun18 and 1.6 < euler18 / euler36 < 2.5, (euler18, euler36)


def test_sigma_steps():
    t = edm_sigma_steps(18)
    assert t.shape == (19,) and t[0] == 80 and abs(t[-2].item() - 0.002) < 1e-12 and t[-1] == 0
    assert torch.all(t[:-1] > t[1:])


def small_model(label_dim=0):
    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    return randomize_(EDMPrecond(img_resolution=8, img_channels=6, model_type=model_type, label_dim=label_dim,
                                 **kwargs)).eval()


@pytest.mark.parametrize("guidance,num_masks", [(0.0, 1), (0.05, 2)])
def test_each_image_depends_only_on_its_seed(guidance, num_masks):
    model = small_model()
    kwargs = dict(num_steps=4, guidance=guidance, dtype=torch.float64)
    latents, masks = seeded_inputs([3, 4, 5, 6], (3, 8, 8), num_masks, 0.5, False, "cpu")
    together = ambient_sample(model, latents, masks, **kwargs)
    lat, msk = seeded_inputs([5, 9], (3, 8, 8), num_masks, 0.5, False, "cpu")
    apart = ambient_sample(model, lat, msk, **kwargs)
    assert torch.allclose(together[2], apart[0], atol=1e-5)


def test_churned_image_depends_only_on_its_seed():
    """Churn noise from per-seed generators: an image's churned sample is the same in any batch. The
    global generator (the default noise source) would not give that, and churn changes the image."""
    model = small_model()

    def churned(seeds, per_seed=True, churn=20.0):
        generators = PerSeedGenerators(seeds)
        latents, masks = generators.sampling_inputs((3, 8, 8), 1, 0.5, False, "cpu")
        noise = generators.randn_like if per_seed else torch.randn_like
        return ambient_sample(model, latents, masks, num_steps=4, S_churn=churn, randn_like=noise)

    together, apart = churned([3, 4, 5, 6]), churned([5, 9])
    assert torch.allclose(together[2], apart[0], atol=1e-5)
    assert not torch.allclose(together[2], churned([5], churn=0.0)[0], atol=1e-3)
    torch.manual_seed(0)
    global_together = churned([3, 4, 5, 6], per_seed=False)
    assert not torch.allclose(global_together[2], churned([5, 9], per_seed=False)[0], atol=1e-3)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        PerSeedGenerators([1, 2]).randn_like(torch.zeros(3, 1))


def test_seeded_inputs_share_masks_over_channels():
    _, masks = seeded_inputs([1, 2], (3, 8, 8), 2, 0.5, True, "cpu")
    assert masks.shape == (2, 2, 3, 8, 8)
    assert torch.equal(masks[:, :, 0], masks[:, :, 2])
    assert not torch.equal(masks[0], masks[1])


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,4,9-10") == [1, 4, 9, 10]
    with pytest.raises(ValueError, match="--seeds"):
        parse_seeds("3-1")


def test_bad_arguments():
    with pytest.raises(ValueError, match="solver"):
        ambient_sample(small_model(), torch.randn(1, 3, 8, 8), torch.ones(1, 1, 3, 8, 8), solver="rk4")
    with pytest.raises(ValueError, match="masks must have shape"):
        ambient_sample(small_model(), torch.randn(1, 3, 8, 8), torch.ones(1, 3, 8, 8))


def test_sample_cli_end_to_end(tmp_path, capsys):
    net = tmp_path / "net.safetensors"
    save_network(net, small_model(label_dim=2), dict(kind="dust", p=0.5, delta=0.1, shared_channels=True))
    out = tmp_path / "samples"
    command = [sys.executable, "-m", "ambient_fast.sample", "--net", str(net), "--out", str(out), "--seeds", "0-4",
               "--batch", "3", "--steps", "3", "--class", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert load_png(out / "000000.png").shape == (8, 8, 3)
    assert load_png(out / "grid.png").shape[2] == 3
    assert json.loads((out / "sampling.json").read_text())["survival"] == pytest.approx(0.45)
    capsys.readouterr()
    assert sample_main(command[3:-2]) == 1  # the command's own error path, in this process
    assert "--class" in capsys.readouterr().err


def test_fast_path_agrees_with_the_exact_path():
    """The fast path (float32 state, bf16 network, fused step; the CUDA graph needs a GPU, see
    test_fast_path_cuda_graph) gives the exact path's images within bf16 tolerance."""
    model = small_model()
    latents, masks = seeded_inputs([0, 1, 2], (3, 8, 8), 1, 0.5, False, "cpu")
    exact = ambient_sample(model, latents, masks, num_steps=6)
    fast = ambient_sample(model, latents, masks, num_steps=6, fast=True)
    assert fast.dtype == torch.float32
    # Measured: max 3.5e-3, mean 5.2e-4 (bf16 network against fp32).
    assert (fast.double() - exact).abs().max() < 0.02
    assert (fast.double() - exact).abs().mean() < 0.005
    with pytest.raises(ValueError, match="fast path"):
        ambient_sample(model, latents, torch.cat([masks, masks]), guidance=0.1, fast=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_fast_path_cuda_graph(reference):
    model, cases = reference
    model = model.cuda()
    latents, masks = cases["sample_latents"].cuda(), cases["sample_fixed_mask_masks"].cuda()
    exact = ambient_sample(model, latents, masks)
    fast = ambient_sample(model, latents, masks, fast=True)
    assert (fast.double() - exact).abs().max() < 0.1
    assert (fast.double() - exact).abs().mean() < 0.01


def test_sample_cli_under_torchrun_splits_seeds(tmp_path):
    net = tmp_path / "net.safetensors"
    save_network(net, small_model(), dict(kind="dust", p=0.5, delta=0.1, shared_channels=False))
    args = ["--net", str(net), "--seeds", "0-4", "--steps", "2", "--batch", "2"]
    out = torchrun("ambient_fast.sample", *args, "--out", str(tmp_path / "two"))
    assert "2 process(es)" in out
    assert sample_main([*args, "--out", str(tmp_path / "one")]) == 0  # one process: this one
    for seed in range(5):  # each image depends only on its seed, not on the rank or batch it ran in
        name = f"{seed:06d}.png"
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert (tmp_path / "two" / "grid.png").is_file()


def test_fast_path_builds_its_denoiser_once_per_shape(monkeypatch):
    """The fast path's static denoiser (its CUDA graph on a GPU) is made once per network and shape
    and reused; the reused one reads the new latents, masks and labels: its images equal those of a
    fresh copy of the network."""
    import copy

    from ambient_fast.sampling import graphs

    made = []
    original = graphs.StaticDenoiser.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(graphs.StaticDenoiser, "__init__", counting)
    model = small_model(label_dim=3)
    kwargs = dict(num_steps=3, fast=True)
    first_latents, first_masks = seeded_inputs([0, 1], (3, 8, 8), 1, 0.5, False, "cpu")
    latents, masks = seeded_inputs([7, 8], (3, 8, 8), 1, 0.5, False, "cpu")
    labels = torch.eye(3)[[2, 0]]
    ambient_sample(model, first_latents, first_masks, class_labels=torch.eye(3)[[0, 1]], **kwargs)
    reused = ambient_sample(model, latents, masks, class_labels=labels, **kwargs)
    assert len(made) == 1
    fresh = ambient_sample(copy.deepcopy(model), latents, masks, class_labels=labels, **kwargs)
    assert len(made) == 2
    assert torch.equal(reused, fresh)
    more_latents, more_masks = seeded_inputs([0, 1, 2], (3, 8, 8), 1, 0.5, False, "cpu")
    ambient_sample(model, more_latents, more_masks, class_labels=torch.eye(3), **kwargs)  # another batch size
    assert len(made) == 3


def host_reads(work) -> int:
    """How many tensor values `work()` reads on the host (on a GPU each read waits for the queue to
    drain): `.item()`, `bool(tensor)` and comparisons all dispatch to aten._local_scalar_dense."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                HostReads.count += 1
            return func(*args, **(kwargs or {}))

    with HostReads():
        work()
    return HostReads.count


@pytest.mark.parametrize("options", [dict(), dict(fast=True), dict(S_churn=10.0, S_min=0.05, S_max=50.0)],
                         ids=["exact", "fast", "churn"])
def test_the_sampler_never_waits_for_device_values(options):
    """No tensor value is read on the host during sampling."""
    model = small_model()
    latents, masks = seeded_inputs([0, 1], (3, 8, 8), 1, 0.5, False, "cpu")
    assert host_reads(lambda: ambient_sample(model, latents, masks, num_steps=4, **options)) == 0
