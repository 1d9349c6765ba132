"""GPU checks of the training path (`python -m pytest -m gpu`, or `bash bench/gpu_check.sh OUT`): bf16
training against fp32 on the same batch, the trainer's default CUDA step (bf16, compiled blocks, fused
kernels, B drawn in the kernel), and the DALI pipeline on the GPU against the torch loader. They skip,
saying why, without CUDA (and the DALI one without nvidia.dali). The kernels' and the CUDA-graph
sampler's GPU tests live in test_kernels.py and test_sample.py."""
import numpy as np
import pytest
import torch

from ambient_fast.data.format import write_dataset
from ambient_fast.data.batches import dali_available
from ambient_fast.data.loader import make_loader
from ambient_fast.objective.objective import EDMSchedule, ambient_loss, training_batch
from ambient_fast.networks import EDMPrecond
from ambient_fast.training.config import TrainConfig
from ambient_fast.training.trainer import Trainer

from conftest import TINY_ARCHITECTURES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: "
                                 "python -m pytest -m gpu, or bash bench/gpu_check.sh OUT)")]
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable (pip install -e "
                                "\".[dali]\", or give its wheel to bench/gpu_check.sh --wheels DIR)")


def random_set(path, n=64, resolution=16, label_dim=0, seed=0):
    """A corrupted data set of random images: dust p = 0.5 per value."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, 3, resolution, resolution)) >= 0.5
    observed = (rng.integers(0, 256, masks.shape, dtype=np.uint8) * masks).astype(np.uint8)
    labels = rng.integers(0, label_dim, n) if label_dim else None
    corruption = {"kind": "dust", "p": 0.5, "delta": 0.1, "shared_channels": False}
    return write_dataset(path, observed, masks, corruption, labels=labels, source="test")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_bf16_loss_and_gradients_close_to_fp32():
    """The same batch, sigma and noise through the ambient loss in fp32 (TF32 off) and under bf16
    autocast with the fused kernels: finite, and within bf16's precision of each other."""
    model_type, kwargs = TINY_ARCHITECTURES["ddpmpp"]
    net = EDMPrecond(img_resolution=16, img_channels=6, model_type=model_type, **kwargs)
    with torch.no_grad():  # unit-scale weights: EDM's near-zero last layers would hide the network's error
        for param in net.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
    net = net.cuda()
    N = 8
    A = (torch.rand(N, 3, 16, 16, device="cuda") < 0.6).float()
    y = (torch.rand(N, 3, 16, 16, device="cuda") * 2 - 1) * A
    A_hat = A * (torch.rand_like(A) < 0.9)
    sigma = torch.logspace(-2, 1.5, N, device="cuda")  # 0.01 .. 32: every regime of the preconditioning
    batch = training_batch(y, A, A_hat, sigma, torch.randn_like(y))
    schedule = EDMSchedule()

    def loss_and_gradients(bf16: bool):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            per_sample = ambient_loss(net, batch, schedule)
        (per_sample.sum() / N).backward()
        return per_sample.detach(), torch.cat([p.grad.flatten() for p in net.parameters()])

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        loss32, grad32 = loss_and_gradients(bf16=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    loss16, grad16 = loss_and_gradients(bf16=True)
    assert torch.isfinite(loss16).all() and torch.isfinite(grad16).all()
    # bf16 on a CPU, five seeds: loss within 0.3%, gradients within 7-13% (norm of the difference over
    # the norm; cosine 0.99). A wrong kernel or cast is off by order one.
    assert ((loss16 - loss32).abs() / loss32).max().item() < 0.02
    assert relative_error(grad16, grad32) < 0.25


def test_trainer_default_cuda_steps_are_finite_and_match_fp32(tmp_path):
    """The trainer's CUDA defaults (bf16 autocast, compiled blocks, fused kernels, the ambient input
    in one fused pass) take finite steps, and their objective matches an fp32 eager trainer's on the
    same draws (same seed: same sigma, B and noise; the learning rate is still ramping up from 0, so
    the weights barely move)."""
    data = random_set(tmp_path / "data")
    common = dict(data=str(data), batch=8, steps=3, device="cuda", model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[8])
    fast = Trainer(TrainConfig(out=str(tmp_path / "fast"), **common))
    assert fast.bf16 and fast.compiled and "fused Triton" in fast.summary()
    reference = Trainer(TrainConfig(out=str(tmp_path / "fp32"), precision="fp32", compile=False, **common))
    losses = np.array([fast.train_step().item() for _ in range(3)])
    expected = np.array([reference.train_step().item() for _ in range(3)])
    assert np.isfinite(losses).all() and fast.skipped == 0
    assert all(torch.isfinite(p).all() for p in fast.net.parameters())
    assert (np.abs(losses - expected) / expected).max() < 0.02


@needs_dali
def test_dali_gpu_pipeline_agrees_with_the_torch_loader(tmp_path):
    """DALI's asynchronous pipeline on the GPU hands out the torch loader's batches, byte for byte, on
    the device, for two epochs."""
    dataset = random_set(tmp_path / "data", n=96, resolution=8, label_dim=5)
    kwargs = dict(batch_size=32, seed=2, xflip=True, device="cuda")
    torch_loader, dali_loader = (make_loader(dataset, kind=kind, **kwargs) for kind in ("torch", "dali"))
    assert dali_loader.kind == "dali"
    for _ in range(2 * torch_loader.steps_per_epoch):
        a, b = torch_loader.next(), dali_loader.next()
        assert all(t.is_cuda for t in (b.observed, b.mask_bits, b.flips, b.labels))
        for name in ("observed", "mask_bits", "flips", "labels"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.position == b.position
