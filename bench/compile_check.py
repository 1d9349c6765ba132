"""torch.compile of the training step, checked on this machine: `python bench/compile_check.py`.

For the CIFAR-10 (32x32) and 64x64 configurations (`--arch edm2`: EDM2-S at ImageNet-64's size),
builds the trainer as `--compile` does (every U-Net block compiled with Inductor, static shapes),
runs a few training steps and reports: the compile time (first step), the time of the later steps,
the number of compiled graphs, how many of the blocks ran compiled in the last forward pass (all of
them, or some fell back to eager: dynamo's recompile limit), the recompile-limit messages dynamo
logged, and every parameter's gradient in the first step against an eager trainer's on the same
batch (the largest relative difference). Exit status 1 if a block ran eagerly, the limit was hit or
a gradient differs beyond rounding (GRADIENT_TOLERANCE). The settings are this device's defaults;
AMBIENT_FAST_DEFAULTS_FOR=cuda TRITON_INTERPRET=1 checks CUDA's on the CPU (bf16 autocast,
channels_last, the fused kernels interpreted), as tests/test_compile.py does.

Fusion (`--arch edm2`): one EDM2 encoder block in training mode, forward and backward compiled
with Inductor, against its forward's ATen operations (`make_fx`): the generated kernels (each a
fused loop nest) and the library calls (convolutions, matrix products) in Inductor's output code.
Few generated kernels for many elementwise operations is the evidence that Inductor fuses EDM2's
elementwise chains (mp_silu, mp_sum, the gains, the normalisations) itself: no hand-written kernel
is needed there.

Full width by default (the published configurations; minutes on a CPU, mostly Inductor's compile);
`--quick`: one block per resolution and 16 channels (tests/test_compile.py runs that).
"""
import argparse
import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

import _harness as harness  # noqa: E402

RESOLUTIONS = {"ddpmpp": (32, 64), "edm2": (64,)}
PRESET = {"ddpmpp": {}, "edm2": dict(preset="edm2-s")}  # the resolution's own preset, or EDM2-S
QUICK_SIZE = dict(model_channels=16, num_blocks=1)
STEPS = 3
# Largest relative difference ||compiled - eager|| / ||eager|| of a parameter's gradient in the first
# step: Inductor reorders float32 arithmetic (measured 2e-6 on the built-in preset, 16 channels wide)
# and keeps bf16 intermediates in float32 within a fused kernel where eager rounds each operation
# (measured 0.048 under CUDA's settings). A wrong gradient is off by its own size.
GRADIENT_TOLERANCE = {False: 1e-4, True: 0.1}  # by bf16


class CallCounter:
    """A torch.compile backend that wraps another and counts the calls of the graphs it compiled:
    `graphs` compiled so far, `calls` made since the last `reset_calls()`."""

    def __init__(self, backend="inductor"):
        from torch._dynamo.backends.registry import lookup_backend

        self.backend = lookup_backend(backend)
        self.graphs = 0
        self.calls = 0

    def __call__(self, graph_module, example_inputs):
        compiled = self.backend(graph_module, example_inputs)
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run

    def reset_calls(self):
        self.calls = 0


class LimitMessages(logging.Handler):
    """Collects dynamo's log records that say a recompile limit was hit."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.messages.append(message)


@contextlib.contextmanager
def dynamo_limit_messages():
    handler = LimitMessages()
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def check(resolution: int, size: dict, work: Path, steps: int = STEPS, arch: str = "ddpmpp") -> dict:
    """Train `steps` steps compiled and as many eager on the same data, in the settings this device
    resolves (AMBIENT_FAST_DEFAULTS_FOR=cuda: CUDA's); return the figures. The two are compared by
    every parameter's gradient in the first step; the last step's losses are reported only: the
    output layers start near zero and the learning rate ramps up from zero, so the losses of the
    first steps barely depend on the blocks (compiled and eager agreed to float32's last digit
    under CUDA's settings, where bf16 moves the gradients by 5%)."""
    from aot import random_set
    from ambient_fast.training.parallel import compile_each
    from ambient_fast.training.config import TrainConfig
    from ambient_fast.training.trainer import Trainer

    torch._dynamo.reset()
    data = random_set(work / f"data-{resolution}", resolution, True, count=8)

    def trainer(name):
        config = TrainConfig(data=str(data), out=str(work / f"{name}-{resolution}"), device="cpu", compile=False,
                             batch=2, steps=steps, arch=arch, **{**PRESET[arch], **size})
        with contextlib.redirect_stdout(None):
            return Trainer(config)

    def gradients(trainer) -> dict:
        return {name: p.grad.detach().float().clone() for name, p in trainer.net.named_parameters() if p.grad is not None}

    eager = trainer("eager")
    eager_losses = [eager.train_step().item()]
    eager_gradients = gradients(eager)
    eager_losses += [eager.train_step().item() for _ in range(steps - 1)]
    compiled = trainer("compiled")
    blocks = compiled.net.blocks()
    counter = CallCounter()
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit), \
            dynamo_limit_messages() as limit_messages:
        compile_each(blocks, backend=counter)  # what --compile does, through a counting wrapper
        times, losses = [], []
        for step in range(steps):
            counter.reset_calls()
            start = time.perf_counter()
            losses.append(compiled.train_step().item())
            times.append(time.perf_counter() - start)
            if step == 0:
                errors = {name: ((g - eager_gradients[name]).norm() / eager_gradients[name].norm()).item()
                          for name, g in gradients(compiled).items() if eager_gradients[name].norm() > 0}
    torch._dynamo.reset()
    worst = max(errors, key=errors.get)
    return dict(resolution=resolution, blocks=len(blocks), graphs=counter.graphs, compiled_calls=counter.calls,
                compile_s=times[0], step_s=sum(times[1:]) / max(len(times) - 1, 1), limit_messages=limit_messages,
                settings=compiled.settings, loss=losses[-1], eager_loss=eager_losses[-1],
                gradients=(len(errors), len(eager_gradients)), gradient_error=errors[worst], worst_gradient=worst)


def edm2_block_fusion(channels: int = 32, resolution: int = 16) -> dict:
    """One EDM2 encoder block (training mode, `channels` wide, with its embedding), forward and backward
    compiled with Inductor: its forward's ATen operations and what Inductor's output code calls."""
    import re

    from torch._inductor.utils import run_and_get_code
    from torch.fx.experimental.proxy_tensor import make_fx

    from ambient_fast.networks.edm2 import Block

    torch.manual_seed(0)
    block = Block(channels, channels, 2 * channels, flavor="enc", resample_mode="keep").train()
    for module in block.modules():  # as the trainer compiles EDM2: the weights normalised by a step of their own
        if hasattr(module, "normalize_in_forward"):
            module.normalize_in_forward = False
    x, emb = torch.randn(4, channels, resolution, resolution), torch.randn(4, 2 * channels)

    def step(x, emb):
        block(x, emb).square().sum().backward()

    operations = [node for node in make_fx(lambda x, emb: block(x, emb))(x, emb).graph.nodes
                  if node.op == "call_function"]
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(step), x, emb)
    torch._dynamo.reset()
    code = "\n".join(codes)
    kernels = re.findall(r"^(\w+) = async_compile\.", code, re.M)  # each generated kernel's definition
    library = sorted(set(re.findall(r"extern_kernels\.(\w+)", code)))
    return dict(operations=len(operations), kinds=sorted({str(node.target) for node in operations}),
                kernels=kernels, library=library)


