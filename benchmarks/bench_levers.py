"""What each memory/speed lever of the training loop buys, measured side by side on this machine.

    python benchmarks/bench_levers.py [--seq 4096] [--steps 6] [--compile] [--json OUT]

The levers are settings of the ``training`` section, each off by default:

    training.loss_chunk_size=N        lm_head + cross-entropy over N supervised tokens at a time
                                      (default 1024 on a GPU, 128 on the CPU; 0 = whole logits, the
                                      baseline here)
    training.gradient_checkpointing   recompute each decoder layer in backward (default off)
    training.compile                  torch.compile each decoder layer (default off; --compile adds
                                      it, slow to compile on a CPU)

Every variant is a real run of ``scripts/train.py`` in its own process (so each peak is its own) on
the same data: ShareGPT conversations from ../shared with the real Phi-3 tokenizer (32,064-word
vocabulary: the logits are full size), packed into rows of --seq tokens, batch 1, on a small
random Phi-3 (4 layers, hidden 256; the logits dominate its memory, as they do Phi-3-mini's
activations at long sequence lengths). Prints per variant the peak memory (CUDA allocator on a GPU,
peak RSS of the process on the CPU, which includes ~0.5 GB of Python and libraries), the tokens per
second inside the optimizer steps (median of the per-step figures after the first), the final
loss; and each variant's ratios against the baseline.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_cpu import ROOT, SHARED, prepare, timed

VARIANTS = {  # the baseline has every lever off; the others are against it
    "baseline (whole logits)": ["training.loss_chunk_size=0"],
    "chunked CE, 1024 (GPU default)": ["training.loss_chunk_size=1024"],
    "chunked CE, 128 (CPU default)": ["training.loss_chunk_size=128"],
    "checkpointing": ["training.gradient_checkpointing=true", "training.loss_chunk_size=0"],
    "checkpointing + chunked CE": ["training.gradient_checkpointing=true"],  # the device's default chunk size
}
COMPILED = {"compile + chunked CE": ["training.compile=true"]}


def run_variant(overrides, model, tokenizer, data, out: Path, seq: int, steps: int) -> dict:
    timed([sys.executable, str(ROOT / "scripts" / "train.py"), f"output_dir={out}", f"model.name_or_path={model}",
           f"model.tokenizer={tokenizer}", "model.dtype=float32", f"data.path={data}", "data.chat_template=phi3",
           f"data.max_seq_len={seq}", "data.packing=true", "data.eval_size=0", "training.per_device_batch_size=1",
           f"training.max_steps={steps}", "training.logging_steps=1", "training.eval_steps=0",
           "training.warmup_steps=0", *overrides])
    summary = json.loads((out / "summary.json").read_text())
    per_step = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [m["total_tokens_per_second"] for m in per_step if "total_tokens_per_second" in m][1:]
    return {"peak_memory_gb": summary["peak_memory_gb"], "tokens_per_second": statistics.median(rates),
            "final_train_loss": summary["final_train_loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--conversations", type=int, default=400, help="enough to fill --steps rows of --seq")
    parser.add_argument("--compile", action="store_true", help="also the training.compile=true variant")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not (SHARED / "data").is_dir():
        raise SystemExit(f"{SHARED} is absent: the benchmark needs the real tokenizer and ShareGPT data")
    variants = {**VARIANTS, **(COMPILED if args.compile else {})}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, data = prepare(Path(tmp), args.conversations)
        for name, overrides in variants.items():
            out = Path(tmp) / name.replace(" ", "_")
            results[name] = run_variant(overrides, model, tokenizer, data, out, args.seq, args.steps)
            print(f"  {name:32s} done", flush=True)
    base = results["baseline (whole logits)"]
    print(f"\nrows of {args.seq} tokens, batch 1, {args.steps} steps; memory = peak "
          f"{'CUDA allocation' if torch.cuda.is_available() else 'RSS of the process'}")
    print(f"{'variant':32s} {'peak GB':>8s} {'vs base':>8s} {'tokens/s':>9s} {'vs base':>8s} {'final loss':>11s}")
    for name, r in results.items():
        r["memory_ratio"] = r["peak_memory_gb"] / base["peak_memory_gb"]
        r["speed_ratio"] = r["tokens_per_second"] / base["tokens_per_second"]
        print(f"{name:32s} {r['peak_memory_gb']:8.2f} {r['memory_ratio']:7.2f}x {r['tokens_per_second']:9.0f} "
              f"{r['speed_ratio']:7.2f}x {r['final_train_loss']:11.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
