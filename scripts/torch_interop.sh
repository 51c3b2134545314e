#!/usr/bin/env bash
# Exports every family at a few sizes as torch CSV (compute only and with messages) and loads
# each file with torch's own runtime (scripts/torch_csv_check.py). DualPipe must be refused.
#
# usage: scripts/torch_interop.sh [OUT_DIR]      (PYTHON=... picks the interpreter with torch)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/torch-interop}
python=${PYTHON:-python3}
mkdir -p "$out"
cargo build --quiet --release -p dualpipe-cli
dualpipe=target/release/dualpipe

export_family() { # family ranks microbatches [chunks]
  local name="$1_$2rank_$3mb" extra=()
  if [ $# -ge 4 ]; then name="${name}_$4chunk"; extra=(--chunks-per-rank "$4"); fi
  "$dualpipe" plan -s "$1" -n "$2" -c "$3" "${extra[@]}" -o "$out/$name.json" --force
  "$dualpipe" convert "$out/$name.json" --to torch-csv -o "$out/$name.csv" --force
  "$dualpipe" convert "$out/$name.json" --to torch-csv --with-comms -o "$out/$name.comms.csv" --force
}

for size in "2 4" "4 10" "8 20"; do export_family dualpipev $size; done
for size in "2 4" "4 8" "8 16"; do export_family zbv $size; done
for family in 1f1b gpipe zb1p; do
  for size in "2 4" "4 8" "8 16"; do export_family "$family" $size; done
done
for size in "2 4 2" "4 8 2" "4 8 3"; do export_family interleaved-1f1b $size; done

"$dualpipe" plan -s dualpipe -n 4 -c 8 -o "$out/dualpipe.json" --force
if "$dualpipe" convert "$out/dualpipe.json" --to torch-csv 2> "$out/dualpipe.refused"; then
  echo "FAIL dualpipe was exported, but torch cannot place a stage on two ranks"
  exit 1
fi
echo "OK   dualpipe refused: $(cat "$out/dualpipe.refused")"

"$python" scripts/torch_csv_check.py "$out"/*.csv
