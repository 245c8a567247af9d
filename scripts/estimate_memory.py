"""Estimate a run's peak GPU memory per device — weights, adapters, gradients, optimizer states,
activations with and without gradient checkpointing — before renting a GPU.

The model's shape comes from the real config: a local directory's config.json, the built-in figures of
the released Phi-3 models, or (only when neither) the config file from the hub. The formulas are in the
docstring of phi3_lora/memory.py.

    python scripts/estimate_memory.py --config configs/phi3-mini-4k-qlora-consumer.yaml
    python scripts/estimate_memory.py --config configs/phi3-mini-4k-qlora-consumer.yaml --cards 8 12 16 24
    python scripts/estimate_memory.py --config configs/phi3-medium-qlora-zero3.yaml --zero_stage 3 --num_gpus 4
    python scripts/estimate_memory.py --config configs/phi3-mini-4k-lora.yaml data.max_seq_len=4096 \\
        training.per_device_batch_size=1 --json estimate.json
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phi3_lora.checkpoint import check_can_create  # noqa: E402
from phi3_lora.cli import config_from_args, config_parser, positive, run_main  # noqa: E402
from phi3_lora.memory import GIB, estimate, model_shape  # noqa: E402

ROWS = [("weights", "weights"), ("adapters", "adapters"), ("gradients", "gradients"),
        ("optimizer states", "optimizer"), ("activations", "activations"),
        ("  of which logits", "logits"), ("peak, training", "training_peak"),
        ("peak, evaluation", "evaluation_peak"), ("loading (whole before ZeRO-3)", "loading"),
        ("peak (allocated)", "peak"),
        ("+ CUDA context, fragmentation", "overhead"), ("GPU memory needed", "card")]


def describe(cfg, source: str, est, zero_stage: int, num_gpus: int) -> str:
    m, t = cfg.model, cfg.training
    if m.load_in_4bit:
        quant = (f"4-bit {m.bnb_4bit_quant_type}{' + double quant' if m.bnb_4bit_use_double_quant else ''}, "
                 f"compute {m.bnb_4bit_compute_dtype}")
    else:
        quant = "8-bit" if m.load_in_8bit else f"{m.dtype} weights"
    return (f"model {m.name_or_path}: {est.base_parameters / 1e9:.2f}B parameters, shape from {source}\n"
            f"{quant} | LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)} "
            f"({est.adapter_parameters / 1e6:.1f}M parameters) | optimizer {t.optimizer}\n"
            f"micro-batch {t.per_device_batch_size} x {cfg.data.max_seq_len} tokens, evaluation batch "
            f"{t.per_device_eval_batch_size} | ZeRO stage {zero_stage} on {num_gpus} GPU(s) | per device, GiB")


def breakdown(with_ckpt, without) -> str:
    lines = [f"{'':32}{'checkpointing':>15}{'none':>10}"]
    for label, attr in ROWS:
        if attr == "loading" and with_ckpt.loading <= with_ckpt.weights:
            continue  # only a quantized base under ZeRO-3 is held whole while loading
        lines.append(f"{label:32}{getattr(with_ckpt, attr) / GIB:15.2f}{getattr(without, attr) / GIB:10.2f}")
    return "\n".join(lines)


def longest_sequence(cfg, shape, zero_stage, num_gpus, card_bytes, step=256) -> int:
    """The longest max_seq_len (a multiple of ``step``) whose estimate fits ``card_bytes``, 0 if none."""
    best = 0
    for seq in range(step, shape.max_position_embeddings + 1, step):
        trial = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=seq))
        if estimate(trial, shape, zero_stage, num_gpus).card > card_bytes:
            break
        best = seq
    return best


BATCH_SEARCH_LIMIT = 64


def largest_batch(cfg, shape, zero_stage, num_gpus, card_bytes, limit=BATCH_SEARCH_LIMIT) -> int:
    """The largest per_device_batch_size up to ``limit`` whose estimate fits ``card_bytes``, 0 if none."""
    best = 0
    for batch in range(1, limit + 1):
        trial = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, per_device_batch_size=batch))
        if estimate(trial, shape, zero_stage, num_gpus).card > card_bytes:
            break
        best = batch
    return best


def cards_table(cfg, shape, zero_stage, num_gpus, cards) -> str:
    t, seq = cfg.training, cfg.data.max_seq_len
    lines = [f"| GPU | this recipe (batch {t.per_device_batch_size}, seq {seq}) | longest seq at batch 1 | "
             f"largest batch at seq {seq} |", "| --- | --- | --- | --- |"]
    # batch 1 in evaluation too: the recipe's evaluation batch would otherwise set the longest sequence
    one = dataclasses.replace(cfg, training=dataclasses.replace(t, per_device_batch_size=1,
                                                                per_device_eval_batch_size=1))
    need = estimate(cfg, shape, zero_stage, num_gpus).card
    for gb in cards:
        card = gb * GIB
        fits = f"fits ({need / GIB:.1f} GiB)" if need <= card else f"does not fit ({need / GIB:.1f} GiB)"
        longest = longest_sequence(one, shape, zero_stage, num_gpus, card)
        longest_text = f"{longest} (the model's limit)" if longest == shape.max_position_embeddings else longest or "-"
        batch = largest_batch(cfg, shape, zero_stage, num_gpus, card) or "-"
        batch = f"{batch} or more (the search stops there)" if batch == BATCH_SEARCH_LIMIT else batch
        lines.append(f"| {gb:g} GB | {fits} | {longest_text} | {batch} |")
    return "\n".join(lines)


def main(argv=None):
    parser = config_parser(__doc__, epilog_keys=False)
    parser.add_argument("--zero_stage", type=int, default=0, choices=(0, 1, 2, 3),
                        help="DeepSpeed ZeRO stage (0 = one GPU or DDP)")
    parser.add_argument("--num_gpus", type=int, default=1, help="data-parallel processes sharing the run")
    parser.add_argument("--cards", type=positive(float), nargs="*", metavar="GB",
                        help="also print a markdown table of what fits on cards of these sizes (GiB)")
    parser.add_argument("--json", help="write the estimate (bytes) to this file")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    if args.json:
        check_can_create(args.json, "--json", directory=False)
    shape, source = model_shape(cfg)
    with_ckpt = estimate(cfg, shape, args.zero_stage, args.num_gpus, gradient_checkpointing=True)
    without = estimate(cfg, shape, args.zero_stage, args.num_gpus, gradient_checkpointing=False)
    print(describe(cfg, source, with_ckpt, args.zero_stage, args.num_gpus))
    print(breakdown(with_ckpt, without))
    print(f"(the recipe {'uses' if cfg.training.gradient_checkpointing else 'does not use'} gradient checkpointing)")
    if args.cards:
        print()
        print(cards_table(cfg, shape, args.zero_stage, args.num_gpus, args.cards))
    if args.json:
        chosen = with_ckpt if cfg.training.gradient_checkpointing else without
        record = {attr: getattr(chosen, attr) for _, attr in ROWS}
        record.update(zero_stage=args.zero_stage, num_gpus=args.num_gpus, source=source,
                      gradient_checkpointing=cfg.training.gradient_checkpointing)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    run_main(main)
