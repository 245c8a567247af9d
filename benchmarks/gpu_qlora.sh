#!/usr/bin/env bash
# QLoRA on one GPU: peak memory (measured next to scripts/estimate_memory.py's prediction) and tokens/s,
# QLoRA vs LoRA-bf16, for a randomly initialised Phi-3-mini of the real shape (no download), with the
# recipe configs/phi3-mini-4k-qlora-consumer.yaml at batch 1, gradient checkpointing, seq 2048 and 4096.
#
#   bash benchmarks/gpu_qlora.sh                  # writes benchmarks/results/gpu_qlora.json
#   OUT=/tmp/bench STEPS=8 PYTHON=.venv/bin/python bash benchmarks/gpu_qlora.sh
#
# Needs one CUDA GPU with >= 24 GB (the LoRA-bf16 runs hold the 7.6 GB bf16 base) and bitsandbytes
# (pip install -e '.[qlora]'). About 5-6 minutes on an H200: ~1 minute to build and save the random model
# (7.6 GB on disk under $OUT), then four runs of STEPS optimizer steps, each in its own process so that
# every peak is its own. On a machine without CUDA, SHAPE=tiny runs the same plumbing on the CPU (no
# memory figures).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-8}
SHAPE=${SHAPE:-phi3-mini}
MODEL="$OUT/phi3-mini-random"
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

if [ ! -f "$MODEL/config.json" ]; then
    "$PYTHON" benchmarks/qlora_bench.py make-model --dir "$MODEL" --shape "$SHAPE"
fi
results=()
for seq in 2048 4096; do
    for mode in qlora lora_bf16; do
        echo "=== $mode, seq $seq, $STEPS steps"
        "$PYTHON" benchmarks/qlora_bench.py run --model "$MODEL" --mode "$mode" --seq "$seq" --steps "$STEPS" \
            --out "$OUT/$mode-$seq.json" > "$OUT/$mode-$seq.log" 2>&1 || { tail -40 "$OUT/$mode-$seq.log"; exit 1; }
        results+=("$OUT/$mode-$seq.json")
    done
done
"$PYTHON" benchmarks/qlora_bench.py report "${results[@]}" --json "$OUT/gpu_qlora.json"
