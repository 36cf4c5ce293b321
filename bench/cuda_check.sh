#!/usr/bin/env bash
# The checks that need a CUDA device, in one run that fits a short loan of a GPU machine:
# the tests marked cuda, then batch-1 decoding in bfloat16 (eager, compiled, recorded in
# CUDA graphs, compiled and recorded) on the 100M and the 1B Llama shape, each side's
# share of the memory-bandwidth bound and its tokens against the eager ones.
#
#   bench/cuda_check.sh [python] [folder for the JSON results]
#
# `make cuda-check` runs it with the project's environment. Test modules whose optional
# dependencies are missing are reported and the others still run.
set -uo pipefail
python=${1:-python3}
results=${2:-bench/results}
mkdir -p "$results"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
"$python" -m pytest -q -rs -m cuda --continue-on-collection-errors -p no:cacheprovider tests \
    2>&1 | tee "$results/cuda-tests.txt" || status=1
for size in 100m 1b; do
    "$python" bench/bench_decoder.py --device cuda --dtype bfloat16 --bound-only --runs 3 \
        --size "$size" --json "$results/decode-$size.json" \
        2>&1 | tee "$results/decode-$size.txt" || status=1
done
exit $status
