"""Each shipped GPU recipe, run for two steps on a tiny model of the same architecture.

The recipes name hub models this machine cannot download; the test builds a tiny Phi-3 of the same
kind — rope type (LongRoPE for the 128k and 3.5 models), grouped-query attention ratio, fused
projections — and runs the recipe's own LoRA and training settings on the demo data.
"""

from pathlib import Path

import pytest

from conftest import ROOT, in_process_trainer, read_metrics
from phi3_lora.architectures import known_shape
from phi3_lora.config import load_config

RECIPES = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_two_steps_at_tiny_size(recipe, tmp_path):
    cfg = load_config(recipe)
    shape = known_shape(cfg.model.name_or_path)
    assert shape is not None, f"{recipe.name}: {cfg.model.name_or_path} is not a known Phi-3"
    heads = 4
    kv_heads = heads * shape.num_key_value_heads // shape.num_attention_heads
    overrides = [
        "model.name_or_path=tiny-random-phi3", "model.tokenizer=tiny-random-phi3", "model.dtype=float32",
        "model.attn_implementation=sdpa", f"model.tiny_rope={shape.rope}", f"model.tiny_heads={heads}",
        f"model.tiny_kv_heads={kv_heads}", "model.tiny_hidden_size=64",
        "data.path=demo", "data.split=train", "data.eval_split=null", "data.demo_size=40", "data.eval_size=8",
        "training.max_steps=2", "training.logging_steps=1", "training.per_device_batch_size=2",
        "training.gradient_accumulation_steps=1", f"output_dir={tmp_path}",
    ]
    trainer = in_process_trainer(load_config(recipe, overrides))
    trainer.train()
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 2 and all(0 < x < 10 for x in losses)
    # what ran is what the recipe asks for: 4-bit layers, the optimizer, checkpointing, adapters on its targets
    from phi3_lora.optim import BNB_OPTIMIZERS
    model = trainer.accelerator.unwrap_model(trainer.model)
    four_bit = [n for n, m in model.named_modules()  # bitsandbytes' layers (peft's wrappers share the class name)
                if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")]
    assert len(four_bit) == (4 * trainer.cfg.model.tiny_layers if cfg.model.load_in_4bit else 0)
    assert type(trainer.optimizer.optimizer).__name__ == BNB_OPTIMIZERS.get(cfg.training.optimizer, "AdamW")
    layers = model.base_model.model.model.layers
    assert {layer.gradient_checkpointing for layer in layers} == {cfg.training.gradient_checkpointing}
    lora_b = {n.split(".lora_B")[0]: p for n, p in model.named_parameters() if ".lora_B." in n}
    assert {n.rsplit(".", 1)[1] for n in lora_b} == set(cfg.lora.target_modules)
    assert all(p.abs().sum() > 0 for p in lora_b.values())  # every adapter trained (B starts at zero)
    saved = load_config(Path(tmp_path) / "config.yaml")
    assert saved.lora == cfg.lora  # the recipe's own LoRA settings were used
    assert saved.training.gradient_checkpointing == cfg.training.gradient_checkpointing
    # QLoRA recipes run 4-bit on the CPU too (bitsandbytes 0.50); only model.dtype is overridden to float32
    quantization = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                    "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
    assert [getattr(saved.model, k) for k in quantization] == [getattr(cfg.model, k) for k in quantization]
    assert saved.training.optimizer == cfg.training.optimizer


def test_longrope_tiny_model_switches_factors_past_original_context():
    import torch

    from phi3_lora.tiny import tiny_phi3_config, tiny_phi3_model, tiny_tokenizer
    config = tiny_phi3_config(tiny_tokenizer(), hidden=64, rope="longrope", max_position_embeddings=256)
    model = tiny_phi3_model(config)
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 64)
    short = rotary(x, torch.arange(60)[None])[0]
    long = rotary(x, torch.arange(100)[None])[0]  # past original_max_position_embeddings = 64
    assert config.rope_parameters["rope_type"] == "longrope"
    assert not torch.allclose(short[0, :60], long[0, :60])  # the long factors apply to the whole batch
