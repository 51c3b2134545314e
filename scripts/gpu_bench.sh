#!/usr/bin/env bash
# The GPU benchmark, for a GPU machine without a Rust toolchain: runs the `dualpipe` binary
# built elsewhere (docs/gpu.md says how) and torch's ScheduleDualPipeV on the same model in
# the same run, and prints one table.
#
#   scripts/gpu_bench.sh [path/to/dualpipe] [extra bench-gpu options]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# CUDA maps streams onto CUDA_DEVICE_MAX_CONNECTIONS hardware queues (8 by default); 4 virtual
# ranks use 12 streams, which would share queues and run one after another where the schedule
# lets them overlap. Read when the context is made, so it is set here, before the process starts.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-32}"
bin="${1:-$here/../dist/dualpipe}"
shift || true
if [ ! -x "$bin" ]; then
    echo "error: no dualpipe binary at $bin (build it with the command in docs/gpu.md and copy it here)" >&2
    exit 2
fi
ours="$(mktemp)"
trap 'rm -f "$ours"' EXIT
"$bin" bench-gpu "$@" > "$ours"
# The options both sides take go to torch's side too, so both measure the same number of
# steps at the same size; the rest (--device) are ours alone.
shared=()
while [ $# -gt 0 ]; do
    case "$1" in
        --steps|--warmup|--large-rows)
            if [ $# -lt 2 ]; then
                echo "error: $1 needs a value" >&2
                exit 2
            fi
            shared+=("$1" "$2")
            shift 2
            ;;
        --steps=*|--warmup=*|--large-rows=*)
            shared+=("$1")
            shift
            ;;
        *)
            shift
            ;;
    esac
done
python3 "$here/gpu_bench_torch.py" "$ours" ${shared[@]+"${shared[@]}"}
