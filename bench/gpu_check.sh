#!/usr/bin/env bash
# The GPU check: everything that needs a CUDA GPU, in one command, within 740 s (12.3 minutes) on one
# H100/H200 (--full: 1080 s).
#
#   bash bench/gpu_check.sh [--full] [--wheels DIR] [--reference-repo PATH] OUT_DIR
#   bash bench/gpu_check.sh --dry-run            # list the steps, run nothing
#
# Run it from anywhere on a machine with a CUDA GPU, torch and Triton (nothing is downloaded: such
# machines are often offline); PYTHON chooses the interpreter (default python3). With --reference-repo,
# the authors' dnnlib imports requests, s3fs and torchvision: carry the missing ones as wheels too
# (the train step stops at once, saying which, if one is missing). The steps, each under its own limit:
#   setup    wheels from --wheels DIR (or $AMBIENT_FAST_WHEELS), e.g. nvidia-dali-cuda130, installed
#            with pip --no-index into a private folder put first on PYTHONPATH; then this checkout
#            installed in editable mode (pip -e, no dependencies) if ambient_fast.kernels does not
#            import yet (setup.py maps kernels/ to it)
#   env      the GPU, torch, CUDA, Triton, DALI, and which kernel path runs
#   aot      python bench/aot.py --quick: every kernel specialisation of the CI set compiled for sm_80
#            and sm_90 with this machine's Triton, before anything launches one (a compile failure
#            then names its kernel instead of failing inside a test)
#   tests    python -m pytest -m gpu: compiled kernels against their references, the DALI GPU
#            pipeline, the CUDA-graph sampler against the exact one, bf16 training against fp32, the
#            trainer's compiled CUDA step (tests/test_kernels.py, test_sample.py, test_gpu.py;
#            without nvidia.dali the DALI test skips, e.g. on an image with torch 2.11 and Triton 3.6
#            but no DALI; the fixture-based sampler test needs ../shared/fixtures or AMBIENT_FAST_FIXTURES)
#   kernels  python bench/kernels.py --sizes 64
#   train    python bench/train.py --steps 10 --warmup 3 --configs 32 (--full: 32,64; with
#            --reference-repo, the authors' code too)
#   sample   python bench/sample.py --resolutions 64 (batch 256, the target's; --full: 64,32)
# Limits (seconds) include compilation, which dominates the first call of every compiled path. Reasoned
# from what was measured on a 2-core CPU (bench/results/aot-*, compile-cpu-*): the AOT quick set records
# in about 15 s and compiles its ~280 specialisations in ~40 core-seconds (~10 s on 16 cores), the same
# again for the first launch of each kernel in a process; Inductor compiles the 13 graphs of the
# CIFAR-10 configuration (18 at 64x64), forward and backward, in ~20-60 s a configuration with its
# parallel workers, where a 2-core CPU took ~100 s. So: aot 90 (torch and Triton imports, ~2x margin);
# tests 180 (kernels' first compiles ~30 s, two trainer compiles of tiny models ~2 x 40 s, CUDA-graph
# captures); kernels 80 (Triton compiles ~20 s, then timing); train 240 a configuration ((a) eager 13
# steps ~30 s, (b) Inductor ~60 s and 13 steps, FLOP counting and the bf16 peak ~20 s, 2x margin);
# sample 100 a resolution (2 warm-up and 1 timed call of three samplers, the reference-style one the
# slowest, at batch 256). The default set's limits total 740 s, --full's 1080 s.
# A step that fails or runs out of time is recorded and the next one runs. Results:
#   OUT_DIR/gpu-check-<date>.md   one report: the steps' status and times, the test summary, and the
#                                 AOT, kernels, training and sampling tables (device, date, versions)
#   OUT_DIR/gpu-check.log         everything the steps printed
# Exit status: 0 when every step passed, 1 otherwise, 2 for bad arguments.
set -uo pipefail

usage() { sed -n '2,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
full=0
wheels="${AMBIENT_FAST_WHEELS:-}"
reference_repo=""
out=""
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --full) full=1 ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
        --reference-repo) reference_repo="${2:?--reference-repo needs a path}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [[ -z "$out" ]] || { echo "gpu_check: one OUT_DIR only (got $out and $1)" >&2; exit 2; }; out="$1" ;;
    esac
    shift
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
py="${PYTHON:-python3}"
if ((dry_run)); then
    work='$TMPDIR'  # shown, not made
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi
parts="$work/parts"  # the benchmarks' markdown, gathered into the report at the end
site="$work/site"    # where carried wheels are installed

reference_flag=""
if [[ -n "$reference_repo" ]]; then
    reference_flag="--reference-repo $(printf %q "$(cd "$reference_repo" 2>/dev/null && pwd || echo "$reference_repo")")"
