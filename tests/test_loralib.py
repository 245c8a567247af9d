"""The loralib backend: layers in place, training through the same loop, save/load, q/v-only, PEFT export."""

import json

import loralib
import pytest
import torch

from conftest import FAST, in_process_trainer, train
from phi3_lora.checkpoint import CheckpointError, load_adapter_state
from phi3_lora.checkpoint import adapter_state_dict
from phi3_lora.config import ConfigError, load_config
from phi3_lora.lora import attach_lora, save_adapter
from phi3_lora.loralib_backend import UnevenMergedLinear, load_loralib_adapter
from phi3_lora.model import load_model, load_tokenizer

ALL_TARGETS = "lora.target_modules=[qkv_proj,o_proj,gate_up_proj,down_proj,embed_tokens]"
MHA = ["lora.backend=loralib", ALL_TARGETS, "lora.r=4", "lora.alpha=8"]
# grouped-query attention (4 query heads, 2 key/value heads: q, k, v parts of 64, 32, 32 rows), q and v only
GQA_QV = ["lora.backend=loralib", ALL_TARGETS, "model.tiny_kv_heads=2", "lora.qkv_enable=[true,false,true]",
          "lora.r=4", "lora.alpha=8"]


@pytest.fixture(scope="module")
def gqa_run(tmp_path_factory):
    """A real run through scripts/train.py: the same loop and saving path as peft."""
    out = tmp_path_factory.mktemp("loralib_gqa")
    train(out, *GQA_QV, "training.max_steps=16", "training.learning_rate=3e-3", env={"OMP_NUM_THREADS": "1"})
    return out


def rebuild(run_dir, load_state=True):
    """The run's base with fresh loralib layers, and (by default) the saved adapter loaded into them."""
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model, tokenizer, seed=cfg.training.seed), cfg.lora, seed=cfg.training.seed)
    if load_state:
        load_loralib_adapter(model, run_dir / "adapter")
    return cfg, tokenizer, model.eval()


def sample_ids(tokenizer):
    texts = ["<|user|>\nWhat is 12 plus 30?<|end|>\n<|assistant|>\n", "<|user|>\nSpell 'river' backwards."]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:24] for t in texts]
    return torch.tensor([i + [tokenizer.pad_token_id] * (24 - len(i)) for i in ids])


def test_layers_are_loralib_and_only_adapters_train():
    cfg = load_config(None, ["model.tiny_hidden_size=64", *MHA])
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model, tokenizer), cfg.lora, seed=0)
    layer = model.model.layers[0]
    assert type(layer.self_attn.qkv_proj) is loralib.MergedLinear and layer.self_attn.qkv_proj.enable_lora == [True] * 3
    assert type(layer.mlp.gate_up_proj) is loralib.MergedLinear
    assert type(layer.self_attn.o_proj) is loralib.Linear and type(layer.mlp.down_proj) is loralib.Linear
    assert type(model.model.embed_tokens) is loralib.Embedding
    assert type(model.lm_head) is torch.nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(loralib.lora_state_dict(model)) and all("lora_" in n for n in trainable)
    assert not layer.self_attn.qkv_proj.merge_weights  # eval() must not fold the update into the base


