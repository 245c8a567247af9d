"""Training runs for the checkpoint and resume tests: start one, stop it mid-run, resume it, compare it with an
uninterrupted one (the steps' losses and the adapter it saved)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TRAIN, load_adapter_tensors, read_metrics
from phi3_lora import checkpoint as ckpt

# 40 examples in steps of 4: an epoch is 10 steps, so 16 steps cross an epoch boundary.
RUN = ["data.demo_size=40", "data.eval_size=0", "training.eval_steps=0",
       "model.tiny_hidden_size=64", "data.max_seq_len=256", "training.max_steps=16", "training.learning_rate=2e-3",
       "training.logging_steps=3"]


def start(out, *overrides, launcher=None):
    args = (launcher or [sys.executable]) + [str(TRAIN), f"output_dir={out}", *RUN, *overrides]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_step(out: Path, step: int, proc, timeout=300):
    """Block until metrics.jsonl shows ``step`` (logged every 3rd step, so the stop lands mid-window)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[0][-3000:]}")
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def uninterrupted(tmp_path_factory, name, *overrides, launcher=None):
    out = tmp_path_factory.mktemp(name)
    code, log = finish(start(out, *overrides, launcher=launcher))
    assert code == 0, log[-3000:]
    return out


def preempt_and_resume(out, stop_after, *overrides, launcher=None, sig=signal.SIGTERM):
    proc = start(out, "training.save_steps=100", *overrides, launcher=launcher)
    wait_for_step(out, stop_after, proc)
    os.killpg(proc.pid, sig) if launcher is None else proc.send_signal(sig)
    code, log = finish(proc)
    assert "preempted: stopped by" in log, log[-3000:]
    if launcher is None:
        assert code == ckpt.EXIT_PREEMPTED
    saved = ckpt.complete_checkpoints(out)
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) >= stop_after
    code, log = finish(start(out, "training.save_steps=100", "training.resume_from=auto", *overrides,
                             launcher=launcher))
    assert code == 0, log[-3000:]
    assert f"resumed from {saved[0]}" in log
    return int(saved[0].name.split("-")[1])


def assert_identical(reference, resumed, tol=0.0):
    ref = [(m["step"], m["loss"]) for m in read_metrics(reference) if "loss" in m]
    got = [(m["step"], m["loss"]) for m in read_metrics(resumed) if "loss" in m]
    assert [s for s, _ in got] == [s for s, _ in ref]  # no duplicate or missing steps after the resume
    for (step, a), (_, b) in zip(ref, got):
        assert b == pytest.approx(a, rel=tol, abs=0 if tol == 0 else 1e-12), f"step {step}"
    a, b = load_adapter_tensors(reference), load_adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        if tol == 0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(b[key], a[key], rtol=tol, atol=1e-9)
