"""Networks: reference fixtures, every architecture variant, gating, preconditioning, state dicts."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from ambient_fast.networks import EDMPrecond, VPPrecond, build_reference_model, from_reference
from ambient_fast.networks.layers import Conv2d

from conftest import TINY_ARCHITECTURES, assert_gradient_matches_differences, load_fixture

RES = 8


def ambient_input(n: int, channels: int = 3, res: int = RES, survival: float = 0.6) -> torch.Tensor:
    """cat([mask * (y + noise), mask]) with a random 0/1 mask."""
    mask = (torch.rand(n, channels, res, res) < survival).float()
    return torch.cat([mask * torch.randn(n, channels, res, res), mask], dim=1)


def build(arch: str, precond=EDMPrecond, **kwargs):
    model_type, arch_kwargs = TINY_ARCHITECTURES[arch]
    return precond(img_resolution=RES, img_channels=6, model_type=model_type, **{**arch_kwargs, **kwargs})


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Redraw every parameter so that no layer hides behind a zero initialisation."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


# ----------------------------------------------------------------------------------------------
# Golden fixture of the reference implementation.

def test_fixture_forward_matches_reference():
    config, weights, cases = load_fixture("ddpmpp_tiny")
    model = from_reference(config, weights)
    assert not model.training
    with torch.no_grad():
        out = model(cases["forward_x"], cases["forward_sigma"], augment_labels=cases["forward_augment_labels"])
    assert out.shape == cases["forward_out"].shape == (4, 6, 16, 16)
    assert out.dtype == torch.float32
    err = (out - cases["forward_out"]).abs().max().item()
    assert err < 1e-4, f"max abs error against the reference fixture: {err:.3g}"


def test_fixture_state_dict_keys_equal_reference():
    config, weights, _ = load_fixture("ddpmpp_tiny")
    model = build_reference_model(config)
    assert set(model.state_dict()) == set(weights)
    assert "model.enc.16x16_block0.conv0.gate_weight" in model.state_dict()
    for key, value in model.state_dict().items():
        assert value.shape == weights[key].shape, key
    # The config's param_count counts the resampling-filter buffers too.
    assert sum(v.numel() for v in model.state_dict().values()) == config["param_count"]


def test_fixture_config_variants():
    config, weights, cases = load_fixture("ddpmpp_tiny")
    model = from_reference(config, weights)
    assert model.model.enc["16x16_conv"].gate == "double_sigmoid"
    assert not model.mask_aware
    with pytest.raises(ValueError, match="img_resolution"):
        build_reference_model({k: v for k, v in config.items() if k != "img_resolution"})
    with pytest.raises(RuntimeError):  # strict loading: a missing key is an error
        from_reference(config, {k: v for k, v in weights.items() if not k.endswith("gate_weight")})


# ----------------------------------------------------------------------------------------------
# Every architecture variant builds and runs forward and backward.

@pytest.mark.parametrize("arch", sorted(TINY_ARCHITECTURES))
@pytest.mark.parametrize("gate", ["sigmoid", "double_sigmoid", "none"])
def test_architectures_forward_backward(arch, gate):
    """Every architecture and gate: the output's shape, every parameter reached by backward, and the
    U-Net's gradient against central differences of the float64 network (steps of 1e-9: the
    randomised ADM curves strongly at 1e-5 already)."""
    model = build(arch, gate=gate, augment_dim=9).train()
    out = model(ambient_input(3), torch.tensor([0.02, 1.0, 30.0]), augment_labels=torch.randn(3, 9))
    assert out.shape == (3, 6, RES, RES) and out.dtype == torch.float32
    out[:, :3].square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    has_gate = any(name.endswith("gate_weight") for name, _ in model.named_parameters())
    assert has_gate == (gate != "none")
    unet = randomize_(build(arch, gate=gate, augment_dim=9).model).train().double()
    x, aug = ambient_input(3).double(), torch.randn(3, 9, dtype=torch.float64)
    noise_labels = torch.tensor([0.02, 1.0, 30.0], dtype=torch.float64).log() / 4
    assert_gradient_matches_differences(lambda: unet(x, noise_labels, None, aug)[:, :3].square().mean(),
                                        unet.parameters(), eps=1e-9, rel=1e-5)


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_class_conditional(arch):
    model = randomize_(build(arch, label_dim=10)).eval()
    x = ambient_input(2)
    sigma = torch.tensor([0.5, 0.5])
    labels = F.one_hot(torch.tensor([1, 7]), 10).float()
    with torch.no_grad():
        a = model(x, sigma, labels)
        b = model(x, sigma, F.one_hot(torch.tensor([2, 3]), 10).float())
        unconditional = model(x, sigma)  # no labels: the all-zeros label
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, unconditional)


@pytest.mark.parametrize("precond", [EDMPrecond, VPPrecond])
@pytest.mark.parametrize("mask_aware", [True, False])
def test_preconditioners_forward_backward(precond, mask_aware):
    """The preconditioned model's gradient against central differences (it computes in float32, as
    the reference: steps of 1e-2 and a tolerance of 1%; a wrong backward is off by order one)."""
    model = randomize_(build("ddpmpp", precond=precond, mask_aware=mask_aware))
    x, sigma = ambient_input(2), torch.tensor([0.1, 3.0])
    assert_gradient_matches_differences(lambda: model(x, sigma)[:, :3].square().mean(), model.parameters(), eps=1e-2,
                                        rel=1e-2)


class OperationNames(TorchDispatchMode):
    """Records the name of every ATen operation run while active."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_a_network_built_on_meta_only_allocates():
    """Built on the meta device (what a checkpoint's header is checked against before its weights
    load), every architecture and EDM2 only make tensors, copy and view them: no initial values are
    computed (layers.initial_values), since arithmetic on meta tensors runs PyTorch's Python reference
    kernels. On the CPU the same build computes them."""
    from ambient_fast.networks import EDM2Precond

    builds = [lambda arch=arch: build(arch) for arch in TINY_ARCHITECTURES] + [
        lambda: EDM2Precond(img_resolution=RES, img_channels=6, ambient=True, model_channels=16, channel_mult=[1, 2],
                            num_blocks=1, attn_resolutions=[RES // 2])]
    for make in builds:
        with torch.device("meta"), OperationNames() as operations:
            net = make()
        assert all(p.is_meta for p in net.state_dict().values())
        assert operations.names <= {"empty", "zeros", "ones", "rand", "randn", "lift_fresh", "_to_copy", "unsqueeze"}, \
            operations.names
        with OperationNames() as operations:
            make()
        assert {"mul"} <= operations.names


def test_state_dict_round_trip(tmp_path):
    model = randomize_(build("ncsnpp", augment_dim=9)).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    clone = build("ncsnpp", augment_dim=9).eval()
    clone.load_state_dict(load_file(str(path)), strict=True)
    x, sigma, aug = ambient_input(2), torch.tensor([0.3, 4.0]), torch.randn(2, 9)
    with torch.no_grad():
        assert torch.equal(model(x, sigma, augment_labels=aug), clone(x, sigma, augment_labels=aug))


# ----------------------------------------------------------------------------------------------
# The gated convolution and the preconditioning, against direct computations.

@pytest.mark.parametrize("gate", ["sigmoid", "double_sigmoid"])
@pytest.mark.parametrize("kernel,up,down,fused", [(3, False, False, False), (1, False, False, False),
                                                  (3, False, True, False), (3, True, False, False),
                                                  (3, False, True, True)])
def test_gated_conv_matches_two_convolutions(gate, kernel, up, down, fused):
    conv = Conv2d(5, 7, kernel, up=up, down=down, resample_filter=[1, 3, 3, 1], fused_resample=fused,
                  gate=gate, init_bias=1.0)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 5, 9, 9)
    s = torch.sigmoid if gate == "sigmoid" else (lambda t: torch.sigmoid(torch.sigmoid(t)))
    f = conv.resample_filter
    pad = kernel // 2
    if fused:  # convolve and gate at full resolution, then filter and subsample
        y = F.conv2d(x, conv.weight, padding=pad + 1) * s(F.conv2d(x, conv.gate_weight, padding=pad + 1))
        y = F.conv2d(y, f.tile([7, 1, 1, 1]), groups=7, stride=2)
    else:
        z = x
        if up:
            z = F.conv_transpose2d(z, (f * 4).tile([5, 1, 1, 1]), groups=5, stride=2, padding=1)
        if down:
            z = F.conv2d(z, f.tile([5, 1, 1, 1]), groups=5, stride=2, padding=1)
        y = F.conv2d(z, conv.weight, padding=pad) * s(F.conv2d(z, conv.gate_weight, padding=pad))
    expected = y + conv.bias.reshape(1, -1, 1, 1)  # the bias comes last, after gating and resampling
    with torch.no_grad():
        out = conv(x)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=1e-5), (out - expected).abs().max()


def test_mask_aware_preconditioning_hidden_pixels():
    """Where the mask is 0: D = sigma_data * F (c_skip = 0, c_out = sigma_data); where it is 1: EDM's
    c_skip * x + c_out * F. The mask channels enter the network unscaled."""
    model = randomize_(build("ddpmpp", mask_aware=True)).eval()
    x = ambient_input(2)
    sigma = torch.tensor([0.002, 5.0])
    s = sigma.reshape(-1, 1, 1, 1)
    seen = {}
    model.model.register_forward_hook(lambda mod, args, out: seen.update(input=args[0], F=out))
    with torch.no_grad():
        D = model(x, sigma)[:, :3]
    image, mask = x[:, :3], x[:, 3:]
    c_in = 1 / (0.25 + s ** 2).sqrt()
    assert torch.allclose(seen["input"], torch.cat([c_in * image, mask], dim=1))
    F_image = seen["F"][:, :3]
    observed = 0.25 / (s ** 2 + 0.25) * image + s * 0.5 / (s ** 2 + 0.25).sqrt() * F_image
    expected = torch.where(mask.bool(), observed, 0.5 * F_image)
    assert torch.allclose(D, expected, atol=1e-6)


def test_reference_preconditioning_whole_input():
    model = randomize_(build("ddpmpp", mask_aware=False)).eval()
    x = ambient_input(2)
    sigma = torch.tensor([0.01, 2.0])
    s = sigma.reshape(-1, 1, 1, 1)
    seen = {}
    model.model.register_forward_hook(lambda mod, args, out: seen.update(input=args[0], F=out))
    with torch.no_grad():
        D = model(x, sigma)
    c_in = 1 / (0.25 + s ** 2).sqrt()
    assert torch.allclose(seen["input"], c_in * x)  # mask channels scaled too, as the reference does
    expected = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * seen["F"]
    assert torch.allclose(D, expected, atol=1e-6)


def test_vp_coefficients():
    model = build("ddpmpp", precond=VPPrecond, mask_aware=False)
    sigma = torch.tensor([0.01, 1.0, 50.0]).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = model.coefficients(sigma)
    assert torch.equal(c_skip, torch.ones_like(sigma)) and torch.equal(c_out, -sigma)
    # c_noise = (M - 1) t with sigma(t) = sigma: invert through the schedule.
    t = c_noise / (model.M - 1)
    back = ((0.5 * model.beta_d * t ** 2 + model.beta_min * t).exp() - 1).sqrt()
    assert torch.allclose(back, sigma, rtol=1e-4)
    assert model.sigma_min < 0.01 and 100 < model.sigma_max < 200


def test_bad_arguments():
    with pytest.raises(ValueError, match="gate"):
        build("ddpmpp", gate="tanh")
    with pytest.raises(ValueError, match="model_type"):
        EDMPrecond(img_resolution=8, img_channels=6, model_type="UNet3000")
    with pytest.raises(ValueError, match="even"):
        EDMPrecond(img_resolution=8, img_channels=3, model_type="SongUNet")
    with pytest.raises(ValueError, match="encoder_type"):
        build("ddpmpp", encoder_type="fancy")


# ----------------------------------------------------------------------------------------------
# Attention on CUDA: scaled_dot_product_attention with inputs its fused kernels accept.

@pytest.mark.parametrize("channels,heads,res", [(32, 1, 8), (128, 2, 5), (48, 3, 4)], ids=lambda v: str(v))
def test_fused_attention_matches_the_reference_and_takes_a_fused_kernel(monkeypatch, channels, heads, res):
    """The CUDA branch of a block's attention, run on the CPU: it equals the reference arithmetic,
    and SDPA receives 4-D (N, heads, L, c) tensors with a contiguous last dimension, for which it
    picks a fused kernel (3-D or transposed inputs select the math path, choice 0)."""
    from ambient_fast.networks import layers

    block = layers.UNetBlock(channels, channels, emb_channels=16, attention=True, num_heads=heads).eval()
    randomize_(block)
    x, emb = torch.randn(2, channels, res, res), torch.randn(2, 16)
    with torch.no_grad():
        reference = block(x, emb)
        choices = []
        sdpa = F.scaled_dot_product_attention

        def recording(q, k, v, *args, **kwargs):
            assert q.ndim == 4 and q.shape == (2, heads, res * res, channels // heads)
            assert all(t.stride(-1) == 1 for t in (q, k, v))
            choices.append(torch._fused_sdp_choice(q, k, v))
            return sdpa(q, k, v, *args, **kwargs)

        monkeypatch.setattr(layers, "use_fused_attention", lambda qkv: True)
        monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recording)
        fused = block(x, emb)
    assert choices and all(choice != 0 for choice in choices), choices  # 0 = the math path
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
