"""Fine-tuning diffusers UNets with the ambient objective: the VP <-> EDM wrapper against diffusers'
own DDIM step, hidden pixels, conditioning, the loss's blindness outside A, the trainer's outputs
reloaded by diffusers, exact resume (one process; FSDP2 under torchrun in CUDA's configuration in
tests/test_cuda_config.py), the sampling and restoration CLIs, bad input and the optional extra.
Tiny random models of both UNet classes, built here; nothing is downloaded."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers", reason="the [diffusers] extra is not installed (it is part of [test])")

from ambient_fast.files.checkpoints import load_network  # noqa: E402
from ambient_fast.data.synthetic import clean_twin, synthetic_dataset  # noqa: E402
from ambient_fast.networks.diffusers import DiffusersDenoiser, load_denoiser  # noqa: E402
from ambient_fast.finetune import main  # noqa: E402
from ambient_fast.training.config import FinetuneConfig  # noqa: E402
from ambient_fast.training.finetuning import FinetuneTrainer  # noqa: E402
from ambient_fast.objective.objective import DiscreteVPSchedule, ambient_loss, training_batch  # noqa: E402
from ambient_fast.sampling.samplers import ambient_sample  # noqa: E402


EMBEDDING_DIM, TOKENS = 24, 5
FAST = ["--steps", "4", "--batch", "4", "--snapshot-every", "2", "--sample-count", "2", "--sample-steps", "2"]


def tiny_unet2d() -> "diffusers.UNet2DModel":
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def tiny_if_unet() -> "diffusers.UNet2DConditionModel":
    """DeepFloyd IF stage I's architecture, shrunk: 3 channels in, 6 out (noise and variance), text
    embeddings projected into cross-attention and added to the time embedding."""
    return diffusers.UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=EMBEDDING_DIM, attention_head_dim=8,
        addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift", act_fn="gelu")


def if_scheduler(**overrides) -> "diffusers.DDPMScheduler":
    return diffusers.DDPMScheduler(**{**dict(beta_schedule="squaredcos_cap_v2", thresholding=True,
                                             variance_type="learned_range", prediction_type="epsilon"), **overrides})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """unet2d: a UNet2DModel with its scheduler config in the same directory. if: an IF-like
    UNet2DConditionModel in a pipeline layout (unet/, scheduler/), its prompt embedding in a file."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tiny_unet2d().save_pretrained(root / "unet2d")
    diffusers.DDPMScheduler().save_pretrained(root / "unet2d")
    tiny_if_unet().save_pretrained(root / "if" / "unet")
    if_scheduler().save_pretrained(root / "if" / "scheduler")
    save_file({"prompt_embeddings": torch.randn(1, TOKENS, EMBEDDING_DIM)}, str(root / "empty-prompt.safetensors"))
    data = synthetic_dataset(root / "data", n=16, p=0.6)
    return dict(root=root, unet2d=root / "unet2d", IF=root / "if", prompts=root / "empty-prompt.safetensors", data=data)


def finetune_args(models, kind, out):
    args = ["--unet", str(models[kind]), "--data", str(models["data"]), "--out", str(out), *FAST]
    return args + (["--prompt-embeddings", str(models["prompts"])] if kind == "IF" else [])


def unet_inputs(unet, n=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=generator)
    t = torch.tensor([3.0, 250.5, 999.0][:n])
    conditional = isinstance(unet, diffusers.UNet2DConditionModel)
    extra = dict(encoder_hidden_states=torch.randn(n, TOKENS, EMBEDDING_DIM, generator=generator)) if conditional else {}
    return (x, t), extra


# ----------------------------------------------------------------------------------------------
# The wrapper.

@pytest.mark.parametrize("kind,prediction_type", [("unet2d", "epsilon"), ("unet2d", "v_prediction"),
                                                  ("unet2d", "sample"), ("IF", "epsilon")])
