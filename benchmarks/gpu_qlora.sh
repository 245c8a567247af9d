#!/usr/bin/env bash
# Issue 4 on one GPU: QLoRA's peak memory (measured next to scripts/estimate_memory.py's prediction) and
# tokens/s, QLoRA vs LoRA-bf16, for a randomly initialised Phi-3-mini of the real shape (no download), with
# the recipe configs/phi3-mini-4k-qlora-consumer.yaml at batch 1, gradient checkpointing, seq 2048 and 4096
# (LoRA-bf16: the same recipe with the base unquantized). Two held-out examples are evaluated before and
# after training, so the peaks include evaluation, as the estimate does.
#
#   bash benchmarks/gpu_qlora.sh                 # writes benchmarks/results/gpu_qlora.json
#   SHAPE=tiny bash benchmarks/gpu_qlora.sh      # the same plumbing on the CPU (no memory figures)
#
# Needs one CUDA GPU with >= 24 GB (the LoRA-bf16 runs hold the 7.6 GB bf16 base) and bitsandbytes
# (pip install -e '.[qlora]'). 182 s on an H200 (2026-12-04): ~55 s to check the packages, build and save
# the random model and check the paged optimizer, then four runs of 3 warm-up + 10 timed steps, ~30 s each,
# each in its own process so that every peak is its own. Settings (SEQS, STEPS, RESULTS, WORK...): see
# bench_lib.sh. Figures: README, "QLoRA on a single consumer GPU".
set -euo pipefail
source "$(dirname "$0")/bench_lib.sh"

make_model --require bitsandbytes
check_paged
QLORA=configs/phi3-mini-4k-qlora-consumer.yaml
BF16="model.load_in_4bit=false model.bnb_4bit_use_double_quant=false model.bnb_4bit_compute_dtype=auto"
for seq in "$SHORT" "$LONG"; do
    bench ours "qlora-$seq" $QLORA "$seq" data.eval_size=2
    # shellcheck disable=SC2086  # BF16 is a list of overrides
    bench ours "lora_bf16-$seq" $QLORA "$seq" data.eval_size=2 $BF16
done
report issue4 "$RESULTS/gpu_qlora.json"
