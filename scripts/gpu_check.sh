#!/usr/bin/env bash
# Every GPU check in one go, for a GPU machine without a Rust toolchain. Runs from the bundle
# `cargo xtask gpu-bundle` builds (docs/gpu.md): the library report, the GPU checks, the
# shared backend tests of every family on the GPU, a compute-sanitizer memcheck pass on a
# small case (where the tool is installed and runs), and the benchmark against torch's
# ScheduleDualPipeV (and the torch runtime's benchmark when the bundle has its wheel).
# Prints one table. About 5 minutes on an H100 or H200.
#
#   gpu_check.sh [BUNDLE]      (default: the bundle this script is in, else ./gpu-bundle)
#
# Every check has its own time limit, and all together at most DUALPIPE_CHECK_BUDGET seconds
# (default 540): a check that would start with less than 10 s left fails as out of time.
#
# Exit codes: 0 every check passed; 1 a check failed; 2 no GPU (nothing was checked) or no
# bundle.
set -uo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# CUDA maps streams onto CUDA_DEVICE_MAX_CONNECTIONS hardware queues (8 by default); 4 virtual
# ranks use 12 streams, which would share queues and run one after another where the schedule
# lets them overlap. Read when the context is made, so it is set here, before the process starts.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-32}"
if [ $# -ge 1 ]; then
    bundle="$1"
elif [ -x "$here/../dualpipe" ]; then
    bundle="$here/.."
else
    bundle="$PWD/gpu-bundle"
fi
if [ ! -x "$bundle/dualpipe" ]; then
    echo "error: no bundle at $bundle (no executable dualpipe there); build one with: cargo xtask gpu-bundle" >&2
    exit 2
fi
bundle="$(cd "$bundle" && pwd)"
scripts="$bundle/scripts"
[ -d "$scripts" ] || scripts="$here"
logs="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"

budget="${DUALPIPE_CHECK_BUDGET:-540}"
deadline=$(($(date +%s) + budget))
rows=()
failed=0
# record NAME RESULT SECONDS NOTE
record() {
    rows+=("$1|$2|$3|$4")
    if [ "$2" = FAIL ]; then
        failed=1
    fi
}

# step NAME TIMEOUT_S COMMAND...: runs it, its output in $logs/NAME.log; sets $rc and $secs
# ($rc 124 when it ran out of time, its own limit or what is left of the budget).
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((deadline - $(date +%s)))
    if [ "$left" -lt 10 ]; then
        echo "not started: ${budget} s budget spent (DUALPIPE_CHECK_BUDGET)" >"$logs/$name.log"
        rc=124
        secs=0
        return
    fi
    if [ "$left" -lt "$limit" ]; then
        limit="$left"
    fi
    local start
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "killed after ${limit} s" >>"$logs/$name.log"
    fi
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    if [ "$rc" = 137 ]; then
        rc=124
    fi
}

last_line() {
    grep -v '^[[:space:]]*$' "$1" | tail -n 1 | cut -c 1-100
}

# A runner of GPU checks (harness = false): "skipped: no GPU" is a skip, any failure a FAIL.
gpu_checks() {
    local name="$1" limit="$2"
    shift 2
    step "$name" "$limit" "$@"
    if [ "$rc" = 124 ]; then
        record "$name" FAIL "$secs" "out of time: $(last_line "$logs/$name.log")"
    elif [ "$rc" != 0 ]; then
        record "$name" FAIL "$secs" "$(last_line "$logs/$name.log")"
    elif grep -q '^skipped: no GPU' "$logs/$name.log"; then
        record "$name" skipped "$secs" "$(last_line "$logs/$name.log")"
    else
        record "$name" ok "$secs" "$(grep '^GPU checks:' "$logs/$name.log" | tail -n 1)"
    fi
}

print_table() {
    echo
    printf '%-22s %-8s %8s  %s\n' check result seconds note
    local row name result secs note
    for row in "${rows[@]}"; do
        IFS='|' read -r name result secs note <<<"$row"
        printf '%-22s %-8s %8s  %s\n' "$name" "$result" "$secs" "$note"
    done
    echo "logs: $logs"
}

# 1. What the backend finds. No GPU: nothing else can run.
step gpu-info 60 "$bundle/dualpipe" gpu-info
cat "$logs/gpu-info.log"
case "$rc" in
0) record gpu-info ok "$secs" "$(grep '^GPU 0 ' "$logs/gpu-info.log" | head -n 1 | cut -c 1-100)" ;;
2)
    record gpu-info "no GPU" "$secs" "$(last_line "$logs/gpu-info.log")"
    for name in gpu-tests backend-tests unit-tests memcheck bench-gpu torch-runtime; do
        record "$name" skipped 0 "no GPU"
    done
    print_table
    echo "no GPU: nothing was checked"
    exit 2
    ;;