def test_ddim_steps_equal_euler_steps_of_our_sampler(kind, prediction_type):
    """DDIM with eta 0 is Euler's method on the probability-flow ODE in sigma: two DDIM steps of
    diffusers' DDIMScheduler (timesteps 900 -> 800, then the x0 it predicts at 800) equal our
    sampler's two Euler steps from sigma_900 to sigma_800 to 0 through the wrapper, all pixels seen."""
    torch.manual_seed(0)
    unet = (tiny_unet2d() if kind == "unet2d" else tiny_if_unet()).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2" if kind == "IF" else "linear",
                                        prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)  # 900, 800, ..., 0
    prompts = torch.randn(1, TOKENS, EMBEDDING_DIM) if kind == "IF" else None
    net = DiffusersDenoiser(unet, scheduler.alphas_cumprod, prediction_type, dict(scheduler.config), prompts).eval()
    cond = {} if prompts is None else dict(encoder_hidden_states=prompts.expand(2, -1, -1))

    latents = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ab = scheduler.alphas_cumprod.double()
    sigma = ((1 - ab) / ab).sqrt()
    with torch.no_grad():
        x_vp = latents * (1 - ab[900]).sqrt()  # = sigma_900 * latents / sqrt(1 + sigma_900^2)
        for t in (900, 800):
            output = unet(x_vp.float(), t, **cond).sample[:, :3].double()
            step = scheduler.step(output, t, x_vp, eta=0.0)
            x_vp = step.prev_sample
        ddim = step.pred_original_sample
        ours = ambient_sample(net, latents, torch.ones(1, *latents.shape, dtype=torch.float64), num_steps=2,
                              sigma_max=float(sigma[900]), sigma_min=float(sigma[800]), solver="euler", clip=False)
    # Relative to the largest value: a random UNet's x0 predictions reach hundreds (its float32 noise
    # prediction times sigma). Measured 2.6e-7 to 7.1e-7; a timestep off by 0.1 gives 1e-3 or more.
    error = ((ours - ddim).abs().max() / ddim.abs().max()).item()
    assert error < 1e-5, f"our Euler steps differ from diffusers' DDIM steps by {error:.3g} (relative)"


def test_timesteps_interpolate_log_sigma_and_clamp():
    scheduler = diffusers.DDPMScheduler()
    net = DiffusersDenoiser(tiny_unet2d(), scheduler.alphas_cumprod, "epsilon", {})
    sigmas = net.log_sigmas.exp()  # float64
    t = net.timestep(torch.stack([sigmas[0], sigmas[123], sigmas[999], (sigmas[10] * sigmas[11]).sqrt(),
                                  torch.tensor(1e-4, dtype=torch.float64), torch.tensor(1e4, dtype=torch.float64)]))
    torch.testing.assert_close(t, torch.tensor([0, 123, 999, 10.5, 0, 999], dtype=torch.float64), atol=1e-6, rtol=0)
    assert net.sigma_min == pytest.approx(0.01, rel=1e-3) and net.sigma_max == pytest.approx(157, rel=0.01)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_hidden_pixels_take_the_output_and_observed_pixels_the_prediction_formula(prediction_type):
    """Computed independently from diffusers' alphabar at an integer timestep: observed pixels get x0
    from the noise or velocity prediction, hidden pixels the UNet's output itself (the authors' script)."""
    torch.manual_seed(0)
    unet, scheduler = tiny_unet2d().eval(), diffusers.DDPMScheduler(prediction_type=prediction_type)
    net = DiffusersDenoiser(unet, scheduler.alphas_cumprod, prediction_type, {}).eval()
    k = 400
    ab = scheduler.alphas_cumprod[k].double()
    sigma = ((1 - ab) / ab).sqrt()
    y, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16)
    mask = (torch.rand(2, 1, 16, 16) < 0.5).float().expand(2, 3, 16, 16)
    x_edm = mask * (y + sigma.float() * noise)
    with torch.no_grad():
        D = net(torch.cat([x_edm, mask], 1), sigma.reshape(1).expand(2))[:, :3]
        x_vp = x_edm * ab.float().sqrt()
        F = unet(x_vp, torch.full((2,), k)).sample
    if prediction_type == "epsilon":
        x0 = (x_vp - (1 - ab).sqrt().float() * F) / ab.sqrt().float()
    else:
        x0 = ab.sqrt().float() * x_vp - (1 - ab).sqrt().float() * F
    torch.testing.assert_close(D * mask, x0 * mask, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(D * (1 - mask), F * (1 - mask), atol=1e-5, rtol=1e-5)
    assert (F * (1 - mask)).abs().max() > 0.05


def test_prompt_embeddings_are_chosen_by_the_labels():
    torch.manual_seed(0)
    unet = tiny_if_unet().eval()
    prompts = torch.randn(3, TOKENS, EMBEDDING_DIM)
    net = DiffusersDenoiser(unet, if_scheduler().alphas_cumprod, "epsilon", {}, prompts).eval()
    assert net.label_dim == 3
    x = torch.cat([torch.randn(2, 3, 16, 16), torch.ones(2, 3, 16, 16)], 1)
    sigma = net.train_sigmas[[500, 500]]
    labels = torch.nn.functional.one_hot(torch.tensor([2, 0]), 3).float()
    with torch.no_grad():
        both = net(x, sigma, labels)
        for row, k in enumerate((2, 0)):
            alone = net.model(x[row:row + 1, :3] / (1 + sigma[0] ** 2).sqrt(), net.timestep(sigma[:1]).float(),
                              encoder_hidden_states=prompts[k:k + 1]).sample[:, :3]
            torch.testing.assert_close(both[row:row + 1, :3], x[row:row + 1, :3] - sigma[0] * alone)
        with pytest.raises(ValueError, match="class labels"):
            net(x, sigma)


@pytest.mark.parametrize("weighting", ["x0", "snr"])
def test_pixels_outside_A_cannot_change_the_loss(weighting):
    """Other values where A is 0, and other noise where A_hat is 0: the same loss and gradients."""
    torch.manual_seed(0)
    net = DiffusersDenoiser(tiny_unet2d(), diffusers.DDPMScheduler().alphas_cumprod, "epsilon", {})
    schedule = DiscreteVPSchedule(net.train_sigmas, weighting)
    A = (torch.rand(4, 1, 16, 16) < 0.4).float().expand(4, 3, 16, 16)
    A_hat = A * (torch.rand(4, 1, 16, 16) < 0.9).float()
    y, noise = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 3, 16, 16)
    sigma = net.train_sigmas[[3, 200, 600, 990]]

    def gradients(y, noise):
        net.zero_grad()
        value = ambient_loss(net, training_batch(y, A, A_hat, sigma, noise), schedule).sum()
        value.backward()
        return value.detach(), {name: p.grad.clone() for name, p in net.named_parameters()}

    first = gradients(y, noise)
    second = gradients(torch.where(A > 0, y, torch.randn_like(y) * 5), torch.where(A_hat > 0, noise, torch.randn_like(noise)))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][name], second[1][name]) for name in first[1])
    assert any(g.abs().max() > 0 for g in first[1].values())