def test_loralib_run_trains_and_saves_both_formats(gqa_run):
    summary = json.loads((gqa_run / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 0.3
    for name in ("loralib_adapter.safetensors", "adapter_model.safetensors", "adapter_config.json"):
        assert (gqa_run / "adapter" / name).is_file(), name


def test_save_then_load_into_fresh_model_gives_identical_logits(tmp_path):
    """Stands in for exact resume until the resume machinery (issue 5) is on this branch."""
    cfg = load_config(None, ["model.tiny_hidden_size=64", *MHA])
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model, tokenizer), cfg.lora, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sample_ids(tokenizer)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    save_adapter(model, adapter_state_dict(model), tmp_path / "adapter")
    fresh = attach_lora(load_model(cfg.model, tokenizer), cfg.lora, seed=123).eval()  # other adapter init
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.equal(fresh(input_ids=ids).logits, expected)
        load_loralib_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(fresh(input_ids=ids).logits, expected)


def test_checked_loader_rejects_foreign_or_incomplete_state():
    cfg = load_config(None, ["model.tiny_hidden_size=64", *MHA])
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model, tokenizer), cfg.lora, seed=0)
    state = {k: v.clone() for k, v in loralib.lora_state_dict(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = "model.layers.0.self_attn.o_proj.lora_A"
    with pytest.raises(CheckpointError, match=r"t: 1 of .* keys match no parameter of this model .* "
                                              r"e.g. model.layers.9"):
        load_adapter_state(model, {**state, "model.layers.9.self_attn.o_proj.lora_A": state[key]}, "t")
    with pytest.raises(CheckpointError, match=rf"t: 1 adapter parameters of the model are not in the file, e.g. {key}"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key}, "t")
    with pytest.raises(CheckpointError, match=rf"t: {key} has shape"):
        load_adapter_state(model, {**state, key: state[key][:1]}, "t")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_qv_only_trains_q_and_v_slices_under_gqa(gqa_run):
    cfg, _, model = rebuild(gqa_run)
    _, _, untrained = rebuild(gqa_run, load_state=False)
    for layer, base_layer in zip(model.model.layers, untrained.model.layers):
        qkv = layer.self_attn.qkv_proj
        assert isinstance(qkv, UnevenMergedLinear) and qkv.split_sizes == [64, 32, 32]
        assert qkv.lora_A.shape == (2 * 4, 64) and qkv.lora_B.shape == (64 + 32, 4)  # no k parameters at all
        update = qkv.merge_AB() * qkv.scaling
        q, k, v = update.split(qkv.split_sizes)
        assert torch.count_nonzero(k) == 0
        assert q.abs().min(dim=1).values.gt(0).all() and v.abs().min(dim=1).values.gt(0).all()  # every row trained
        assert torch.equal(qkv.weight, base_layer.self_attn.qkv_proj.weight)  # the base stays frozen
    assert model.model.embed_tokens.lora_B.abs().sum() > 0


def assert_export_matches(model, cfg, tokenizer, adapter_dir):
    """The exported PEFT adapter on a fresh base gives the loralib model's logits (fp32, 1e-5)."""
    from peft import PeftModel

    base = load_model(cfg.model, tokenizer, seed=cfg.training.seed)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["rank_pattern"].get("qkv_proj", cfg.lora.r) == sum(cfg.lora.qkv_enable) * cfg.lora.r
    assert config["rank_pattern"]["gate_up_proj"] == 2 * cfg.lora.r


def test_exported_peft_adapter_of_trained_gqa_run_matches(gqa_run):
    cfg, tokenizer, model = rebuild(gqa_run)
    assert_export_matches(model, cfg, tokenizer, gqa_run / "adapter")


@pytest.mark.parametrize("extra", [[], ["model.tiny_kv_heads=1", "lora.qkv_enable=[false,true,true]"]],
                         ids=["mha-qkv", "mqa-kv"])
def test_exported_peft_adapter_matches_random_adapters(tmp_path, extra):
    """Every adapter matrix random (B = 0 at init would hide a misplaced block) — even and uneven splits."""
    cfg = load_config(None, ["model.tiny_hidden_size=64", *MHA, *extra])
    tokenizer = load_tokenizer(cfg.model)
    model = attach_lora(load_model(cfg.model, tokenizer, seed=cfg.training.seed), cfg.lora, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    save_adapter(model, adapter_state_dict(model), tmp_path / "adapter")
    assert_export_matches(model, cfg, tokenizer, tmp_path / "adapter")


def test_adapters_train_in_float32_over_a_bf16_base_under_autocast(tmp_path):
    """bf16 mixed precision as on a GPU (accelerate's autocast, here on the CPU): loralib builds its layers in
    the base's dtype, but the adapters the optimizer updates are float32, as peft's are (a bf16 weight drops
    updates under its precision; fp16's loss scaler refuses fp16 gradients); the base stays bf16."""
    cfg = load_config(None, [*FAST, *MHA, f"output_dir={tmp_path}", "data.eval_size=0", "model.dtype=bfloat16",
                             "training.mixed_precision=bf16", "training.warmup_steps=0"])
    trainer = in_process_trainer(cfg)
    assert trainer.accelerator.native_amp
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    loss_sum, n_tokens, _, _ = trainer.train_step(next(trainer._batches_of_epoch()))
    assert torch.isfinite(torch.tensor(loss_sum)) and n_tokens > 0
    moved = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    # every factor with a gradient at the first step moved: the one beside the factor loralib starts at 0 (B in
    # the linear layers, A in the embedding)
    assert moved == [n for n in trainable if ("lora_B" in n) != ("embed_tokens" in n)]
    assert all(p.dtype == torch.float32 for p in trainable.values())


def test_config_rules():
    with pytest.raises(ConfigError, match="lora.qkv_enable: adapting only some of q, k, v needs lora.backend=loralib"):
        load_config(None, ["lora.qkv_enable=[true,false,true]"])
    with pytest.raises(ConfigError, match="lora.use_dora: not available with lora.backend=loralib"):
        load_config(None, ["lora.backend=loralib", "lora.use_dora=true"])
    with pytest.raises(ConfigError, match="lora.qkv_enable: expected three"):
        load_config(None, ["lora.backend=loralib", "lora.qkv_enable=[false,false,false]"])
