#!/usr/bin/env bash
# The whole benchmark in one command (resumable: every step skips the rows already in bench/results/):
#   bash bench/run_all.sh
# 1. every row, both bundled models, 20/28/50 steps, 100 seeds (speedups measured on the busy machine);
# 2. FD / KID of every row on 1,000 seeds (no timing);
# 3. the FD noise level at 1,000 seeds (the full run on two seed sets) at every step count, and at 28 steps the
#    presets vs fewer steps beside it (bench/FD_STUDY.md);
# 4. own rows re-timed alone, 5 interleaved repeats (prefer a quiet machine: nothing else running);
# 5. rows an earlier version of the presets produced (and this one no longer does) set aside, then
#    BENCHMARKS.md and bench/pareto.png from all of it.
# A full run from empty results takes several hours on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/benchmark.py "$@"
python bench/benchmark.py --steps 20 28 50 --samples 1000 --fd-only "$@"
python bench/fd_study.py --steps 28
python bench/fd_study.py --steps 20 50 --noise-only
python bench/timing.py --steps 20 28 50 --repeats 5 --samples 16
python bench/prune_superseded.py
python bench/report.py
