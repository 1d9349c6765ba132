#!/usr/bin/env bash
# The GPU check, in two parts that each fit one command on a lent GPU machine (one command may run
# 10 minutes there, and all GPU work of a piece of work has 15 minutes, machine starts included):
# the per-step limits of each part sum to at most 300 s.
#
#   bash bench/gpu_check.sh --part 1|2 [--wheels DIR] [--fixtures DIR] [--reference-repo PATH] OUT_DIR
#       (--fixtures and --reference-repo: part 1, whose tests and training benchmark use them)
#   bash bench/gpu_check.sh --cpu-rehearsal [--part 1|2] OUT_DIR   # every step at tiny sizes on the CPU, each allowed 4x its limit
#   bash bench/gpu_check.sh --part 1|2 --dry-run [--cpu-rehearsal]   # list the steps and limits only
#
# Part 1: set-up, the GPU tests with the reference fixtures, the training benchmark at 32x32.
# Part 2: set-up, the kernel benchmark, the sampling benchmark, the training benchmark's batch scaling.
# No ahead-of-time compile step: the CPU checks every kernel specialisation (python bench/aot.py, and
# tests/test_aot.py in CI). Run it from anywhere on a machine with a CUDA GPU, torch and Triton
# (nothing is downloaded: such machines are often offline); PYTHON chooses the interpreter (default
# python3). The steps, each under its own limit (seconds, compilation included):
#   setup    (both parts, 20) wheels from --wheels DIR (or $AMBIENT_FAST_WHEELS), e.g. requests or
#            s3fs for --reference-repo, installed with pip --no-index into a private folder put first on
#            PYTHONPATH; this checkout installed in editable mode (no dependencies) unless ambient_fast
#            already imports from it; then the GPU, torch, CUDA, Triton, DALI and the kernel path
#   tests    (part 1, 100) python -m pytest -m gpu: compiled kernels against their references, the
#            CUDA-graph sampler against the exact one on the reference fixtures (--fixtures DIR, default
#            $AMBIENT_FAST_FIXTURES or ../shared/fixtures beside the checkout: a copied tree lacks them,
#            so carry them), bf16 training against fp32, the trainer's compiled CUDA step, the DALI
#            pipeline (it skips without nvidia.dali, whose wheel is too large to carry)
#   train    (part 1, 180) python bench/train.py --configs 32 --scaling none: (a) reference settings
#            and (b) the fast path at batch 128 (and (c) with --reference-repo), 2 warm-up steps and 3
#            windows of 5 steps each; compile time; a profiler table and the host syncs of one step of
#            (b) and of one sampler call
#   kernels  (part 2, 70) python bench/kernels.py --sizes 64 --configs ddpmpp (its EDM2 configurations'
#            six more compiles would not fit the limit: run them on their own, --configs edm2-64,edm2-latent-64)
#   sample   (part 2, 85) python bench/sample.py --resolutions 64 (batch 256, the target's; the rehearsal samples
#            at 32, in 8 steps)
#   scaling  (part 2, 125) python bench/train.py --configs none --scaling 128,256,512: (b) at each batch
# The limits, reasoned from what was measured on a 2-core CPU and from an H100/H200's speed (no GPU
# run of this script has been recorded yet): Inductor compiles the 14 graphs of the CIFAR-10
# configuration (forward and backward) in an estimated 30-60 s with a GPU machine's 16 cores (a 2-core
# CPU took 180 s, C++ code generation included); a fresh Python process imports torch and Triton in
# ~5-10 s. setup: pip's editable install without dependencies ~5 s, imports ~10 s. tests: the
# kernels' first compiles ~30 s, a trainer compiled on a tiny model ~30 s, CUDA-graph captures and the
# rest ~20 s. train: (a) 17 fp32 steps of 128 images at ~1 s, (b) one compile and 17 steps, the FLOP
# count, the profiled step, the sampler's warm-up. kernels: 8 torch.compile calls of ~5 s and the
# timings. sample: three samplers, a 2-step warm-up and an 18-step call each, at batch 256, the
# reference-style one with autograd the slowest (~3 PFLOP at 64x64 in fp32/TF32). scaling: three
# compiles (one per batch, static shapes) and their steps. A step that fails or runs out of time is
# recorded and the next one runs.
#
# What each part writes to OUT_DIR, as it goes (at most 8 files, none in a sub-folder, names of letters,
# digits, '.', '_' and '-', as a lent machine's $OUT returns them):
#   gpu-check-partN-<date>.md     the summary, rewritten after every step: each step's status, seconds and
#                                 limit (a step still 'running' is where the part was stopped), the
#                                 environment, the test summary and every benchmark's tables so far
#   gpu-check-partN.log           everything the steps printed, appended as they print it
#   train-*.md, kernels-*.md, sample-*.md, train-scaling-*.md   the benchmarks' reports, each
#                                 rewritten by its benchmark after each of its sections
# With --cpu-rehearsal the names start gpu-check-rehearsal-partN; it runs both parts unless --part
# says which. Exit status: 0 when every step passed, 1 otherwise, 2 for bad arguments.
set -uo pipefail

