"""benchmarks/gpu_bench.py: its CPU plumbing end to end (ours and trl on a tiny model), its clock and its goals.

The GPU figures themselves (CUDA peaks, MFU) need a GPU; here the same code paths run on the CPU, and
the goal checks are fed runs with GPU-like figures.
"""

from __future__ import annotations

import importlib.util
import gzip
import json
import math
import re
import sys

import pytest

from conftest import ROOT, run_script

SPEC = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
gpu_bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_bench)


def test_ours_and_trl_train_the_same_tokens_and_report(tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed (pip install -e '.[bench]'): the benchmark's other side needs it")
    seq, warmup, steps = 96, 2, 3
    model = tmp_path / "model"
    gpu_bench.main(["make-model", "--dir", str(model), "--shape", "tiny", "--require", "trl"])
    results = {}
    for side in ("ours", "trl"):
        out = tmp_path / f"{side}.json"
        run_script([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), side, "--model", str(model),
                    "--recipe", str(ROOT / "configs" / "phi3-mini-4k-lora.yaml"), "--seq", str(seq),
                    "--warmup", str(warmup), "--steps", str(steps), "--label", f"{side}-bf16-{seq}-ckpt",
                    "--out", str(out), "--profile", str(tmp_path / f"{side}.profile"),
                    "--set", "training.gradient_checkpointing=true"], timeout=300)
        results[side] = json.loads(out.read_text())
    ours, trl = results["ours"], results["trl"]
    for side in ("ours", "trl"):  # --profile: the last two of the 5 steps (recording step n is labelled n - 1)
        table = (tmp_path / f"{side}.profile").read_text()
        assert re.match(r"2 steps profiled in \d+\.\d{3} s of wall time\n\nProfilerStep#3: .* GPU busy \d+\.\d ms .*"
                        r"operator calls by thread \d", table), table[:300]
        assert "aten::mm" in table and "sorted by self_cpu_time_total" in table
        with gzip.open(tmp_path / f"{side}.profile.trace.json.gz", "rt") as f:
            profiled = {e["name"] for e in json.load(f)["traceEvents"] if e["name"].startswith("ProfilerStep")}
        assert profiled == {f"ProfilerStep#{warmup + steps - 2}", f"ProfilerStep#{warmup + steps - 1}"}, profiled
        assert results[side]["profiled"] is True

    for r in (ours, trl):
        assert (r["warmup_steps"], r["timed_steps"], len(r["step_seconds"])) == (warmup, steps, steps)
        assert r["timed_tokens"] == steps * seq  # batch 1, every row exactly seq tokens
        assert r["tokens_per_second"] > 0
        assert r["tokens_per_second"] == pytest.approx(r["timed_tokens"] / r["timed_seconds"])
        assert 0 < r["in_step_fraction"] <= 1
        assert math.isfinite(r["final_train_loss"])
        assert (r["device"], r["mfu"], r["peak_memory_kind"]) == ("cpu", None, "cpu_peak_rss")  # no peak FLOPs known
        assert r["peak_gb"] > 0
        assert (r["mode"], r["gradient_checkpointing"], r["dtype"]) == ("lora_bf16", True, "float32")
        assert r["supervised_per_row"] == [seq - 1]  # every token a target on both sides
    # the same rows, adapters and FLOP count on both sides
    for key in ("rows", "rows_sha256", "adapter_parameters", "flops_per_token", "attention", "optimizer"):
        assert ours[key] == trl[key], key
    # the same model, rows and hyperparameters: 5 steps later the losses agree to 2% (they start at ln 320)
    assert ours["final_train_loss"] == pytest.approx(trl["final_train_loss"], rel=0.02)
    assert ours["estimate_gb"] > 0 and "estimate_gb" not in trl

    report = tmp_path / "report.json"
    gpu_bench.main(["report", str(tmp_path / "ours.json"), str(tmp_path / "trl.json"), "--goals", "issue8",
                    "--json", str(report)])
    written = json.loads(report.read_text())
    assert written["device"] == "cpu" and [r["label"] for r in written["runs"]] == [ours["label"], trl["label"]]
    # the same report from bench_lib.sh's one-run-a-line file (each JSON with its newlines removed)
    runs_jsonl = tmp_path / "gpu_bench.runs.jsonl"
    runs_jsonl.write_text("".join((tmp_path / f"{side}.json").read_text().replace("\n", "") + "\n"
                                  for side in ("ours", "trl")))
    gpu_bench.main(["report", str(runs_jsonl), "--goals", "issue8", "--json", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert (again["runs"], again["goals"], again["versions"]) == (written["runs"], written["goals"], ours["versions"])
    assert all(written["versions"][k] for k in ("torch", "transformers", "peft", "trl"))
    by_goal = {g["goal"]: g for g in written["goals"]}
    ratio = ours["tokens_per_second"] / trl["tokens_per_second"]
    against_trl = by_goal["LoRA-bf16 tokens/s >= 1.3x trl's on the same settings"]
    assert (against_trl["run"], against_trl["met"]) == (ours["label"], ratio >= 1.3)
    assert against_trl["value"].startswith(f"{ratio:.2f}x")
    assert by_goal["LoRA-bf16 MFU >= 40% at seq 4096 without checkpointing"]["met"] is None  # no such run


def test_trace_summary_counts_overlapping_kernels_once_and_names_their_operators():
    """A hand-made trace: one step of 10 ms, two kernels of one mm overlapping (2-5 and 4-6 ms), a 2 ms gap,
    then an add's kernel (8-9 ms); a kernel launched before the step is not the step's."""
    def op(name, ts, dur, ext, tid=1):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "tid": tid,
                "args": {"External id": ext}}

    def kernel(ts, dur, ext, correlation, launched_at):
        return [{"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"External id": ext,
                 "correlation": correlation}},
                {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": launched_at, "dur": 5,
                 "tid": 1, "args": {"correlation": correlation}}]
    events = [{"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#4", "ts": 0, "dur": 10_000, "tid": 1},
              op("aten::linear", 100, 500, 7), op("aten::mm", 150, 300, 7), op("aten::add", 700, 50, 8),
              op("autograd::engine::evaluate_function: MmBackward0", 800, 20, 9, tid=2),
              *kernel(2_000, 3_000, 7, 1, 200), *kernel(4_000, 2_000, 7, 2, 300),
              *kernel(8_000, 1_000, 8, 3, 720), *kernel(-5_000, 1_000, 8, 4, -6_000)]
    lines = gpu_bench.trace_summary({"traceEvents": events})
    assert lines[0] == ("ProfilerStep#4: 10.0 ms, GPU busy 5.0 ms (50%; union of 3 kernels and copies), idle "
                        "before and between them 4.0 ms (2 gaps over 1 ms), operator calls by thread 3 + 1")
    assert lines[1:] == ["        5.00 ms  aten::mm", "        1.00 ms  aten::add"]  # mm: 3 + 2 ms, overlap or not