# ----------------------------------------------------------------------------------------------
# The trainer and the CLIs.

@pytest.mark.parametrize("kind", ["unet2d", "IF"])
def test_finetune_writes_unets_that_diffusers_loads_as_the_trainer_held_them(models, kind, tmp_path):
    out = tmp_path / "run"
    cfg = FinetuneConfig(unet=str(models[kind]), data=str(models["data"]), out=str(out), steps=3, batch=4,
                         snapshot_every=2, sample_count=2, sample_steps=2,
                         prompt_embeddings=str(models["prompts"]) if kind == "IF" else None)
    trainer = FinetuneTrainer(cfg)
    assert "UNet2D" in trainer.summary() and "1000 timesteps" in trainer.summary()
    assert trainer.train() == 0
    cls = diffusers.UNet2DModel if kind == "unet2d" else diffusers.UNet2DConditionModel
    held = trainer.net.model.eval()
    held_ema = copy.deepcopy(held)
    held_ema.load_state_dict({name[len("model."):]: value for name, value in trainer.ema.items()})
    start = cls.from_pretrained(models[kind] / ("unet" if kind == "IF" else ""))
    inputs, extra = unet_inputs(held)
    with torch.no_grad():
        for folder, expected in (("unet", held), ("unet-ema", held_ema)):
            reloaded = cls.from_pretrained(out / folder).eval()
            assert torch.equal(reloaded(*inputs, **extra).sample, expected(*inputs, **extra).sample), folder
        assert not torch.equal(start(*inputs, **extra).sample, held(*inputs, **extra).sample)  # it did train
    for name, value in held_ema.state_dict().items():
        assert torch.equal(value, trainer.ema["model." + name]), name
    assert (out / "unet-ema-snapshot-000000002").is_dir() and (out / "overview.png").is_file()

    # Our loader reads the directory back as the same denoiser, with its training corruption.
    loaded = load_network(out / "unet-ema")
    assert loaded.survival == pytest.approx(0.4 * 0.9) and loaded.metadata["step"] == 3
    trainer.net.model.load_state_dict(held_ema.state_dict())
    x = torch.cat([torch.randn(2, 3, 16, 16), (torch.rand(2, 3, 16, 16) < 0.5).float()], 1)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, torch.tensor([0.3, 7.0])), trainer.net.eval()(x, torch.tensor([0.3, 7.0])))


