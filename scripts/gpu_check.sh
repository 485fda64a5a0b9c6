#!/usr/bin/env bash
# The GPU path, proven on a machine with a CUDA GPU and vLLM (pip install -e '.[vllm]'):
#   bash scripts/gpu_check.sh
# No model hub: the tiny and small Qwen-VL models are built offline, as on CPU. Budget: 8 minutes
# on one H100 (each check has its own time limit below). Prints a PASS/FAIL line per verdict
# (`scripts/gpu_check.py` says what each compares), the weight-sync bench's figures, and a summary;
# exits 1 if any check failed. Full logs: $GPU_CHECK_LOGS (default: a fresh temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
TORCHRUN="${TORCHRUN:-torchrun}"
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$LOGS"
start=$(date +%s)
failed=()

# check NAME SECONDS COMMAND...: run one check with a time limit, show its verdict lines.
check() {
    local name="$1" limit="$2"
    shift 2
    local began=$(date +%s) log="$LOGS/$name.log"
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local code=$?
    grep -E '^(PASS|FAIL) ' "$log"
    if [ "$code" -ne 0 ]; then
        failed+=("$name")
        if [ "$code" -eq 124 ]; then
            echo "FAIL $name: over its $limit s limit"
        elif [ "$code" -ne 3 ]; then  # 3: a verdict failed (printed above); anything else: it crashed
            echo "FAIL $name: exited with code $code; last lines:"
            tail -n 8 "$log" | sed 's/^/    /'
        fi
    fi
    echo "  ($name: $(( $(date +%s) - began )) s, log $log)"
}

if ! "$PY" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device'" >"$LOGS/preflight.log" 2>&1; then
    echo "FAIL preflight: needs a CUDA GPU and vLLM (pip install -e '.[vllm]'):"
    tail -n 3 "$LOGS/preflight.log" | sed 's/^/    /'
    exit 1
fi
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
"$PY" -c "import torch, transformers, vllm; print(f'gpu_check: {torch.cuda.get_device_name(0)} x $gpus, vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
# Build the offline models once, before the checks start (seconds; cached).
"$PY" -c "from agents import tiny; from agents.small import small_model_dir; [tiny.tiny_model_dir(f) for f in tiny.FAMILIES]; small_model_dir()"

for family in qwen2_vl qwen2_5_vl qwen3_vl; do
    check "family-$family" 90 "$PY" scripts/gpu_check.py family "$family"
done
for variant in colocated lora freeze_vision; do
    check "grpo-$variant" 90 "$PY" scripts/gpu_check.py grpo "$variant"
done
ranks=$(( gpus >= 2 ? 2 : 1 ))
check "fsdp-$ranks" 90 "$TORCHRUN" --standalone --nproc_per_node="$ranks" scripts/gpu_check.py fsdp
if [ "$gpus" -ge 2 ]; then
    check "grpo-fsdp" 120 "$TORCHRUN" --standalone --nproc_per_node=2 scripts/gpu_check.py grpo fsdp
fi
check "throughput" 90 "$PY" scripts/gpu_check.py throughput
# Figures, not a verdict: the weight sync's peak extra memory and time on this GPU.
timeout 60 "$PY" bench/bench_weight_sync.py --repeats 3 >"$LOGS/bench_weight_sync.log" 2>&1 \
    && grep -vE 'Loading weights|^$' "$LOGS/bench_weight_sync.log" | sed 's/^/  bench: /' \
    || echo "  bench_weight_sync did not finish (log $LOGS/bench_weight_sync.log)"

elapsed=$(( $(date +%s) - start ))
echo "gpu_check: ${#failed[@]} check(s) failed${failed[*]:+: ${failed[*]}} in $elapsed s (logs: $LOGS)"
[ "$elapsed" -le 480 ] || echo "gpu_check: over the 8-minute budget ($elapsed s): see the per-check times above"
[ "${#failed[@]}" -eq 0 ]
