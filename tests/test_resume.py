"""Exact resumption: a run stopped mid-way (SIGTERM, or SIGKILL at any moment, checkpoint writes included) and
resumed ends bit-identical to one never stopped: one process, DeepSpeed ZeRO-2/3 on two, loralib, DoRA."""

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from conftest import ROOT, accelerate_launch, load_adapter_tensors, read_metrics
from phi3_lora import checkpoint as ckpt
from training_runs import assert_identical, finish, preempt_and_resume, start, uninterrupted


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory, "reference", "lora.dropout=0.1")


def test_exact_resume_in_the_second_epoch(reference, tmp_path):
    """SIGTERM in the second epoch (the accelerate#2016 trap replays epoch 0's order there): the resumed
    run is bit-identical, dropout included."""
    saved_at = preempt_and_resume(tmp_path, 12, "lora.dropout=0.1")
    assert 12 <= saved_at < 16
    assert_identical(reference, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 16
    # the summary's tokens and rate cover both attempts: the first one's time (12+ of 16 steps) counts too
    assert summary["supervised_tokens"] == json.loads((reference / "summary.json").read_text())["supervised_tokens"]
    assert summary["wall_time_seconds"] > summary["wall_time_this_attempt_seconds"] > 0
    assert summary["supervised_tokens_per_second"] == pytest.approx(summary["supervised_tokens"]
                                                                    / summary["wall_time_seconds"])


def test_exact_resume_in_the_first_epoch_and_tensorboard_continues(reference, tmp_path):
    """SIGTERM after step 6, mid logging window: bit-identical after the resume, across the epoch boundary
    at step 10; TensorBoard shows every logged step once, with the uninterrupted run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    saved_at = preempt_and_resume(tmp_path, 6, "lora.dropout=0.1")
    assert 6 <= saved_at < 10
    assert_identical(reference, tmp_path)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [3, 6, 9, 12, 15, 16]
    values = {e.step: e.value for e in acc.Scalars("train/loss")}
    expected = {m["step"]: m["loss"] for m in read_metrics(reference) if "loss" in m}
    assert values == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_exact_resume_deepspeed_two_processes(tmp_path_factory, tmp_path, stage):
    launcher = accelerate_launch(2, "--config_file", str(ROOT / "accelerate_configs" / f"deepspeed_{stage}.yaml"))
    common = ["training.per_device_batch_size=2", "lora.dropout=0.1"]  # dropout: each rank's RNG restored as its own
    reference = uninterrupted(tmp_path_factory, f"ds_{stage}", *common, launcher=launcher)
    preempt_and_resume(tmp_path, 6, *common, launcher=launcher)
    assert_identical(reference, tmp_path, tol=1e-6)
    assert json.loads((tmp_path / "summary.json").read_text())["num_processes"] == 2


def _written_since(root: Path, since: float, temporary: bool) -> bool:
    """An entry of the checkpoints folder (a hidden .tmp one only, if ``temporary``) changed after ``since``."""
    try:
        return any(p.stat().st_mtime >= since for p in root.iterdir() if not temporary or p.name.endswith(".tmp"))
    except FileNotFoundError:  # no folder yet, or an entry renamed or rotated away while we looked
        return False


def test_crash_safety_under_sigkill(reference, tmp_path):
    """Ten SIGKILLs at random moments, half of them while a checkpoint is being written; every time
    resume_from=auto finds a complete checkpoint, and the final adapter equals an uninterrupted run's."""
    rng = random.Random(0)
    root = ckpt.checkpoints_root(tmp_path)
    kills_during_save, newest = 0, []
    for attempt in range(10):
        started = time.time()
        proc = start(tmp_path, "lora.dropout=0.1", "training.save_steps=1", "training.save_total_limit=2",
                     "training.resume_from=auto")
        # kill as soon as this attempt writes a checkpoint (a stale .tmp of the last one does not count), or at a
        # random moment once it trains (start-up takes 5-8 s here; the 16 steps then take about 2)
        writing = attempt % 2 == 0
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not _written_since(root, started, writing):
            time.sleep(0.001)
        if writing:
            kills_during_save += proc.poll() is None
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        complete = ckpt.complete_checkpoints(tmp_path)
        for path in complete:
            ckpt.verify_checkpoint(path)  # every checkpoint that looks complete is complete
        newest.append(complete[-1] if complete else None)
    assert kills_during_save >= 3
    # the runs made progress through their checkpoints: the newest complete one never went back
    steps = [int(p.name.split("-")[1]) if p else 0 for p in newest]
    assert steps == sorted(steps) and steps[-1] > 0, steps
    code, log = finish(start(tmp_path, "lora.dropout=0.1", "training.save_steps=1", "training.save_total_limit=2",
                             "training.resume_from=auto"))
    assert code == 0, log[-3000:]
    assert f"resumed from {newest[-1]} at step {steps[-1]} " in log  # not a fresh start that happens to match
    assert_identical(reference, tmp_path)



def test_exact_resume_loralib_backend(tmp_path_factory, tmp_path):
    """The cookbook's loralib backend resumes exactly too (q,v-only MergedLinear, lora_state_dict files)."""
    loralib = ["lora.backend=loralib", "lora.qkv_enable=[true,false,true]", "lora.dropout=0.1"]
    reference = uninterrupted(tmp_path_factory, "loralib_reference", *loralib)
    preempt_and_resume(tmp_path, 6, *loralib)
    assert_identical(reference, tmp_path)
    assert (tmp_path / "adapter" / "loralib_adapter.safetensors").is_file()


def test_exact_resume_dora(tmp_path_factory, tmp_path):
    """DoRA's magnitude vectors are resumed too (peft's file names them differently from the model)."""
    dora = ["lora.use_dora=true", "lora.dropout=0.1"]
    reference = uninterrupted(tmp_path_factory, "dora_reference", *dora)
    preempt_and_resume(tmp_path, 6, *dora)
    assert_identical(reference, tmp_path)
    magnitudes = [k for k in load_adapter_tensors(tmp_path) if k.endswith(".lora_magnitude_vector")]  # peft's names
    assert len(magnitudes) == 2 * 4  # 2 layers x 4 targets