def test_resume_is_exact(models, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(finetune_args(models, "IF", straight)) == 0
    assert main([*finetune_args(models, "IF", resumed), "--steps", "2"]) == 0
    assert main(["--resume", str(resumed), "--steps", "4"]) == 0
    for folder in ("unet", "unet-ema"):
        a = load_file(str(straight / folder / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(resumed / folder / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder


def test_sample_and_restore_clis_take_a_diffusers_directory(models, tmp_path):
    run = tmp_path / "run"
    assert main(finetune_args(models, "IF", run)) == 0
    from ambient_fast.sample import main as sample_main

    for name, extra in (("fixed", []), ("guided", ["--guidance-masks", "2", "--guidance", "0.1"])):
        out = tmp_path / name
        assert sample_main(["--net", str(run / "unet-ema"), "--out", str(out), "--seeds", "0-2", "--steps", "3",
                            *extra]) == 0
        record = json.loads((out / "sampling.json").read_text())
        assert record["survival"] == pytest.approx(0.36) and record["sigma_min"] == pytest.approx(load_denoiser(
            run / "unet-ema").sigma_min) and record["sigma_max"] == 80
        assert len(list(out.glob("00000*.png"))) == 3
    from ambient_fast.restore import main as restore_main

    assert restore_main(["--net", str(run / "unet-ema"), "--input", str(models["data"]), "--out", str(tmp_path / "r"),
                         "--max-images", "4"]) == 0
    report = json.loads((tmp_path / "r" / "restore.json").read_text())
    # The report's PSNR, recomputed here from the written PNGs and the set's clean twin.
    restored = np.stack([np.asarray(Image.open(tmp_path / "r" / f"{i:06d}.png")) for i in range(4)]).astype(np.float64)
    clean = np.load(clean_twin(models["data"]) / "images.npy")[:4].transpose(0, 2, 3, 1).astype(np.float64)
    mse = ((restored - clean) ** 2).reshape(4, -1).mean(1)
    assert report["psnr_restored"] == pytest.approx(float(np.mean(10 * np.log10(255.0 ** 2 / mse))), abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Bad input and the optional extra.

def test_bad_input_errors(models, tmp_path, capsys):
    def fails(argv, message):
        assert main(argv) == 1
        assert message in capsys.readouterr().err

    data = ["--data", str(models["data"]), "--out", str(tmp_path / "run")]
    fails(["--unet", str(models["unet2d"])], "--data")
    fails(["--unet", str(tmp_path / "missing"), *data], "config.json")
    no_scheduler = tmp_path / "no-scheduler"
    tiny_unet2d().save_pretrained(no_scheduler)
    fails(["--unet", str(no_scheduler), *data], "scheduler config")
    pickled = tmp_path / "pickled"
    tiny_unet2d().save_pretrained(pickled, safe_serialization=False)
    diffusers.DDPMScheduler().save_pretrained(pickled)
    fails(["--unet", str(pickled), *data], "pickled weights")
    fails(["--unet", str(models["IF"]), *data], "prompt embeddings")
    three = tmp_path / "three.safetensors"
    save_file({"prompt_embeddings": torch.zeros(3, TOKENS, EMBEDDING_DIM)}, str(three))
    fails(["--unet", str(models["IF"]), "--prompt-embeddings", str(three), *data], "needs 3 classes")
    wide = tmp_path / "wide"
    diffusers.UNet2DModel(sample_size=32, block_out_channels=(8, 8), norm_num_groups=8,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(wide)
    diffusers.DDPMScheduler().save_pretrained(wide)
    fails(["--unet", str(wide), *data], "takes 3x32x32 images")


def test_missing_diffusers_names_the_extra(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert main(finetune_args(models, "unet2d", tmp_path / "run")) == 1
    assert 'pip install "ambient-fast[diffusers]"' in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"ambient-fast\[diffusers\]"):
        load_network(models["unet2d"])


def test_core_modules_import_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import ambient_fast.train, ambient_fast.sample, ambient_fast.restore, ambient_fast.files.checkpoints, "
            "ambient_fast.finetune, ambient_fast.training.finetuning, ambient_fast.networks.diffusers\n"
            "assert sys.modules['diffusers'] is None")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
