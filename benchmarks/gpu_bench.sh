#!/usr/bin/env bash
# Issue 8 on one GPU: our loop against trl's SFTTrainer (+ peft) on a randomly initialised Phi-3-mini of the
# real shape (no download) — tokens/s, MFU, peak memory and final loss of LoRA-bf16 and QLoRA at seq 2048
# and 4096, batch 1, each run in its own process. Writes benchmarks/results/gpu_bench.json.
#
#   bash benchmarks/gpu_bench.sh                                  # one CUDA GPU; pip install -e '.[bench]'
#   SHAPE=tiny bash benchmarks/gpu_bench.sh                       # the same plumbing on the CPU, tiny model
#   EXTRA_RUNS="whole-logits: training.loss_chunk_size=0; compiled: training.compile=true" bash benchmarks/gpu_bench.sh
#   EXTRA_RUNS= bash benchmarks/gpu_bench.sh                      # no extra runs
#
# The runs (S, L = the short and long of SEQS, 2048 and 4096):
#   ours-bf16-L / trl-bf16-L             LoRA, bf16 base, no activation checkpointing   (the MFU goal)
#   ours-bf16-S-ckpt / trl-bf16-S-ckpt   LoRA, bf16 base, activation checkpointing      (the memory goal)
#   ours-qlora-S-ckpt, ours-qlora-L-ckpt the consumer QLoRA recipe (NF4, checkpointing, paged 8-bit AdamW)
# LoRA-bf16 is configs/phi3-mini-4k-lora.yaml at batch 1 with sdpa; trl's runs take every setting from the
# same resolved config (see gpu_bench.py). EXTRA_RUNS adds, per "LABEL: KEY=VALUE ..." entry (';' between
# entries), the two ours-bf16 runs again with those overrides, labelled ours-bf16-L-LABEL and
# ours-bf16-S-ckpt-LABEL; by default it holds one entry, whole-logits (training.loss_chunk_size=0), so that
# the default chunked loss is measured against its absence. Other settings: see bench_lib.sh (WARMUP, STEPS, SEQS, RESULTS, WORK...).
#
# Time on an H200 (16 cores), measured 2026-12-04 (benchmarks/measured/2026-12-04-h200/gpu_bench.log):
#   make-model  14 s to build and write the random model (7.6 GB, fsync'd); skipped when MODEL_DIR holds it
#               (then ~36 s for the import check and check-paged, as in that log, which reused it).
#   each run    25-33 s start to finish: process start and imports, loading, 13 steps (~0.38 s each at seq
#               4096 without checkpointing), the adapter saved.
#   total       269 s with the default EXTRA_RUNS (8 runs); each EXTRA_RUNS entry adds ~55 s; a compiled
#               one ~80 s (its first run took 50 s, the second 30 s with inductor's cache warm).
set -euo pipefail
source "$(dirname "$0")/bench_lib.sh"

# Read EXTRA_RUNS before anything runs: a malformed entry fails now, not after minutes of runs.
labels=()
overrides=()
EXTRA_RUNS=${EXTRA_RUNS-"whole-logits: training.loss_chunk_size=0"}  # the default lever against its absence
IFS=';' read -ra entries <<< "$EXTRA_RUNS" || true
for entry in "${entries[@]}"; do
    [ -n "${entry// /}" ] || continue
    name=$(echo "${entry%%:*}" | tr -d ' ')
    if [[ $entry != *:* || ! $name =~ ^[A-Za-z0-9_.-]+$ || -z ${entry#*:} ]]; then
        echo "EXTRA_RUNS: '$entry' is not 'LABEL: KEY=VALUE ...' (LABEL of letters, digits, '.', '_', '-')" >&2
        exit 2
    fi
    labels+=("$name")
    overrides+=("${entry#*:}")
done

make_model --require trl   # without bitsandbytes only the two QLoRA runs fail (and say so)
check_paged
LORA=configs/phi3-mini-4k-lora.yaml
QLORA=configs/phi3-mini-4k-qlora-consumer.yaml
bench ours "ours-bf16-$LONG" $LORA "$LONG" training.gradient_checkpointing=false
bench trl "trl-bf16-$LONG" $LORA "$LONG" training.gradient_checkpointing=false
bench ours "ours-bf16-$SHORT-ckpt" $LORA "$SHORT" training.gradient_checkpointing=true
bench trl "trl-bf16-$SHORT-ckpt" $LORA "$SHORT" training.gradient_checkpointing=true
bench ours "ours-qlora-$SHORT-ckpt" $QLORA "$SHORT"
bench ours "ours-qlora-$LONG-ckpt" $QLORA "$LONG"
for i in "${!labels[@]}"; do
    read -ra extra <<< "${overrides[$i]}"
    VARIANT=${labels[$i]} bench ours "ours-bf16-$LONG-${labels[$i]}" $LORA "$LONG" \
        training.gradient_checkpointing=false "${extra[@]}"
    VARIANT=${labels[$i]} bench ours "ours-bf16-$SHORT-ckpt-${labels[$i]}" $LORA "$SHORT" \
        training.gradient_checkpointing=true "${extra[@]}"
done
report issue8 "$RESULTS/gpu_bench.json"
