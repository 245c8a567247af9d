"""End to end through scripts/train.py: outputs, TensorBoard read back, the adapter, bad input."""

import json
import math
import sys

import pytest
import torch

from conftest import (FAST, TRAIN, in_process_trainer, load_adapter_tensors, read_metrics, run_script, train,
                      train_losses)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # the demo recipe at its real model size, shortened: eval before the first step, every 20 steps, at the end
    proc = train(out, "training.max_steps=100", "training.eval_steps=20", "training.logging_steps=5",
                 "data.demo_size=400", "model.tiny_hidden_size=128", "data.max_seq_len=512")
    return out, proc


def test_outputs_and_summary(demo_run):
    out, proc = demo_run
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "summary.json", "tokenizer/tokenizer.json"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (16, 32)  # the demo's lora.r and lora.alpha
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 100 and summary["num_processes"] == 1
    assert summary["distributed_type"] == "NO"
    assert summary["adapter"] == str((out / "adapter").resolve())
    assert summary["final_eval_loss"] < summary["first_eval_loss"]
    assert summary["supervised_tokens"] > 0 and summary["supervised_tokens_per_second"] > 0
    assert summary["examples_dropped"] == 0 and summary["examples_truncated"] == 0
    assert f"adapter:     {out / 'adapter'}" in proc.stdout
    assert "trainable parameters:" in proc.stdout
    # library messages a user cannot act on are silenced (cli.quiet_library_noise)
    assert "kernels-community" not in proc.stderr and "`is_gradient_checkpointing` is deprecated" not in proc.stderr


def test_metrics_jsonl_lines(demo_run):
    out, _ = demo_run
    metrics = read_metrics(out)
    train_entries = [m for m in metrics if "loss" in m]
    eval_entries = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in train_entries] == list(range(5, 101, 5))
    assert [m["step"] for m in eval_entries] == [0, 20, 40, 60, 80, 100]
    for m in train_entries:
        assert set(m) >= {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second"}
        assert m["grad_norm"] > 0 and m["tokens_per_second"] > 0
    for m in eval_entries:
        assert m["eval_perplexity"] == pytest.approx(torch.tensor(m["eval_loss"]).exp().item(), rel=1e-5)
    # the rate step s used (the scheduler's after s - 1 steps; it used to be logged one step late): linear
    # warmup over 20 steps to 1e-3 from 0 at step 1, then cosine towards 0 at step 100
    expected = [1e-3 * (k / 20 if k < 20 else 0.5 * (1 + math.cos(math.pi * (k - 20) / 80)))
                for k in (s - 1 for s in range(5, 101, 5))]
    assert [m["learning_rate"] for m in train_entries] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_tensorboard_scalars_read_back(demo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = demo_run
    event_files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(event_files) == 1, event_files  # one writer
    acc = EventAccumulator(str(event_files[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "eval/loss", "eval/perplexity"} <= tags
    metrics = read_metrics(out)
    for tag, key, source in (("train/loss", "loss", "loss"), ("eval/loss", "eval_loss", "eval_loss")):
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)), f"{tag}: steps repeat or go back"
        expected = [(m["step"], m[key]) for m in metrics if source in m]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events] == expected


def test_adapter_loads_with_peft_and_changes_logits(demo_run):
    from peft import PeftModel

    from phi3_lora.config import load_config
    from phi3_lora.model import load_model, load_tokenizer
    out, _ = demo_run
    cfg = load_config(out / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, tokenizer, seed=cfg.training.seed)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}],
                                                      add_generation_prompt=True, tokenize=True)["input_ids"]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
        tuned.eval()
        tuned_logits = tuned(ids).logits
        assert (tuned_logits - base_logits).abs().max() > 1e-2
        with tuned.disable_adapter():  # the base is untouched underneath
            torch.testing.assert_close(tuned(ids).logits, base_logits)


