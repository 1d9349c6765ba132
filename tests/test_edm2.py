"""EDM2's network, preconditioning, sampler and snapshot import: against NVlabs/edm2's own outputs
(../shared/fixtures/edm2_tiny), against direct computations, and against hostile snapshots."""
import builtins
import copy
import json
import pickle
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ambient_fast.files.checkpoints import load_network, save_network
from ambient_fast.files.reference import UnsafePickleError, import_reference
from ambient_fast.networks import EDM2Precond, build_model, edm2_from_reference
from ambient_fast.networks.edm2 import Block, MPConv, mp_cat, mp_sum, normalize, resample
from ambient_fast.sampling.edm2 import edm2_sample

from conftest import assert_gradient_matches_differences, fixture_folder, installed_modules
from test_checkpoint import Persistent, as_persistent_tree, fake_persistence

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=16,
            logvar_channels=8)


def fixture():
    """(folder, reference constructor keywords, weights, io, intermediates) of edm2_tiny."""
    folder = fixture_folder("edm2_tiny")
    config = json.loads((folder / "config.json").read_text())
    return (folder, config, load_file(folder / "weights.safetensors"), load_file(folder / "io.safetensors"),
            load_file(folder / "intermediates.safetensors"))


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def tiny(ambient: bool = True, **kwargs) -> EDM2Precond:
    """A tiny EDM2 (8x8) with every parameter away from its initial value (the gains start at zero)."""
    model = EDM2Precond(img_resolution=8, img_channels=6 if ambient else 3, ambient=ambient, **{**TINY, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.rand_like(p) + 0.5 if p.ndim == 0 else 0.1 * torch.randn_like(p))
    return model.eval()


def ambient_input(n: int, res: int = 8, survival: float = 0.6) -> torch.Tensor:
    mask = (torch.rand(n, 3, res, res) < survival).float()
    return torch.cat([mask * torch.randn(n, 3, res, res), mask], dim=1)


# ----------------------------------------------------------------------------------------------
# The reference's own outputs.

def test_fixture_eval_forward():
    _, config, weights, io, _ = fixture()
    model = edm2_from_reference(config, weights)
    assert set(model.state_dict()) == set(weights)
    with torch.no_grad():
        D = model(io["x"], io["sigma"])
        D_with_logvar, logvar = model(io["x"], io["sigma"], return_logvar=True)
        D_scalar = model(io["x_scalar_sigma"], io["sigma_scalar"])  # 0-dim sigma, as the sampler calls it
    assert D.dtype == torch.float32 and logvar.shape == (4, 1, 1, 1)
    for ours, key in [(D, "D"), (D_with_logvar, "D_with_logvar"), (logvar, "logvar"), (D_scalar, "D_scalar_sigma")]:
        assert max_error(ours, io[key]) < 1e-5, key


def test_fixture_every_activation():
    """Every block's output, the embeddings, the log-variance head, F_x and the coefficients."""
    _, config, weights, io, expected = fixture()
    model = edm2_from_reference(config, weights)
    seen = {}
    for name in [key[len("act."):] for key in expected if key.startswith("act.")]:
        model.get_submodule(name).register_forward_hook(lambda m, args, out, name=name: seen.update({name: out}))
    model.unet.register_forward_hook(lambda m, args, out: seen.update(F_x=out))
    with torch.no_grad():
        model(io["x"], io["sigma"], return_logvar=True)
    assert len(seen) == len([key for key in expected if key.startswith("act.")]) + 1
    for name, value in seen.items():
        key = name if name == "F_x" else f"act.{name}"
        assert max_error(value, expected[key]) < (1e-5 if name == "F_x" else 2e-5), key
    coefficients = model.coefficients(io["sigma"].reshape(-1, 1, 1, 1))
    for value, key in zip(coefficients, ("c_skip", "c_out", "c_in", "c_noise")):
        assert max_error(value.flatten(), expected[key]) < 1e-6, key


def test_fixture_training_forward_normalises_the_weights_in_place():
    _, config, weights, io, _ = fixture()
    folder = fixture_folder("edm2_tiny")
    model = edm2_from_reference(config, weights).train()
    D, logvar = model(io["x"], io["sigma"], return_logvar=True)
    assert max_error(D, io["D_train"]) < 1e-5 and max_error(logvar, io["logvar_train"]) < 1e-5
    # The training output differs from the eval output (normalize(normalize(w)) against normalize(w)).
    assert max_error(D, io["D"]) > 1e-6
    after = load_file(folder / "weights_after_train_forward.safetensors")
    changed = [key for key in after if not torch.equal(after[key], weights[key])]
    assert changed and all(key.endswith("weight") for key in changed)
    state = model.state_dict()
    # Bit for bit on the machines tried; 1e-6 leaves room for another CPU's vector norm.
    assert max(max_error(state[key], after[key]) for key in after) <= 1e-6
    with torch.no_grad():
        assert max_error(model.eval()(io["x"], io["sigma"]), io["D_eval_after_train_forward"]) < 1e-5

    # The same with the normalisation as a step of its own (what a compiled trainer does).
    stepwise = edm2_from_reference(config, weights).train()
    stepwise.normalize_in_forward(False)
    stepwise.normalize_weights_()
    D_stepwise, _ = stepwise(io["x"], io["sigma"], return_logvar=True)
    assert torch.equal(D_stepwise, D)
    assert all(torch.equal(value, state[key]) for key, value in stepwise.state_dict().items())


def test_fixture_sampler():
    """EDM2's sampler (our Heun loop through `edm2_sample`) on the fixture's latents: the images in
    float32 and float64, and the 4-step run call by call."""
    _, config, weights, _, _ = fixture()
    reference = load_file(fixture_folder("edm2_tiny") / "sampler.safetensors")
    model = edm2_from_reference(config, weights)
    noise = reference["noise"]
    assert max_error(edm2_sample(model, noise), reference["images"]) < 1e-5
    images = edm2_sample(model, noise, dtype=torch.float64)
    assert images.dtype == torch.float64 and max_error(images, reference["images_fp64"]) < 1e-5

    calls = []

    class Recording(torch.nn.Module):
        img_channels, img_resolution, label_dim = 3, 16, 0

        def forward(self, x, sigma, class_labels=None, augment_labels=None):
            calls.append((x.clone(), sigma.clone()))
            return model(x, sigma, class_labels)

    assert max_error(edm2_sample(Recording(), noise, num_steps=4), reference["images_steps4"]) < 1e-3
    assert len(calls) == len(reference["trace_steps4_t"]) == 7
    for (x, t), x_ref, t_ref, D_ref in zip(calls, reference["trace_steps4_x"], reference["trace_steps4_t"],
                                           reference["trace_steps4_D"]):
        assert t.ndim == 0 and abs(t.item() - t_ref.item()) <= 1e-6 * t_ref.item()
        assert max_error(x, x_ref) <= 1e-5 * x_ref.abs().max().item()  # the state's float32 round-off, grown
        with torch.no_grad():  # the denoiser at the reference's own inputs
            assert max_error(model(x_ref, t_ref), D_ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# The snapshot pickle: imported with nothing executed.

@contextmanager
def tripwires():
    """Make running anything of a snapshot fail loudly: exec, eval and compile raise when handed source
    text of the snapshot's modules (EDM2's all use `persistence.persistent_class`; imports, which exec
    code objects, pass), and the reference's reconstruction function and EasyDict, importable while it
    lasts, raise when called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the importer ran code from the snapshot")

    def guarded(real):
        def call(source, *args, **kwargs):
            if isinstance(source, (str, bytes)) and "persistent_class" in str(source):
                forbidden()
            return real(source, *args, **kwargs)
        return call

    with fake_dnnlib(type("EasyDict", (dict,), {"__new__": forbidden})), fake_persistence(), \
            pytest.MonkeyPatch.context() as patch:
        for name in ("exec", "eval", "compile"):
            patch.setattr(builtins, name, guarded(getattr(builtins, name)))
        yield


def fake_dnnlib(easydict: type):
    """`dnnlib.util.EasyDict` importable as `easydict` (a dict subclass), as the reference's pickles name it."""
    easydict.__module__ = "dnnlib.util"
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    util.EasyDict, dnnlib.util = easydict, util
    return installed_modules({"dnnlib": dnnlib, "dnnlib.util": util})


def test_snapshot_imports_without_running_anything(tmp_path):
    folder, config, weights, io, _ = fixture()
    modules = set(sys.modules)
    with tripwires():
        loaded = load_network(folder / "snapshot.pkl")
    # The reference's reconstruction would register the snapshot's source as `_imported_module_<hash>`.
    assert not [name for name in set(sys.modules) - modules
                if name.startswith(("_imported_module", "torch_utils", "training", "dnnlib"))]
    model = loaded.model
    assert isinstance(model, EDM2Precond) and not model.training and not model.ambient
    state = model.state_dict()
    assert set(state) == set(weights) and all(value.dtype == torch.float16 for value in state.values())
    assert all(torch.equal(state[key], weights[key].half()) for key in weights)
    with torch.no_grad():
        D = model(io["x"], io["sigma"])
    # float16 weights evaluated as the reference does (float16 gains): within 1e-5; the same weights
    # upcast to float32 are up to ~3e-4 away.
    assert max_error(D, io["D_snapshot_fp16_weights"]) < 1e-5
    assert loaded.metadata["reference_loss"] == "EDM2Loss" and loaded.metadata["loss_state"]["P_mean"] == -0.4
    assert loaded.metadata["encoder"] == "StandardRGBEncoder"

    # Converted to our format, it loads through the same call path with identical outputs.
    from ambient_fast import convert

    assert convert.main([str(folder / "snapshot.pkl"), str(tmp_path / "edm2.safetensors")]) == 0
    ours = load_network(tmp_path / "edm2.safetensors")
    with torch.no_grad():
        assert torch.equal(ours.model(io["x"], io["sigma"]), D)
    assert ours.model.config == model.config and ours.metadata["reference"] == "NVlabs/edm2"


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval")])
def test_hostile_snapshot_is_refused(tmp_path, module, name):
    """The fixture's snapshot with a call `module.name(...)` spliced in before its own content: refused,
    naming the global, and nothing runs."""
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if module == "os" else f"open({str(marker)!r}, 'w')"
    original = (fixture_folder("edm2_tiny") / "snapshot.pkl").read_bytes()
    assert original[:2] == b"\x80\x04"  # protocol 4; protocol-0 opcodes remain valid inside it
    payload = f"c{module}\n{name}\n(V{command}\ntR0".encode()  # GLOBAL, MARK, string, TUPLE, REDUCE, POP
    hostile = tmp_path / "network-snapshot-hostile.pkl"
    hostile.write_bytes(original[:2] + payload + original[2:])
    with pytest.raises(UnsafePickleError, match=rf"{module}\.{name}"):
        import_reference(hostile)
    assert not marker.exists()


def write_edm2_snapshot(path, model: EDM2Precond, encoder_state: dict):
    """A snapshot in NVlabs/edm2's structure for `model` (plain input): an EasyDict of a persistent
    `Precond` with its `_init_kwargs`, a latent encoder's record with numpy statistics, a loss."""
    tree = as_persistent_tree(model)
    tree.meta["class_name"] = "Precond"
    reference_kwargs = dict(img_resolution=model.img_resolution, img_channels=model.img_channels, label_dim=0,
                            use_fp16=True, **TINY)
    tree.meta["state"].update(_init_args=(), _init_kwargs=reference_kwargs)
    easydict = type("EasyDict", (dict,), {})
    with fake_dnnlib(easydict), fake_persistence():
        payload = easydict(encoder=Persistent("StabilityVAEEncoder", encoder_state),
                           dataset_kwargs=easydict(path="latents.zip"),
                           loss_fn=Persistent("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5)),
                           ema=tree)
        path.write_bytes(pickle.dumps(payload, protocol=4))
    return path


def test_snapshot_with_numpy_encoder_statistics(tmp_path):
    """A latent model's snapshot holds numpy arrays and scalars (StabilityVAEEncoder's statistics):
    rebuilt as data, while an array of object dtype is refused."""
    model = tiny(ambient=False).half()
    scale = np.array([0.5, 0.25, 0.125, 1.0], dtype=np.float32)
    state = dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale, bias=-scale, raw_std=np.float32(5.0))
    loaded = import_reference(write_edm2_snapshot(tmp_path / "latent.pkl", model, state))
    assert loaded.metadata["encoder"] == "StabilityVAEEncoder"
    assert loaded.metadata["encoder_state"] == dict(vae_name="stabilityai/sd-vae-ft-mse", scale=scale.tolist(),
                                                    bias=(-scale).tolist(), raw_std=5.0)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 3.0])
    with torch.no_grad():
        assert torch.equal(loaded.model(x, sigma), model(x, sigma))

    state["raw_mean"] = np.array([1, "os.system"], dtype=object)
    with pytest.raises(UnsafePickleError, match="object dtype"):
        import_reference(write_edm2_snapshot(tmp_path / "hostile.pkl", model, state))