usage() { sed -n '2,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//'; }

part=""
dry_run=0
rehearsal=0
wheels="${AMBIENT_FAST_WHEELS:-}"
reference_repo=""
fixtures=""
out=""
while (($#)); do
    case "$1" in
        --part) part="${2:?--part needs 1 or 2}"; shift ;;
        --dry-run) dry_run=1 ;;
        --cpu-rehearsal) rehearsal=1 ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
        --reference-repo) reference_repo="${2:?--reference-repo needs a path}"; shift ;;
        --fixtures) fixtures="${2:?--fixtures needs a folder}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: gpu_check: unknown option $1; see bash bench/gpu_check.sh --help" >&2; exit 2 ;;
        *) [[ -z "$out" ]] || { echo "error: gpu_check: one OUT_DIR only (got $out and $1)" >&2; exit 2; }; out="$1" ;;
    esac
    shift
done

case "$part" in
    1|2) parts=("$part") ;;
    "") if ((rehearsal)); then parts=(1 2); else
            echo "error: gpu_check: say which part to run: --part 1 or --part 2 (each fits one command)" >&2; exit 2; fi ;;
    *) echo "error: gpu_check: --part takes 1 or 2, got $part" >&2; exit 2 ;;
esac
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 2
py="${PYTHON:-python3}"
fixtures="${fixtures:-${AMBIENT_FAST_FIXTURES:-$repo/../shared/fixtures}}"
if ((!dry_run)); then
    [[ -n "$out" ]] || { echo "error: gpu_check: give the folder for the results: bash bench/gpu_check.sh --part N OUT_DIR" >&2; exit 2; }
    [[ -z "$wheels" || -d "$wheels" ]] || { echo "error: gpu_check: --wheels $wheels is not a folder" >&2; exit 2; }
    if ((!rehearsal)) && [[ " ${parts[*]} " == *" 1 "* && ! -d "$fixtures" ]]; then
        echo "error: gpu_check: part 1 runs the GPU tests on the reference fixtures, and $fixtures is not a folder: give --fixtures DIR" >&2
        exit 2
    fi
    if [[ -n "$reference_repo" && ! -d "$reference_repo" ]]; then
        echo "error: gpu_check: --reference-repo $reference_repo is not a folder" >&2; exit 2
    fi
    mkdir -p "$out" || exit 2
    out="$(cd "$out" && pwd)"
fi