fi
# name | seconds allowed | command (limits reasoned in the header)
configs=32; resolutions=64; train_limit=240; sample_limit=100
if ((full)); then configs=32,64; resolutions=64,32; train_limit=480; sample_limit=200; fi
steps=(
    "setup|30|setup_step"
    "env|20|$py $work/env_check.py"
    "aot|90|$py bench/aot.py --quick --results $parts"
    "tests|180|$py -m pytest -m gpu -q -rs -p no:cacheprovider"
    "kernels|80|$py bench/kernels.py --sizes 64 --results $parts"
    "train|$train_limit|$py bench/train.py --steps 10 --warmup 3 --configs $configs --results $parts $reference_flag"
    "sample|$sample_limit|$py bench/sample.py --resolutions $resolutions --results $parts"
)

if ((dry_run)); then
    echo "bash bench/gpu_check.sh would run, from $repo, with ${py}:"
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        [[ "$name" == setup ]] && command="install wheels from ${wheels:-(none given: --wheels DIR or AMBIENT_FAST_WHEELS)}; pip install --no-deps --no-build-isolation --no-index -e . if ambient_fast.kernels does not import"
        printf '  %-8s (at most %3s s)  %s\n' "$name" "$limit" "$command"
    done
    echo "then write OUT_DIR/gpu-check-<date>.md and OUT_DIR/gpu-check.log"
    exit 0
fi
[[ -n "$out" ]] || { echo "gpu_check: give the folder for the report: bash bench/gpu_check.sh OUT_DIR" >&2; exit 2; }
if [[ -n "$wheels" && ! -d "$wheels" ]]; then echo "gpu_check: --wheels $wheels is not a folder" >&2; exit 2; fi
mkdir -p "$out" "$parts" || exit 2
out="$(cd "$out" && pwd)"
log="$out/gpu-check.log"
: >"$log"

setup_step() {
    shopt -s nullglob
    local files=("$wheels"/*.whl)
    if [[ -n "$wheels" ]]; then
        if ((${#files[@]})); then
            echo "installing ${#files[@]} wheel(s) from $wheels into $site"
            "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "${files[@]}" || return 1
        else
            echo "no .whl files in $wheels"
        fi
    fi
    if "$py" -c "import ambient_fast.kernels" 2>/dev/null; then
        echo "ambient_fast (with its kernels) imports: $("$py" -c 'import ambient_fast; print(ambient_fast.__file__)')"
    else
        echo "installing this checkout in editable mode (no dependencies, nothing downloaded)"
        "$py" -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$repo" || return 1
    fi
}
export -f setup_step
export py wheels site repo
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

cat >"$work/env_check.py" <<'EOF'
import importlib.metadata
import platform

import torch

def version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None

print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA GPU: this check needs one")
props = torch.cuda.get_device_properties(0)
print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
      f"compute capability {props.major}.{props.minor}")
print(f"Triton {version('triton') or 'NOT INSTALLED (the fused kernels need it)'}")
dali = next((v for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120") if (v := version(d))), None)
print(f"DALI {dali or 'not installed (the DALI test skips; carry its wheel with --wheels DIR)'}")
from ambient_fast import kernels
print(f"kernels on cuda: {kernels.active_path('cuda')}")
if version("triton") is None:
    raise SystemExit("Triton is missing")
EOF

declare -A status seconds_taken
failed=0
for step in "${steps[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    echo "=== $name (at most $limit s): $command" | tee -a "$log"
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "$command" >"$work/$name.log" 2>&1
    rc=$?
    seconds_taken[$name]=$((SECONDS - start))
    cat "$work/$name.log" >>"$log"
    case $rc in
        0) status[$name]="passed" ;;
        124|137) status[$name]="TIMED OUT after $limit s"; failed=1 ;;
        *) status[$name]="FAILED (exit status $rc)"; failed=1 ;;
    esac
    echo "=== $name: ${status[$name]} (${seconds_taken[$name]} s)" | tee -a "$log"
done

report="$out/gpu-check-$(date +%F).md"
{
    echo "# GPU check, $(date +%F)"
    echo
    echo "Command: \`bash bench/gpu_check.sh $( ((full)) && echo '--full ')${wheels:+--wheels $wheels }${reference_flag:+$reference_flag }$out\` on $(hostname), commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')."
    echo
    echo "| step | status | seconds | limit |"
    echo "|---|---|---|---|"
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit _ <<<"$step"
        echo "| $name | ${status[$name]} | ${seconds_taken[$name]} | $limit |"
    done
    echo
    echo "## Environment"
    echo
    sed 's/^/    /' "$work/env.log"
    echo
    echo "## Tests (python -m pytest -m gpu)"
    echo
    grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|error|skipped|deselected" "$work/tests.log" | sed 's/^/    /'
    for part in "$parts"/aot-*.md "$parts"/kernels-*.md "$parts"/train-*.md "$parts"/sample-*.md; do
        [[ -f "$part" ]] || continue
        echo
        sed 's/^#/##/' "$part"  # one level down: each benchmark's report becomes a section
    done
} >"$report"
echo "wrote $report and $log"
exit $failed
