#!/usr/bin/env bash
# The checks that need a CUDA device, in one run that fits a short loan of a GPU machine
# (about 8 minutes on an H200): the CUDA-graph tests, then batch-1 decoding in bfloat16
# on the 100M and the 1B Llama shape (eager, recorded in CUDA graphs, compiled and
# recorded: each side's share of the memory-bandwidth bound, and its tokens against the
# eager ones), then the other CUDA tests.
#
#   bench/cuda_check.sh [python] [folder for the results]
#
# `make cuda-check` runs it with the project's environment. Test modules whose optional
# dependencies are missing are reported, and the others still run.
set -uo pipefail
python=${1:-python3}
results=${2:-bench/results}
mkdir -p "$results"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
"$python" -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_cuda_graphs.py \
    2>&1 | tee "$results/cuda-graph-tests.txt" || status=1
for size in 100m 1b; do
    "$python" bench/bench_decoder.py --device cuda --dtype bfloat16 --bound-only --runs 3 \
        --size "$size" --sides ours ours_graphs ours_compiled_graphs \
        --json "$results/decode-$size.json" 2>&1 | tee "$results/decode-$size.txt" || status=1
done
"$python" -m pytest -q -rs -m cuda --continue-on-collection-errors -p no:cacheprovider tests \
    --ignore=tests/test_cuda_graphs.py 2>&1 | tee "$results/cuda-tests.txt" || status=1
exit $status
