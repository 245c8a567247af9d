"""Checkpoints: checked strict=False loading, rotation, damaged files, preemption signals, safe loading
(exact resumption: tests/test_resume.py)."""

import argparse
import json
import os
import pickle
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TRAIN, read_metrics, run_script
from phi3_lora import checkpoint as ckpt
from phi3_lora.config import ConfigError, load_config
from training_runs import RUN, finish, start


# ----------------------------------------------------------------------------- strict=False, checked

def tiny_peft(r=8, hidden=64, targets=("qkv_proj", "o_proj"), *overrides):
    from phi3_lora.config import load_config
    from phi3_lora.lora import attach_lora
    from phi3_lora.model import load_model, load_tokenizer
    cfg = load_config(None, [f"lora.r={r}", f"model.tiny_hidden_size={hidden}",
                             f"lora.target_modules=[{','.join(targets)}]", *overrides])
    return attach_lora(load_model(cfg.model, load_tokenizer(cfg.model)), cfg.lora, seed=1)


def saved_adapter(model):
    return {k: v.clone() for k, v in ckpt.adapter_state_dict(model).items()}


def randomised(state):
    gen = torch.Generator().manual_seed(3)
    return {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.mark.parametrize("prefix", ["", "module.", "module.base_model.model."])
def test_adapter_with_known_prefixes_loads_exactly(prefix):
    source = randomised(saved_adapter(tiny_peft()))
    # PEFT files drop "base_model.model." and the adapter name; DDP adds "module."
    peft_style = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in source.items()}
    state = {prefix + k: v for k, v in peft_style.items()}
    target = tiny_peft()
    missing_base = ckpt.load_adapter_state(target, state, "test.safetensors")
    assert missing_base > 0  # the base weights are not in an adapter file, as expected
    loaded = dict(target.named_parameters())
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("variant", [[], ["lora.use_dora=true"]], ids=["lora", "dora"])
def test_a_saved_adapter_directory_loads_back_exactly(tmp_path, variant):
    """Written as training writes it (peft's file format: DoRA's magnitude saved without ".weight") and
    read back with the checked loader, as evaluate, chat, merge and resuming do."""
    from phi3_lora.lora import load_adapter_dir, save_adapter
    source = tiny_peft(8, 64, ("qkv_proj", "o_proj"), *variant)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_adapter(source, saved_adapter(source), tmp_path / "adapter")
    target = tiny_peft(8, 64, ("qkv_proj", "o_proj"), *variant)
    load_adapter_dir(target, tmp_path / "adapter")
    trained = {k: v for k, v in source.named_parameters() if v.requires_grad}
    assert len(trained) == (12 if variant else 8)  # 2 layers x 2 targets x (A, B[, magnitude])
    loaded = dict(target.named_parameters())
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key


def test_rank_mismatch_names_both_ranks():
    with pytest.raises(ckpt.CheckpointError, match=r"rank 8 in the file, the model has rank 16"):
        ckpt.load_adapter_state(tiny_peft(r=16), saved_adapter(tiny_peft(r=8)), "r8.safetensors")


def test_adapter_of_another_model_fails():
    other = saved_adapter(tiny_peft(targets=("gate_up_proj", "down_proj")))
    with pytest.raises(ckpt.CheckpointError, match=r"other.safetensors: .* keys match no parameter of this model"):
        ckpt.load_adapter_state(tiny_peft(), other, "other.safetensors")


def test_adapter_of_another_size_fails():
    with pytest.raises(ckpt.CheckpointError, match=r"has shape .* the model expects"):
        ckpt.load_adapter_state(tiny_peft(hidden=64), saved_adapter(tiny_peft(hidden=32)), "small.safetensors")


def test_foreign_prefix_fails_instead_of_loading_nothing():
    state = {"transformer.h." + k: v for k, v in saved_adapter(tiny_peft()).items()}
    with pytest.raises(ckpt.CheckpointError, match="match no parameter of this model"):
        ckpt.load_adapter_state(tiny_peft(), state, "foreign.safetensors")


def test_partial_adapter_fails_on_missing_adapter_keys():
    state = dict(list(saved_adapter(tiny_peft()).items())[:3])
    with pytest.raises(ckpt.CheckpointError, match="adapter parameters of the model are not in the file"):
        ckpt.load_adapter_state(tiny_peft(), state, "partial.safetensors")


