"""One process, DDP, ZeRO-2, ZeRO-3 (+ CPU offload) and two 'machines' give the same numbers.

Every run here is a real ``accelerate launch`` with 2 processes on the CPU (gloo). Same seed, same
data, same global batch of 4 examples: one process runs 2 micro-batches of 2, the others one micro-
batch of 2 per process (or 2 of 1: ZeRO-2 and ZeRO-3 with offload accumulate). The data (45 examples, two
epochs) does not divide into steps of 4.
"""

import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT, accelerate_launch, free_ports, load_adapter_tensors, read_metrics, run_script, train_losses

RECORD = ROOT / "tests" / "helpers" / "record_train.py"
N_EXAMPLES = 45  # trained on; 9 more are held out and evaluated (by 2 processes: 5 and 4) before and after
COMMON = ["data.demo_size=54", "training.max_steps=-1", "data.eval_size=9", "training.num_epochs=2", "lora.dropout=0",
          "training.logging_steps=1", "training.eval_steps=0", "data.max_seq_len=256",
          "model.tiny_hidden_size=64", "training.per_device_batch_size=2", "training.learning_rate=3e-3"]
STEPS = 2 * math.ceil(N_EXAMPLES / 4)


def record_run(out, launcher, *overrides, env=None):
    args = launcher + [str(RECORD), f"output_dir={out}", *COMMON, *overrides]
    return run_script(args, timeout=900, env=env)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    # the reference computes the loss from whole logits; the others from chunks of 64 positions
    record_run(out, [sys.executable], "training.gradient_accumulation_steps=2", "training.loss_chunk_size=0")
    return out


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny model saved like a hub checkpoint, so ZeRO-3 loads it with from_pretrained + zero.Init."""
    from phi3_lora.config import load_config
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, COMMON)
    out = tmp_path_factory.mktemp("tiny_model")
    load_model(cfg.model, load_tokenizer(cfg.model), seed=cfg.training.seed).save_pretrained(out)
    return out


def eval_losses(out) -> list[tuple[int, float]]:
    return [(m["step"], m["eval_loss"]) for m in read_metrics(out) if "eval_loss" in m]


def assert_same_run(reference, other, rel=1e-4):
    """The same training losses, evaluation losses (every process evaluates its share, reduced) and adapter."""
    ref_eval, got_eval = eval_losses(reference), eval_losses(other)
    assert [s for s, _ in ref_eval] == [s for s, _ in got_eval] == [0, STEPS]
    for (step, a), (_, b) in zip(ref_eval, got_eval):
        assert b == pytest.approx(a, rel=rel), f"eval at step {step}: {a} vs {b}"
    ref_losses, losses = train_losses(reference), train_losses(other)
    assert [s for s, _ in ref_losses] == list(range(1, STEPS + 1))
    assert [s for s, _ in losses] == [s for s, _ in ref_losses]
    for (step, a), (_, b) in zip(ref_losses, losses):
        assert b == pytest.approx(a, rel=rel), f"step {step}: {a} vs {b}"
    assert ref_losses[-1][1] < ref_losses[0][1] - 0.3  # it learned something, so equality means something
    ref, got = load_adapter_tensors(reference), load_adapter_tensors(other)
    assert ref.keys() == got.keys() and len(ref) > 0
    for key in ref:
        assert got[key].shape == ref[key].shape and got[key].numel() > 0, key
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)


def assert_each_example_once_per_epoch(out, num_processes):
    per_rank = [json.loads((out / f"seen.rank{r}.json").read_text()) for r in range(num_processes)]
    assert len({len(steps) for steps in per_rank}) == 1 and len(per_rank[0]) == STEPS
    steps_per_epoch = STEPS // 2
    for epoch in range(2):
        ids = [i for steps in per_rank for step in steps[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
               for i in step]
        assert sorted(ids) == list(range(N_EXAMPLES)), f"epoch {epoch}"
    # the remainder: 45 = 11 full steps of 4 + 1 example, which goes to rank 0; rank 1 runs an empty micro-batch
    last = [len(per_rank[r][steps_per_epoch - 1]) for r in range(num_processes)]
    assert sorted(last) == ([0, 1] if num_processes == 2 else [1])


def assert_one_writer(out, num_processes):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == num_processes
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    steps = [s for s, _ in train_losses(out)]
    assert len(steps) == len(set(steps)) == STEPS  # metrics.jsonl written once per step, not per process
    return summary


def test_single_process_reference(single):
    assert_each_example_once_per_epoch(single, 1)
    assert assert_one_writer(single, 1)["distributed_type"] == "NO"


def test_ddp_two_processes_match_single(single, tmp_path):
    """Also the step-time split when one process is slower: the second takes 0.2 s more to collate each
    batch, so the first waits about that long at each step's all-reduce of the token counts ("sync")."""
    record_run(tmp_path, accelerate_launch(2, "--multi_gpu"), "training.loss_chunk_size=64",
               env={"SLOW_DATA_ON_LAST_RANK": "0.2"})
    assert_same_run(single, tmp_path)
    assert_each_example_once_per_epoch(tmp_path, 2)
    summary = assert_one_writer(tmp_path, 2)
    assert summary["distributed_type"] == "MULTI_CPU"
    assert 0.15 < summary["step_sync_seconds"] < 0.2 + summary["step_forward_backward_seconds"]
    assert summary["step_data_seconds"] < 0.1  # the first process's own batches came at once
    steps = summary["step_data_seconds"] + summary["step_forward_backward_seconds"] + \
        summary["step_optimizer_seconds"] + summary["step_sync_seconds"]
    assert summary["tokens_per_second_in_steps"] == pytest.approx(summary["tokens_this_run"] / (STEPS * steps))


