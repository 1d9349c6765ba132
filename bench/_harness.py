"""What the benchmarks share: the device and the software they ran on, timing with the device
synchronised, the bf16 matmul peak measured in the same run, and the report (a rich table on the
terminal, the same table as markdown in bench/results/ or the folder given).

Every report names the device, the date and the versions, and every ratio is printed with both
of its sides, so that a figure can be checked and reproduced.
"""
import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from ambient_fast.files.atomic import write_text
from ambient_fast.training.settings import resolve_sampling

RESULTS = Path(__file__).resolve().parent / "results"
CPU_CAVEAT = ("No CUDA GPU: these are CPU figures, for correctness and regressions only. They say nothing about "
              "the performance targets, which are judged on a GPU (`bash bench/gpu_check.sh OUT_DIR`); GPU figures "
              "are pending.")


def pick_device(name: str) -> torch.device:
    """`auto` (the first GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


# --tiny (bash bench/gpu_check.sh --cpu-rehearsal): the smallest models that still have every kind of
# block (two resolutions, attention at the lower one), so that every path runs in seconds on a CPU.
TINY_SIZE = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1)


def add_common_arguments(parser, quick_help: str) -> None:
    """--device, --results, --quick and --tiny, the same for every benchmark."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the markdown report")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help=quick_help)
    sizes.add_argument("--tiny", action="store_true", help="the smallest models and sizes (bash bench/gpu_check.sh "
                       "--cpu-rehearsal): every path runs, the figures mean nothing")


def size_mode(args) -> str:
    """'tiny', 'quick' or 'full', from the common arguments."""
    return "tiny" if args.tiny else "quick" if args.quick else "full"


SIZE_TITLES = {"full": "", "quick": " (narrowed: --quick)", "tiny": " (tiny: --tiny)"}  # appended to table titles


def cli_sampling(device: torch.device) -> "tuple[torch.memory_format, bool]":
    """The network's memory format and whether the fast path runs, as `python -m ambient_fast.sample`
    chooses them on `device` by default (no --exact, guidance or churn): channels_last and the fast
    path on CUDA, contiguous and the exact path elsewhere (`ambient_fast.training.settings.resolve_sampling`,
    the command's own resolution). The sampling benchmarks sample so."""
    settings = resolve_sampling(device)
    return settings.memory_format, settings.fast


def add_check_arguments(parser, quick_help: str) -> None:
    """--quick, --results and --no-report, the same for the checks that need no device (bench/aot.py,
    bench/compile_check.py)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the markdown report")
    parser.add_argument("--no-report", action="store_true", help="print only, write no report")


def parse_resolutions(parser, text: str, allowed, flag: str) -> "list[int]":
    """Comma-separated resolutions among `allowed`; a parser error otherwise."""
    try:
        resolutions = [int(r) for r in text.split(",")]
        if resolutions and all(r in allowed for r in resolutions):
            return resolutions
    except ValueError:
        pass
    parser.error(f"{flag} takes resolutions among {sorted(allowed)}, comma-separated; got {text!r}")


def parse_list(parser, text: str, flag: str, allowed=None) -> list:
    """Comma-separated names among `allowed` if given, else positive integers; 'none' or '' for none."""
    if text.strip().lower() in ("", "none"):
        return []
    items = [v.strip() for v in text.split(",")]
    if allowed is not None:
        if all(v in allowed for v in items):
            return items
    else:
        try:
            values = [int(v) for v in items]
            if all(v >= 1 for v in values):
                return values
        except ValueError:
            pass
    parser.error(f"{flag} takes {'names among ' + ', '.join(allowed) if allowed else 'positive integers'}, "
                 f"comma-separated, or none; got {text!r}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> str:
    """One line: torch, Triton, CUDA, DALI and Python versions (read without importing Triton or DALI)."""
    def installed(distribution: str) -> Optional[str]:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    dali = next((v for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
                 if (v := installed(d))), None)
    return (f"torch {torch.__version__}, Triton {installed('triton') or 'not installed'}, "
            f"CUDA {torch.version.cuda or 'none (CPU build)'}, DALI {dali or 'not installed'}, "
            f"Python {platform.python_version()}")


def today() -> str:
    return datetime.date.today().isoformat()


def report_path(folder: Path, kind: str, device: torch.device) -> Path:
    """<folder>/<kind>-<device slug>-<date>.md, e.g. train-nvidia-h100-80gb-hbm3-2026-12-01.md."""
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return Path(folder) / f"{kind}-{slug}-{today()}.md"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Wall-clock seconds of `repeats` calls of fn, the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def cpu_threads(count: int):
    """torch's intra-op thread count set to `count` for the block, then restored: a benchmark called
    in-process (the tests do) must not leave its setting behind, since the count changes how CPU
    kernels split their reductions and so their last bits."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def fused_kernels_off():
    """Our PyTorch references instead of the fused kernels (AMBIENT_FAST_KERNELS=0, which the
    dispatch reads at every call), restored afterwards."""
    saved = os.environ.get("AMBIENT_FAST_KERNELS")
    os.environ["AMBIENT_FAST_KERNELS"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["AMBIENT_FAST_KERNELS"]
        else:
            os.environ["AMBIENT_FAST_KERNELS"] = saved


def tf32_state(device: torch.device) -> str:
    if device.type != "cuda":
        return "TF32 n/a (CPU)"
    return (f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}, "
            f"cuDNN {'on' if torch.backends.cudnn.allow_tf32 else 'off'}")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """Peak device memory allocated and reserved (by the caching allocator) since the last reset, or n/a
    on the CPU (no such counters)."""
    if device.type != "cuda":
        return "n/a"
    return (f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} / "
            f"{torch.cuda.max_memory_reserved(device) / 2 ** 30:.2f} GiB")


def peak_matrix_size(device: torch.device, mode: str) -> int:
    """n of `bf16_matmul_peak`'s products: 8192 on a GPU, 1024 on the CPU, 256 at --tiny on the CPU
    (where the figures mean nothing and a CPU without bf16 instructions took 26 s for 1024)."""
    if device.type == "cuda":
        return 8192
    return 256 if mode == "tiny" else 1024


def bf16_matmul_peak(device: torch.device, n: int) -> float:
    """FLOP/s of a square n x n bf16 matrix product on `device`, the best of a few timed products
    after warm-up: the yardstick for model FLOP utilisation."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    repeats = 10 if device.type == "cuda" else 2
    seconds(lambda: a @ b, device, 3 if device.type == "cuda" else 1)  # warm-up: clocks, library heuristics
    best = min(seconds(lambda: a @ b, device, repeats) / repeats for _ in range(3))
    return 2 * n ** 3 / best


def ratio(numerator: float, denominator: float) -> str:
    """'12.3x (A / B)' with both sides, so that no ratio is printed without what it divides."""
    return f"{numerator / denominator:.2f}x ({numerator:.4g} / {denominator:.4g})"


def print_table(console: Console, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                left: Sequence[str] = ()) -> None:
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> "list[str]":
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(path: Path, title: str, sections: Sequence[str]) -> Path:
    """Write `# title` and the sections (markdown text, one blank line between them)."""
    return write_text(path, "\n\n".join([f"# {title}", *sections]) + "\n")


def environment_section(device: torch.device, command: str) -> str:
    """The report's first lines: device, date, versions, command."""
    lines = [f"- Device: {device_name(device)}"
             + ("" if device.type == "cuda" else f", {torch.get_num_threads()} torch thread(s). {CPU_CAVEAT}"),
             f"- Date: {today()}", f"- Software: {versions()}", f"- Command: `{command}`"]
    return "\n".join(lines)
