"""The CUDA configuration, run on the CPU: one resolution of every device-dependent default
(ambient_fast.training.settings), and the commands run with the defaults CUDA resolves wherever
the CPU can execute them (AMBIENT_FAST_DEFAULTS_FOR=cuda, the kernels in Triton's interpreter):
`train` under FSDP2 and DDP on 2 gloo ranks, `finetune` under FSDP2, `sample` on the fast path.

Every test that runs a command with CUDA's values says which settings it runs so
(`runs_cuda_values`) and checks that the run resolved them so; the last test resolves every
command's defaults for the CPU and for CUDA and fails if a setting that differs is run with its
CUDA value by none of them. The GPU-only part: the sampler's CUDA graph (tests/test_gpu.py)."""
import collections
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ambient_fast import kernels, sample
from ambient_fast.data.batches import dali_available
from ambient_fast.data.synthetic import synthetic_dataset
from ambient_fast.files.images import load_png
from ambient_fast.networks import EDMPrecond
from ambient_fast.training.config import TrainConfig
from ambient_fast.training.distributed import World
from ambient_fast.training.parallel import CONVOLUTIONS, parallelize
from ambient_fast.training.settings import (TARGET_VARIABLE, defaults_target, device_dependent, resolve_sampling,
                                            resolve_training, setting_text)
from ambient_fast.training.state import state_dirs

from conftest import TINY_ARCHITECTURES, torchrun

# Tiny U-Nets on the 16x16 synthetic set, without attention (tests/test_compile.py compiles every
# kind of block): torch.compile's cost on the CPU grows with the kinds of block.
TINY = ["--channels", "8", "--blocks", "1", "--attn", "", "--batch", "4", "--sample-count", "1", "--sample-steps", "2"]
# A run of 4 steps with a training state at step 2, which `cut_back_and_resume` resumes from.
STEPS = ["--steps", "4", "--snapshot-every", "2"]

# command -> the settings some test below runs with their CUDA values (filled by `runs_cuda_values`).
COVERED = collections.defaultdict(set)


def runs_cuda_values(command: str, *names: str):
    """Mark a test that runs `command` with these settings at their CUDA defaults (and checks it)."""
    def register(test):
        COVERED[command].update(names)
        return test
    return register


def cuda_defaults(command: str):
    """The settings `command` resolves by default on a CUDA device, under torchrun's 2 ranks."""
    return RESOLVERS[command](torch.device("cuda"))


RESOLVERS = {  # command -> its default settings on a device
    "train": lambda device: resolve_training(TrainConfig(), device, world_size=2),
    "finetune": lambda device: resolve_training(_finetune_config(), device, world_size=2),
    "sample": lambda device: resolve_sampling(device),
    "restore": lambda device: resolve_sampling(device),
}


def _finetune_config():
    from ambient_fast.finetune import FinetuneConfig

    return FinetuneConfig(unet="unet", data="data")  # required paths; the defaults are what counts


def assert_ran_with_cuda_values(printed: str, command: str, names) -> None:
    """The settings line `command` printed shows each of `names` at its CUDA default."""
    expected = cuda_defaults(command)
    wrong = [name for name in names if setting_text(expected, name) not in printed]
    assert not wrong, f"{command} did not run {wrong} with CUDA's values ({expected.describe()}): {printed[-2000:]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("data"), n=16, p=0.6)


def cut_back_and_resume(run, module: str, step: int) -> str:
    """Delete the run's training states after `step` and resume it to its end under torchrun (the
    same command): it must end where it ended. Returns the resumed run's output."""
    for state in state_dirs(run):
        if int(state.name.rsplit("-", 1)[1]) > step:
            shutil.rmtree(state)
    out = torchrun(module, "--resume", str(run))
    assert f"at step {step}" in out
    return out


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


# ----------------------------------------------------------------------------------------------
# The resolution.