# The benchmarks' sizes: the GPU's, or the smallest that run every path on a CPU (--tiny).
if ((rehearsal)); then
    sizes="--device cpu --tiny"; train_sizes="$sizes"; label="gpu-check-rehearsal"
    # One thread: the rehearsal checks paths, not speed, and on a CPU shared with other work OpenMP's
    # threads wait on each other (a tiny network's call took 50 times longer with two on a busy 2-core CPU).
    export OMP_NUM_THREADS=1
    # The limits are the GPU's; on a CPU runner busy with other tests a tiny step can take longer
    # without anything being wrong with the script (the sample step took 86 s of its 85 at a load of 4
    # on a 2-core CPU without AVX-512). The rehearsal gives each step four times its limit.
    limit_factor=4
    # Sampling at 32x32 rather than the GPU's 64x64: the same paths at a quarter of the pixels (the fast
    # sampler's bf16 network took 87 s of the rehearsal at 64x64 on a 2-core CPU without AVX-512).
    sample_resolution=32
else
    limit_factor=1
    sizes=""; train_sizes="--steps 5 --windows 3 --warmup 2"; label="gpu-check"; sample_resolution=64
fi
reference_flag=""
[[ -n "$reference_repo" ]] && reference_flag="--reference-repo $(printf %q "$(cd "$reference_repo" && pwd)")"
results="$(printf %q "${out:-OUT_DIR}")"

# name | seconds allowed | command (limits reasoned in the header; each part's sum at most 300)
steps_of_part() { step_table "$1" | sed -E 's/ +/ /g; s/ +$//'; }
step_table() {
    case "$1" in
        1) printf '%s\n' \
            "setup|20|setup_step" \
            "tests|100|$py -m pytest -m gpu -q -rs -p no:cacheprovider" \
            "train|180|$py bench/train.py --configs 32 --scaling none $train_sizes --results $results $reference_flag" ;;
        2) printf '%s\n' \
            "setup|20|setup_step" \
            "kernels|70|$py bench/kernels.py --sizes 64 --configs ddpmpp --results $results" \
            "sample|85|$py bench/sample.py --resolutions $sample_resolution $sizes --results $results" \
            "scaling|125|$py bench/train.py --configs none $( ((rehearsal)) || echo '--scaling 128,256,512 ')$train_sizes --results $results" ;;
    esac
}

if ((dry_run)); then
    for p in "${parts[@]}"; do
        echo "part $p: bash bench/gpu_check.sh$( ((rehearsal)) && echo ' --cpu-rehearsal') --part $p would run, from $repo, with ${py}:"
        while IFS='|' read -r name limit command; do
            printf '  %-8s (at most %3s s)  %s\n' "$name" "$limit" "$command"
        done < <(steps_of_part "$p")
    done
    exit 0
fi

site="$(mktemp -d)"  # where carried wheels are installed
trap 'rm -rf "$site"' EXIT
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 COLUMNS=200  # whole lines, wide tables
export AMBIENT_FAST_FIXTURES="$fixtures"

# The set-up's check of the environment; exit status 3: ambient_fast does not import from this checkout.
environment_check='
import importlib.metadata
import os
import platform
import sys

import torch

repo, rehearsal = sys.argv[1], sys.argv[2] == "1"
try:
    from ambient_fast import kernels
except ImportError:
    kernels = None
if kernels is None or not os.path.realpath(kernels.__file__).startswith(os.path.realpath(repo) + os.sep):
    sys.exit(3)  # an editable install made from another copy of the checkout would run that copy: reinstall


def version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


print(f"ambient_fast from {repo}; Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
          f"compute capability {props.major}.{props.minor}")
elif rehearsal:
    print("GPU: none (CPU rehearsal)")
else:
    raise SystemExit("torch sees no CUDA GPU: this check needs one (or --cpu-rehearsal)")
