"""The benchmarks' working parts on tiny sizes, so that they cannot rot unnoticed: the training
variants (ours in the reference settings and the fast path, and the authors' code imported from a
checkout, here a stand-in with its API), the FLOP count, the samplers and their agreement, the
reports and the command-line errors. Nothing here looks at a time."""
import importlib.util
import sys
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
    setup = train.Setup(resolution=16, batch=2, steps=1, warmup=1, size=TINY, device=torch.device("cpu"))
    rows, flops = train.measure(setup, tmp_path / "work", reference)
    assert [row.variant for row in rows] == ["(a) reference settings", "(b) fast path", "(c) authors' code"]
    for row in rows:  # images/s is the batch over the time of one step
        assert row.images_per_s == pytest.approx(setup.batch / row.step_s, rel=1e-9), row
    assert "AMBIENT_FAST_KERNELS=0" in rows[0].settings and "per-image numpy masks" in rows[0].settings
    assert "AMBIENT_FAST_KERNELS" not in rows[1].settings and "FAILED" not in rows[2].settings
    table = train.table_rows(rows, flops, peak=1e12)
    assert table[0][-1].startswith("1.00x (") and all(len(row) == len(train.HEADER) for row in table)
    # The FLOP column is flops x images/s; the percentage is that over the peak.
    assert float(table[1][3]) == pytest.approx(flops * rows[1].images_per_s / 1e12, rel=1e-3)
    assert float(table[1][4].rstrip("%")) == pytest.approx(100 * flops * rows[1].images_per_s / 1e12, rel=1e-2)


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
    setup = train.Setup(resolution=16, batch=2, steps=1, warmup=0, size=TINY, device=torch.device("cpu"))
    data = train.corrupted_set(tmp_path, resolution=16, count=8)
    row = train.run_reference(setup, data, reference)
    assert row.images_per_s is None and "FAILED: RuntimeError: boom" in row.settings


def test_train_command_line_errors(train, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--configs", "48"])
    assert "--configs" in capsys.readouterr().err
    assert train.main(["--reference-repo", str(tmp_path)]) == 2
    assert "lacks training/networks.py" in capsys.readouterr().out


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


def test_sample_main_writes_a_report(sample, tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "QUICK_SIZE", dict(model_channels=16, num_blocks=1, channel_mult=[1, 2]))
    assert sample.main(["--quick", "--resolutions", "32", "--batch", "1", "--results", str(tmp_path)]) == 0
    report = next(tmp_path.glob("sample-cpu-*.md")).read_text()
    assert "## 32x32 (narrowed: --quick), batch 1" in report and "reference-style" in report and "torch " in report
    with pytest.raises(SystemExit):
        sample.main(["--resolutions", "128"])


def test_gpu_check_compiles_ahead_first_and_fits_its_budget():
    """`bash bench/gpu_check.sh --dry-run`: the AOT compile runs before anything launches a kernel, and
    the steps' limits (compilation included) add up to what the script promises: 740 s, 1080 s with
    --full."""
    import re
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    for flags, budget in (([], 740), (["--full"], 1080)):
        out = subprocess.run(["bash", str(script), "--dry-run", *flags], capture_output=True, text=True,
                             check=True).stdout
        steps = re.findall(r"^\s+(\w+)\s+\(at most\s+(\d+) s\)", out, re.MULTILINE)
        names = [name for name, _ in steps]
        assert names == ["setup", "env", "aot", "tests", "kernels", "train", "sample"]
        assert sum(int(limit) for _, limit in steps) == budget