# ----------------------------------------------------------------------------------------------
# Our interfaces: config, checkpoints, the ambient input, blocks.

def test_config_and_checkpoint_round_trip(tmp_path):
    model = tiny(mask_aware=False)
    config = json.loads(json.dumps(model.config))
    assert config["precond"] == "EDM2Precond" and config["ambient"] and not config["mask_aware"]
    assert config["res_balance"] == 0.3 and config["channel_mult_emb"] is None  # defaults recorded too
    assert build_model(config).config == config
    save_network(tmp_path / "net.safetensors", model, {"kind": "dust"})
    loaded = load_network(tmp_path / "net.safetensors")
    x, sigma = ambient_input(2), torch.tensor([0.05, 4.0])
    with torch.no_grad():
        assert torch.equal(loaded.model(x, sigma), model(x, sigma))
    # Every encoder and decoder entry but the first convolution: 3 + 7 at two resolutions of one block each.
    assert len(model.blocks()) == 10 and all(isinstance(block, Block) for block in model.blocks())
    assert model.model is model.unet


@pytest.mark.parametrize("mask_aware", [True, False])
def test_ambient_preconditioning(mask_aware):
    """The U-Net reads cat([c_in * image, mask]) (mask scaled by c_in too under the reference's
    coefficients) and predicts C channels; D on observed pixels is EDM's, on hidden pixels
    sigma_data * F (mask-aware) or EDM's; the output's second half is the mask."""
    model = tiny(mask_aware=mask_aware)
    assert model.unet.enc["8x8_conv"].weight.shape[1] == 7 and model.unet.out_conv.weight.shape[0] == 3
    x, sigma = ambient_input(2), torch.tensor([0.002, 5.0])
    s = sigma.reshape(-1, 1, 1, 1)
    seen = {}
    model.unet.register_forward_hook(lambda m, args, out: seen.update(input=args[0], F=out))
    with torch.no_grad():
        D = model(x, sigma)
    image, mask = x[:, :3], x[:, 3:]
    c_in = 1 / (0.25 + s ** 2).sqrt()
    assert torch.allclose(seen["input"], torch.cat([c_in * image, mask if mask_aware else c_in * mask], dim=1))
    observed = 0.25 / (s ** 2 + 0.25) * image + s * 0.5 / (s ** 2 + 0.25).sqrt() * seen["F"]
    expected = torch.where(mask.bool(), observed, 0.5 * seen["F"]) if mask_aware else observed
    assert torch.allclose(D[:, :3], expected, atol=1e-6) and torch.equal(D[:, 3:], mask)
    hidden_scale = model.hidden_output_scale(s)
    assert torch.allclose(hidden_scale, torch.full_like(s, 0.5) if mask_aware else s * 0.5 / (s ** 2 + 0.25).sqrt())


