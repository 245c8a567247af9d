"""Evaluate a fine-tuned adapter: eval loss and perplexity, and answers to a prompts file.

    # the run's held-out eval data (as in training), base model vs. the run's adapter
    python scripts/evaluate.py --config outputs/demo/config.yaml
    python scripts/evaluate.py --adapter outputs/demo/adapter
    # any dataset in a supported format (messages / sharegpt / alpaca), plus generation
    python scripts/evaluate.py --adapter outputs/run/adapter \\
        --data my_eval.jsonl --prompts ../shared/data/mt_bench_questions.jsonl --compare_base
    # sampled answers, 4-bit base (QLoRA)
    python scripts/evaluate.py --adapter outputs/run/adapter \\
        --prompts prompts.jsonl --do_sample --temperature 0.7 model.load_in_4bit=true

The loss is the training loop's (token-weighted cross-entropy over the assistant turns). Prompts
files are JSONL of {"messages": [...]} (a final assistant message is the reference answer) or
MT-bench {"question_id", "turns": [...]} (answered turn by turn, each turn seeing the model's
previous answers). Generation is batched, left-padded, greedy unless --do_sample, and stops on
<|end|> / <|endoftext|> / <|assistant|> (ids from the tokenizer). With references, exact-match and
contains scores are reported. Writes OUT_DIR/generations.jsonl (one line per prompt and turn) and
OUT_DIR/results.json, and prints a table. One process; put the model on a GPU with
CUDA_VISIBLE_DEVICES as usual (it is moved to cuda when one is available).
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from phi3_lora import data as data_lib  # noqa: E402
from phi3_lora.checkpoint import STEP_DIR, check_can_create  # noqa: E402
from phi3_lora.cli import config_parser, run_main  # noqa: E402
from phi3_lora.config import ConfigError, effective_chunk_size  # noqa: E402
from phi3_lora.generate import (GenerationSettings, answer_prompts, check_prompts, disabled_adapter,  # noqa: E402
                                read_prompts, score)
from phi3_lora.inference import (dataset_loss, has_run_config, load_for_inference, load_tokenizer_for,  # noqa: E402
                                 read_adapter_config, run_config)


def parse_args(argv):
    parser = config_parser(__doc__, epilog_keys=False)
    parser.add_argument("--model", help="base model (hub id or directory); default: the run's model.name_or_path")
    parser.add_argument("--adapter", help="PEFT adapter directory (OUTPUT_DIR/adapter); default: the base model alone")
    parser.add_argument("--data", help="evaluate the loss on this whole dataset instead of the run's eval split")
    parser.add_argument("--prompts", help="JSONL prompts file to answer (messages or MT-bench turns)")
    parser.add_argument("--out_dir", help="where generations.jsonl and results.json go (default: evaluation/ beside "
                        "--adapter, OUTPUT_DIR/evaluation/step-N for a checkpoint's; without --adapter, "
                        "OUTPUT_DIR/evaluation of --config, or here)")
    parser.add_argument("--compare_base", action="store_true", help="also answer with the adapter disabled")
    parser.add_argument("--no_loss", action="store_true", help="skip the eval loss")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    if args.compare_base and not args.adapter:
        raise ConfigError("--compare_base: needs --adapter (there is nothing to compare the base with)")
    if args.no_loss and not args.prompts:
        raise ConfigError("--no_loss without --prompts leaves nothing to do")
    if args.model and not has_run_config(args.config, args.adapter) and not (args.data or args.no_loss):
        raise ConfigError("--model without a run config (--config, or one saved with --adapter): there is no "
                          "run's eval split to take the loss on; pass --data FILE, or --no_loss")
    return args


def residual_init(adapter: str) -> str | None:
    """PiSSA's or OLoRA's name when the adapter's own config records it (peft's ``init_lora_weights``): such an
    adapter sits on a residual of the base weights. Read from the adapter, whatever ``--config`` says."""
    init = read_adapter_config(adapter).get("init_lora_weights")
    return init if isinstance(init, str) and (init.startswith("pissa") or init == "olora") else None


def default_out_dir(args, cfg) -> Path:
    """``evaluation/`` beside the adapter (``OUTPUT_DIR/evaluation`` for a run's final adapter; a checkpoint's,
    ``checkpoints/step-N/adapter``, goes to ``OUTPUT_DIR/evaluation/step-N``, not into the checkpoint); without
    ``--adapter``, ``OUTPUT_DIR/evaluation`` of the run config, or ``evaluation/`` here."""
    if args.adapter:
        parent = Path(args.adapter).resolve().parent  # through "." and links: a checkpoint is known by its path
        if STEP_DIR.match(parent.name) and parent.parent.name == "checkpoints":
            return parent.parent.parent / "evaluation" / parent.name
        return parent / "evaluation"
    return Path(cfg.output_dir) / "evaluation" if has_run_config(args.config, None) else Path("evaluation")


def eval_split(cfg, tokenizer, data_path: str | None):
    """The data to take the loss on: all of ``data_path``, else the run's own eval split."""
    if data_path:
        whole = dataclasses.replace(cfg.data, path=data_path, eval_path=None, eval_split=None, eval_size=0)
        return data_lib.build_datasets(whole, tokenizer, cfg.training.seed)[0]
    _, evaluation = data_lib.build_datasets(cfg.data, tokenizer, cfg.training.seed)
    if evaluation is None:
        raise ConfigError("the run has no eval data (data.eval_size=0 and no data.eval_path); pass --data")
    return evaluation