def test_step_profiler_records_the_last_steps_and_writes_after_them(tmp_path):
    """8 steps (2 warm-up + 6 timed): the last 3 are recorded, and the trace is processed and written in the
    step() after the last step's work, which StepClock calls after its last reading: in no timed step."""
    import torch
    path = tmp_path / "profile.txt"
    written_before = []
    with gpu_bench.step_profiler(str(path), warmup=2, steps=6) as profiler:
        for _ in range(8):
            torch.ones(3, 3) @ torch.ones(3, 3)
            written_before.append(path.exists())
            profiler.step()
    assert written_before == [False] * 8 and path.read_text().startswith("3 steps profiled in ")
    with gzip.open(f"{path}.trace.json.gz", "rt") as f:
        labels = {e["name"] for e in json.load(f)["traceEvents"] if e["name"].startswith("ProfilerStep")}
    assert labels == {"ProfilerStep#5", "ProfilerStep#6", "ProfilerStep#7"}  # steps 6-8: step n is labelled n - 1


def test_step_clock_times_the_steps_after_warmup():
    clock = gpu_bench.StepClock()
    clock.begins, clock.ends = [0.0, 1.0, 3.0, 6.0], [0.5, 2.0, 4.0, 7.0]
    figures = clock.figures(1, [10, 20, 20, 20])
    # timed: the end of step 0 (0.5) to the end of step 3 (7.0); inside the steps: 1 + 1 + 1 of those 6.5 s
    assert figures["timed_seconds"] == 6.5 and figures["timed_tokens"] == 60
    assert figures["tokens_per_second"] == pytest.approx(60 / 6.5)
    assert figures["in_step_fraction"] == pytest.approx(3 / 6.5)
    assert figures["step_seconds"] == [1.5, 2.0, 3.0]
    with pytest.raises(SystemExit, match="too few"):
        clock.figures(4, [10, 20, 20, 20])
    clock.close()


