"""The benchmarks' working parts on tiny sizes, so that they cannot rot unnoticed: the training
variants (ours in the reference settings and the fast path, and the authors' code imported from a
checkout, here a stand-in with its API), their timing windows, the FLOP count, the profiler table and
its kernel groups, the host-sync count, the batch scaling, the samplers and their agreement, the
ambient-input cases of the kernel benchmark, the EDM2 configurations of both benchmarks (pixels and
latents), the reports, the command-line errors, and the GPU check (bench/gpu_check.sh): its parts'
limits, its CPU rehearsal, and what a part killed midway leaves. Nothing here looks at a time."""
import importlib.util
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    """bench/<name>.py as a module (bench/ is a folder of scripts, not a package). The scripts put
    bench/ first on sys.path to import `_harness`; it is taken off again, so that their names
    (train, sample, kernels) shadow nothing in the rest of the session."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.fixture(scope="module")
def train():
    return load("train")


@pytest.fixture(scope="module")
def sample():
    return load("sample")


@pytest.fixture(scope="module")
def profile():
    return load("_profile")


@pytest.fixture(scope="module")
def kernel_bench():
    return load("kernels")


TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])

# A stand-in for a checkout of giannisdaras/ambient-diffusion: the constructor and call signatures of
# its training/networks.py EDMPrecond and training/loss.py AmbientLoss, backed by our modules.
STAND_IN = {
    "training/__init__.py": "",
    "torch_utils/__init__.py": "",
    "dnnlib/__init__.py": "",
    "training/networks.py": '''
import torch
from ambient_fast.networks import build_reference_model

class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", gated=True, **model_kwargs):
        super().__init__()
        config = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                      model_type=model_type, gated=gated, **model_kwargs)
        self.inner = build_reference_model(config)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return self.inner(x, sigma, class_labels, model_kwargs.get("augment_labels"))
''',
    "training/loss.py": '''
import torch

class AmbientLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5, norm=2):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, net, images, corruption_matrix, hat_corruption_matrix, labels=None, augment_pipe=None):
        sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        n = torch.randn_like(images) * sigma
        D = net(torch.cat([hat_corruption_matrix * (images + n), hat_corruption_matrix], 1), sigma, labels)[:, :3]
        return (weight * (hat_corruption_matrix * (D - images)) ** 2, weight * (corruption_matrix * (D - images)) ** 2,
                weight * (D - images) ** 2)
''',
}


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    for name, text in STAND_IN.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys, "path", list(sys.path))  # import_reference prepends the checkout
    yield tmp_path
    for name in [m for m in sys.modules if m == "training" or m.startswith("training.")]:
        del sys.modules[name]


def test_training_variants_and_report(train, stand_in, tmp_path):
    reference = train.import_reference(stand_in)
    setup = train.Setup(resolution=16, batch=2, steps=1, windows=3, warmup=1, size=TINY, device=torch.device("cpu"))
    rows, flops, inspection = train.measure(setup, tmp_path / "work", 1, reference)
    assert [row.variant for row in rows] == ["(a) reference settings", "(b) fast path", "(c) authors' code"]
    for row in rows:  # images/s is the batch over the median window's seconds per step; the spread its windows'
        timing = row.timing
        assert len(timing.window_s) == 3 and timing.graphs_warmup == timing.graphs_timed == 0, row
        assert timing.images_per_s == pytest.approx(2 / statistics.median(timing.window_s), rel=1e-9)
        rates = [2 / s for s in timing.window_s]
        assert timing.spread == pytest.approx((max(rates) - min(rates)) / statistics.median(rates), rel=1e-9)
    assert "AMBIENT_FAST_KERNELS=0" in rows[0].settings and "per-image numpy masks" in rows[0].settings
    assert "AMBIENT_FAST_KERNELS" not in rows[1].settings and "FAILED" not in rows[2].settings
    table = train.table_rows(rows, flops, peak=1e12)
    assert table[0][-1].startswith("1.00x (") and all(len(row) == len(train.HEADER) for row in table)
    # The FLOP column is flops x images/s; the percentage is that over the peak.
    assert float(table[1][5]) == pytest.approx(flops * rows[1].timing.images_per_s / 1e12, rel=1e-3)
    assert float(table[1][6].rstrip("%")) == pytest.approx(100 * flops * rows[1].timing.images_per_s / 1e12, rel=1e-2)
    assert [line.split(":")[0] for line in train.compile_lines(rows)] == [f"- {row.variant}" for row in rows]
    # One step of (b) looked into on the CPU: its operators' self time grouped, no sync count (CUDA only).
    assert inspection.step_syncs is None and inspection.sampler_syncs is None
    groups = {group for group, _, _ in inspection.profile.rows}
    assert {"convolution", "normalisation", "attention", "elementwise"} <= groups
    assert inspection.profile.busy_us == pytest.approx(sum(us for _, _, us in inspection.profile.rows))


def test_edm2_configurations(train, stand_in, tmp_path, monkeypatch):
    """--configs edm2-64,edm2-latent-64 at --tiny, with --reference-repo: EDM2 networks trained by (a)
    and (b) (on the pixel set (a) takes the reference's host-side masks, on the latent set our loader),
    a (c) row saying the authors' code has no EDM2 and timing nothing, in a report of their own. For CI's
    time, at 16x16 rather than 64x64 and sampling 2 steps rather than 18: other numbers, the same paths."""
    for name in ("edm2-64", "edm2-latent-64"):
        monkeypatch.setitem(train.CONFIGS, name, train.CONFIGS[name]._replace(resolution=16))
    monkeypatch.setattr(train, "SAMPLER_STEPS", 2)
    assert train.main(["--tiny", "--configs", "edm2-64,edm2-latent-64", "--scaling", "none", "--windows", "1",
                       "--reference-repo", str(stand_in), "--results", str(tmp_path)]) == 0
    assert not list(tmp_path.glob("train-cpu-*.md"))  # the day's DDPM++ record stays
    report = next(tmp_path.glob("train-edm2-cpu-*.md")).read_text()
    pixels, latents = report.split("## EDM2-S at ImageNet-64's size")[1].split("## EDM2-S on 64x64x4 latents")
    for section, channels in ((pixels, 3), (latents, 4)):
        assert "(tiny: --tiny), batch 2" in section and "- model: EDM2 U-Net (" in section
        rows = {row[0]: row for row in (line.split(" | ") for line in section.splitlines() if line.startswith("| ("))}
        assert list(rows) == ["| (a) reference settings", "| (b) fast path", "| (c) authors' code"]
        assert float(rows["| (a) reference settings"][1]) > 0 and float(rows["| (b) fast path"][1]) > 0
        assert rows["| (c) authors' code"][1:-1] == ["none: no EDM2 there", *["-"] * 5, "n/a"]
        assert "- (c) authors' code: not run: giannisdaras/ambient-diffusion has no EDM2 network" in section
        assert "AMBIENT_FAST_KERNELS=0" in section and "(b) / (c)" not in section
    assert "loader: host (per-image numpy masks)" in pixels
    assert "loader: torch (a latent set has no masks for the reference's host-side path)" in latents
    gflops = [float(re.search(r"batch 2, ([\d.]+) GFLOP/image", part).group(1)) for part in (pixels, latents)]
    assert gflops[1] > gflops[0] > 0  # the same network on 4 channels in and out instead of 3


def test_compile_lines(train):
    """A compiled variant's compile time is its first step less its median step; a recompile while
    timing is called out (the windows then include compilation)."""
    rows = [train.Row("(b) fast path", "", train.Timing(128, 48.5, [0.2, 0.25, 0.3], 14, 0), "n/a"),
            train.Row("(x) recompiled", "", train.Timing(128, 10.0, [1.0, 2.0, 3.0], 2, 1), "n/a")]
    lines = train.compile_lines(rows)
    assert lines[0] == ("- (b) fast path: compile time ~ 48.2 s (first step 48.5 s, later steps 0.25 s); "
                        "14 graphs compiled in the warm-up, 0 while timing")
    assert lines[1].startswith("- (x) recompiled: compile time ~ 8 s") and "RECOMPILED" in lines[1]


def test_batch_scaling_report(train, tmp_path):
    """--configs none --scaling: (b) alone at each batch, in a report of its own, ratios over the first."""
    assert train.main(["--tiny", "--configs", "none", "--scaling", "2,3", "--results", str(tmp_path)]) == 0
    report = next(tmp_path.glob("train-scaling-cpu-*.md")).read_text()
    rows = [line.split(" | ") for line in report.splitlines() if re.match(r"\| [23] \|", line)]
    assert [row[0] for row in rows] == ["| 2", "| 3"] and rows[0][-1].startswith("1.00x (")
    first, second = (float(row[1]) for row in rows)  # images/s
    assert rows[1][-1].endswith(f"x ({rows[1][1]} / {rows[0][1]}) |")
    assert float(rows[1][-1].split("x")[0]) == pytest.approx(second / first, abs=0.01)
    assert not list(tmp_path.glob("train-cpu-*.md"))


def test_flops_match_the_published_count(train):
    """REFERENCE.md section 4: CIFAR-10 config, gated, 253 GFLOP forward + backward per image."""
    model_type, arch = train.ARCHS["ddpmpp"]
    config = dict(precond="EDMPrecond", img_resolution=32, img_channels=6, model_type=model_type, **arch,
                  **train.PRESETS["cifar10"])
    assert train.flops_per_image(config, 32) == pytest.approx(253.3e9, rel=1e-3)
    # REFERENCE.md: un-gated is half (every convolution with a kernel is two).
    ungated = train.flops_per_image({**config, "gate": "none"}, 32)
    assert ungated == pytest.approx(253.3e9 / 2, rel=0.02)


def test_host_loader_matches_the_stored_masks(train, tmp_path):
    data = train.corrupted_set(tmp_path, resolution=8, count=16)
    batch = train.host_loader(data, 4, torch.device("cpu")).next()
    _, masks, _ = data.get(train.host_loader(data, 4, torch.device("cpu")).indices(0, 0))
    assert torch.equal(batch.A, torch.from_numpy(masks).float())
    assert (batch.A_hat <= batch.A).all() and (batch.y[batch.A == 0] == 0).all()
    assert torch.equal(batch.A_hat[:, 0], batch.A_hat[:, 1])  # the set's B: one coin for all channels


def test_a_failing_reference_is_reported_not_raised(train, stand_in, tmp_path):
    (stand_in / "training/loss.py").write_text("class AmbientLoss:\n    def __call__(self, **kw):\n"
                                               "        raise RuntimeError('boom')\n")
    reference = train.import_reference(stand_in)
    setup = train.Setup(resolution=16, batch=2, steps=1, windows=1, warmup=1, size=TINY, device=torch.device("cpu"))
    data = train.corrupted_set(tmp_path, resolution=16, count=8)
    row = train.run_reference(setup, data, reference)
    assert row.timing is None and "FAILED: RuntimeError: boom" in row.settings


def test_train_command_line_errors(train, tmp_path, capsys):
    for configs in ("48", "32,edm2"):
        with pytest.raises(SystemExit):
            train.main(["--configs", configs])
        assert "--configs takes names among 32, 64, edm2-64, edm2-latent-64" in capsys.readouterr().err
    for flags in (["--scaling", "0"], ["--warmup", "0"], ["--windows", "0"], ["--quick", "--tiny"]):
        with pytest.raises(SystemExit):
            train.main(flags)
        capsys.readouterr()
    assert train.main(["--reference-repo", str(tmp_path)]) == 2
    assert "lacks training/networks.py" in " ".join(capsys.readouterr().out.split())  # rich wraps long paths


def test_samplers_agree_and_the_reference_style_one_differentiates(sample, monkeypatch):
    net = sample.published_model(16, dict(model_channels=16, num_blocks=1), torch.device("cpu"))
    backward_calls = []
    net.model.register_full_backward_hook(lambda *args: backward_calls.append(1))
    latents, masks = sample.seeded_inputs(range(2), (3, 16, 16), 1, sample.SURVIVAL, False, "cpu")
    images = sample.reference_style_sample(net, latents, masks[0], num_steps=3)
    assert images.dtype == torch.float64 and len(backward_calls) == 5  # 2 per Heun step, 1 on the last
    exact = sample.ambient_sample(net, latents, masks, num_steps=3)
    assert (exact - images).abs().max() < 1e-9  # the same arithmetic without autograd

    monkeypatch.setattr(sample, "REFERENCE_BATCH", 1)  # reference-style in chunks: each image alone
    results = sample.run_samplers(16, 2, dict(model_channels=16, num_blocks=1), torch.device("cpu"))
    assert [r.sampler for r in results] == ["reference-style", "exact", "fast"]
    rows = sample.table_rows(results)
    assert rows[1][-1].startswith("yes") and rows[2][-1].startswith("yes"), rows
    assert rows[0][2].startswith("1.00x (")


def test_sample_main_refuses_a_resolution_it_has_no_model_for(sample):
    """(Its report, from `--tiny --resolutions 32`: the rehearsal's sample step below.)"""
    with pytest.raises(SystemExit):
        sample.main(["--resolutions", "128"])


def test_cli_sampling_settings():
    """The sampling command's defaults the benchmarks copy: channels_last and the fast path on CUDA."""
    harness = load("_harness")
    assert harness.cli_sampling(torch.device("cpu")) == (torch.contiguous_format, False)
    assert harness.cli_sampling(torch.device("cuda")) == (torch.channels_last, True)


@pytest.mark.parametrize("name, group", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_cudnn", "convolution"),
    ("sm80_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<float, float, float, false, true>", "convolution"),
    ("triton_poi_fused_convolution_silu_3", "elementwise"),  # Inductor's bias add beside a convolution
    ("triton_red_fused_native_group_norm_0", "normalisation"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*)", "normalisation"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda(TensorIteratorBase&)>", "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise"),
    ("_ambient_input_kernel", "elementwise"),
    ("_gated_backward_kernel", "elementwise"),
    ("aten::convolution_backward", "convolution"),
    ("aten::native_group_norm", "normalisation"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::mm", "matmul"),
    ("aten::mul", "elementwise"),
    ("autograd::engine::evaluate_function: torch::autograd::AccumulateGrad", "other"),
])
def test_profiler_groups(profile, name, group):
    assert profile.group_of(name) == group


def test_profile_table_measures_busy_and_idle(profile):
    """CUDA: busy is the union of the kernels' intervals (streams overlap), idle the rest of the call;
    a CPU: busy is the summed self time."""
    Interval = profile.Interval
    kernels = [Interval("triton_poi_fused_add_0", 0, 10, 10), Interval("aten::mm gemm", 5, 15, 10),
               Interval("sm90_xmma_fprop_implicit_gemm", 20, 25, 5), Interval("triton_red_x", 21, 22, 1)]
    table = profile.table_of(kernels, wall_us=40, device="cuda")
    assert table.busy_us == 20 and table.idle_us == 20  # [0, 15] and [20, 25]
    assert table.rows == [("elementwise", 2, 11), ("matmul", 1, 10), ("convolution", 1, 5)]
    cpu = profile.table_of(kernels, wall_us=40, device="cpu")
    assert cpu.busy_us == 26 and cpu.idle_us == 14
    text = profile.profile_rows(table)
    assert text[-3:] == [["busy (union of kernels)", "", "0.020", "50.0%"], ["idle (no kernel running)", "", "0.020", "50.0%"],
                         ["the call (wall)", "", "0.040", "100.0%"]]


def test_profile_call_on_the_cpu(profile):
    """A real call profiled: its operators grouped, busy their self time, busy + idle the call."""
    conv = torch.nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 16, 16)
    table = profile.profile_call(lambda: torch.sigmoid(conv(x)) * 2, torch.device("cpu"))
    groups = {group for group, _, _ in table.rows}
    assert {"convolution", "elementwise"} <= groups
    assert table.busy_us == pytest.approx(sum(us for _, _, us in table.rows))
    assert table.busy_us + table.idle_us == pytest.approx(max(table.wall_us, table.busy_us))


