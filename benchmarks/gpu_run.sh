#!/usr/bin/env bash
# Every GPU check of rlparity in one pass, within a time budget, on a machine with CUDA, torch and triton
# installed (nothing is installed: it runs from this checkout's src/):
#
#     OUT=results/gpu-run benchmarks/gpu_run.sh [budget_seconds]
#
# TUNE=0 skips the tile tuning (the sm90 defaults already hold the tiles an H100 chose).
#
# The conformance suite builds the tiny model and its supervised warm start on first use (minutes); on a
# machine lent for minutes, build them beforehand elsewhere and point RLPARITY_CACHE at a copy of the cache.
#
# Stages, most valuable first, each under a cap and the budget left, each logged, none stopping the next:
#   env          the GPU, driver and package versions
#   tune         (unless TUNE=0) benchmarks/tune_triton_blocks.py at seq 8k: the Triton kernel's fastest tiles on this GPU
#   bench-8k     the target cells (seq 8k full causal, every backend) and the bf16 matmul peak,
#                the triton backend running the tuned tiles
#   conformance  the sink-attention matrix on CUDA (small and GPT-OSS-sized cases; three processes by
#                backend) beside the rest of the conformance suite, all with --require-cuda
#   bench-rest   the other benchmark cells: triton, flex (16k last), then the others
# Results land in $OUT: summary.txt, the tuning log, the best tiles, attention-bench.jsonl (one line per
# benchmark cell, written as it is measured), the conformance records, and logs.tar.gz.
set -u
OUT=${OUT:-results/gpu-run}
BUDGET=${1:-560}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
START=$(date +%s)
LOGS=$(mktemp -d)
SUMMARY="$OUT/summary.txt"

left() { echo $((START + BUDGET - $(date +%s))); }

stage() {  # stage NAME CAP CMD...: CMD under min(CAP, budget left), its output in $LOGS/NAME.log
    local name=$1 cap=$2 limit t0 rc
    shift 2
    limit=$(left)
    ((cap < limit)) && limit=$cap
    if ((limit < 15)); then
        echo "$name: not run, the budget is spent" | tee -a "$SUMMARY"
        return
    fi
    t0=$(date +%s)
    STAGE_LIMIT=$limit timeout -s INT -k 20 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - t0)) s (limit $limit s)" | tee -a "$SUMMARY"
    tail -n 8 "$LOGS/$name.log"
}

bench() { RLPARITY_BENCH_LOG="$OUT/attention-bench.jsonl" "$PY" -m pytest -p no:cacheprovider -q \
    benchmarks/bench_attention.py "$@"; }

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    "$PY" -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    git rev-parse HEAD 2>/dev/null
} >"$SUMMARY" 2>&1
cat "$SUMMARY"

if [ "${TUNE:-1}" = 1 ]; then
    stage tune 130 "$PY" benchmarks/tune_triton_blocks.py --seq 8192 --out "$OUT/triton-tuning.jsonl" \
        --best "$OUT/triton-best-config.json"
else
    echo "tune: skipped (TUNE=$TUNE); the default tiles run" | tee -a "$SUMMARY"
fi
[ -s "$OUT/triton-best-config.json" ] && export RLPARITY_TRITON_BLOCKS="$OUT/triton-best-config.json"

attention_matrix() {  # one process per group of backends, in parallel; the rest of the suite beside them
    # Each under its own timeout, inside the stage's, so pytest is interrupted (and prints its summary)
    # before the stage's timeout kills what is left.
    local limit=$((STAGE_LIMIT - 10))
    # Triton compiles kernel variants per case and dtype (~4 s each on an H100 machine): one process per dtype.
    for dtype in fp32 bf16 fp16; do
        timeout -s INT "$limit" "$PY" -m pytest -p no:cacheprovider -q --require-cuda conformance/test_sink_attention.py \
            --attention-backend triton -k "$dtype" --results "$LOGS/conformance-triton-$dtype.jsonl" \
            >"$LOGS/matrix-triton-$dtype.log" 2>&1 &
    done
    timeout -s INT "$limit" "$PY" -m pytest -p no:cacheprovider -q --require-cuda conformance/test_sink_attention.py \
        --attention-backend flex --results "$LOGS/conformance-flex.jsonl" >"$LOGS/matrix-flex.log" 2>&1 &
    timeout -s INT "$limit" "$PY" -m pytest -p no:cacheprovider -q --require-cuda conformance/test_sink_attention.py \
        --attention-backend reference --attention-backend eager --attention-backend chunked \
        --attention-backend fa3 --attention-backend vllm_fa3 --attention-backend fa4 \
        --results "$LOGS/conformance-others.jsonl" >"$LOGS/matrix-others.log" 2>&1 &
    timeout -s INT "$limit" "$PY" -m pytest -p no:cacheprovider -q --require-cuda conformance \
        --ignore conformance/test_sink_attention.py --results "$OUT/conformance-suite.jsonl" >"$LOGS/suite.log" 2>&1 &
    wait
    for log in matrix-triton-fp32 matrix-triton-bf16 matrix-triton-fp16 matrix-flex matrix-others suite; do echo "== $log"; tail -n 25 "$LOGS/$log.log"; done
}

export OUT LOGS PY
export -f bench attention_matrix
stage bench-8k 150 bash -c 'bench "$@"' bench -k "matmul or seq8k-causal" --benchmark-json "$LOGS/bench-8k.json"

stage conformance 240 bash -c attention_matrix
cat "$LOGS"/conformance-{triton-fp32,triton-bf16,triton-fp16,flex,others}.jsonl >"$OUT/conformance-attention.jsonl" 2>/dev/null

# Triton before flex: compiled flex compiles per cell (15-20 s each), and its 16k forward+backward ran
# past 3 minutes without finishing twice on an H100 (torch 2.11; the mask was then built inside the
# compiled call), so the 16k flex cells come last.
stage bench-rest-triton 150 bash -c 'bench "$@"' bench -k "triton and not (matmul or seq8k-causal)" \
    --benchmark-json "$LOGS/bench-rest-triton.json"
stage bench-rest-flex 200 bash -c 'bench "$@"' bench -k "flex and not (matmul or seq8k-causal or seq16k)" \
    --benchmark-json "$LOGS/bench-rest-flex.json"
stage bench-rest-flex-16k 150 bash -c 'bench "$@"' bench -k "flex and seq16k" \
    --benchmark-json "$LOGS/bench-rest-flex-16k.json"
stage bench-rest-others 300 bash -c 'bench "$@"' bench -k "not (triton or flex or matmul or seq8k-causal)" \
    --benchmark-json "$LOGS/bench-rest-others.json"

tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && echo "logs: $OUT/logs.tar.gz"
echo "total $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
grep -h "verdicts" -A12 "$LOGS"/matrix-*.log "$LOGS/suite.log" 2>/dev/null | grep -v "^--" | head -40