def generation_records(prompts, answers, base_answers) -> list[dict]:
    records = []
    for p, tuned in zip(prompts, answers):
        for turn, answer in enumerate(tuned):
            record = {"id": p.id, "turn": turn + 1, "prompt": p.turns[turn], "answer": answer.text,
                      "new_tokens": answer.new_tokens, "stopped": answer.stopped}
            reference = p.references[turn]
            if reference is not None:
                record.update({"reference": reference, **score(answer.text, reference)})
            records.append(record)
    if base_answers is not None:
        flat = [a for per_prompt in base_answers for a in per_prompt]
        for record, base in zip(records, flat):
            record.update({"base_answer": base.text, "base_stopped": base.stopped})
            if "reference" in record:
                record.update({f"base_{k}": v for k, v in score(base.text, record["reference"]).items()})
    return records


def print_table(records: list[dict], width: int = 48) -> None:
    def cut(text: str) -> str:
        text = text.replace("\n", " ")
        return text if len(text) <= width else text[:width - 1] + "…"

    columns = ["id", "turn", "answer"] + (["base_answer"] if records and "base_answer" in records[0] else [])
    columns += ["exact_match", "contains"] if any("reference" in r for r in records) else []
    columns += ["stopped"]
    rows = [[cut(str(r.get(c, ""))) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def summarise(records: list[dict], prefix: str = "") -> dict:
    scored = [r for r in records if "reference" in r]
    out = {f"{prefix}answers": len(records),
           f"{prefix}stopped": sum(r[f"{prefix}stopped"] for r in records)}
    if scored:
        for key in ("exact_match", "contains"):
            out[f"{prefix}{key}"] = sum(r[f"{prefix}{key}"] for r in scored) / len(scored)
    return out


def main(argv=None):
    args = parse_args(argv)
    cfg = run_config(args.config, args.overrides, adapter=args.adapter, model=args.model)
    settings = GenerationSettings(args.max_new_tokens, args.do_sample, args.temperature, args.top_p,
                                  args.batch_size, args.seed)
    residual = residual_init(args.adapter) if args.adapter else None
    if args.compare_base and residual:
        raise ConfigError(f"--compare_base: the adapter was initialised with {residual}, so its base is the residual "
                          "of the original weights, not the base model; evaluate the base without --adapter instead")
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args, cfg)
    check_can_create(out_dir, "--out_dir")  # before the generations, not after them
    tokenizer = load_tokenizer_for(cfg)
    prompts = read_prompts(args.prompts) if args.prompts else None  # bad prompts fail before the model loads
    if prompts is not None:
        check_prompts(tokenizer, prompts)
    split = None if args.no_loss else eval_split(cfg, tokenizer, args.data)
    model = load_for_inference(cfg, tokenizer, args.adapter)
    if torch.cuda.is_available():
        model.to("cuda")
    results = {"adapter": args.adapter, "model": cfg.model.name_or_path}

    if split is not None:
        chunk_size = effective_chunk_size(cfg.training.loss_chunk_size, 0, on_gpu=torch.cuda.is_available())
        batching = (tokenizer.pad_token_id, cfg.training.per_device_eval_batch_size, chunk_size)
        loss, tokens = dataset_loss(model, split, *batching)
        results.update({"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)),
                        "eval_examples": len(split), "eval_supervised_tokens": tokens})
        if args.compare_base:
            with disabled_adapter(model):
                base_loss, _ = dataset_loss(model, split, *batching, desc="base eval loss")
            results.update({"base_eval_loss": base_loss, "base_eval_perplexity": math.exp(min(base_loss, 50))})

    if prompts is not None:
        answers = answer_prompts(model, tokenizer, prompts, settings)
        base_answers = None
        if args.compare_base:
            with disabled_adapter(model):
                base_answers = answer_prompts(model, tokenizer, prompts, settings, desc="generating (base)")
        records = generation_records(prompts, answers, base_answers)
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "generations.jsonl").open("w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print_table(records)
        results.update(summarise(records))
        if base_answers is not None:
            results.update(summarise(records, prefix="base_"))
        results["generations"] = str(out_dir / "generations.jsonl")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\nresults:")
    for key, value in results.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  written: {out_dir / 'results.json'}")


if __name__ == "__main__":
    run_main(main)
