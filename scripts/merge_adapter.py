"""Merge a LoRA adapter into its base model and save a standalone model (safetensors shards).

    python scripts/merge_adapter.py --model microsoft/Phi-3-mini-4k-instruct --adapter outputs/run/adapter \\
        --out merged/phi3-mini-tuned [--dtype bfloat16] [--max_shard_size 5GB]
    # the tiny demo model: its seeded base is rebuilt from the run's config saved with the adapter
    python scripts/merge_adapter.py --adapter outputs/demo/adapter --out merged/demo --dtype float32

The output loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` alone (no peft), with the
tokenizer and a generation config whose eos ids stop on <|end|>, <|endoftext|> and <|assistant|>.
A QLoRA adapter is merged into the weights it was trained on: the 4-bit base, dequantized to
--dtype (merging into 4-bit weights would round the update away); --qlora_base original merges it
into the original full-precision weights instead, which differ from those by the quantization error.
Before saving, the merged model's logits are compared with the model as trained (base + adapter; for
QLoRA, the 4-bit base) on a few prompts and the largest difference is printed; --max_logit_diff makes
it a hard check.
One process: --device auto (the default) merges on the first GPU when the model fits in its free
memory, else on the CPU; --device cpu or cuda[:N] chooses.
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from phi3_lora.checkpoint import atomic_directory, check_can_create  # noqa: E402
from phi3_lora.cli import config_parser, run_main  # noqa: E402
from phi3_lora.config import ConfigError  # noqa: E402
from phi3_lora.generate import encode_prompts, stop_token_ids  # noqa: E402
from phi3_lora.inference import load_for_inference, load_tokenizer_for, run_config, unquantized  # noqa: E402
from phi3_lora.lora import parameter_counts  # noqa: E402
from phi3_lora.model import gpu_lacks_bf16  # noqa: E402
from phi3_lora.quant import is_quantized  # noqa: E402

CHECK_PROMPTS = [
    [{"role": "user", "content": "What is 12 plus 30?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Spell 'river' backwards."}, {"role": "assistant", "content": "'revir'."},
     {"role": "user", "content": "And 'stone'?"}],
]


def parse_args(argv):
    parser = config_parser(__doc__, epilog_keys=False)
    parser.add_argument("--model", help="base model (hub id or directory); default: the run's model.name_or_path")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory (OUTPUT_DIR/adapter)")
    parser.add_argument("--out", required=True, help="directory for the merged model (must not exist, or --overwrite)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="dtype of the merged weights (the merge is done in this dtype)")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest safetensors shard: 2GB, 500MB, 1.5GiB, or a number of bytes")
    parser.add_argument("--max_logit_diff", type=float, help="fail if merged and base+adapter logits differ more")
    parser.add_argument("--device", default="auto",
                        help="where to merge: cpu, cuda, cuda:N, or auto (the first GPU when the model fits in its "
                             "free memory, else the CPU)")
    parser.add_argument("--qlora_base", default="dequantized", choices=("dequantized", "original"),
                        help="for a QLoRA adapter: merge into the 4/8-bit base it was trained on, dequantized "
                             "(the model as trained), or into the original unquantized weights")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out directory that holds a model (its config.json), never one "
                             "holding the adapter")
    return parser.parse_args(argv)


UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
         "TIB": 2**40}


def size_in_bytes(text: str) -> int:
    """``--max_shard_size`` in bytes: a number with an optional unit (5GB, 500MB, 1.5GiB, 1000000)."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B)?", text.strip(), flags=re.IGNORECASE)
    size = int(float(found.group(1)) * UNITS[(found.group(2) or "").upper()]) if found else 0
    if size < 1:
        raise ConfigError(f"--max_shard_size: expected a size such as 5GB, 500MB or 1.5GiB, got {text!r}")
    return size


