#!/usr/bin/env bash
# The GPU checks in one bounded run: the kernel tests, then the three attention benchmarks (results as JSON lines).
#   OUT=folder bash benchmarks/gpu_suite.sh     (default folder benchmarks/results/gpu-run)
# Each step has its own time limit so one slow step cannot eat the others; logs go to $OUT/suite.log.
# Needs pytest, hypothesis, pytest-xdist and pytest-timeout; the sparse baseline `entmax_pkg` needs the entmax package
# (without it that baseline is left out).
set -u
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/suite.log
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? $(date -u +%T)" | tee -a "$LOG"
}
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
baselines=softmax,sdpa
python3 -c "import entmax" 2>/dev/null && baselines=$baselines,entmax_pkg
# kernel tests: two autotune candidates per key (compiles, not tuning, dominate a test run)
step "${KERNEL_TESTS_S:-200}" kernel-tests env ATTNSWAP_AUTOTUNE=0 python3 -m pytest tests/test_kernels_softmax_fwd.py \
    tests/test_kernels_softmax_bwd.py tests/test_kernels_topk.py tests/test_kernels_entmax.py \
    tests/test_kernels_linear.py -q -n 8 --timeout 150 -p no:cacheprovider -rfE
tail -n 25 "$LOG" | grep -E "passed|failed|error" | tail -n 3
# routing: the softmax swap against the model's own SDPA and against the torch call it dispatches to (SmolLM2's
# shapes, then head dim 128), prefill and decode; the crossover with our kernel shows in the prefill rows
step "${DISPATCH_S:-60}" dispatch-d64 python3 benchmarks/dispatch_overhead.py --device cuda --kv 1k,16k \
    --prefill 1k,4k,16k --calls 100 --out "$OUT"
step "${DISPATCH_S:-60}" dispatch-d128 python3 benchmarks/dispatch_overhead.py --device cuda --heads 16 --kv-heads 8 \
    --head-dim 128 --kv 1k,16k --prefill 1k,4k,16k --calls 100 --out "$OUT"
step "${ATTENTION_S:-100}" attention python3 benchmarks/attention.py --quick --out "$OUT"
step "${SPARSE_S:-120}" sparse python3 benchmarks/sparse_attention.py --lengths 1k,4k,16k,64k --baselines "$baselines" \
    --out "$OUT"
step "${LINEAR_S:-90}" linear python3 benchmarks/linear_attention.py --lengths 1k,4k,16k,64k --decode-lengths 1k,16k \
    --out "$OUT"
ls -la "$OUT"
