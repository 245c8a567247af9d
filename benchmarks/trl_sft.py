"""The alternative in bench_cpu.py: trl's SFTTrainer + peft, as the Phi-3 cookbook's sample_finetune.py does it.

    python benchmarks/trl_sft.py --model DIR --tokenizer DIR --data FILE.jsonl --out DIR [--packing]

Same settings as our side of the benchmark (bench_cpu.py passes them); prints one JSON line with
the final training loss and the number of optimizer steps.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def checkpointing_settings(sft_config_class, enabled: bool) -> dict:
    """SFTConfig's activation checkpointing arguments, always given: trl turns checkpointing on by default,
    which would make trl recompute every layer where our side does not. transformers 5.24 renamed
    gradient_checkpointing* to activation_checkpointing* (the old names warn)."""
    name = ("activation_checkpointing" if "activation_checkpointing" in sft_config_class.__dataclass_fields__
            else "gradient_checkpointing")
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--model", "--tokenizer", "--data", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="as our training.gradient_checkpointing")
    args = parser.parse_args()

    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from phi3_lora.config import PHI3_TARGET_MODULES
    from phi3_lora.data import PHI3_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32", attn_implementation="sdpa")
    data = datasets.load_dataset("json", data_files=args.data, split="train")
    config = SFTConfig(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_length=args.max_len, packing=args.packing, logging_steps=5, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=42, dataloader_num_workers=0,
        **checkpointing_settings(SFTConfig, args.gradient_checkpointing))
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PHI3_TARGET_MODULES,
                             bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    trainer.model.save_pretrained(Path(args.out) / "adapter")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"final_train_loss": losses[-1] if losses else None, "steps": trainer.state.global_step,
                      "gradient_checkpointing": getattr(config, "activation_checkpointing",
                                                        getattr(config, "gradient_checkpointing", None))}))


if __name__ == "__main__":
    main()