*) record gpu-info FAIL "$secs" "exit $rc: $(last_line "$logs/gpu-info.log")" ;;
esac

# 2. The GPU checks and the shared backend tests of every family on the GPU.
gpu_checks gpu-tests 180 "$bundle/tests/gpu"
gpu_checks backend-tests 240 "$bundle/tests/backends"
step unit-tests 120 "$bundle/tests/dualpipe_cuda"
if [ "$rc" = 0 ]; then
    record unit-tests ok "$secs" "$(grep '^test result' "$logs/unit-tests.log" | tail -n 1 | cut -c 1-60)"
else
    record unit-tests FAIL "$secs" "exit $rc: $(last_line "$logs/unit-tests.log")"
fi

# 3. compute-sanitizer memcheck, stream-ordered races included, on the smallest GPU check.
# On PATH, in a CUDA toolkit, or in an NVIDIA wheel under python3's site-packages.
sanitizer="$(command -v compute-sanitizer || true)"
site_packages="$(timeout 10 python3 -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true)"
dirs=(/usr/local/cuda/bin /usr/local/cuda-*/bin /opt/nvidia/*/compute-sanitizer)
while IFS= read -r sp; do
    [ -n "$sp" ] && dirs+=("$sp"/nvidia/*/compute-sanitizer "$sp"/nvidia/*/bin)
done <<<"$site_packages"
for dir in "${dirs[@]}"; do
    if [ -z "$sanitizer" ] && [ -x "$dir/compute-sanitizer" ]; then
        sanitizer="$dir/compute-sanitizer"
    fi
done
if [ -z "$sanitizer" ]; then
    record memcheck skipped 0 "compute-sanitizer not installed"
else
    step memcheck 240 "$sanitizer" --tool memcheck --track-stream-ordered-races all \
        --error-exitcode 99 "$bundle/tests/gpu" copies_and_no_op_communication
    if [ "$rc" = 0 ] && grep -q 'ERROR SUMMARY: 0 errors' "$logs/memcheck.log"; then
        record memcheck ok "$secs" "0 errors"
    elif [ "$rc" = 99 ] || grep -q 'ERROR SUMMARY: [1-9]' "$logs/memcheck.log"; then
        record memcheck FAIL "$secs" "$(grep 'ERROR SUMMARY' "$logs/memcheck.log" | tail -n 1)"
    elif [ "$rc" = 124 ]; then
        record memcheck FAIL "$secs" "out of time: $(last_line "$logs/memcheck.log")"
    elif ! grep -q 'ERROR SUMMARY' "$logs/memcheck.log"; then
        record memcheck skipped "$secs" "the tool does not run here: $(last_line "$logs/memcheck.log")"
    else
        record memcheck FAIL "$secs" "exit $rc: $(last_line "$logs/memcheck.log")"
    fi
fi

# 4. The benchmark: ours, and torch's ScheduleDualPipeV beside it when torch is installed.
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    step bench-gpu 300 "$scripts/gpu_bench.sh" "$bundle/dualpipe"
    bench_note="ours and torch's ScheduleDualPipeV"
else
    step bench-gpu 300 "$bundle/dualpipe" bench-gpu
    bench_note="ours only: no torch with CUDA for python3"
fi
if [ "$rc" = 0 ]; then
    record bench-gpu ok "$secs" "$bench_note"
    echo
    cat "$logs/bench-gpu.log"
else
    record bench-gpu FAIL "$secs" "exit $rc: $(last_line "$logs/bench-gpu.log")"
fi

# 5. The torch runtime (dualpipe_rs.torch) on the GPU, from the wheel in the bundle.
wheel="$(ls "$bundle"/wheels/dualpipe_rs-*.whl 2>/dev/null | head -n 1)"
if [ -z "$wheel" ]; then
    record torch-runtime skipped 0 "the bundle has no dualpipe_rs wheel"
else
    site="$logs/site"
    if ! python3 -m pip install --quiet --no-deps --target "$site" "$wheel" >"$logs/torch-runtime-install.log" 2>&1; then
        record torch-runtime FAIL 0 "pip could not install $(basename "$wheel")"
    else
        step torch-runtime 300 env PYTHONPATH="$site" python3 "$bundle/scripts/torch_gpu_check.py"
        if [ "$rc" = 0 ]; then
            record torch-runtime ok "$secs" "$(last_line "$logs/torch-runtime.log")"
            echo
            cat "$logs/torch-runtime.log"
        else
            record torch-runtime FAIL "$secs" "exit $rc: $(last_line "$logs/torch-runtime.log")"
        fi
    fi
fi

for row in "${rows[@]}"; do
    IFS='|' read -r name result _ _ <<<"$row"
    if [ "$result" = FAIL ] && [ -s "$logs/$name.log" ]; then
        echo
        echo "--- $name (last 20 lines of $logs/$name.log)"
        tail -n 20 "$logs/$name.log"
    fi
done
print_table
exit "$failed"