def test_ddp_with_compiled_layers_matches_single(single, tmp_path):
    """training.compile under DDP: each process compiles its layers in place (batches of varying length
    recompile them, within dynamo's limit), and the numbers stay those of one eager process."""
    proc = record_run(tmp_path, accelerate_launch(2, "--multi_gpu"), "training.loss_chunk_size=64",
                      "training.compile=true")
    assert "compiling 2 decoder layers" in proc.stdout and "recompile_limit" not in proc.stderr
    assert_same_run(single, tmp_path)


@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_matches_single(single, tiny_model_dir, tmp_path, stage):
    """ZeRO-3 also with gradient checkpointing, as its recipe runs: recomputing a layer gathers its partitioned
    weights again (trl forces reentrant checkpointing for peft under ZeRO-3; the non-reentrant kind is right here).
    ZeRO-2 and ZeRO-3 with offload also accumulate gradients, 2 processes x 2 micro-batches of 1 for the same global
    batch of 4: DeepSpeed counts the accumulation itself, beside accelerate's own counter."""
    launcher = accelerate_launch(2, "--config_file", str(ROOT / "accelerate_configs" / f"deepspeed_{stage}.yaml"))
    accumulation = ["training.per_device_batch_size=1", "training.gradient_accumulation_steps=2"]
    proc = record_run(tmp_path, launcher, f"model.name_or_path={tiny_model_dir}", "model.tokenizer=tiny-random-phi3",
                      "training.loss_chunk_size=64", f"training.gradient_checkpointing={str(stage == 'zero3').lower()}",
                      *(accumulation if stage != "zero3" else []))
    assert_same_run(single, tmp_path)
    assert_each_example_once_per_epoch(tmp_path, 2)
    assert assert_one_writer(tmp_path, 2)["distributed_type"] == "DEEPSPEED"
    chunks_off = "training.loss_chunk_size: off under ZeRO-3" in proc.stdout
    assert chunks_off == (stage != "zero2")
    if stage != "zero2":
        assert "loaded partitioned across 2 processes (ZeRO-3 zero.Init)" in proc.stdout


def test_zero3_bf16_adapters_are_bf16_under_a_partitioned_base(tiny_model_dir, tmp_path):
    """ZeRO-3 with zero.Init and bf16: DeepSpeed casts nothing once the base is partitioned, so the loop gives the
    adapters the run's dtype, as DeepSpeed does under ZeRO-2; else peft's float32 adapters would set the ZeRO
    optimizer's dtype to float32 (with fp16: no loss scaling, no overflow check)."""
    launcher = accelerate_launch(2, "--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"))
    proc = record_run(tmp_path, launcher, f"model.name_or_path={tiny_model_dir}", "model.tokenizer=tiny-random-phi3",
                      "model.dtype=bfloat16", "training.mixed_precision=bf16", "training.max_steps=4")
    assert "loaded partitioned across 2 processes (ZeRO-3 zero.Init)" in proc.stdout
    for rank in (0, 1):
        dtypes = json.loads((tmp_path / f"dtypes.rank{rank}.json").read_text())
        assert dtypes == {"trainable": ["torch.bfloat16"], "zero_optimizer": "torch.bfloat16"}
    losses = [m["loss"] for m in read_metrics(tmp_path) if "loss" in m]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_deepspeed_config_that_disagrees_or_is_missing_is_one_line(tmp_path):
    """A DeepSpeed JSON with numbers of its own (not "auto") that differ from the training config, precision
    included; a relative deepspeed_config_file launched from elsewhere; ZeRO-Offload with a bitsandbytes
    optimizer, which accelerate would swap for DeepSpeedCPUAdam; torch.compile under ZeRO-3, whose parameter
    hooks recompile each layer until torch.compile gives up (tried: 8 recompilations a layer already in the
    first evaluation): exit 2, one line, nothing written."""
    settings = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    settings.update({"bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 7})
    (tmp_path / "mine.json").write_text(json.dumps(settings))
    zero2 = ["--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero2.yaml")]
    offload = ["--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3_offload.yaml")]
    zero3 = ["--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml")]
    for name, cwd, launch, settings in [
            ("disagrees", ROOT, [*zero2, "--deepspeed_config_file", str(tmp_path / "mine.json")], []),
            ("missing", tmp_path, zero2, []),
            ("offload", ROOT, offload, ["training.optimizer=adamw_8bit"]),
            ("compile", ROOT, zero3, ["training.compile=true"])]:
        out = tmp_path / name
        command = accelerate_launch(1, *launch) + [str(ROOT / "scripts" / "train.py"), f"output_dir={out}"]
        proc = run_script(command + COMMON + settings, cwd=cwd, check=False, timeout=600)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
        if name == "disagrees":
            assert "train_micro_batch_size_per_gpu" in errors[0] and "bf16.enabled=True but training.mixed_precision " \
                "resolves to no" in errors[0]
        elif name == "missing":
            assert "DeepSpeed config file 'ds_configs/zero2.json' (deepspeed_config_file of the accelerate config) " \
                f"not found from {tmp_path}" in errors[0]
        elif name == "compile":
            assert errors[0] == "error: training.compile=true does not work under DeepSpeed ZeRO-3: the hooks " \
                "that gather each layer's partitioned weights break its compiled graph at every linear and " \
                "recompile it on every call until torch.compile gives up and runs it eagerly; set " \
                "training.compile=false"
        else:  # accelerate would swap adamw_8bit for DeepSpeedCPUAdam
            assert errors[0].endswith("in place of the configured one: training.optimizer must be adamw_torch (got "
                                      "adamw_8bit)")
        assert not out.exists()