def test_class_labels():
    """Labels enter through mp_sum with the noise embedding; no labels means the all-zeros label
    (which still rescales the noise embedding, as the reference does)."""
    model = tiny(label_dim=10)
    x, sigma = ambient_input(2), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        a = model(x, sigma, F.one_hot(torch.tensor([1, 7]), 10).float())
        b = model(x, sigma, F.one_hot(torch.tensor([2, 3]), 10).float())
        none = model(x, sigma)
        zeros = model(x, sigma, torch.zeros(2, 10))
    assert not torch.allclose(a, b) and torch.equal(none, zeros)


# ----------------------------------------------------------------------------------------------
# The operations, against direct computations, and the gradient.

def test_magnitude_preserving_operations():
    x = torch.randn(3, 5, 4, 4)
    rms = x.square().mean(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(normalize(x, dim=1), x / (1e-4 + rms))
    w = torch.randn(6, 5, 3, 3)
    torch.testing.assert_close(normalize(w), w / (1e-4 + w.square().mean(dim=(1, 2, 3), keepdim=True).sqrt()))
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 12, 3, 3)
    torch.testing.assert_close(mp_sum(a, a * 0 + b[:, :4], 0.3), (0.7 * a + 0.3 * b[:, :4]) / (0.49 + 0.09) ** 0.5)
    # mp_cat: unit-RMS inputs give a unit-RMS output, each part weighted 1 - t : t as a whole.
    a, b = normalize(torch.randn(2, 4, 5, 5), dim=1), normalize(torch.randn(2, 12, 5, 5), dim=1)
    joined = mp_cat(a, b, t=0.3)
    assert abs(joined.square().mean().item() - 1) < 1e-3
    ratio = (joined[:, 4:].square().sum() / joined[:, :4].square().sum()).item()
    assert abs(ratio - (0.3 / 0.7) ** 2) < 1e-3