def test_base_weights_in_an_adapter_file_are_refused():
    """An adapter file that also holds a base weight would overwrite the frozen model it lands on."""
    model = tiny_peft()
    embed = "base_model.model.model.embed_tokens.weight"
    before = dict(model.named_parameters())[embed].detach().clone()
    state = {**saved_adapter(tiny_peft()), embed: torch.zeros_like(before)}
    with pytest.raises(ckpt.CheckpointError, match=r"^tampered.safetensors: 1 keys are weights of the frozen base "
                                                   r"model, not adapter parameters .* e.g. " + re.escape(embed)):
        ckpt.load_adapter_state(model, state, "tampered.safetensors")
    assert torch.equal(dict(model.named_parameters())[embed], before)


# ----------------------------------------------------------------------------- rotation

def fake_checkpoint(output_dir, step, eval_loss):
    path = ckpt.step_directory(output_dir, step)
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"eval_loss_at_save": eval_loss}))
    (path / ckpt.MARKER).write_text(json.dumps({"files": {}}))
    return path


def test_rotation_keeps_newest_n_plus_best_and_protected(tmp_path):
    losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: 2.2, 6: None}
    paths = {s: fake_checkpoint(tmp_path, s, loss) for s, loss in losses.items()}
    removed = ckpt.rotate(tmp_path, keep=2, protected={paths[3]})
    kept = [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(tmp_path)]
    assert kept == [2, 3, 5, 6]  # newest 2 (5, 6), best eval loss (2), the one resumed from (3)
    assert sorted(int(p.name.split("-")[1]) for p in removed) == [1, 4]
    assert not any(p.name.startswith(".") for p in ckpt.checkpoints_root(tmp_path).iterdir())


def test_a_crash_while_rotating_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Rotation renames a checkpoint to a hidden name before deleting it: a crash part-way through the deletion
    (here rmtree dies after one file, the marker still there) leaves nothing that resume_from=auto would pick,
    and the next run clears the remains."""
    paths = {s: fake_checkpoint(tmp_path, s, None) for s in (1, 2, 3)}
    for path in paths.values():
        (path / "adapter_model.safetensors").write_bytes(b"x" * 10)
    real_rmtree = ckpt.shutil.rmtree

    def dies_part_way(path, ignore_errors=False):
        if not Path(path).exists():
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / "adapter_model.safetensors").unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_part_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.rotate(tmp_path, keep=2, protected=set())
    assert ckpt.complete_checkpoints(tmp_path) == [paths[2], paths[3]]
    (leftover,) = [p for p in ckpt.checkpoints_root(tmp_path).iterdir() if p.name.startswith(".")]
    assert (leftover / ckpt.MARKER).is_file()  # the marker survived, under a name nothing resumes from
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in ckpt.checkpoints_root(tmp_path).iterdir()) == ["step-000002", "step-000003"]


def test_rotation_deletes_a_linked_checkpoint_s_link_not_its_target(tmp_path):
    """A checkpoint that is a symbolic link to another run's: rotation removes the link from this run's
    checkpoints/, and the other run's checkpoint stays whole."""
    other = fake_checkpoint(tmp_path / "other", 1, None)
    (other / "adapter_model.safetensors").write_bytes(b"x" * 10)
    ckpt.checkpoints_root(tmp_path / "run").mkdir(parents=True)
    ckpt.step_directory(tmp_path / "run", 1).symlink_to(other, target_is_directory=True)
    fake_checkpoint(tmp_path / "run", 2, None)
    removed = ckpt.rotate(tmp_path / "run", keep=1, protected=set())
    assert [p.name for p in removed] == ["step-000001"]
    assert sorted(p.name for p in ckpt.checkpoints_root(tmp_path / "run").iterdir()) == ["step-000002"]
    assert sorted(p.name for p in other.iterdir()) == [ckpt.MARKER, "adapter_model.safetensors", "trainer_state.json"]


def test_a_file_where_a_checkpoint_directory_goes_is_replaced(tmp_path):
    """A stray file named like the checkpoint being saved is replaced by it; a stray hidden file under
    checkpoints/ is cleared like a hidden directory."""
    target = ckpt.step_directory(tmp_path, 2)
    target.parent.mkdir(parents=True)
    target.write_text("not a checkpoint")
    (target.parent / ".step-000002.old").write_text("left by a crash")
    with ckpt.atomic_directory(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"x")
    assert target.is_dir() and (target / "adapter_model.safetensors").read_bytes() == b"x"
    (target.parent / ".step-000001.tmp").write_text("left by a crash")
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in target.parent.iterdir()) == ["step-000002"]


