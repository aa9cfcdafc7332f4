#!/usr/bin/env bash
# The nightly GPU pipeline (.github/workflows/gpu-nightly.yml), by hand on any machine with an NVIDIA GPU:
#   1. `nox -s gpu_conformance`: the conformance suite on CUDA (installs $RLPARITY_TORCH when there is no torch);
#      SGLang's checks run when $RLPARITY_SGLANG names a version (installed in an environment of its own);
#   2. `nox -s benchmarks`: the attention benchmarks on the GPU;
#   3. `nox -s engine_matrix`: the vLLM checks against each version of $RLPARITY_VLLM_MATRIX;
#   4. `nox -s dashboard`: appends this run to the history and writes the page; exits 1 on a regression.
# Every step runs even when an earlier one fails; the script exits non-zero if any failed.
#
#   RLPARITY_TORCH       harness torch (default: noxfile's; PyPI's Linux wheels are CUDA builds)
#   RLPARITY_VLLM        vLLM for the conformance suite (e.g. vllm==0.33.0)
#   RLPARITY_VLLM_MATRIX vLLM versions side by side (e.g. vllm==0.32.0,vllm==0.33.0)
#   RLPARITY_SGLANG      SGLang for the conformance suite (e.g. sglang==0.5.23); unset: SGLang's checks skip
#   RLPARITY_HISTORY     the history folder (default dashboard/history); the workflow keeps it on gh-pages
#   RLPARITY_GPU_DASHBOARD=0  skip step 4 (the workflow builds one page from every matrix cell instead)
set -uo pipefail
cd "$(dirname "$0")/.."

run="results/gpu-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$run"
failed=()
step() {  # step NAME COMMAND...: run it, remember a failure, go on
    local name=$1
    shift
    echo "::group::$name"
    "$@" || failed+=("$name (exit $?)")
    echo "::endgroup::"
}

python3 -m pip install --quiet --upgrade nox || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$run/gpu.txt" || exit 2

if [ -n "${RLPARITY_SGLANG:-}" ]; then
    sglang_env=".nox/sglang-engine-${RLPARITY_SGLANG//[^A-Za-z0-9.-]/_}"
    if [ ! -e "$sglang_env/.installed" ]; then
        python3 -m venv --clear "$sglang_env" && "$sglang_env/bin/python" -m pip install "$RLPARITY_SGLANG" \
            && touch "$sglang_env/.installed"
    fi
    export RLPARITY_SGLANG_PYTHON="$PWD/$sglang_env/bin/python"
fi

step gpu_conformance python3 -m nox -s gpu_conformance -- --results "$run/conformance.jsonl"
step benchmarks python3 -m nox -s benchmarks -- --benchmark-json="$run/benchmarks.json"
step engine_matrix python3 -m nox -s engine_matrix
if [ "${RLPARITY_GPU_DASHBOARD:-1}" != 0 ]; then
    step dashboard python3 -m nox -s dashboard -- --results "$run" results/engine-matrix --benchmarks "$run" \
        --run-id "${run#results/}" --history "${RLPARITY_HISTORY:-dashboard/history}" --out dashboard/index.html
fi

echo "this run's records and benchmark results: $run"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'failed: %s\n' "${failed[@]}"
    exit 1
fi