def passed(result: dict) -> bool:
    compared, parameters = result["gradients"]
    same_gradients = compared == parameters and \
        result["gradient_error"] <= GRADIENT_TOLERANCE[result["settings"].bf16]
    return result["compiled_calls"] == result["blocks"] and not result["limit_messages"] and same_gradients


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_check_arguments(parser, "one block per resolution, 16 channels")
    parser.add_argument("--arch", choices=tuple(RESOLUTIONS), default="ddpmpp",
                        help="DDPM++ (CIFAR-10 and 64x64 configurations) or EDM2 (EDM2-S at 64x64)")
    args = parser.parse_args(argv)
    console = Console()
    size = QUICK_SIZE if args.quick else {}
    header = ["config", "blocks", "compiled in last forward", "graphs", "first step s", "later steps s",
              "recompile-limit messages", "largest gradient difference", "last loss compiled / eager", "check"]
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="ambient-fast-compile-") as work:
        for resolution in RESOLUTIONS[args.arch]:
            console.print(f"{args.arch} {resolution}x{resolution}: {STEPS} compiled steps and {STEPS} eager ...")
            result = check(resolution, size, Path(work), arch=args.arch)
            ok = passed(result)
            failed |= not ok
            rows.append([f"{args.arch} {resolution}x{resolution}" + (" (quick)" if args.quick else ""),
                         str(result["blocks"]), str(result["compiled_calls"]), str(result["graphs"]),
                         f"{result['compile_s']:.1f}",
                         f"{result['step_s']:.2f}", str(len(result["limit_messages"])),
                         f"{result['gradient_error']:.2g} ({result['worst_gradient']})",
                         f"{result['loss']:.6g} / {result['eager_loss']:.6g}", "ok" if ok else "FAIL"])
    harness.print_table(console, "torch.compile of the training step (Inductor, CPU)", header, rows,
                        left=("config", "check"))
    fusion = []
    if args.arch == "edm2":
        result = edm2_block_fusion()
        fusion = [f"Fusion: one EDM2 encoder block (32 channels, 16x16, training mode; the weight normalisation a "
                  f"step of its own, as the trainer has it), forward and backward under Inductor: its forward has "
                  f"{result['operations']} ATen operations ({', '.join(result['kinds'])}); Inductor's code for "
                  f"forward and backward has {len(result['kernels'])} generated kernels "
                  f"({', '.join(result['kernels'])}) and calls the libraries for {', '.join(result['library'])}."]
        console.print(fusion[0])
    if not args.no_report:
        device = torch.device("cpu")
        name = "compile" + ("" if args.arch == "ddpmpp" else f"-{args.arch}") + ("-quick" if args.quick else "")
        path = harness.report_path(args.results, name, device)
        command = "python bench/compile_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
        harness.write_report(path, f"torch.compile of the training step, {harness.today()}", [
            harness.environment_section(device, command.strip()),
            "Every U-Net block compiled as `--compile` does (Inductor, static shapes), batch 2. 'compiled in last "
            "forward': compiled graphs called in the last step's forward pass (one per block when every block runs "
            "compiled). First step: tracing and Inductor's compile included. 'largest gradient difference': "
            "max over parameters of |compiled - eager| / |eager| of the first step's gradient.",
            "\n".join(harness.markdown_table(header, rows)), *fusion])
        console.print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