def test_an_unreadable_old_checkpoint_state_does_not_stop_rotation_or_resume(tmp_path):
    """Rotation ranks old checkpoints by their trainer_state.json; a damaged or missing one is not ranked (and
    deleted as any other), instead of ending the run that is saving. Steps come from the directory names."""
    paths = {s: fake_checkpoint(tmp_path, s, loss) for s, loss in {1: 0.5, 2: 1.0, 3: 2.0, 4: 3.0}.items()}
    (paths[1] / "trainer_state.json").write_text("{torn")
    (paths[2] / "trainer_state.json").unlink()
    removed = ckpt.rotate(tmp_path, keep=1, protected=set())
    assert sorted(p.name for p in removed) == ["step-000001", "step-000002"]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]  # best, newest
    assert [ckpt.saved_step(p) for p in ckpt.complete_checkpoints(tmp_path)] == [3, 4]


def test_stale_adapter_temporaries_are_removed_and_a_lone_old_adapter_put_back(tmp_path):
    for name in (".adapter.tmp", ".adapter.old", "checkpoints/.step-000004.tmp"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "adapter_model.safetensors").write_bytes(name.encode())
    (tmp_path / "adapter").mkdir()
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapter", "checkpoints"]
    # a crash between the two renames of commit_directory: the previous adapter exists only as .adapter.old
    (tmp_path / "adapter").rename(tmp_path / ".adapter.old")
    (tmp_path / ".adapter.old" / "adapter_model.safetensors").write_bytes(b"previous")
    (tmp_path / ".adapter.tmp").mkdir()
    ckpt.remove_stale_temporaries(tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoints"]


def test_rotation_in_a_run_keeps_newest_plus_best(tmp_path):
    code, log = finish(start(tmp_path, "training.save_steps=2", "training.save_total_limit=1", "data.eval_size=8",
                             "training.eval_steps=2", "training.learning_rate=0.05"))  # lr so high eval loss wanders
    assert code == 0, log[-3000:]
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(tmp_path) if "eval_loss" in m}
    saved_steps = list(range(2, 17, 2))
    best = min(saved_steps, key=lambda s: evals[s])
    assert best != 16  # otherwise keeping the newest alone would pass too
    kept = ckpt.complete_checkpoints(tmp_path)
    assert [int(p.name.split("-")[1]) for p in kept] == [best, 16]
    for path in kept:  # the score rotation ranks by is the evaluation logged at that step, exactly
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["eval_loss_at_save"] == evals[int(path.name.split("-")[1])]


# ----------------------------------------------------------------------------- damaged files

class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def checkpointed_run(tmp_path):
    code, log = finish(start(tmp_path, "training.save_steps=8", "training.max_steps=8"))
    assert code == 0, log[-3000:]
    return tmp_path, ckpt.complete_checkpoints(tmp_path)[-1]


