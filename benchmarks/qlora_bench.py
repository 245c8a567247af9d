"""QLoRA vs LoRA-bf16 on one GPU: measured peak memory next to the estimator's, and tokens per second.

Run by ``benchmarks/gpu_qlora.sh`` (read it first); three subcommands:

    python benchmarks/qlora_bench.py make-model --dir /tmp/phi3-mini-random
        a randomly initialised Phi-3-mini of the real shape (config of microsoft/Phi-3-mini-4k-instruct),
        saved in bf16 — speed and memory do not depend on the weights' values; no download
    python benchmarks/qlora_bench.py run --model /tmp/phi3-mini-random --mode qlora --seq 2048 --out r.json
        the real training loop (phi3_lora.loop.Trainer) with configs/phi3-mini-4k-qlora-consumer.yaml at
        batch 1 and the given sequence length, on full-length examples; --mode lora_bf16 loads the base in
        bf16 instead of 4 bits, everything else equal
    python benchmarks/qlora_bench.py report r1.json r2.json ... --json gpu_qlora.json
        the table, the goals of issue 4 checked, one JSON

``make-model --shape tiny`` and ``run`` on a machine without CUDA exercise the plumbing on the CPU
(no memory figures there). The measured peak is ``torch.cuda.max_memory_allocated`` from the end of
loading to the end of training (evaluations included); bitsandbytes' paged optimizer states live in
CUDA managed memory outside PyTorch's allocator, so they are not in it (the estimate counts them:
about 0.05 GiB for Phi-3-mini's adapters in 8 bits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RECIPE = ROOT / "configs" / "phi3-mini-4k-qlora-consumer.yaml"
GOALS = {"qlora_peak_gb": {2048: 5.5, 4096: 6.5}, "throughput_ratio": 0.8, "estimate_error": 0.15}


def make_model(args) -> None:
    from phi3_lora.architectures import known_shape
    from phi3_lora.tiny import tiny_phi3_config, tiny_tokenizer
    from transformers import Phi3Config, Phi3ForCausalLM

    if args.shape == "tiny":
        config = tiny_phi3_config(tiny_tokenizer(), hidden=64)
    else:
        s = known_shape("microsoft/Phi-3-mini-4k-instruct")
        config = Phi3Config(vocab_size=s.vocab_size, hidden_size=s.hidden_size,
                            intermediate_size=s.intermediate_size, num_hidden_layers=s.num_hidden_layers,
                            num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
                            max_position_embeddings=s.max_position_embeddings,
                            original_max_position_embeddings=s.original_max_position_embeddings,
                            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
                            pad_token_id=32000, sliding_window=2047, use_cache=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # initialise directly in bf16 on the GPU: seconds, not minutes on the CPU
        model = Phi3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"random Phi-3 ({params / 1e9:.2f}B parameters, bf16) saved to {args.dir} in "
          f"{time.perf_counter() - start:.0f}s")


def write_long_chats(path: Path, seq: int, count: int) -> None:
    """Conversations whose assistant turn alone exceeds ``seq`` tokens (byte-level tokenizer: one a byte)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly vex the jumping frog".split()
    rows = []
    for k in range(count):
        text = " ".join(words[(k + j) % len(words)] for j in range(seq // 3))
        rows.append({"messages": [{"role": "user", "content": f"Tell me a long story, number {k}."},
                                  {"role": "assistant", "content": text}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(args) -> None:
    from phi3_lora.config import load_config
    from phi3_lora.loop import Trainer
    from phi3_lora.memory import estimate, model_shape

    work = Path(args.out).with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    data = work / "long_chats.jsonl"
    write_long_chats(data, args.seq, count=args.steps + 2)
    overrides = [f"model.name_or_path={args.model}", "model.tokenizer=tiny-random-phi3", f"data.path={data}", "data.split=train",
                 "data.eval_path=null", "data.eval_split=null", "data.eval_size=2", f"data.max_seq_len={args.seq}",
                 "training.per_device_batch_size=1", "training.gradient_accumulation_steps=1",
                 f"training.max_steps={args.steps}", "training.logging_steps=2", "training.eval_steps=0",
                 "training.warmup_steps=1", f"output_dir={work / 'run'}"]
    if args.mode == "lora_bf16":
        overrides += ["model.load_in_4bit=false", "model.bnb_4bit_use_double_quant=false",
                      "model.bnb_4bit_compute_dtype=auto"]
    if not torch.cuda.is_available():
        overrides += ["model.dtype=float32", "model.bnb_4bit_compute_dtype=float32"]
    cfg = load_config(RECIPE, overrides)
    shape, _ = model_shape(cfg)
    predicted = estimate(cfg, shape)
    cuda = torch.cuda.is_available()
    trainer = Trainer(cfg)
    if cuda:
        torch.cuda.synchronize()
        load_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    summary = trainer.train()
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["total_tokens_per_second"] for m in metrics if "total_tokens_per_second" in m][1:]  # skip warm-up
    result = {
        "mode": args.mode, "seq": args.seq, "steps": args.steps, "device": torch.cuda.get_device_name() if cuda
        else "cpu", "tokens_per_second": statistics.median(rates) if rates else None,
        "measured_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "measured_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "load_peak_bytes": load_peak if cuda else None,
        "predicted_peak_bytes": predicted.peak, "predicted_training_peak_bytes": predicted.training_peak,
        "predicted_evaluation_peak_bytes": predicted.evaluation_peak,
        "predicted": {k: getattr(predicted, k) for k in ("weights", "adapters", "gradients", "optimizer",
                                                         "activations", "logits")},
        "final_train_loss": summary["final_train_loss"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def report(args) -> None:
    results = [json.loads(Path(p).read_text()) for p in args.results]
    by = {(r["mode"], r["seq"]): r for r in results}
    print(f"device: {results[0]['device']}  (GB = 10^9 bytes; peak = torch.cuda.max_memory_allocated during "
          "training, after loading)")
    print(f"{'mode':10} {'seq':>5} {'measured GB':>12} {'reserved GB':>12} {'estimate GB':>12} {'error':>7} "
          f"{'tokens/s':>9}")
    checks = []
    for r in sorted(results, key=lambda r: (r["seq"], r["mode"])):
        error = None
        if r["measured_peak_bytes"]:
            error = (r["predicted_peak_bytes"] - r["measured_peak_bytes"]) / r["measured_peak_bytes"]
            checks.append((f"estimate within 15% ({r['mode']}, seq {r['seq']})",
                           abs(error) <= GOALS["estimate_error"]))
        rate = r["tokens_per_second"]
        print(f"{r['mode']:10} {r['seq']:5d} {_gb(r['measured_peak_bytes']):>12} {_gb(r['measured_reserved_bytes']):>12} "
              f"{_gb(r['predicted_peak_bytes']):>12} {'-' if error is None else f'{error:+.0%}':>7} "
              f"{'-' if rate is None else f'{rate:.0f}':>9}")
        r["estimate_error"] = error
    for seq, limit in GOALS["qlora_peak_gb"].items():
        q = by.get(("qlora", seq))
        if q and q["measured_peak_bytes"]:
            checks.append((f"QLoRA peak <= {limit} GB at seq {seq}", q["measured_peak_bytes"] / 1e9 <= limit))
        lora = by.get(("lora_bf16", seq))
        if q and lora and q["tokens_per_second"] and lora["tokens_per_second"]:
            ratio = q["tokens_per_second"] / lora["tokens_per_second"]
            checks.append((f"QLoRA throughput >= 0.8x LoRA-bf16 at seq {seq} ({ratio:.2f}x)",
                           ratio >= GOALS["throughput_ratio"]))
    if results[0]["device"] == "cpu":
        print("  (a CPU plumbing run of a tiny model: these figures say nothing about the goals)")
    for name, ok in checks:
        print(f"  [{'met' if ok else 'NOT met'}] {name}")
    Path(args.json).write_text(json.dumps({"results": results, "goals": dict(checks)}, indent=2))
    print(f"written: {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-model")
    p.add_argument("--dir", required=True)
    p.add_argument("--shape", choices=("phi3-mini", "tiny"), default="phi3-mini")
    p = sub.add_parser("run")
    p.add_argument("--model", required=True)
    p.add_argument("--mode", choices=("qlora", "lora_bf16"), required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("results", nargs="+")
    p.add_argument("--json", required=True)
    args = parser.parse_args()
    {"make-model": make_model, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