def test_step_clock_counts_the_garbage_collections_inside_timed_steps():
    """A full collection inside a timed step is reported with its generation; those in warm-up steps and
    between steps are not."""
    import gc
    clock = gpu_bench.StepClock()
    try:
        for step in range(3):
            clock.step_begin()
            gc.collect(2 if step else 1)  # step 0 is the warm-up
            clock.step_end()
            gc.collect(1)  # between steps
        collections = clock.figures(1, [5, 5, 5])["gc_in_timed_steps"]
    finally:
        clock.close()
    assert clock._garbage_collection not in gc.callbacks
    assert collections.keys() == {"2"} and collections["2"]["count"] == 2 and collections["2"]["seconds"] > 0


def test_step_clock_counts_python_calls_in_the_last_steps_only():
    """--count-calls: cProfile counts the Python function calls of the steps from count_calls_from on, per step;
    without it the figure is None."""
    def calls(n):
        for _ in range(n):
            len([])  # one C function call each

    clock = gpu_bench.StepClock(count_calls_from=2)
    for step in range(4):
        clock.step_begin()
        calls(1000 if step < 2 else 10)  # the counted steps make few calls; the first two many
        clock.step_end()
    figures = clock.figures(1, [5, 5, 5, 5])
    clock.close()
    assert clock.steps_counted == 2 and 10 <= figures["python_calls_per_step"] < 100
    plain = gpu_bench.StepClock()
    plain.begins, plain.ends = [0.0, 1.0], [0.5, 2.0]
    assert plain.figures(1, [5, 5])["python_calls_per_step"] is None
    plain.close()