def resume_error(out):
    proc = run_script([sys.executable, str(TRAIN), f"output_dir={out}", *RUN, "training.resume_from=auto",
                       "training.save_steps=8"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return errors[0]


def test_corrupted_safetensors_is_named(checkpointed_run):
    out, path = checkpointed_run
    file = path / "adapter" / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    assert resume_error(out) == f"error: {file}: does not match its checksum (corrupted or replaced)"


def test_missing_optimizer_file_is_named(checkpointed_run):
    out, path = checkpointed_run
    (path / "optimizer.pt").unlink()
    assert resume_error(out) == f"error: {path / 'optimizer.pt'}: missing from the checkpoint"


def test_pickle_in_place_of_safetensors_never_runs(checkpointed_run, tmp_path_factory):
    out, path = checkpointed_run
    marker = tmp_path_factory.mktemp("exploit") / "pwned"
    file = path / "adapter" / "adapter_model.safetensors"
    file.write_bytes(pickle.dumps(Exploit(marker)))
    assert resume_error(out) == f"error: {file}: does not match its checksum (corrupted or replaced)"
    # even without the checksum guard, the loaders never unpickle it
    with pytest.raises(ckpt.CheckpointError, match="not a valid safetensors file"):
        ckpt.read_safetensors(file)
    torch_file = path / "scheduler.pt"
    torch_file.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(ckpt.CheckpointError, match=r"scheduler.pt: not a tensors-only PyTorch file; refused"):
        ckpt.torch_load(torch_file)
    torch.save({"scheduler": Exploit(marker)}, torch_file)
    refused = (r"scheduler.pt: holds a Python object \(posix.system\) that only an unpickling load would build, "
               r"which could run any code; refused$")
    with pytest.raises(ckpt.CheckpointError, match=refused):
        ckpt.torch_load(torch_file)
    assert not marker.exists()


def test_deepspeed_checkpoint_files_are_read_without_unpickling(tmp_path):
    """DeepSpeed's engine would torch.load its files with weights_only=False; within deepspeed_loads_safely it
    reads them tensors-only, with the DeepSpeed objects its optimizer states hold allowed, and any other object
    is refused by name — its code never runs. Outside the context the engine's own load is back."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    states, model_states, marker = tmp_path / "optim_states.pt", tmp_path / "model_states.pt", tmp_path / "pwned"
    torch.save({"loss_scaler": LossScaler(2.0), "dynamic": DynamicLossScaler(8.0, 1000, 1.0, 2, False),
                "zero_stage": ZeroStageEnum.gradients, "state": torch.arange(3.0)}, states)
    torch.save({"module": {"w": torch.ones(2)}, "extra": Exploit(marker)}, model_states)
    with ckpt.deepspeed_loads_safely(engine):
        loaded = engine.checkpoint_engine.load(str(states), map_location=torch.device("cpu"))
        with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{model_states}: holds a Python object "
                                                                 "(posix.system)")):
            engine.checkpoint_engine.load(str(model_states), map_location=lambda storage, loc: storage)
    assert not marker.exists()
    plain = tmp_path / "plain.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, plain)
    with ckpt.deepspeed_loads_safely(engine), pytest.raises(ckpt.CheckpointError, match=r"allow it with "
                                                             r"PHI3_LORA_TRUSTED_GLOBALS=NAME\)$"):
        engine.checkpoint_engine.load(str(plain))
    os.environ[ckpt.TRUSTED_GLOBALS_ENV] = "argparse.Namespace"  # the user's own choice: then it loads
    try:
        with ckpt.deepspeed_loads_safely(engine):
            assert engine.checkpoint_engine.load(str(plain))["args"] == argparse.Namespace(lr=0.1)
    finally:
        del os.environ[ckpt.TRUSTED_GLOBALS_ENV]
    assert (loaded["loss_scaler"].cur_scale, loaded["dynamic"].cur_scale) == (2.0, 8.0)
    assert loaded["zero_stage"] is ZeroStageEnum.gradients and torch.equal(loaded["state"], torch.arange(3.0))
    assert "load" not in vars(engine.checkpoint_engine)


def test_fresh_start_into_a_checkpointed_dir_is_refused(checkpointed_run):
    out, _ = checkpointed_run
    proc = run_script([sys.executable, str(TRAIN), f"output_dir={out}", *RUN], check=False, timeout=300)
    assert proc.returncode == 2
    assert "already holds checkpoints (newest: step-000008); continue them with training.resume_from=auto" \
        in proc.stderr


def test_changed_settings_are_named_on_resume(checkpointed_run):
    out, _ = checkpointed_run
    proc = run_script([sys.executable, str(TRAIN), f"output_dir={out}", *RUN, "training.resume_from=auto",
                       "lora.r=4", "training.max_steps=20"], check=False, timeout=300)
    assert proc.returncode == 2
    assert "settings changed since it was saved (lora.r: 16 -> 4)" in proc.stderr


def test_a_resume_its_checkpoint_does_not_fit_is_refused(tmp_path):
    """Going back to an earlier checkpoint while the abandoned run's later ones remain (rotation would delete this
    run's own, resume_from=auto would pick the stale ones up); a checkpoint past the run's last step; training
    data that changed under the same path (the saved position would point at other examples)."""
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(40)))
    out = tmp_path / "run"
    code, log = finish(start(out, f"data.path={data}", "training.save_steps=4", "training.max_steps=8"))
    assert code == 0, log[-3000:]
    step4, step8 = ckpt.complete_checkpoints(out)

    def refused(*overrides):
        proc = run_script([sys.executable, str(TRAIN), f"output_dir={out}", *RUN, f"data.path={data}",
                           "training.save_steps=4", *overrides], check=False, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return errors[0]

    assert refused(f"training.resume_from={step4}") == (
        f"error: cannot resume {step4}: {out} also holds later checkpoints (step-000008) of the run this one would "
        "leave behind, which rotation and resume_from=auto would take for this run's; move or delete them first")
    assert refused("training.resume_from=auto", "training.max_steps=6") == (
        f"error: cannot resume {step8.resolve()}: it is at step 8, past this run's 6 steps (training.max_steps / "
        "training.num_epochs)")
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "one more"},
                                         {"role": "assistant", "content": "row"}]}) + "\n")
    assert refused("training.resume_from=auto", "training.max_steps=12") == (
        f"error: cannot resume {step8.resolve()}: the training data changed since it was saved (40 examples then, "
        "41 now, or other tokens): its position in the epoch would point at other examples")
    assert ckpt.complete_checkpoints(out) == [step4, step8]  # nothing touched


def test_a_preemption_signal_before_training_stops_as_preempted(tmp_path):
    """SIGTERM while the data is tokenized (scripts/train.py catches it from before anything loads): exit 75, as
    a preempted run, not 143; in process, a signal before the first step stops at the end of the set-up."""
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    from phi3_lora.loop import PreemptionFlag
    proc = start(tmp_path / "run", "data.demo_size=6000", "data.num_proc=1")
    deadline = time.time() + 120
    seen = ""
    while "Tokenizing" not in seen and time.time() < deadline:
        seen += proc.stdout.read(1)
    os.killpg(proc.pid, signal.SIGTERM)
    code, log = finish(proc)
    assert code == ckpt.EXIT_PREEMPTED, (seen + log)[-3000:]
    assert "preempted: stopped by SIGTERM before training began (nothing new to save); run again with " \
        "training.resume_from=auto to continue" in log
    assert not ckpt.complete_checkpoints(tmp_path / "run")
    cfg = load_config(None, [f"output_dir={tmp_path / 'in'}", *RUN])
    with PreemptionFlag(["SIGUSR1"]) as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(ckpt.Preempted, match="stopped by SIGUSR1 before training began"):
            in_process_trainer(cfg, flag)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def catches(pid: int, number: int) -> bool:
    """Whether process ``pid`` has a handler of its own for signal ``number`` (Linux: SigCgt in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (number - 1) & 1)


def signal_once_caught(proc, number: int) -> None:
    """Send ``number`` to the run as soon as it catches it, and check that this was during its imports:
    scripts/train.py installs its flag before it imports torch, seconds before the loop's libraries (the
    tokenizers library is the first of them mapped)."""
    deadline = time.time() + 60
    while not catches(proc.pid, number):
        assert proc.poll() is None and time.time() < deadline, "the run never caught the signal"
        time.sleep(0.002)
    imported = "tokenizers" in Path(f"/proc/{proc.pid}/maps").read_text()
    os.killpg(proc.pid, number)
    assert not imported, "the signal is caught only once the training loop's libraries are imported"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads caught signals from Linux's /proc")
def test_a_signal_during_the_imports_stops_as_preempted(tmp_path):
    """SIGTERM in the first second, while torch and transformers are still being imported: exit 75 after the
    set-up, not 143 mid-import. A signal left out of training.preemption_signals is not swallowed: caught during
    the imports, it is delivered again once the config is read, and kills the run as it would have."""
    proc = start(tmp_path / "run")
    signal_once_caught(proc, signal.SIGTERM)
    code, log = finish(proc)
    assert code == ckpt.EXIT_PREEMPTED, log[-3000:]
    assert "preempted: stopped by SIGTERM before training began (nothing new to save)" in log
    assert not ckpt.complete_checkpoints(tmp_path / "run")

    proc = start(tmp_path / "usr1_only", "training.preemption_signals=[SIGUSR1]")
    signal_once_caught(proc, signal.SIGTERM)
    code, log = finish(proc)
    assert code == -signal.SIGTERM, log[-3000:]
    assert "preempted" not in log and not (tmp_path / "usr1_only").exists()


def test_narrowing_the_preemption_flag():
    """narrow_to keeps a signal it still catches, hands the others back to their handlers, and delivers again
    one of those that arrived meanwhile."""
    from phi3_lora.preemption import PreemptionFlag
    delivered = []
    previous = signal.signal(signal.SIGUSR2, lambda number, frame: delivered.append(number))
    try:
        with PreemptionFlag(["SIGUSR1", "SIGUSR2"]) as flag:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert flag.received == signal.SIGUSR2 and delivered == []
            flag.narrow_to(["SIGUSR1", "SIGINT"])
            assert delivered == [signal.SIGUSR2] and flag.received is None
            assert signal.getsignal(signal.SIGUSR2) not in (signal.SIG_DFL, flag._handle)
            assert signal.getsignal(signal.SIGUSR1) == signal.getsignal(signal.SIGINT) == flag._handle
            os.kill(os.getpid(), signal.SIGUSR1)
            flag.narrow_to(["SIGUSR1"])
            assert flag.received == signal.SIGUSR1  # still a preemption signal: kept
            flag.narrow_to(["SIGUSR1", "SIGUSR2"])
            os.kill(os.getpid(), signal.SIGUSR2)  # a later signal handed back does not take the earlier one along
            flag.narrow_to(["SIGUSR1"])
            assert delivered == [signal.SIGUSR2] * 2 and flag.received == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGUSR2, previous)



@pytest.mark.parametrize("marker", ["[]", '{"files": ["a"]}', '{"files": {"a": 1}}', '{"step": 3}', "{not json"])
def test_a_marker_of_the_wrong_shape_is_a_damaged_marker(tmp_path, marker):
    path = ckpt.step_directory(tmp_path, 3)
    path.mkdir(parents=True)
    (path / ckpt.MARKER).write_text(marker)
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.MARKER}: damaged marker file$"):
        ckpt.verify_checkpoint(path)