def test_host_syncs_need_cuda(profile):
    calls = []
    assert profile.host_syncs(lambda: calls.append(1), torch.device("cpu")) is None and calls == [1]
    assert "unavailable on the CPU" in profile.describe_syncs(None)
    assert profile.describe_syncs(Counter({"trainer.py:278": 1, "loss.py:9": 2})) == "3 (loss.py:9 x2, trainer.py:278 x1)"


@pytest.mark.parametrize("config, objective", [("ddpmpp", "AmbientObjective"), ("edm2-64", "EDM2Objective"),
                                               ("edm2-latent-64", "EDM2Objective")])
def test_the_kernel_alone_case_is_what_a_step_launches(kernel_bench, config, objective):
    """bench/kernels.py times the ambient-input kernel on the arguments a training step passes it: the
    kernel alone writes exactly what the whole call of the configuration's objective returns (a latent
    set's: float16 values, its windows)."""
    from ambient_fast import kernels

    config = kernel_bench.KERNEL_CONFIGS[config]
    C = config.shape[0]
    raw = (kernel_bench.latent_batch if config.latent else kernel_bench.stored_batch)(3, C, 8, 8, torch.device("cpu"))
    inputs = kernel_bench.training_inputs((C, 8, 8), config.edm2, raw if config.latent else None)
    assert type(inputs.__self__).__name__ == objective
    args, kwargs = kernel_bench.kernel_arguments(inputs, raw)
    alone, whole = kernels.ambient_input(*args, **kwargs), inputs(raw)
    for name in ("net_input", "A", "A_hat", "y"):
        assert torch.equal(getattr(alone, name), getattr(whole, name)), name
    cases = kernel_bench.ambient_input_cases(3 * C * 64 * 64, 0.1, torch.device("cpu"), config)
    assert [case.op for case in cases] == ["ambient_input kernel", f"{objective}.inputs call"]
    assert cases[0].bytes == cases[1].bytes and all(case.check() == 0 for case in cases)
    value_bytes = 2 if config.latent else 1  # float16 latents, uint8 levels
    assert cases[0].bytes == 3 * C * 64 * 64 * (value_bytes + 20) + 3 * C * 64 * 64 // 8 + 3