def check_device(choice: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", choice):
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {choice!r}")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {choice}: no CUDA GPU here (use cpu or auto)")
    if choice.startswith("cuda:") and int(choice[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {choice}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")


def merge_device(choice: str, model, dtype: torch.dtype) -> str:
    """``--device`` resolved: auto takes the first GPU when the merged model (every weight in ``dtype``, 4-bit
    ones at their unpacked size), plus a fifth of it for the merge's temporaries, fits in its free memory."""
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "cpu"
    needed = 1.2 * parameter_counts(model)[1] * dtype.itemsize
    free, _ = torch.cuda.mem_get_info()
    if needed > free:
        print(f"the model needs {needed / 2**30:.1f} GiB, the GPU has {free / 2**30:.1f} GiB free: merging on the CPU")
        return "cpu"
    return "cuda"


@torch.no_grad()
def logits_on(model, inputs) -> torch.Tensor:
    """The model's float32 logits at the prompts' real positions (padding carries no meaning), on the CPU."""
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    logits = model(**inputs).logits.float()
    return logits[inputs["attention_mask"].bool()].cpu()


def main(argv=None):
    from transformers import GenerationConfig

    args = parse_args(argv)
    out = Path(args.out)
    check_can_create(out, "--out", replaced=True)  # written beside it, then renamed into place
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out}: already exists (pass --overwrite to replace it)")
    adapter = Path(args.adapter).resolve()
    if out.resolve() == adapter or out.resolve() in adapter.parents or adapter in out.resolve().parents:
        raise ConfigError(f"--out {out}: overlaps the adapter being merged (--adapter {args.adapter}), which replacing "
                          "it would delete; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ConfigError(f"--out {out}: holds files but no config.json, so it is not a model directory; --overwrite "
                          "replaces only those (a run's output_dir holds its checkpoints)")
    shard_bytes = size_in_bytes(args.max_shard_size)
    check_device(args.device)
    cfg = run_config(args.config, [*args.overrides, f"model.dtype={args.dtype}"], adapter=args.adapter,
                     model=args.model)
    quantized = is_quantized(cfg.model)
    if quantized and args.qlora_base == "original":
        unquantized(cfg)
        print("QLoRA adapter: merging into the original unquantized weights (--qlora_base original)")
    dtype = getattr(torch, args.dtype)
    if dtype == torch.bfloat16 and gpu_lacks_bf16():  # the loader would fall back to float16 for such a GPU
        if args.device.startswith("cuda"):
            raise ConfigError("--dtype bfloat16: this GPU has no native bfloat16; merge on --device cpu (or auto), "
                              "or ask for --dtype float16")
        if args.device == "auto":
            print("merging on the CPU: this GPU has no native bfloat16 (--dtype bfloat16)")
        args.device = "cpu"
    tokenizer = load_tokenizer_for(cfg)
    as_trained = is_quantized(cfg.model)  # 4-bit still: the reference logits come from the base as trained,
    # where bitsandbytes put it and in the compute dtype chosen for this GPU; it is loaded again for the merge
    model = load_for_inference(cfg, tokenizer, args.adapter, dtype=None if as_trained else dtype)
    device = merge_device(args.device, model, dtype)
    if not as_trained:
        model.to(device)
    inputs = encode_prompts(tokenizer, CHECK_PROMPTS)
    tuned = logits_on(model, inputs)
    reference = "quantized base + adapter, as trained" if as_trained else "base + adapter"
    if quantized and args.qlora_base == "dequantized":
        print(f"QLoRA adapter: merging into its quantized base dequantized to {args.dtype}, the weights it was "
              "trained on")
        del model  # the base loads again, on the merge's device, where it is expanded to args.dtype
        model = load_for_inference(cfg, tokenizer, args.adapter, dequantize=True, device=device, dtype=dtype)
    elif quantized:
        reference = "unquantized base + adapter"
    merged = model.merge_and_unload()
    diff = float((logits_on(merged, inputs) - tuned).abs().max())
    print(f"largest |logit| difference, merged vs {reference}, on {len(CHECK_PROMPTS)} prompts: {diff:.3g} "
          f"({args.dtype})")
    if args.max_logit_diff is not None and diff > args.max_logit_diff:
        raise SystemExit(f"error: merged logits differ by {diff:.3g} > --max_logit_diff {args.max_logit_diff}; "
                         "nothing written")

    merged.config.use_cache = True  # training switched the cache off; serving wants it
    stop_ids = stop_token_ids(tokenizer)
    merged.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids,
                                                pad_token_id=tokenizer.pad_token_id)
    with atomic_directory(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=shard_bytes)
        tokenizer.save_pretrained(tmp)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"merged model: {out} ({len(shards)} safetensors shard(s), {args.dtype}), stops on ids {stop_ids}\n"
          f"  load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    run_main(main)