def test_rng_state_holds_this_process_gpu_only(monkeypatch):
    """A resumed job may see a different number of GPUs (another node, another CUDA_VISIBLE_DEVICES): each
    process saves and restores the generator of its own GPU, never a list over all visible ones. CUDA is
    stood in for here (this machine has none); the torch, python and numpy states are the real ones."""
    saved, restored = torch.tensor([7, 7, 7], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": saved)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("all GPUs' states saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("all GPUs' states restored"))
    plain, tensors = ckpt.rng_state()
    assert set(tensors) == {"torch", "cuda"} and torch.equal(tensors["cuda"], saved)
    expected = (random.random(), torch.rand(3))
    ckpt.set_rng_state(plain, tensors)
    assert restored == [saved]
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])
    # a checkpoint written before (every visible GPU's state, cuda0, cuda1, ...): this process's GPU's state
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    older = {"torch": tensors["torch"], "cuda0": torch.zeros(3, dtype=torch.uint8), "cuda1": saved}
    ckpt.set_rng_state(plain, older)
    assert restored == [saved, saved]


def test_fp16_loss_scale_is_saved_and_restored(tmp_path):
    """fp16 (GPUs without bf16) has accelerate's GradScaler: its scale and growth count go into the checkpoint
    (scaler.json, no pickle) and come back on resume, or a resumed run would skip steps for overflows anew.
    accelerate makes no scaler on the CPU, so a real torch GradScaler("cpu") stands in for CUDA's here."""
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    from phi3_lora.loop import SCALER_FILE
    trainer = in_process_trainer(load_config(None, [f"output_dir={tmp_path / 'a'}", *RUN]))
    scaler = trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(1))  # the scale tensors are made at first use
    scaler.update(new_scale=512.0)
    scaler._growth_tracker.fill_(7)
    trainer.save_checkpoint()
    (path,) = ckpt.complete_checkpoints(tmp_path / "a")
    assert json.loads((path / SCALER_FILE).read_text())["scale"] == 512.0
    resumed = in_process_trainer(load_config(None, [f"output_dir={tmp_path / 'b'}", *RUN]))
    fresh = resumed.accelerator.scaler = torch.amp.GradScaler("cpu")
    resumed._restore(path)
    assert (fresh.get_scale(), fresh._get_growth_tracker()) == (512.0, 7)