def test_resampling_is_the_box_filter():
    x = torch.randn(2, 3, 6, 6)
    box = torch.full((3, 1, 2, 2), 0.25)
    torch.testing.assert_close(resample(x, "down"), F.conv2d(x, box, groups=3, stride=2))
    torch.testing.assert_close(resample(x, "up"), F.conv_transpose2d(x, box * 4, groups=3, stride=2))
    assert resample(x, "keep") is x


def test_mpconv_half_weights_in_training_normalise_once():
    """With float16 weights the reference computes with normalize(w) of the float32 copy taken before
    the overwrite (float32 weights: normalize(normalize(w))), and stores normalize(w) in float16."""
    for dtype in (torch.float16, torch.float32):
        conv = MPConv(4, 5, kernel=[3, 3]).to(dtype).train()
        w = conv.weight.detach().float().clone()
        x = torch.randn(2, 4, 6, 6)
        out = conv(x, gain=2.0)
        once = normalize(w)
        used = once if dtype == torch.float16 else normalize(once)
        torch.testing.assert_close(out, F.conv2d(x, used * (2.0 / 6), padding=1), rtol=1e-5, atol=1e-5)
        assert torch.equal(conv.weight.detach(), once.to(dtype))


def test_fused_attention_matches_the_reference_arithmetic(monkeypatch):
    """The CUDA branch of the attention (scaled_dot_product_attention), run on the CPU."""
    from ambient_fast.networks import edm2

    block = Block(32, 32, 16, "dec", attention=True, channels_per_head=16).eval()
    with torch.no_grad():
        block.emb_gain.fill_(0.7)
    x, emb = torch.randn(2, 32, 5, 5), torch.randn(2, 16)
    with torch.no_grad():
        reference = block(x, emb)
        monkeypatch.setattr(edm2, "use_fused_attention", lambda qkv: True)
        fused = block(x, emb)
    assert block.num_heads == 2
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def training_step(model: EDM2Precond, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """EDM2's loss shape (a per-level log-variance) on the image half, backward; returns D."""
    D, logvar = model(x, sigma, return_logvar=True)
    logvar = logvar.flatten()
    ((D[:, :3] - x[:, :3]).square().mean(dim=(1, 2, 3)) / logvar.exp() + logvar).sum().backward()
    return D.detach()


def test_forced_normalisation_as_a_step_and_whole_compiled_blocks():
    """normalize_weights_() before each step, with the in-place overwrite off in the forward, trains
    bit for bit as the reference's forward does (outputs, gradients, stored weights), and leaves every
    block one graph; the reference's way breaks the graph at each overwrite (Inductor would drop the
    overwrite from a graph: see MPConv)."""
    reference = tiny(dropout=0.0).train()
    stepwise = copy.deepcopy(reference)
    stepwise.normalize_in_forward(False)
    x, sigma = ambient_input(2), torch.tensor([0.05, 3.0])
    for _ in range(2):
        stepwise.normalize_weights_()
        assert torch.equal(training_step(stepwise, x, sigma), training_step(reference, x, sigma))
        for (name, a), b in zip(stepwise.named_parameters(), reference.parameters()):
            assert torch.equal(a, b) and torch.equal(a.grad, b.grad), name
            a.grad = b.grad = None

    block = stepwise.unet.dec["4x4_in0"]  # attention, decoder flavour
    inputs = (torch.randn(2, 32, 4, 4), torch.randn(2, 32))
    torch._dynamo.reset()
    try:
        assert torch._dynamo.explain(block)(*inputs).graph_break_count == 0
        torch._dynamo.reset()
        block.conv_res0.normalize_in_forward = True
        assert torch._dynamo.explain(block)(*inputs).graph_break_count > 0
    finally:
        torch._dynamo.reset()


def test_gradient_matches_central_differences():
    """The U-Net in float64 (eval mode: training mode rewrites the weights on every call), every
    parameter including the gains, the attention and the label embedding."""
    unet = tiny(label_dim=4, dropout=0.0).unet.double()
    x = ambient_input(2).double()
    noise_labels = torch.tensor([0.02, 30.0], dtype=torch.float64).log() / 4
    labels = F.one_hot(torch.tensor([1, 3]), 4).double()
    assert_gradient_matches_differences(lambda: unet(x, noise_labels, labels).square().mean(), unet.parameters(),
                                        eps=1e-6, rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown EDM2 network argument"):
        EDM2Precond(img_resolution=8, img_channels=3, gated=True)
    with pytest.raises(ValueError, match=r"\[1, 1\]"):
        EDM2Precond(img_resolution=8, img_channels=3, resample_filter=[1, 3, 3, 1])
    with pytest.raises(ValueError, match="even"):
        EDM2Precond(img_resolution=8, img_channels=3, ambient=True)
    with pytest.raises(ValueError, match="augmentation"):
        tiny()(ambient_input(1), torch.tensor([1.0]), augment_labels=torch.zeros(1, 9))
    with pytest.raises(ValueError, match="label_dim"):
        edm2_from_reference(dict(img_resolution=8, img_channels=3), {})


def test_edm2_run_folder_needs_the_file_of_one_ema_length(tmp_path):
    """An EDM2 run folder holds one snapshot per EMA length, none of them the run's network: with two
    lengths, loading the folder names them and asks for the file; with one, its newest loads."""
    original = (fixture_folder("edm2_tiny") / "snapshot.pkl").read_bytes()
    for name in ("network-snapshot-0000100-0.050.pkl", "network-snapshot-0000200-0.050.pkl"):
        (tmp_path / name).write_bytes(original)
    assert isinstance(load_network(tmp_path).model, EDM2Precond)
    (tmp_path / "network-snapshot-0000200-0.100.pkl").write_bytes(original)
    with pytest.raises(ValueError, match=r"2 EMA lengths \(0\.050, 0\.100\): give the file"):
        load_network(tmp_path)
    assert load_network(tmp_path / "network-snapshot-0000200-0.100.pkl").source.endswith("0.100.pkl")