def test_the_defaults_follow_the_device_and_the_options_win(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    cpu, cuda = (resolve_training(TrainConfig(), torch.device(kind), world_size=2) for kind in ("cpu", "cuda"))
    triton = kernels.triton_available()
    assert (cpu.channels_last, cpu.compile, cpu.bf16, cpu.tf32, cpu.cudnn_benchmark, cpu.fused_optimizer,
            cpu.fused_kernels, cpu.loader) == (False,) * 7 + ("torch",)
    assert (cuda.channels_last, cuda.compile, cuda.bf16, cuda.tf32, cuda.cudnn_benchmark, cuda.fused_optimizer,
            cuda.fused_kernels, cuda.loader) == (True,) * 6 + (triton, "dali" if dali_available() else "torch")
    assert cpu.parallel == cuda.parallel == "fsdp"
    assert resolve_training(TrainConfig(), "cuda", world_size=1).parallel == "none"

    given = TrainConfig(channels_last=False, compile=False, precision="fp32", tf32=False, parallel="ddp", loader="torch")
    on_cuda = resolve_training(given, "cuda", world_size=2)
    assert (on_cuda.channels_last, on_cuda.compile, on_cuda.bf16, on_cuda.tf32, on_cuda.parallel, on_cuda.loader) == \
        (False, False, False, False, "ddp", "torch")
    on_cpu = resolve_training(TrainConfig(channels_last=True, compile=True, precision="bf16"), "cpu", world_size=1)
    assert (on_cpu.channels_last, on_cpu.compile, on_cpu.bf16, on_cpu.tf32) == (True, True, True, False)

    assert resolve_sampling("cuda").fast and not resolve_sampling("cpu").fast
    for options in (dict(exact=True), dict(guidance=0.1), dict(churn=5.0)):
        assert not resolve_sampling("cuda", **options).fast, options


def test_the_cuda_target_on_the_cpu(monkeypatch):
    """AMBIENT_FAST_DEFAULTS_FOR=cuda resolves on the CPU what a GPU resolves, its fused kernels in
    Triton's interpreter, which it asks for when it is not on; a target it does not know is refused."""
    pytest.importorskip("triton", reason="Triton is not installed: the CUDA configuration has no fused kernels here")
    cpu = torch.device("cpu")
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(TARGET_VARIABLE, "cuda")
    assert defaults_target(cpu) == "cuda"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_training(TrainConfig(), cpu, world_size=2, target="cuda")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_sampling(cpu, target="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_training(TrainConfig(), cpu, 2, target="cuda") == cuda_defaults("train")
    assert resolve_sampling(cpu, target="cuda") == cuda_defaults("sample")
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")  # the kernels switched off: off on CUDA too
    assert not resolve_training(TrainConfig(), cpu, 2, target="cuda").fused_kernels
    monkeypatch.setenv(TARGET_VARIABLE, "tpu")
    with pytest.raises(ValueError, match=f"{TARGET_VARIABLE}=tpu"):
        defaults_target(cpu)
    monkeypatch.delenv(TARGET_VARIABLE)
    assert defaults_target(cpu) == "cpu"


# ----------------------------------------------------------------------------------------------
# channels_last: contiguous parameters, channels_last activations.

def test_channels_last_keeps_the_parameters_contiguous_and_every_convolution_reads_channels_last():
    """FSDP2 takes contiguous parameters only; the layout goes to the activations instead. Even an
    NCHW activation (what CUDA's group norm writes) reaches its convolution channels_last, the
    network computes what it computes in NCHW, and the hooks break no block's graph."""
    model_type, kwargs = TINY_ARCHITECTURES["ncsnpp"]  # resampling convolutions, attention
    net = EDMPrecond(img_resolution=8, img_channels=6, model_type=model_type, **kwargs)
    x, sigma = torch.randn(2, 6, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        want = net(x, sigma)
    parallelize(net, "none", World(0, 1, 0), torch.device("cpu"), compile_blocks=False, channels_last=True)
    read, block_inputs = [], {}
    convolutions = [m for m in net.model.modules() if isinstance(m, CONVOLUTIONS)]
    for convolution in convolutions:  # registered after the layout's hooks: sees what the convolution reads
        convolution.register_forward_pre_hook(lambda module, args: read.append(args[0]))

    def remember(block, args):
        block_inputs.setdefault(block, args)

    for block in net.blocks():
        block.register_forward_pre_hook(remember)
    with torch.no_grad():
        got = net(x.contiguous(), sigma)
    assert all(p.is_contiguous() for p in net.parameters())
    assert len(read) >= len(convolutions) > 10
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in read)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    try:
        for block, args in block_inputs.items():
            explained = torch._dynamo.explain(block)(*args)
            assert explained.graph_break_count == 0, explained.break_reasons
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# The commands with CUDA's defaults, on 2 gloo ranks.

ALL_TRAINING = ("channels_last", "compile", "bf16", "tf32", "cudnn_benchmark", "fused_optimizer", "fused_kernels",
                "loader")


# Compiled in the EDM2 and fine-tuning runs below; DDPM++'s blocks compiled in CUDA's settings, each
# gradient against eager's: tests/test_compile.py (Inductor's CPU compile, not FSDP2, is what costs:
# two ranks compile each block twice, and every .so is a g++ run of a second or more).
EAGER_VALUES = tuple(name for name in ALL_TRAINING if name != "compile")


@runs_cuda_values("train", *EAGER_VALUES)
@runs_cuda_values("sample", "channels_last", "fast", "fused_kernels")
def test_train_fsdp2_resumes_exactly_and_sample_runs_the_fast_path(data, tmp_path, cuda_defaults_on_cpu, capsys,
                                                                   monkeypatch):
    """The command that failed at start on every GPU node (FSDP2 with channels_last) trains with
    CUDA's configuration, bf16 and the fused kernels included, eagerly; a resumed run ends bit for
    bit where the run ended; and the sample command's fast path draws from it what the exact path
    draws."""
    run = tmp_path / "run"
    out = torchrun("ambient_fast.train", "--data", str(data), "--out", str(run), *TINY, "--channel-mult", "1", *STEPS,
                   "--channels-last", "--no-compile", "--precision", "bf16")
    assert "2 rank(s)" in out and "parallel fsdp" in out
    assert_ran_with_cuda_values(out, "train", EAGER_VALUES)
    straight = load_file(str(run / "network-final.safetensors"))
    resumed = cut_back_and_resume(run, "ambient_fast.train", step=2)
    assert_ran_with_cuda_values(resumed, "train", EAGER_VALUES)
    assert_same_tensors(straight, load_file(str(run / "network-final.safetensors")))

    args = ["--net", str(run / "network-final.safetensors"), "--seeds", "0-2", "--batch", "2", "--steps", "4"]
    capsys.readouterr()
    assert sample.main([*args, "--out", str(tmp_path / "fast")]) == 0
    assert_ran_with_cuda_values(capsys.readouterr().out, "sample", ("channels_last", "fast", "fused_kernels"))
    monkeypatch.delenv(TARGET_VARIABLE)  # the CPU's own defaults: the exact path
    monkeypatch.delenv("TRITON_INTERPRET")
    assert sample.main([*args, "--out", str(tmp_path / "exact")]) == 0
    for seed in range(3):
        fast, exact = (torch.tensor(load_png(tmp_path / kind / f"{seed:06d}.png"), dtype=torch.float32)
                       for kind in ("fast", "exact"))
        assert (fast - exact).abs().max() <= 8 and (fast - exact).abs().mean() <= 1  # bf16 network: a few levels


@runs_cuda_values("restore", "channels_last", "fast", "fused_kernels")
def test_posterior_restore_runs_the_fast_path(data, tmp_path, cuda_defaults_on_cpu, capsys, monkeypatch):
    """restore --method posterior with CUDA's defaults (channels_last, the fast path: a bf16 network
    through the static denoiser, padded batches; the gated activations interpreted) restores what
    the exact path restores, to bf16's few levels."""
    from ambient_fast import restore
    from ambient_fast.files.checkpoints import save_network
    from test_nn import randomize_

    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    net = randomize_(EDMPrecond(img_resolution=16, img_channels=6, model_type=model_type,
                                **{**kwargs, "attn_resolutions": []}))
    save_network(tmp_path / "net.safetensors", net, {"kind": "dust", "p": 0.6, "delta": 0.1, "shared_channels": True})
    args = ["--net", str(tmp_path / "net.safetensors"), "--input", str(data), "--method", "posterior", "--posterior",
            "ambient", "--samples", "2", "--max-images", "2", "--steps", "2", "--batch", "3"]
    capsys.readouterr()
    assert restore.main([*args, "--out", str(tmp_path / "fast")]) == 0
    assert_ran_with_cuda_values(capsys.readouterr().out, "restore", ("channels_last", "fast", "fused_kernels"))
    monkeypatch.delenv(TARGET_VARIABLE)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert restore.main([*args, "--out", str(tmp_path / "exact")]) == 0
    for index in range(2):
        fast, exact = (torch.tensor(load_png(tmp_path / kind / f"{index:06d}.png"), dtype=torch.float32)
                       for kind in ("fast", "exact"))
        assert (fast - exact).abs().max() <= 8 and (fast - exact).abs().mean() <= 1


@runs_cuda_values("train", *ALL_TRAINING)
def test_train_edm2_under_fsdp2_compiled_in_bf16_resumes_exactly(data, tmp_path, cuda_defaults_on_cpu, lean_inductor):
    """EDM2 (its forced weight normalisation a step of its own, its scalar gains outside FSDP2's shards,
    its log-variance head in the root) trains on 2 ranks with CUDA's configuration, --compile and bf16
    included; a resumed run ends bit for bit where the run ended, post-hoc EMA snapshots included."""
    run = tmp_path / "run"
    out = torchrun("ambient_fast.train", "--data", str(data), "--out", str(run), "--arch", "edm2", *TINY,
                   "--channel-mult", "1", *STEPS, "--ema-snapshot-kimg", "0.008", "--channels-last", "--compile",
                   "--precision", "bf16")
    assert "2 rank(s)" in out and "parallel fsdp" in out and "EDM2 U-Net" in out
    assert_ran_with_cuda_values(out, "train", ALL_TRAINING)
    straight = load_file(str(run / "network-final.safetensors"))
    snapshots = {path.name: load_file(str(path)) for path in (run / "phema").iterdir()}
    assert len(snapshots) == 2 * 2  # 2 profiles at 8 and 16 images
    cut_back_and_resume(run, "ambient_fast.train", step=2)
    assert_same_tensors(straight, load_file(str(run / "network-final.safetensors")))
    for name, tensors in snapshots.items():
        assert_same_tensors(tensors, load_file(str(run / "phema" / name)))


# Compiled and with the kernels interpreted above: here eager, with the kernels' references (the
# interpreter costs seconds per run of the eager network's gated convolutions).
DDP_VALUES = tuple(name for name in ALL_TRAINING if name not in ("compile", "fused_kernels"))


@runs_cuda_values("train", *DDP_VALUES)
def test_train_ddp_resumes_exactly(data, tmp_path, cuda_defaults_on_cpu, monkeypatch):
    """DDP with CUDA's configuration (channels_last, bf16, the fused optimizer, DALI), on a U-Net
    with two resolutions (resampling convolutions): a resumed run ends bit for bit where the run
    ended."""
    monkeypatch.setenv("AMBIENT_FAST_KERNELS", "0")
    run = tmp_path / "run"
    out = torchrun("ambient_fast.train", "--data", str(data), "--out", str(run), *TINY, "--channel-mult", "1,2", *STEPS,
                   "--parallel", "ddp", "--no-compile")
    assert "parallel ddp" in out
    assert_ran_with_cuda_values(out, "train", DDP_VALUES)
    straight = load_file(str(run / "network-final.safetensors"))
    cut_back_and_resume(run, "ambient_fast.train", step=2)
    assert_same_tensors(straight, load_file(str(run / "network-final.safetensors")))


@runs_cuda_values("finetune", *ALL_TRAINING)
def test_finetune_fsdp2_resumes_exactly(data, tmp_path, cuda_defaults_on_cpu, lean_inductor):
    """Fine-tuning a diffusers UNet under FSDP2 with CUDA's configuration: a resumed run ends bit for
    bit where the run ended."""
    diffusers = pytest.importorskip("diffusers", reason="the [diffusers] extra is not installed (it is part of [test])")
    unet = tmp_path / "unet"
    torch.manual_seed(0)
    diffusers.UNet2DModel(sample_size=16, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                          add_attention=False).save_pretrained(unet)
    diffusers.DDPMScheduler().save_pretrained(unet)
    run = tmp_path / "run"
    out = torchrun("ambient_fast.finetune", "--unet", str(unet), "--data", str(data), "--out", str(run), *STEPS,
                   "--batch", "4", "--sample-count", "1", "--sample-steps", "2")
    assert "parallel fsdp" in out
    assert_ran_with_cuda_values(out, "finetune", ALL_TRAINING)
    weights = run / "unet-ema" / "diffusion_pytorch_model.safetensors"
    straight = load_file(str(weights))
    cut_back_and_resume(run, "ambient_fast.finetune", step=2)
    assert_same_tensors(straight, load_file(str(weights)))


# ----------------------------------------------------------------------------------------------
# Every device-dependent default is run above with its CUDA value.

def test_every_device_dependent_default_runs_on_the_cpu_with_its_cuda_value(monkeypatch):
    """Resolve each command's defaults for the CPU and for CUDA; every setting that differs must be
    one that a test of this module runs with its CUDA value. A new device-dependent default fails
    here until a test runs it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU as users run it
    monkeypatch.delenv("AMBIENT_FAST_KERNELS", raising=False)
    for command, resolver in RESOLVERS.items():
        differing = device_dependent(resolver(torch.device("cpu")), resolver(torch.device("cuda")))
        assert differing, f"{command}: nothing depends on the device? (the resolution is not what this test reads)"
        missing = sorted(set(differing) - COVERED[command])
        assert not missing, (f"{command}: these defaults differ on CUDA ({', '.join(f'{n}: {differing[n]}' for n in missing)}) "
                             "and no CPU test runs them with CUDA's value: run them so in a test of this module "
                             "and mark it with runs_cuda_values")