def test_demo_eval_loss_halves(demo_run):
    """The acceptance bar of `make demo` (300 steps), already met by this 100-step cut of it."""
    summary = json.loads((demo_run[0] / "summary.json").read_text())
    assert summary["final_eval_loss"] <= 0.5 * summary["first_eval_loss"]


def test_gradient_checkpointing_changes_no_number(tmp_path):
    """Recomputing each decoder layer in the backward gives the run without it: the same losses and adapter,
    with LoRA dropout on (the recomputation must draw the forward's dropout masks again)."""
    runs = {}
    for checkpointing in ("false", "true"):
        runs[checkpointing] = tmp_path / checkpointing
        train(runs[checkpointing], "training.max_steps=12", "training.learning_rate=3e-3", "lora.dropout=0.1",
              f"training.gradient_checkpointing={checkpointing}")
    plain, recomputed = train_losses(runs["false"]), train_losses(runs["true"])
    assert [s for s, _ in plain] == [s for s, _ in recomputed] == list(range(1, 13))
    assert [loss for _, loss in recomputed] == pytest.approx([loss for _, loss in plain], rel=1e-5)
    assert sum(loss for _, loss in plain[-3:]) < sum(loss for _, loss in plain[:3]) - 0.6  # it learned
    reference, got = load_adapter_tensors(runs["false"]), load_adapter_tensors(runs["true"])
    assert reference.keys() == got.keys()
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_checkpointing_recomputes_each_block_once(tmp_path, checkpointing):
    """training.gradient_checkpointing, through the Trainer: each decoder layer's blocks run twice a
    micro-batch with it (once more in the backward), once without. Counted by wrapping ``forward``: a
    forward hook on the block fired once here, recomputation or not."""
    from phi3_lora.config import load_config
    cfg = load_config(None, [*FAST, f"output_dir={tmp_path}", "data.eval_size=0", "training.per_device_batch_size=2",
                             "training.gradient_accumulation_steps=2",
                             f"training.gradient_checkpointing={str(checkpointing).lower()}"])
    trainer = in_process_trainer(cfg)
    mlp = trainer.accelerator.unwrap_model(trainer.model).base_model.model.model.layers[1].mlp
    forward, calls = mlp.forward, []
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    trainer.train_step(next(trainer._batches_of_epoch()))
    assert len(calls) == 2 * (2 if checkpointing else 1)  # two micro-batches


def bad_input_cases(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(json.dumps(good) + "\n{oops\n")
    no_assistant = tmp_path / "no_assistant.jsonl"
    no_assistant.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}))
    return [
        (["training.learnin_rate=1e-4"], "error: unknown key 'training.learnin_rate' (command line) "
                                         "(did you mean 'training.learning_rate'?)"),
        ([f"data.path={malformed}"], f"error: {malformed} line 2: not valid JSON"),
        ([f"data.path={no_assistant}"], f"error: {no_assistant} line 2: no assistant turn to learn from"),
        ([f"data.path={tmp_path / 'missing.jsonl'}"], f"error: data file not found: {tmp_path / 'missing.jsonl'}"),
        (["training.learning_rate=-1"], "error: training.learning_rate: must be greater than 0, got -1.0"),
        (["--config", str(tmp_path / "nope.yaml")], f"error: config file not found: {tmp_path / 'nope.yaml'}"),
    ]


def test_bad_input_exits_with_one_line_and_no_adapter(tmp_path):
    for i, (args, message) in enumerate(bad_input_cases(tmp_path)):
        out = tmp_path / f"run{i}"
        proc = run_script([sys.executable, str(TRAIN), f"output_dir={out}", *args], check=False, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert error_lines == [error_lines[0]] and error_lines[0].startswith(message), (message, proc.stderr)
        assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_help_lists_keys():
    proc = run_script([sys.executable, str(TRAIN), "--help"])
    for key in ("training.learning_rate = 0.0002", "lora.target_modules", "data.train_on_prompt", "output_dir ="):
        assert key in proc.stdout
    assert "accelerate launch" in proc.stdout  # the docstring's launch commands

