"""QLoRA on the CPU with the real bitsandbytes (0.50 runs 4-bit NF4 forward and backward there).

A 4-bit tiny Phi-3 trains through scripts/train.py; its linear layers are Linear4bit; the saved
adapter loads onto the 4-bit base and onto the unquantized base; the bitsandbytes optimizers step;
missing bitsandbytes and bf16 on a GPU without it give clear messages.
"""

import dataclasses
import json
import logging
import sys

import pytest
import torch

from conftest import TRAIN, read_metrics, run_script, train
from phi3_lora.config import ConfigError, load_config

# (4-bit with gradient checkpointing runs in tests/test_recipes.py, with the consumer recipe)
QLORA = ["model.load_in_4bit=true", "model.bnb_4bit_use_double_quant=true", "training.optimizer=paged_adamw_8bit"]


def needs_bitsandbytes():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[qlora]')")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    needs_bitsandbytes()
    out = tmp_path_factory.mktemp("qlora")
    train(out, *QLORA, "training.max_steps=12", "training.learning_rate=5e-3")
    return out


def _models(out):
    """(config, tokenizer, 4-bit base, unquantized base) as the run built them, same seed."""
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(out / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    quantized = load_model(cfg.model, tokenizer, seed=cfg.training.seed)
    plain_cfg = dataclasses.replace(cfg.model, load_in_4bit=False, bnb_4bit_use_double_quant=False)
    plain = load_model(plain_cfg, tokenizer, seed=cfg.training.seed)
    return cfg, tokenizer, quantized, plain


def test_qlora_run_trains(qlora_run):
    summary = json.loads((qlora_run / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["final_eval_loss"] < summary["first_eval_loss"] - 0.5, summary
    losses = [m["loss"] for m in read_metrics(qlora_run) if "loss" in m]
    assert len(losses) == 12 and all(0 < x < 10 for x in losses)


def test_linear_layers_are_4bit_and_the_rest_is_not(qlora_run):
    import bitsandbytes as bnb

    from phi3_lora.lora import attach_lora
    cfg, _, quantized, _ = _models(qlora_run)
    linear = {name: type(module) for name, module in quantized.named_modules()
              if isinstance(module, (torch.nn.Linear, bnb.nn.Linear4bit))}
    decoder = {name: kind for name, kind in linear.items() if name != "lm_head"}
    assert len(decoder) == 4 * cfg.model.tiny_layers
    assert set(decoder.values()) == {bnb.nn.Linear4bit}
    assert linear["lm_head"] is torch.nn.Linear  # kept unquantized, as transformers does
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert module.weight.quant_type == "nf4" and module.weight.quant_state.nested, name  # double quant
    # nothing upcast or downcast: the unquantized parts stay in model.dtype (float32 on the CPU)
    assert {p.dtype for n, p in quantized.named_parameters() if "proj" not in n} == {torch.float32}
    peft_model = attach_lora(quantized, cfg.lora, seed=0)
    trainable = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and set(trainable.values()) == {torch.float32}


@pytest.mark.parametrize("setting, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_4bit_layers_compute_in_the_configured_dtype(setting, expected):
    """model.bnb_4bit_compute_dtype reaches every Linear4bit ("auto": the model's dtype, float32 on the CPU)."""
    needs_bitsandbytes()
    import bitsandbytes as bnb

    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, [*QLORA, f"model.bnb_4bit_compute_dtype={setting}"])
    model = load_model(cfg.model, load_tokenizer(cfg.model), seed=0)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * cfg.model.tiny_layers and {m.compute_dtype for m in layers} == {expected}


def test_gradients_still_flow_through_4bit_layers_after_an_evaluation(monkeypatch):
    """bitsandbytes 0.50 repacks 4-bit weights for a backward-less CPU kernel on the first eval forward
    (on CPUs with AVX512-BF16); prepare_kbit_model turns that off. The switch is checked on every CPU (the
    feature reported present); the gradients, which only such a CPU can break, where the tests run."""
    needs_bitsandbytes()
    import bitsandbytes as bnb
    from phi3_lora.lora import attach_lora
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, ["model.load_in_4bit=true", "model.tiny_hidden_size=64", "lora.dropout=0"])
    tokenizer = load_tokenizer(cfg.model)
    with monkeypatch.context() as patch:
        patch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)  # read by Linear4bit.__init__
        reported = load_model(cfg.model, tokenizer)
    switches = [m.support_avx512bf16_for_cpu for m in reported.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(switches) == 4 * cfg.model.tiny_layers and not any(switches)
    model = attach_lora(load_model(cfg.model, tokenizer), cfg.lora, seed=0)
    ids = torch.tensor([tokenizer("What is 12 plus 30? It is 42.")["input_ids"]])
    first_lora_b = next(p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n)

    def gradient():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return first_lora_b.grad.clone()  # (lora_A.grad is 0 while B is 0)

    before = gradient()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    torch.testing.assert_close(gradient(), before)


def _eval_loss_and_logits(model, batch):
    from phi3_lora.loss import supervised_tokens, token_loss_sum
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(token_loss_sum(model, batch)) / supervised_tokens(batch), logits


def test_adapter_loads_onto_4bit_and_unquantized_base(qlora_run):
    import bitsandbytes as bnb
    from peft import PeftModel

    from phi3_lora import data as data_lib
    cfg, tokenizer, quantized, plain = _models(qlora_run)
    _, _, _, dequantized = _models(qlora_run)
    for name, module in quantized.named_modules():  # the 4-bit weights, dequantized, in an ordinary model
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dequantized.get_submodule(name).weight.data.copy_(weight.float())
    data_lib.use_chat_template(tokenizer, cfg.data.chat_template)
    _, eval_data = data_lib.build_datasets(cfg.data, tokenizer, cfg.training.seed)
    batch = data_lib.Collator(tokenizer.pad_token_id)([[eval_data.dataset[i]] for i in range(len(eval_data))])
    base_loss, _ = _eval_loss_and_logits(plain, batch)
    results = {}
    for label, base in (("4-bit", quantized), ("unquantized", plain), ("dequantized", dequantized)):
        tuned = PeftModel.from_pretrained(base, str(qlora_run / "adapter")).eval()
        results[label] = _eval_loss_and_logits(tuned, batch)
    (loss4, logits4), (loss_plain, logits_plain), (_, logits_deq) = (results[k] for k in
                                                                      ("4-bit", "unquantized", "dequantized"))
    mask = batch["attention_mask"].bool()
    # the adapter is applied identically: on the 4-bit weights dequantized into nn.Linear, same logits
    torch.testing.assert_close(logits_deq[mask], logits4[mask], atol=1e-4, rtol=1e-4)
    # on the original (unquantized) base only NF4's rounding separates them. Tolerances: mean
    # KL(4-bit || unquantized) below 0.05 nats a position, and the eval loss within 5%.
    logp4, logp_plain = logits4[mask].log_softmax(-1), logits_plain[mask].log_softmax(-1)
    kl = (logp4.exp() * (logp4 - logp_plain)).sum(-1).mean()
    assert kl < 0.05, kl
    assert loss_plain == pytest.approx(loss4, rel=0.05)
    assert max(loss4, loss_plain) < base_loss - 0.5  # and the adapter's training shows on both bases


def test_merge_of_a_qlora_adapter_is_the_model_as_trained(qlora_run, tmp_path):
    """merge_adapter.py merges a QLoRA adapter into the weights it was trained on, the 4-bit base dequantized:
    the merged model's logits are the 4-bit base + adapter's (float32, 1e-4). --qlora_base original merges into
    the unquantized weights: equal to unquantized base + adapter, and off the trained model by NF4's rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import ROOT
    from phi3_lora import data as data_lib
    cfg, tokenizer, quantized, plain = _models(qlora_run)
    data_lib.use_chat_template(tokenizer, cfg.data.chat_template)
    _, eval_data = data_lib.build_datasets(cfg.data, tokenizer, cfg.training.seed)
    batch = data_lib.Collator(tokenizer.pad_token_id)([[eval_data.dataset[i]] for i in range(len(eval_data))])
    mask = batch["attention_mask"].bool()
    as_trained = _eval_loss_and_logits(PeftModel.from_pretrained(quantized, str(qlora_run / "adapter")).eval(), batch)
    on_plain = _eval_loss_and_logits(PeftModel.from_pretrained(plain, str(qlora_run / "adapter")).eval(), batch)
    merged = {}
    for base in ("dequantized", "original"):
        proc = run_script([sys.executable, str(ROOT / "scripts" / "merge_adapter.py"), "--adapter",
                           str(qlora_run / "adapter"), "--out", str(tmp_path / base), "--dtype", "float32",
                           "--qlora_base", base, "--device", "cpu"])
        assert ("into its quantized base dequantized to float32" in proc.stdout) == (base == "dequantized"), proc.stdout
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / base), dtype=torch.float32).eval()
        merged[base] = _eval_loss_and_logits(model, batch)
    torch.testing.assert_close(merged["dequantized"][1][mask], as_trained[1][mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged["original"][1][mask], on_plain[1][mask], atol=1e-4, rtol=1e-4)
    assert (merged["original"][1][mask] - as_trained[1][mask]).abs().max() > 1e-2  # what the default avoids


def test_8bit_loading_gives_linear8bit_layers():
    bnb = needs_bitsandbytes()
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, ["model.load_in_8bit=true", "model.tiny_hidden_size=64"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    plain = load_model(dataclasses.replace(cfg.model, load_in_8bit=False), tokenizer)
    kinds = {type(m) for n, m in model.named_modules() if n.endswith("_proj")}
    assert kinds == {bnb.nn.Linear8bitLt} and type(model.lm_head) is torch.nn.Linear
    ids = torch.tensor([tokenizer("What is 12 plus 30?")["input_ids"]])
    with torch.no_grad():
        got, want = model(ids).logits, plain(ids).logits
    assert (got - want).norm() / want.norm() < 0.05  # int8 rounding: a few percent at most


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_bitsandbytes_optimizers_step(name):
    needs_bitsandbytes()
    from phi3_lora.loop import optimizer_groups
    from phi3_lora.optim import build_optimizer
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 128)  # weight: 8192 elements (8-bit states); bias: 128 (32-bit states)
    reference = torch.nn.Linear(64, 128)
    reference.load_state_dict(model.state_dict())
    t = load_config(None, [f"training.optimizer={name}", "training.learning_rate=1e-2"]).training
    optimizer = build_optimizer(optimizer_groups(model, 0.0), t)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = torch.randn(32, 64), torch.randn(32, 128)
    start = model.weight.detach().clone()
    losses = []
    for step in range(5):
        for m, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            try:
                opt.step()
            except (RuntimeError, NotImplementedError) as err:  # where the library cannot, its own words
                pytest.skip(f"bitsandbytes {name} on the CPU: {err}")
            if m is model:
                losses.append(float(loss))
        if step == 0:  # Adam's first update is lr * sign(grad) whatever the precision of its moments
            torch.testing.assert_close(model.weight, reference.weight, atol=1e-3, rtol=0)
    assert losses[-1] < losses[0]
    state = optimizer.state[model.weight]
    expected = torch.uint8 if "8bit" in name else torch.float32
    assert state["state1"].dtype == expected and optimizer.state[model.bias]["state1"].dtype == torch.float32
    # after 5 steps the 8-bit moments' rounding shows, but the trajectory is AdamW's: within 10% of its movement
    moved = (reference.weight - start).norm()
    assert (model.weight - reference.weight).norm() < 0.1 * moved


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_a_paged_optimizers_loaded_state_goes_back_into_its_paged_buffers(monkeypatch, name):
    """Resuming loads the optimizer state as ordinary tensors (bitsandbytes would move them to the GPU whole):
    load_optimizer_state copies each parameter-sized state into the buffer bitsandbytes allocates, paged on a GPU.
    Paging needs CUDA, so its allocation is stood in for (a recorded buffer); the copy and the later steps are real:
    the resumed optimizer steps exactly as the one that never stopped."""
    needs_bitsandbytes()
    from phi3_lora.optim import build_optimizer, load_optimizer_state
    t = load_config(None, [f"training.optimizer={name}", "training.learning_rate=1e-2"]).training
    torch.manual_seed(0)
    models = [torch.nn.Linear(64, 128) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(32, 64), torch.randn(32, 128)

    def step(model, optimizer):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    running = build_optimizer([{"params": list(models[0].parameters())}], t)
    for _ in range(3):
        step(models[0], running)
    models[1].load_state_dict(models[0].state_dict())
    resumed = build_optimizer([{"params": list(models[1].parameters())}], t)

    paged = []  # the buffers bitsandbytes would allocate in paged memory

    def paged_buffer(p, dtype=torch.float32):
        paged.append(torch.full_like(p, 77, dtype=dtype))
        return paged[-1]
    monkeypatch.setattr(resumed, "get_state_buffer", paged_buffer)
    load_optimizer_state(resumed, running.state_dict())
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        sized = [k for k, v in resumed.state[q].items() if torch.is_tensor(v) and v.shape == q.shape]
        assert sized and all(any(resumed.state[q][k] is b for b in paged) for k in sized)
        for k in sized:
            assert torch.equal(resumed.state[q][k], running.state[p][k]), k
    for _ in range(2):
        step(models[0], running)
        step(models[1], resumed)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_adamw_torch_is_fused_on_cuda_only(monkeypatch):
    from phi3_lora.optim import build_optimizer
    t = load_config(None, []).training
    params = [{"params": [torch.nn.Parameter(torch.zeros(4))]}]
    assert not build_optimizer(params, t).defaults["fused"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # mock: no CUDA here; fused needs no device yet
    assert build_optimizer(params, t).defaults["fused"] is True


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    from phi3_lora.model import load_model, load_tokenizer
    from phi3_lora.optim import build_optimizer
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    cfg = load_config(None, ["model.load_in_4bit=true", "training.optimizer=adamw_8bit"])
    with pytest.raises(ConfigError, match=r"^model.load_in_4bit needs bitsandbytes, which is not installed: "
                                          r"pip install -e '\.\[qlora\]'$"):
        load_model(cfg.model, load_tokenizer(cfg.model))
    with pytest.raises(ConfigError, match=r"^training.optimizer=adamw_8bit needs bitsandbytes.*\[qlora\]'$"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(4))]}], cfg.training)


def test_missing_bitsandbytes_cli_exits_with_one_line(tmp_path):
    code = ("import runpy, sys; sys.modules['bitsandbytes'] = None; "
            f"sys.argv = [{str(TRAIN)!r}, 'output_dir={tmp_path}', 'model.load_in_4bit=true', 'data.demo_size=40']; "
            f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')")
    proc = run_script([sys.executable, "-c", code], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: model.load_in_4bit needs bitsandbytes, which is not installed: "
                      "pip install -e '.[qlora]'"]
    assert not (tmp_path / "adapter").exists()


def test_bitsandbytes_is_unused_only_when_nothing_can_need_it(tmp_path):
    from phi3_lora.quant import bitsandbytes_unused
    plain_dir, quantized_dir, no_config_dir = (tmp_path / name for name in ("plain", "quantized", "empty"))
    for folder in (plain_dir, quantized_dir, no_config_dir):
        folder.mkdir()
    (plain_dir / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    (quantized_dir / "config.json").write_text(json.dumps({"model_type": "phi3",
                                                            "quantization_config": {"load_in_4bit": True}}))

    def unused(*overrides, base=None):
        cfg = load_config(None, list(overrides))
        if base is not None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(base)))
        return bitsandbytes_unused(cfg)

    assert unused() and unused(base=plain_dir)
    assert not unused("model.load_in_4bit=true") and not unused("model.load_in_8bit=true")
    assert not unused("training.optimizer=adamw_8bit") and not unused("training.optimizer=paged_adamw_32bit")
    assert not unused(base=quantized_dir)  # saved quantized: transformers loads it with bitsandbytes
    assert not unused(base=no_config_dir) and not unused(base="microsoft/Phi-3-mini-4k-instruct")  # in doubt


def test_train_script_skips_the_bitsandbytes_import_when_unused(tmp_path):
    """A run with nothing quantized and PyTorch's AdamW trains without importing bitsandbytes (peft would
    import it, about a second); the QLoRA runs above show it is still there when needed."""
    needs_bitsandbytes()
    code = ("import atexit, runpy, sys; "
            "atexit.register(lambda: print('bitsandbytes imported:', sys.modules.get('bitsandbytes') is not None)); "
            f"sys.argv = [{str(TRAIN)!r}, 'output_dir={tmp_path}', 'data.demo_size=40', 'training.max_steps=2']; "
            f"runpy.run_path({str(TRAIN)!r}, run_name='__main__')")
    proc = run_script([sys.executable, "-c", code], timeout=300)
    assert proc.stdout.splitlines()[-1] == "bitsandbytes imported: False"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_bf16_on_a_gpu_without_it_falls_back_to_fp16(monkeypatch, caplog):
    from phi3_lora.model import resolve_dtype
    # mock: CUDA cannot run here. A pre-Ampere GPU: bf16 only through emulation.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with caplog.at_level(logging.WARNING, logger="phi3_lora.model"):
        assert resolve_dtype("bfloat16", "model.bnb_4bit_compute_dtype") == torch.float16
    assert "model.bnb_4bit_compute_dtype=bfloat16: this GPU has no native bfloat16; using float16" in caplog.text
    assert resolve_dtype("auto") == torch.float32 and resolve_dtype("float32") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("bfloat16") == torch.bfloat16 == resolve_dtype("auto")


@pytest.mark.parametrize("overrides, message", [
    (["model.load_in_4bit=true", "model.load_in_8bit=true"], "model.load_in_4bit and model.load_in_8bit: choose one"),
    (["model.bnb_4bit_quant_storage=bfloat16"], "model.bnb_4bit_quant_storage: only applies with model.load_in_4bit"),
    (["model.bnb_4bit_quant_type=int4"], "model.bnb_4bit_quant_type: 'int4' is not one of nf4, fp4"),
    (["training.optimizer=sgd"], "training.optimizer: 'sgd' is not one of adamw_torch, adamw_8bit"),
    (["model.load_in_4bit=true", "lora.init=pissa"], "lora.init=pissa rewrites the base weights from their "
                                                     "decomposition, which a 4-bit or 8-bit base does not have"),
])
def test_quantization_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[")):
        load_config(None, overrides)


def test_deepspeed_precision_must_not_recast_4bit_weights_stored_in_float_words():
    """DeepSpeed casts every floating-point parameter to its fp16/bf16 at start, at any ZeRO stage: 4-bit weights
    packed in float words of another dtype would be converted as numbers (tried: 91% of the weights changed under
    fp16 with bfloat16 storage, and the run went on). uint8 words, and no mixed precision, are left alone."""
    from phi3_lora.loop import check_4bit_storage_survives_deepspeed
    cfg = load_config(None, ["model.load_in_4bit=true", "model.bnb_4bit_quant_storage=bfloat16"])
    with pytest.raises(ConfigError, match=r"^model.bnb_4bit_quant_storage=bfloat16: DeepSpeed casts every floating-"
                                          r"point parameter to float16 \(fp16\)"):
        check_4bit_storage_survives_deepspeed(cfg, "fp16")
    for precision in ("bf16", "no"):
        check_4bit_storage_survives_deepspeed(cfg, precision)
    for precision in ("bf16", "fp16"):
        check_4bit_storage_survives_deepspeed(load_config(None, ["model.load_in_4bit=true"]), precision)


def test_qlora_under_zero3_shards_4bit_weights_and_trains(tmp_path):
    """Two CPU processes, DeepSpeed ZeRO-3: the 4-bit weights, stored in the model's dtype
    (bnb_4bit_quant_storage), are partitioned like any parameter; training works; the gathered
    adapter loads onto the 4-bit base."""
    needs_bitsandbytes()
    from peft import PeftModel

    from conftest import FAST, ROOT, accelerate_launch, load_adapter_tensors
    from phi3_lora.model import load_model, load_tokenizer
    model_dir = tmp_path / "base"
    cfg = load_config(None, FAST)
    load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.training.seed).save_pretrained(model_dir)
    out = tmp_path / "run"
    launcher = accelerate_launch(2, "--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"))
    run_script(launcher + [str(ROOT / "tests" / "helpers" / "quantized_layers.py"), f"output_dir={out}", *FAST,
                           f"model.name_or_path={model_dir}", "model.tokenizer=tiny-random-phi3",
                           "model.load_in_4bit=true", "model.bnb_4bit_quant_storage=float32",
                           "training.max_steps=10", "training.learning_rate=3e-3", "training.per_device_batch_size=2"],
               timeout=600)
    ranks = [json.loads((out / f"layers.rank{r}.json").read_text()) for r in (0, 1)]
    for layers in ranks:
        assert len(layers) == 4 * cfg.model.tiny_layers
        assert {v["class"] for v in layers.values()} == {"Linear4bit"}
        for name, v in layers.items():  # packed 4-bit: in * out / 2 bytes, in float32 words, split over 2
            assert v["ds_shape"] is not None and v["local_numel"] < v["ds_shape"][0], name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed_type"] == "DEEPSPEED" and summary["final_eval_loss"] < summary["first_eval_loss"] - 0.3
    from phi3_lora.lora import attach_lora, parameter_counts  # the 4-bit words are float32 here: 8 weights each
    unquantized = attach_lora(load_model(cfg.model, load_tokenizer(cfg.model)), cfg.lora, seed=0)
    assert (summary["trainable_parameters"], summary["total_parameters"]) == parameter_counts(unquantized)
    quantized_cfg = load_config(out / "config.yaml").model
    base = load_model(dataclasses.replace(quantized_cfg, name_or_path=str(model_dir)), load_tokenizer(quantized_cfg))
    tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
    loaded = {k: v for k, v in tuned.state_dict().items() if "lora_" in k}
    saved = load_adapter_tensors(out)
    assert len(loaded) == len(saved) == 2 * 4 * cfg.model.tiny_layers  # A and B on each quantized layer
    for key, value in saved.items():  # every tensor as saved (gathered from both ranks), every one trained
        torch.testing.assert_close(loaded[key.replace(".weight", ".default.weight")], value, rtol=0, atol=0)
        assert value.abs().sum() > 0, key