def test_make_model_names_every_package_that_does_not_import(tmp_path, monkeypatch):
    """A carried wheel whose dependency is missing fails make-model at once, naming it (not each run later)."""
    (tmp_path / "needs_httpx2.py").write_text("import httpx2_not_here\n")
    (tmp_path / "raises_on_init.py").write_text("raise RuntimeError('libfoo.so.13: cannot open shared object')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        gpu_bench.check_imports(["json", "needs_httpx2", "raises_on_init"])
    assert str(stop.value) == ("installed but not working: needs_httpx2 (ModuleNotFoundError: No module named "
                               "'httpx2_not_here'); raises_on_init (RuntimeError: libfoo.so.13: cannot open shared "
                               "object)")
    gpu_bench.check_imports(["json", "datasets", "bitsandbytes"])  # a map and an NF4 round trip work here (CPU)


def test_no_paged_replaces_only_a_paged_optimizer(tmp_path, capsys):
    """check-paged's fallback (--no-paged): the consumer QLoRA recipe's paged 8-bit AdamW runs as plain
    8-bit AdamW, a recipe without a paged optimizer is untouched."""
    def optimizer(recipe, *flags):
        """The optimizer a run of ``recipe`` gets, and whether a paged one was replaced (the results' flag)."""
        args = gpu_bench.parser().parse_args(["ours", "--model", str(tmp_path), "--recipe", str(ROOT / recipe),
                                              "--seq", "64", "--label", "x", "--out", str(tmp_path / "x.json"),
                                              *flags])
        return gpu_bench.bench_config(args, tmp_path).training.optimizer, args.paged_replaced
    assert optimizer("configs/phi3-mini-4k-qlora-consumer.yaml") == ("paged_adamw_8bit", False)
    assert optimizer("configs/phi3-mini-4k-qlora-consumer.yaml", "--no-paged") == ("adamw_8bit", True)
    assert optimizer("configs/phi3-mini-4k-qlora-consumer.yaml", "--no-paged", "--set",
                     "training.optimizer=paged_adamw_32bit") == ("adamw_torch", True)
    assert optimizer("configs/phi3-mini-4k-lora.yaml", "--no-paged") == ("adamw_torch", False)  # nothing paged
    gpu_bench.main(["check-paged"])  # on the CPU nothing is paged: it says so and succeeds
    assert "nothing to check" in capsys.readouterr().out


def test_dynamo_counters_explain_a_compiled_run():
    """What a compiled run records: a function with one graph break, compiled (eager backend: no codegen),
    called with two dtypes (a recompilation of both halves): 4 frame compilations, 4 graphs, 2 graph breaks,
    each reason on one line."""
    import torch
    from torch._dynamo.utils import counters

    def step(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x + 1
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="eager")
    compiled(torch.ones(3))
    compiled(torch.ones(3, dtype=torch.float64))
    compiled(torch.ones(3, dtype=torch.float64))  # no more compilation
    dynamo = gpu_bench.dynamo_counters()
    torch._dynamo.reset()
    assert dynamo["frames"] == {"total": 4, "ok": 4} and dynamo["stats"]["unique_graphs"] == 4
    [(reason, count)] = dynamo["graph_break"].items()
    assert count == 2 and reason == "Call to `torch._dynamo.graph_break()`"
    assert gpu_bench.compiled_what({"dynamo": dynamo}) == "; compiled: 4 frame compilations, 4 graphs, 2 graph breaks"
    assert gpu_bench.compiled_what({}) == ""


def _run(label, side, mode, seq, ckpt, tokens_per_second, mfu=None, peak_gb=5.0, estimate_gb=None, variant=""):
    return {"label": label, "side": side, "mode": mode, "seq": seq, "gradient_checkpointing": ckpt,
            "tokens_per_second": tokens_per_second, "mfu": mfu, "peak_gb": peak_gb,
            "peak_memory_kind": "cuda_max_allocated", "estimate_gb": estimate_gb, "variant": variant}


def test_issue8_goals_on_gpu_like_figures():
    runs = [_run("ours-4096", "ours", "lora_bf16", 4096, False, 23000, mfu=0.41, peak_gb=40.0),
            _run("trl-4096", "trl", "lora_bf16", 4096, False, 16000, mfu=0.29),
            _run("ours-2048-ckpt", "ours", "lora_bf16", 2048, True, 15000, peak_gb=10.6),
            _run("trl-2048-ckpt", "trl", "lora_bf16", 2048, True, 12500),
            _run("qlora-2048", "ours", "qlora", 2048, True, 9000),
            # an EXTRA_RUNS variant: compared with its plain twin, never judged against the goals
            _run("ours-4096-whole", "ours", "lora_bf16", 4096, False, 30000, mfu=0.5, variant="whole")]
    assert gpu_bench.plain_twin(runs, runs[-1])["label"] == "ours-4096" and gpu_bench.plain_twin(runs, runs[0]) is None
    checks = [(g["run"], g["met"]) for g in gpu_bench.issue8_goals(runs)]
    assert checks == [("ours-4096", True),          # MFU 41% >= 40%
                      ("ours-2048-ckpt", False),    # 10.6 GB > 10.5 GB
                      ("ours-4096", True),          # 23000 / 16000 = 1.44x
                      ("ours-2048-ckpt", False)]    # 15000 / 12500 = 1.2x
    assert gpu_bench.speedup(runs, runs[0]) == pytest.approx(23000 / 16000)
    assert gpu_bench.speedup(runs, runs[4]) is None  # no trl run of QLoRA


def test_issue4_goals_on_gpu_like_figures():
    runs = [_run("qlora-2048", "ours", "qlora", 2048, True, 9000, peak_gb=5.0, estimate_gb=5.5),
            _run("bf16-2048", "ours", "lora_bf16", 2048, True, 12000, peak_gb=10.0, estimate_gb=8.0),
            _run("qlora-4096", "ours", "qlora", 4096, True, 7000, peak_gb=6.6, estimate_gb=6.6)]
    checks = {(g["goal"], g["run"]): g["met"] for g in gpu_bench.issue4_goals(runs)}
    assert checks == {("estimate within 15% of the measured peak", "qlora-2048"): True,     # +10%
                      ("estimate within 15% of the measured peak", "bf16-2048"): False,     # -20%
                      ("estimate within 15% of the measured peak", "qlora-4096"): True,
                      ("QLoRA peak <= 5.5 GB at seq 2048", "qlora-2048"): True,
                      ("QLoRA peak <= 6.5 GB at seq 4096", "qlora-4096"): False,
                      ("QLoRA tokens/s >= 0.8x LoRA-bf16's", "qlora-2048"): False}          # 0.75x
