"""Our training loop vs trl's SFTTrainer (+ peft) on the CPU, side by side, on the same epoch of work.

    python benchmarks/bench_cpu.py [--conversations 240] [--repeats 1] [--max_len 512] [--json OUT]

Both sides get: the same small random Phi-3 (saved once, loaded with from_pretrained), the real
Phi-3 tokenizer and ShareGPT conversations from ../shared, the Phi-3 chat template, LoRA r=16,
alpha=32, dropout 0.05 on qkv_proj, o_proj, gate_up_proj, down_proj, AdamW lr 2e-4 with a cosine
schedule, batch 8, one epoch, max length --max_len, loss on every token (trl's default for
conversations without generation markers; ours with data.train_on_prompt=true), so both learn from
the same supervised tokens, and no activation checkpointing (trl's SFTConfig turns it on unless told;
each run reports its setting and a mismatch stops the benchmark). No evaluation, no intermediate saves.

Runs alternate — ours padded, ours packed, trl padded, trl packed — so drifts in the machine's
speed hit every side alike. Each run is timed from process start to the adapter on disk (the whole
run a user waits for). Throughput = supervised tokens of the epoch / wall seconds. Prints each run,
the ratios against trl, and the final training losses; --json writes the figures.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PHI3_LORA_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))


def prepare(work: Path, conversations: int) -> tuple[Path, Path, Path]:
    """The model directory, the tokenizer directory and the data file both sides read."""
    from transformers import AutoTokenizer

    from phi3_lora.formats import read_rows, to_messages
    from phi3_lora.tiny import tiny_phi3_config, tiny_phi3_model

    tokenizer_dir = SHARED / "phi3-tokenizer" / "hf"
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_phi3_config(tokenizer, layers=4, hidden=256, heads=4, kv_heads=4)
    model_dir = work / "model"
    tiny_phi3_model(config, seed=0).save_pretrained(model_dir)
    rows = read_rows(str(SHARED / "data" / "sharegpt_conversations.json"))[:conversations]
    data = work / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": to_messages(r, "sharegpt", f"row {i}")}) + "\n"
                            for i, r in enumerate(rows)))
    return model_dir, tokenizer_dir, data


def timed(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def ours(model, tokenizer, data, out, max_len, packing) -> tuple[float, dict]:
    seconds, _ = timed([sys.executable, str(ROOT / "scripts" / "train.py"), f"output_dir={out}",
                        f"model.name_or_path={model}", f"model.tokenizer={tokenizer}", "model.dtype=float32",
                        f"data.path={data}", "data.chat_template=phi3", "data.train_on_prompt=true",
                        f"data.max_seq_len={max_len}", "data.eval_size=0", f"data.packing={str(packing).lower()}",
                        "lora.r=16", "lora.alpha=32", "lora.dropout=0.05", "training.learning_rate=2e-4",
                        "training.lr_scheduler=cosine", "training.warmup_steps=0", "training.max_steps=-1",
                        "training.num_epochs=1", "training.per_device_batch_size=8", "training.logging_steps=5",
                        "training.eval_steps=0"])
    summary = json.loads((Path(out) / "summary.json").read_text())
    settings = (Path(out) / "config.yaml").read_text()
    return seconds, {**summary, "gradient_checkpointing": "gradient_checkpointing: true" in settings}


def trl(model, tokenizer, data, out, max_len, packing) -> tuple[float, dict]:
    args = [sys.executable, str(ROOT / "benchmarks" / "trl_sft.py"), "--model", str(model), "--tokenizer",
            str(tokenizer), "--data", str(data), "--out", str(out), "--max_len", str(max_len)]
    seconds, stdout = timed(args + (["--packing"] if packing else []))
    return seconds, json.loads(stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not (SHARED / "data").is_dir():
        raise SystemExit(f"{SHARED} is absent: the benchmark needs the real tokenizer and ShareGPT data")
    sides = {"ours (padded)": (ours, False), "ours (packed)": (ours, True),
             "trl (padded)": (trl, False), "trl (packed)": (trl, True)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, tokenizer, data = prepare(work, args.conversations)
        runs = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, (run, packing) in sides.items():
                seconds, result = run(model, tokenizer, data, work / f"{name}-{repeat}".replace(" ", ""),
                                      args.max_len, packing)
                if result["gradient_checkpointing"]:
                    raise SystemExit(f"{name} ran with activation checkpointing: the sides would not do equal work")
                runs[name].append({"seconds": seconds, "final_train_loss": result["final_train_loss"],
                                   **({"supervised_tokens": result["supervised_tokens"]} if "supervised_tokens"
                                      in result else {})})
                print(f"  {name:15s} run {repeat + 1}: {seconds:6.1f} s, final loss {result['final_train_loss']:.4f}",
                      flush=True)
    tokens = runs["ours (padded)"][0]["supervised_tokens"]  # the same epoch of tokens for every side
    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    print(f"\n{args.conversations} ShareGPT conversations, max length {args.max_len}, {tokens} supervised tokens")
    print(f"{'side':15s} {'seconds':>8s} {'tokens/s':>9s} {'final loss':>11s}")
    for name in runs:
        print(f"{name:15s} {median[name]:8.1f} {tokens / median[name]:9.0f} {runs[name][-1]['final_train_loss']:11.4f}")
    ratios = {f"{a} vs {b}": median[b] / median[a] for a in ("ours (packed)", "ours (padded)")
              for b in ("trl (padded)", "trl (packed)")}
    for label, ratio in ratios.items():
        print(f"speed-up {label}: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "supervised_tokens": tokens, "runs": runs,
                                               "median_seconds": median, "speedups": ratios}, indent=2))


if __name__ == "__main__":
    main()
