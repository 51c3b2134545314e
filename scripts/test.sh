#!/usr/bin/env bash
# Every test of the project: the Rust workspace, then the Python package (`dualpipe_rs`) with
# torch. The Python environment is created once and reused from a stable path
# (DUALPIPE_VENV, default ~/.cache/dualpipe/venv); the first run downloads torch (~5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${DUALPIPE_VENV:-$HOME/.cache/dualpipe/venv}"
requirements=python/requirements-test.txt
stamp="$venv/.dualpipe-requirements"

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating the Python environment in $venv"
    python3 -m venv "$venv"
fi
if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
    echo "== installing $requirements into $venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -r "$requirements"
    cp "$requirements" "$stamp"
fi

echo "== cargo test --workspace"
cargo test --workspace

echo "== building and installing the dualpipe_rs package"
export PATH="$venv/bin:$PATH"   # the build backend runs the environment's `maturin`
"$venv/bin/python" -m pip install --quiet --no-build-isolation --force-reinstall --no-deps ./python

echo "== pytest python/tests"
# Run from the tests folder so the installed package, not the source tree, is imported.
cd python/tests
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
