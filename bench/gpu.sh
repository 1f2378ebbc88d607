#!/usr/bin/env bash
# The GPU benchmark in one command (bench/gpu.py has the details):
#   bash bench/gpu.sh            # on a GPU node, ~3-4 min: bench/out/gpu/results.md
#   bash bench/gpu.sh --write    # ... and append the dated section to BENCHMARKS.md
#   bash bench/gpu.sh --smoke    # the same steps on the CPU with tiny inputs (or HISTOTILE_GPU_BENCH_SMOKE=1)
# Builds bench/out/model and the 37,000² benchmark slide when missing (once per machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, not an installed copy
exec "${PYTHON:-python3}" bench/gpu.py "$@"