def signal_at_evaluation_batch(trainer, n: int) -> list:
    """Send this process SIGUSR1 as the trainer collates its ``n``-th evaluation batch (counting every
    evaluation); returns the list that grows by one a collated batch."""
    collated, collate = [], trainer.eval_collate

    def signalling_collate(items):
        collated.append(1)
        if len(collated) == n:
            os.kill(os.getpid(), signal.SIGUSR1)
        return collate(items)
    trainer.eval_collate = signalling_collate
    return collated


def test_a_preemption_signal_stops_a_long_evaluation(tmp_path):
    """A signal that arrives during an evaluation stops it within EVAL_SIGNAL_EVERY batches, records no eval
    loss for it, and the run checkpoints and stops as preempted: the evaluation does not use up the grace time."""
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    from phi3_lora.loop import EVAL_SIGNAL_EVERY, PreemptionFlag
    cfg = load_config(None, [f"output_dir={tmp_path}", *RUN, "data.eval_size=24", "training.eval_steps=2",
                             "training.per_device_eval_batch_size=1"])
    with PreemptionFlag(["SIGUSR1"]) as flag:
        trainer = in_process_trainer(cfg, flag)
        collated = signal_at_evaluation_batch(trainer, 24 + 3)  # the 3rd batch of the evaluation after step 2
        with pytest.raises(ckpt.Preempted, match="stopped by SIGUSR1 after step 2: checkpoint .*step-000002 saved"):
            trainer.train()
    assert len(collated) == 24 + EVAL_SIGNAL_EVERY  # the whole first evaluation, then up to the next check
    (saved,) = ckpt.complete_checkpoints(tmp_path)
    assert [step for step, _ in json.loads((saved / "trainer_state.json").read_text())["eval_losses"]] == [0]
    assert [m["step"] for m in read_metrics(tmp_path) if "eval_loss" in m] == [0]