def test_edm2_kernel_cases_in_the_interpreter(kernel_bench, tmp_path, monkeypatch):
    """`bench/kernels.py --configs edm2-64,edm2-latent-64` on a CPU: EDM2's ambient input (the kernel
    alone and EDM2Objective.inputs; uint8 values with dust masks, float16 latents with windows) and its
    uncertainty-weighted loss, each in Triton's interpreter against its PyTorch reference, in a report
    of their own, and nothing of DDPM++'s. For CI's time at 16x16 rather than 64x64 (the interpreter
    runs a block at a time): the same kernels and paths."""
    for name in ("edm2-64", "edm2-latent-64"):
        config = kernel_bench.KERNEL_CONFIGS[name]
        monkeypatch.setitem(kernel_bench.KERNEL_CONFIGS, name, config._replace(shape=(config.shape[0], 16, 16)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # run_cpu sets it as well; monkeypatch removes it afterwards
    assert kernel_bench.main(["--configs", "edm2-64,edm2-latent-64", "--results", str(tmp_path)]) == 0
    assert not list(tmp_path.glob("kernels-cpu-*.md"))  # the day's DDPM++ record stays
    report = next(tmp_path.glob("kernels-edm2-cpu-*.md")).read_text()
    assert "Path: Triton interpreter (TRITON_INTERPRET=1)" in report
    rows = [line.split(" | ") for line in report.splitlines() if line.endswith(("| ok |", "| FAIL |"))]
    assert [(row[0], row[1], row[-1]) for row in rows] == [
        ("| masked_loss fwd+bwd", "fp32 L2 (3,3,16,16) slice, EDM2 uncertainty-weighted", "ok |"),
        ("| ambient_input kernel", "the kernel alone: stored uint8 + bits (3,3,16,16) -> fp32", "ok |"),
        ("| EDM2Objective.inputs call", "a training step's whole call: stored uint8 + bits (3,3,16,16) -> fp32",
         "ok |"),
        ("| masked_loss fwd+bwd", "fp32 L2 (2,4,16,16) slice, EDM2 uncertainty-weighted", "ok |"),
        ("| ambient_input kernel", "the kernel alone: stored float16 + bits (2,4,16,16) -> fp32, windows", "ok |"),
        ("| EDM2Objective.inputs call", "a training step's whole call: stored float16 + bits (2,4,16,16) -> fp32, "
                                        "windows", "ok |")]


GPU_CHECK = BENCH / "gpu_check.sh"
PART_STEPS = {"1": ["setup", "tests", "train"], "2": ["setup", "kernels", "sample", "scaling"]}


def test_gpu_check_parts_fit_one_command():
    """`bash bench/gpu_check.sh --part N --dry-run`: each part's step limits (compilation included) sum to
    at most 300 s, as the script promises; the GPU runs no AOT step; the rehearsal runs the same steps."""
    for flags in ([], ["--cpu-rehearsal"]):
        for part, names in PART_STEPS.items():
            out = subprocess.run(["bash", str(GPU_CHECK), "--part", part, "--dry-run", *flags], capture_output=True,
                                 text=True, check=True).stdout
            steps = re.findall(r"^\s+(\w+)\s+\(at most\s+(\d+) s\)\s+(.*)$", out, re.MULTILINE)
            assert [name for name, _, _ in steps] == names
            assert sum(int(limit) for _, limit, _ in steps) <= 300
            assert ("--tiny" in out) == bool(flags) and "aot" not in out
    assert "sum to at most 300 s" in GPU_CHECK.read_text()
    for flags in ([], ["--part", "3"], ["--part", "1", "--fixtures", "/nonexistent"]):
        done = subprocess.run(["bash", str(GPU_CHECK), *flags, "OUT"], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith("error: gpu_check: ") and done.stderr.count("\n") == 1


def statuses(summary: Path) -> dict:
    """step -> status, from a part's summary table."""
    return dict(re.findall(r"^\| (\w+) \| ([^|]+?) \| [-\d]+ \| \d+ \|$", summary.read_text(), re.MULTILINE))


def rehearsal_environment() -> dict:
    return dict(os.environ, PYTHON=sys.executable)


def test_gpu_check_cpu_rehearsal(tmp_path):
    """`bash bench/gpu_check.sh --cpu-rehearsal OUT`: every step of both parts at tiny sizes on the CPU,
    each passing, every benchmark's report in OUT and in its part's summary, and OUT as a lent machine
    returns it (at most 8 files, no folder, plain names). About a minute on an idle 2-core CPU."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(GPU_CHECK), "--cpu-rehearsal", str(out)], capture_output=True, text=True,
                          env=rehearsal_environment(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = sorted(path.name for path in out.iterdir())
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names) and all(
        (out / n).is_file() for n in names), names
    for part, steps in PART_STEPS.items():
        (summary,) = out.glob(f"gpu-check-rehearsal-part{part}-*.md")
        assert statuses(summary) == {step: "passed" for step in steps}
        assert (out / f"gpu-check-rehearsal-part{part}.log").is_file()
    part1 = next(out.glob("gpu-check-rehearsal-part1-*.md")).read_text()
    assert "GPU: none (CPU rehearsal)" in part1 and "skipped" in part1 and "### One step of (b) under torch.profiler" in part1
    part2 = next(out.glob("gpu-check-rehearsal-part2-*.md")).read_text()
    for report in ("kernels-cpu-", "sample-cpu-", "train-scaling-cpu-"):
        (path,) = out.glob(report + "*.md")
        assert path.read_text().splitlines()[0].replace("# ", "## ", 1) in part2  # the report, a level down
    # bench/sample.py's own report (its step: `--tiny --resolutions 32 --device cpu`)
    report = next(out.glob("sample-cpu-*.md")).read_text()
    assert "## 32x32 (tiny: --tiny), batch 1" in report and "reference-style" in report and "torch " in report
    # exact and fast sample in the sampling command's memory format on this device (the CPU: contiguous)
    assert re.search(r"- exact: .*fp32 network, contiguous", report) and re.search(r"- fast: .*contiguous", report)


def session_processes(session: int) -> "list[int]":
    """The processes of a session (the script and everything it started), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[3]) == session:
            pids.append(int(entry.name))
    return pids


def test_gpu_check_part_killed_midway_keeps_what_finished(tmp_path):
    """A part stopped as a lent machine stops a command at its limit (every process killed, nothing
    trapped), here right after its first step ended: that step's results are in OUT, the summary says
    which step was running and which never ran."""
    out = tmp_path / "out"
    script = subprocess.Popen(["bash", str(GPU_CHECK), "--cpu-rehearsal", "--part", "1", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=rehearsal_environment(),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and script.poll() is None:
            summary = next(out.glob("gpu-check-rehearsal-part1-*.md"), None) if out.is_dir() else None
            if summary is not None and statuses(summary).get("tests", "").startswith("running"):
                break  # the first step has passed, the second begun
            time.sleep(0.2)
        assert script.poll() is None, "the part ended before it could be stopped"
    finally:
        for pid in session_processes(script.pid):
            os.kill(pid, signal.SIGKILL)
        script.wait()
    summary = next(out.glob("gpu-check-rehearsal-part1-*.md"))
    status = statuses(summary)
    assert status["setup"] == "passed" and status["tests"].startswith("running") and status["train"] == "pending"
    assert "## Environment" in summary.read_text() and "torch " in summary.read_text()
    log = (out / "gpu-check-rehearsal-part1.log").read_text()
    assert "=== part 1, setup: passed" in log and "=== part 1, tests (at most" in log
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", path.name) for path in out.iterdir())