triton = version("triton")
print("Triton", triton or "NOT INSTALLED (the fused kernels need it)")
dali = next((v for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120") if (v := version(d))), None)
print("DALI", dali or "not installed (the DALI test skips)")
print("kernels on cuda:", kernels.active_path("cuda"))
if triton is None:
    raise SystemExit("Triton is missing")
'

setup_step() {
    shopt -s nullglob
    local files=("$wheels"/*.whl)
    if [[ -n "$wheels" ]]; then
        echo "installing ${#files[@]} wheel(s) from $wheels into $site"
        ((${#files[@]} == 0)) || "$py" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "${files[@]}" || return 1
    fi
    local status=0
    "$py" -c "$environment_check" "$repo" "$rehearsal" || status=$?
    ((status == 3)) || return $status
    echo "installing $repo in editable mode (no dependencies, nothing downloaded)"
    "$py" -m pip install --quiet --no-deps --no-build-isolation --no-index -e "$repo" && "$py" -c "$environment_check" "$repo" "$rehearsal"
}
export -f setup_step
export py wheels site repo rehearsal environment_check

commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
failed=0
for p in "${parts[@]}"; do
    mapfile -t steps < <(steps_of_part "$p")
    summary="$out/$label-part$p-$(date +%F).md"
    log="$out/$label-part$p.log"
    : >"$log"
    declare -A status=() seconds_taken=() output=()
    for step in "${steps[@]}"; do status[${step%%|*}]="pending"; done

    # The summary, rewritten whole after every step (a temporary file renamed over it: never half written).
    write_summary() {
        local step name limit report
        {
            echo "# GPU check part $p$( ((rehearsal)) && echo ', CPU rehearsal (tiny sizes: the figures mean nothing)'), $(date +%F)"
            echo
            echo "Command: \`bash bench/gpu_check.sh$( ((rehearsal)) && echo ' --cpu-rehearsal') --part $p${wheels:+ --wheels $wheels}${reference_flag:+ $reference_flag} OUT_DIR\` on $(hostname), commit $commit; the log: \`$(basename "$log")\`."
            echo
            echo "| step | status | seconds | limit |"
            echo "|---|---|---|---|"
            for step in "${steps[@]}"; do
                IFS='|' read -r name limit _ <<<"$step"
                echo "| $name | ${status[$name]} | ${seconds_taken[$name]:--} | $((limit * limit_factor)) |"
            done
            for step in "${steps[@]}"; do
                name="${step%%|*}"
                [[ -n "${output[$name]:-}" ]] || continue
                echo
                case "$name" in
                    setup) echo "## Environment"; echo; sed 's/^/    /' <<<"${output[$name]}" ;;
                    tests) echo "## Tests (python -m pytest -m gpu)"; echo
                           grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|error|skipped|deselected" <<<"${output[$name]}" | sed 's/^/    /' ;;
                    *) # the benchmark's own report, one heading level down
                       report="$(grep -oE "wrote $out/[A-Za-z0-9._-]+\.md" <<<"${output[$name]}" | tail -1)"
                       if [[ -n "$report" && -f "${report#wrote }" ]]; then sed 's/^#/##/' "${report#wrote }"
                       else echo "## $name: no report (see the log)"; fi ;;
                esac
            done
        } >"$summary.tmp" && mv -f "$summary.tmp" "$summary"
    }

    write_summary
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        limit=$((limit * limit_factor))
        echo "=== part $p, $name (at most $limit s): $command" | tee -a "$log"
        status[$name]="running (if it stays so, the part was stopped here)"
        write_summary
        offset=$(stat -c %s "$log")
        start=$SECONDS
        timeout --kill-after=5 "$limit" bash -c "$command" >>"$log" 2>&1
        rc=$?
        seconds_taken[$name]=$((SECONDS - start))
        output[$name]="$(tail -c +$((offset + 1)) "$log")"
        case $rc in
            0) status[$name]="passed" ;;
            124|137) status[$name]="TIMED OUT after $limit s"; failed=1 ;;
            *) status[$name]="FAILED (exit status $rc)"; failed=1 ;;
        esac
        echo "=== part $p, $name: ${status[$name]} (${seconds_taken[$name]} s)" | tee -a "$log"
        write_summary
    done
    echo "wrote $summary and $log"
    cat "$summary"
done
exit $failed