def test_a_preemption_signal_in_the_final_evaluation_checkpoints_and_resuming_finishes(tmp_path):
    """After the last step: the final evaluation stops, the last step's checkpoint is saved and the run stops as
    preempted; resuming it evaluates, writes the adapter and finishes (with the eval loss an uninterrupted run
    gives)."""
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    from phi3_lora.loop import PreemptionFlag
    settings = [*RUN, "data.eval_size=24", "training.eval_steps=0", "training.max_steps=4",
                "training.per_device_eval_batch_size=1"]
    reference = in_process_trainer(load_config(None, [f"output_dir={tmp_path / 'reference'}", *settings])).train()
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", *settings])
    with PreemptionFlag(["SIGUSR1"]) as flag:
        trainer = in_process_trainer(cfg, flag)
        signal_at_evaluation_batch(trainer, 24 + 3)  # the 3rd batch of the final evaluation
        with pytest.raises(ckpt.Preempted, match="stopped by SIGUSR1 after step 4"):
            trainer.train()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step-000004"]
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = in_process_trainer(load_config(None, [f"output_dir={tmp_path / 'run'}", *settings,
                                                    "training.resume_from=auto"])).train()
    assert resumed["steps"] == 4 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert resumed["tokens_per_second_in_steps"] is None  # no step in that attempt: no rate, rather than 0
    assert resumed["step_forward_backward_seconds"] is None and resumed["mfu"] is None
    assert resumed["final_eval_loss"] == reference["final_eval_loss"]


def test_a_preemption_signal_at_a_step_just_saved_does_not_save_it_again(tmp_path, monkeypatch):
    """A signal during a periodic save stops the run after it, without a second save of the same step, even where
    a listing of checkpoints/ lags (as another node's view of a network file system may): every process knows the
    step it saved last, so none enters the collective save that the others skip."""
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    from phi3_lora.loop import PreemptionFlag
    cfg = load_config(None, [f"output_dir={tmp_path}", *RUN, "training.save_steps=2"])
    with PreemptionFlag(["SIGUSR1"]) as flag:
        trainer = in_process_trainer(cfg, flag)
        saves, save = [], trainer.save_checkpoint

        def save_and_get_signalled():
            saves.append(trainer.progress.step)
            target = save()
            os.kill(os.getpid(), signal.SIGUSR1)
            return target

        trainer.save_checkpoint = save_and_get_signalled
        monkeypatch.setattr(ckpt, "complete_checkpoints", lambda output_dir: [])  # the lagging listing
        with pytest.raises(ckpt.Preempted, match="stopped by SIGUSR1 after step 2: checkpoint .*step-000002 saved"):
            trainer.train()
    monkeypatch.undo()
    assert saves == [2] and [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000002"]


def test_a_checkpoint_copied_under_another_name_resumes(checkpointed_run):
    """resume_from takes any checkpoint directory: its step comes from its verified trainer_state.json."""
    import shutil
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    out, step8 = checkpointed_run
    kept = out / "elsewhere" / "kept-best"
    shutil.copytree(step8, kept)
    cfg = load_config(None, [f"output_dir={out}", *RUN, "training.save_steps=8", f"training.resume_from={kept}",
                             "training.max_steps=10"])
    assert in_process_trainer(cfg).train()["steps"] == 10
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-3:] == [8, 9, 10]


def test_a_longer_resumed_run_says_its_learning_rate_schedule_changed(tmp_path, capsys):
    """max_steps may grow on resume: the schedule is rebuilt for the new length, so the rate after the resumed step
    changes, and the run says from what to what. Within a warmup both lengths give the same rate: no note."""
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    notes = {}
    for warmup in (0, 8):
        settings = [f"output_dir={tmp_path / str(warmup)}", *RUN, "training.lr_scheduler=linear",
                    "training.save_steps=4", f"training.warmup_steps={warmup}"]
        in_process_trainer(load_config(None, [*settings, "training.max_steps=4"])).train()
        capsys.readouterr()
        in_process_trainer(load_config(None, [*settings, "training.max_steps=8", "training.resume_from=auto"])).train()
        notes[warmup] = [line for line in capsys.readouterr().out.splitlines() if "learning-rate schedule" in line]
    assert notes[0] == ["note: the learning-rate schedule spans this run's 8 steps, not the length step-000004 was "
                        "saved with: after step 4 the rate is 0.001, where the checkpoint's schedule gives 0"]
    assert notes[8] == []