def test_zero_offload_steps_with_the_configured_betas_and_epsilon():
    """Under ZeRO-Offload accelerate replaces our AdamW with DeepSpeedCPUAdam built from its param groups: the
    configured betas, epsilon, learning rate and weight decay carry over, and its step is torch's AdamW's
    (1e-6), so a beta2 of 0.95 needs no refusal."""
    from accelerate.utils.deepspeed import map_pytorch_optim_to_deepspeed

    from phi3_lora.config import load_config
    from phi3_lora.optim import build_optimizer
    t = load_config(None, ["training.adam_beta2=0.95", "training.adam_epsilon=1e-6", "training.learning_rate=1e-2",
                           "training.weight_decay=0.1"]).training
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(64, 8, generator=gen), torch.randn(8, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
    results = []
    for offloaded in (False, True):
        weights = [torch.nn.Parameter(p.clone()) for p in params]
        optimizer = build_optimizer([{"params": weights[:1], "weight_decay": t.weight_decay},
                                     {"params": weights[1:], "weight_decay": 0.0}], t)
        if offloaded:
            optimizer = map_pytorch_optim_to_deepspeed(optimizer)
            assert [(g["betas"], g["eps"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == \
                [((0.9, 0.95), 1e-6, 1e-2, 0.1), ((0.9, 0.95), 1e-6, 1e-2, 0.0)]
        for step_grads in grads:
            for w, g in zip(weights, step_grads):
                w.grad = g.clone()
            optimizer.step()
        results.append([w.detach() for w in weights])
    assert type(optimizer).__name__ == "DeepSpeedCPUAdam"
    for plain, offloaded in zip(*results):
        torch.testing.assert_close(offloaded, plain, atol=1e-6, rtol=1e-6)


def test_a_deepspeed_config_without_training_entries_gets_them_from_the_training_config(monkeypatch):
    """Absent from the JSON, gradient_clipping would be DeepSpeed's default 1.0, whatever training.max_grad_norm says:
    it and the batch size come from the training config. (accelerate itself writes 1 for a missing
    gradient_accumulation_steps, which then disagrees with the training config's 2: an error, not a silent 1.)"""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin

    from phi3_lora.config import ConfigError, load_config
    from phi3_lora.loop import fill_deepspeed_config
    cfg = load_config(None, ["training.max_grad_norm=0.3", "training.per_device_batch_size=3",
                             "training.gradient_accumulation_steps=2"])
    for name in [name for name in os.environ if name.startswith("ACCELERATE_")]:
        monkeypatch.delenv(name)  # the plugin would fill "auto" entries from them (an accelerate launch sets them)
    for missing in (("gradient_clipping", "train_batch_size"), ("gradient_accumulation_steps",)):
        settings = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
        for key in missing:
            del settings[key]
        settings.update({"bf16": {"enabled": False}, "fp16": {"enabled": False}})  # what accelerate's launch resolves
        plugin = DeepSpeedPlugin(hf_ds_config=settings)
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=2)
        if "gradient_clipping" in missing:
            fill_deepspeed_config(accelerator, cfg)
            filled = plugin.deepspeed_config
            assert (filled["gradient_clipping"], filled["train_micro_batch_size_per_gpu"],
                    filled["gradient_accumulation_steps"], filled["train_batch_size"]) == (0.3, 3, 2, 12)
        else:
            with pytest.raises(ConfigError, match="gradient_accumulation_steps=1 vs arg gradient_accumulation_steps=2"):
                fill_deepspeed_config(accelerator, cfg)


def test_zero3_adapter_loads_onto_base(single, tiny_model_dir, tmp_path):
    """The ZeRO-3 adapter (gathered, full shapes) loads with PeftModel.from_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    launcher = accelerate_launch(2, "--config_file", str(ROOT / "accelerate_configs" / "deepspeed_zero3.yaml"))
    record_run(tmp_path, launcher, f"model.name_or_path={tiny_model_dir}", "model.tokenizer=tiny-random-phi3",
               "training.max_steps=3")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    saved = load_adapter_tensors(tmp_path)
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():
        model_key = key.replace(".weight", ".default.weight")
        torch.testing.assert_close(loaded[model_key], value)
        assert value.abs().sum() > 0, key  # every A and B trained and gathered whole, none left at zero


def test_a_checkpoint_loads_straight_onto_the_processs_device(tiny_model_dir):
    """What the loop does on a GPU (device = this process's GPU, unless ZeRO-3 partitions the load): from_pretrained
    places every weight on it as it loads (device_map). Here the device is the CPU: the same weights as a load
    without one (benchmarks/gpu_bench.sh loads this way onto its GPU)."""
    from phi3_lora.config import load_config
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, [*COMMON, f"model.name_or_path={tiny_model_dir}", "model.tokenizer=tiny-random-phi3"])
    tokenizer = load_tokenizer(cfg.model)
    placed, plain = load_model(cfg.model, tokenizer, device="cpu"), load_model(cfg.model, tokenizer)
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    assert placed.state_dict().keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(placed.state_dict()[name], value), name


def test_the_base_loads_onto_the_processs_gpu_unless_zero3_partitions_it(monkeypatch, tmp_path):
    """The loop's choice of device for load_model (the GPU is stood in for: this machine has none)."""
    from types import SimpleNamespace

    import transformers.integrations
    from conftest import FAST, in_process_trainer
    from phi3_lora import loop
    from phi3_lora.config import load_config
    gpu = SimpleNamespace(device=torch.device("cuda", 1))
    for zero3, expected in ((False, torch.device("cuda", 1)), (True, None)):
        monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: zero3)
        assert loop.base_model_device(gpu) == expected
    monkeypatch.undo()
    asked, load = [], loop.load_model
    monkeypatch.setattr(loop, "load_model",
                        lambda *args, **kwargs: asked.append(kwargs["device"]) or load(*args, **kwargs))
    in_process_trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", "training.max_steps=1"]))
    assert asked == [None]  # the CPU
    monkeypatch.setattr(loop, "base_model_device", lambda accelerator: torch.device("cpu"))
    in_process_trainer(load_config(None, [*FAST, f"output_dir={tmp_path}", "training.max_steps=1"]))
    assert asked == [None, torch.device("cpu")]


def test_two_machines_on_one_host_match_single(single, tmp_path):
    import subprocess
    port = free_ports(1)[0]
    procs = []
    for rank in (0, 1):
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                    "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                    "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
        args = launcher + [str(RECORD), f"output_dir={tmp_path}", *COMMON]
        procs.append(subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_run(single, tmp_path)
    assert_each_example_once_per_epoch(tmp_path, 2)
    assert_one_writer(tmp_path, 2)


def test_the_main_process_picks_the_checkpoint_and_its_error_stops_every_process(tmp_path):
    """Which checkpoint to resume is decided by the main process and broadcast (the nodes' views of a shared file
    system may lag); a checkpoint it refuses stops every process with the same one-line error, none hangs. (On one
    host both processes see the same files: this proves the broadcast of the error, not a lagging view.)"""
    step = tmp_path / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "COMPLETE.json").write_text(json.dumps({"step": 4, "files": {"trainer_state.json": "0" * 64}}))
    proc = run_script(accelerate_launch(2, "--multi_gpu") + [str(ROOT / "scripts" / "train.py"),
                      f"output_dir={tmp_path}", *COMMON, "training.resume_from=auto"], check=False, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {step / 'trainer_state.json'}: missing from the checkpoint"] * 2, proc.stderr[-3000:]
    # each process exits 2, as a user error does; the launcher (torchrun) then prints its own traceback, none of ours
    assert proc.returncode != 0 and "failed (exitcode: 2)" in proc.stderr
    assert "phi3_lora/" not in proc.stderr and "train.py\", line" not in proc.stderr
