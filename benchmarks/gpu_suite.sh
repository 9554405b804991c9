#!/usr/bin/env bash
# The GPU checks in one bounded run: the kernel tests, then the attention benchmarks (results as JSON lines).
#   OUT=folder bash benchmarks/gpu_suite.sh     (default folder benchmarks/results/gpu-run)
#   ONLY=sparse,sparse-real,sparse-decode bash benchmarks/gpu_suite.sh     (only the steps named)
# Each step has its own time limit so one slow step cannot eat the others; logs go to $OUT/suite.log.
# Needs pytest, hypothesis, pytest-xdist and pytest-timeout. The anchors measured beside ours are the wheels in
# benchmarks/wheels (AdaSplash, fla-core + einops, entmax), installed here with --no-deps (no network needed).
# Real SmolLM2 q/k/v for `sparse-real`: write them on a machine with the model first (they travel as a file):
#   python benchmarks/sparse_attention.py --device cpu --inputs smollm2 --lengths 8192 --layer L \
#       --qkv-file benchmarks/results/smollm2-qkv.pt --modes fwd --kinds topk --baselines softmax --no-record
#   (L = 2, 15, 28), then carry benchmarks/results/smollm2-qkv.pt (~47 MB).
set -u
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/suite.log
step() {  # step SECONDS NAME COMMAND...
    local limit=$1 name=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
    echo "=== $name (limit ${limit}s) $(date -u +%T)" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "=== $name: exit $? $(date -u +%T)" | tee -a "$LOG"
}
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
ls benchmarks/wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps benchmarks/wheels/*.whl 2>&1 | tail -n 2
baselines=softmax,sdpa
python3 -c "import adasplash" 2>/dev/null && baselines=$baselines,adasplash
python3 -c "import entmax" 2>/dev/null && baselines=$baselines,entmax_pkg
# kernel tests: two autotune candidates per key (compiles, not tuning, dominate a test run)
step "${KERNEL_TESTS_S:-200}" kernel-tests env ATTNSWAP_AUTOTUNE=0 python3 -m pytest tests/test_kernels_softmax_fwd.py \
    tests/test_kernels_softmax_bwd.py tests/test_kernels_topk.py tests/test_kernels_entmax.py tests/test_kernels_entmax_decode.py \
    tests/test_kernels_linear.py tests/test_kernels_linear_parallel.py tests/test_kernels_window_linear.py \
    tests/test_kernels_state_step.py -q -n 8 --timeout 150 -p no:cacheprovider -rfE
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
# issue 15's GPU lines: real inputs at 4k and 8k (one early, middle and late layer), decode n = 1 against 32k keys
# at batch 8 (H 16, d 128), and the swaps' prefill at 8k context
QKV=${QKV:-benchmarks/results/smollm2-qkv.pt}
for layer in 2 15 28; do
    [ -f "$QKV" ] && step "${SPARSE_REAL_S:-60}" sparse-real python3 benchmarks/sparse_attention.py --inputs smollm2 \
        --qkv-file "$QKV" --layer "$layer" --lengths 4k,8k --baselines "$baselines" --out "$OUT"
done
step "${SPARSE_DECODE_S:-60}" sparse-decode python3 benchmarks/sparse_attention.py --modes decode --lengths 32k \
    --rows 4194304 --baselines softmax,sdpa --out "$OUT"
step "${LINEAR_S:-90}" linear python3 benchmarks/linear_attention.py --lengths 1k,4k,16k,64k --decode-lengths 1k,16k \
    --out "$OUT"
# issue 16: our engines beside fla's on the same inputs (linear: chunk_linear_attn on the same ELU+1 / Hedgehog
# features; taylor: both our forms -- their crossover sets kernels/taylor.FEATURE_FORM_FROM -- and parallel_based),
# forward and forward + backward, d 64 and 128
step "${ENGINES_S:-150}" engines python3 benchmarks/linear_attention.py --modes engines --lengths 1k,4k,16k,32k,64k \
    --engine-dims 64,128 --repeats 5 --out "$OUT"
# issue 16's decode lines: a random 1B Llama (Llama 3.2 1B's shape) at 32k context, batch 1 and 16: linear with the
# StateCache against the model's own attention with a K/V cache filled to 32k; then the largest batch each fits
step "${BATCH_S:-150}" batch python3 benchmarks/linear_attention.py --modes batch --model llama-1b --kinds linear \
    --decode-lengths 32k --batches 1,16 --max-batch 512 --new-tokens 16 --out "$OUT"
ls -la "$OUT"