def test_a_crash_while_a_checkpoint_is_replaced_leaves_it_to_resume_from(checkpointed_run, monkeypatch, capsys):
    """A final save at the step of the checkpoint a run resumed from replaces that checkpoint: commit_directory
    renames it to .step-N.old, then the new one into place. A crash between the two renames left no step-N, so the
    next resume started afresh and then deleted both hidden copies; now the complete old one is put back."""
    import shutil
    from conftest import in_process_trainer
    from phi3_lora.config import load_config
    out, step8 = checkpointed_run
    before = {p.relative_to(step8): p.read_bytes() for p in step8.rglob("*") if p.is_file()}
    new = step8.parent / ".step-000008.tmp"
    shutil.copytree(step8, new)
    (new / ckpt.MARKER).unlink()  # commit_directory writes the marker anew
    real_rename = Path.rename

    def dies_before_the_second_rename(self, target):
        if self == new:
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", dies_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.commit_directory(new, step8, manifest=True, extra={"step": 8})
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not step8.exists() and ckpt.complete_checkpoints(out) == []
    assert sorted(p.name for p in step8.parent.iterdir()) == [".step-000008.old", ".step-000008.tmp"]

    cfg = load_config(None, [f"output_dir={out}", *RUN, "training.save_steps=8", "training.resume_from=auto",
                             "training.max_steps=10"])
    assert in_process_trainer(cfg).train()["steps"] == 10
    printed = capsys.readouterr().out
    assert f"note: put back {step8}, which a crash while replacing it had left as .step-000008.old" in printed
    assert f"resumed from {step8} at step 8" in printed
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-3:] == [8, 9, 10]
    assert {p.relative_to(step8): p.read_bytes() for p in step8.rglob("*") if p.is_file()} == before
    assert [p.name for p in ckpt.checkpoints_root(out).iterdir() if p.name.startswith(".")] == []


def test_paths_that_cannot_be_written_are_refused_before_the_work(tmp_path):
    """check_can_create, which output_dir, evaluate's --out_dir, merge's --out and the scripts' --json/--jsonl go
    through before any work: an existing file or directory of the wrong kind, a path under a file."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    ckpt.check_can_create(tmp_path / "new" / "deeper", "output_dir")  # a directory that can be made
    ckpt.check_can_create(tmp_path, "output_dir")
    ckpt.check_can_create(tmp_path / "new" / "out.json", "--json", directory=False)
    ckpt.check_can_create("/dev/null", "--json", directory=False)  # an existing file is written in place
    with pytest.raises(ConfigError, match=rf"^output_dir {afile}: exists and is not a directory$"):
        ckpt.check_can_create(afile, "output_dir")
    with pytest.raises(ConfigError, match=rf"^--json {tmp_path}: exists and is a directory$"):
        ckpt.check_can_create(tmp_path, "--json", directory=False)
    with pytest.raises(ConfigError, match=rf"^--out {afile / 'sub' / 'x'}: {afile} is a file, not a directory$"):
        ckpt.check_can_create(afile / "sub" / "x", "--out")
    from conftest import in_process_trainer
    cfg = load_config(None, [f"output_dir={afile / 'run'}", *RUN])
    with pytest.raises(ConfigError, match=rf"^output_dir {afile / 'run'}: {afile} is a file, not a directory$"):
        in_process_trainer(cfg)  # before the model loads


def test_a_trainer_state_or_optimizer_state_of_other_content_is_named(tmp_path):
    """Files that match a marker made anew over other content (a hand-assembled checkpoint): the trainer state
    without its counts, AdamW moments of another rank, are CheckpointErrors naming the file, not a KeyError or
    a failed first step."""
    from phi3_lora.loop import read_trainer_state
    from phi3_lora.optim import load_optimizer_state
    (tmp_path / "trainer_state.json").write_text(json.dumps({"num_processes": 1}))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: not the trainer state this toolkit saves"):
        read_trainer_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text("[1]")
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: not the trainer state this toolkit saves"):
        read_trainer_state(tmp_path)
    rank4, rank16 = torch.nn.Parameter(torch.ones(4, 8)), torch.nn.Parameter(torch.ones(16, 8))
    saved = torch.optim.AdamW([rank4])
    rank4.grad = torch.ones_like(rank4)
    saved.step()
    optimizer = torch.optim.AdamW([rank16])
    with pytest.raises(ckpt.CheckpointError, match=r"^optimizer.pt: its 'exp_avg' of parameter 0 has shape \(4, 8\), "
                                                   r"the parameter \(16, 8\): the state of another model or rank$"):
        load_optimizer_state(optimizer, saved.state_dict(), source="optimizer.pt")
    assert optimizer.state_dict()["state"] == {}


def test_a_fresh_run_over_a_finished_one_says_so_and_drops_its_summary(tmp_path, capsys):
    """A fresh start where a finished run lives: a note says its adapter is replaced at the end, and its
    summary.json goes at once with its metrics, so no file describes a run the directory no longer holds."""
    from conftest import in_process_trainer
    cfg = load_config(None, [f"output_dir={tmp_path}", *RUN, "training.max_steps=2"])
    in_process_trainer(cfg).train()
    assert (tmp_path / "summary.json").is_file()
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    in_process_trainer(cfg)  # set up, not trained: as if killed before its end
    note = f"note: {tmp_path} holds an earlier run's adapter; this run replaces it when it ends"
    assert note in capsys.readouterr().out
    assert not (tmp_path / "summary.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
