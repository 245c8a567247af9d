"""Our loop and trl's SFTTrainer on one GPU: tokens/s, MFU, peak memory and final loss of each run.

Driven by ``benchmarks/gpu_bench.sh`` (issue 8: LoRA-bf16 and QLoRA, ours next to trl) and
``benchmarks/gpu_qlora.sh`` (issue 4: QLoRA's peak next to the estimator's); read those first. Each
run is one process, so that each peak is its own:

    python benchmarks/gpu_bench.py make-model --dir DIR [--shape phi3-mini|tiny|tiny-deep] [--require trl bitsandbytes]
        a randomly initialised Phi-3-mini of the real shape (speed and memory do not depend on the
        weights' values; no download), built in bf16 directly on the GPU, saved with the byte-level
        tokenizer of phi3_lora.tiny; reused when DIR already holds it. Fails at once, saying what to
        install, when CUDA (for the real shape) or a package the runs need is missing.
    python benchmarks/gpu_bench.py check-paged
        one step of bitsandbytes' paged 8-bit AdamW with its states in CUDA managed memory, which some
        GPU sandboxes refuse or stall on; bench_lib.sh runs it under a timeout and, if it fails, runs
        the recipes' paged optimizers unpaged (--no-paged), and the results say so.
    python benchmarks/gpu_bench.py ours --model DIR --recipe YAML --seq 4096 --label NAME --out r.json \\
            [--warmup 3] [--steps 10] [--no-paged] [--set KEY=VALUE ...]
        our loop (phi3_lora.loop.Trainer) with the recipe, the benchmark's settings below, then --set
    python benchmarks/gpu_bench.py trl ...same arguments...
        trl's SFTTrainer + peft with the settings of the same resolved config (unquantized base only)
    python benchmarks/gpu_bench.py ours|trl ... --profile PATH
        the same run, its last (up to 3) timed steps under torch.profiler: the busiest operators to PATH (after
        the trace summary below), the Chrome trace to PATH.trace.json.gz; the run is marked profiled
    python benchmarks/gpu_bench.py trace-summary PATH.trace.json.gz
        per profiled step: its wall time, how long the GPU was busy (the union of kernel and copy
        intervals), the idle gaps, operator calls per thread, and GPU time by the launching operator
    python benchmarks/gpu_bench.py report r1.json r2.json runs.jsonl ... --goals issue8 --json gpu_bench.json
        the table, the goals of issue 8 (or issue4) checked, one JSON with device, versions and date;
        a .jsonl holds one run a line (bench_lib.sh appends each run there as it ends, so that the
        report can be rebuilt from whatever finished)

Measured the same way on both sides:

* the work: batch 1, no accumulation, every row exactly ``--seq`` tokens after the chat template
  (synthetic conversations longer than that, truncated; checked, and a digest of the rows is kept
  so both sides can be shown to train on the same tokens), every token supervised (ours with
  ``data.train_on_prompt=true``, trl's default for conversations): seq - 1 targets a step. trl gets
  its LoRA (``phi3_lora.lora.peft_config``), learning rate, schedule, optimizer, seed, gradient
  checkpointing (non-reentrant), attention kernel and dtype from the same resolved config as ours.
* tokens/s: the tokens of the timed steps over their wall time. The clock is read at the start and
  the end of each optimizer step after ``torch.cuda.synchronize`` (our ``Trainer.train_step``, trl's
  ``on_step_begin``/``on_step_end``); the timed wall time runs from the end of the last of the
  ``--warmup`` untimed steps to the end of the last step, so it includes what happens between steps
  (batching, logging). ``in_step_fraction`` says how much of it was inside the steps.
* MFU: ``phi3_lora.metrics.train_flops_per_token`` (4 N for the frozen matmuls, 6 N for the
  adapters, causal attention within the model's sliding window) at ``--seq`` against the device's
  dense bf16 peak; none where the peak is unknown (the CPU).
* peak memory: ``torch.cuda.max_memory_allocated`` from the end of loading (base, adapters) to the
  end of training (bitsandbytes' paged optimizer states of 10^5 elements or more live in CUDA
  managed memory outside PyTorch's allocator and are not in it; the smaller ones are); on the CPU
  the process's peak RSS, loading included (``phi3_lora.metrics.peak_memory_gb``), a plumbing
  figure only.
* final loss: the training loss of the last step (both sides log every step).

Our runs also keep the estimator's prediction (``estimate_gb``, ``phi3_lora.memory``) and the loop's own
telemetry (``loop_tokens_per_second``: the median of ``metrics.jsonl``'s total tokens/s over the timed
steps), as cross-checks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# What the runs import, by module name -> the distribution pip installs it from.
REQUIRED = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
            "datasets": "datasets", "safetensors": "safetensors", "tensorboard": "tensorboard",
            "loralib": "loralib", "yaml": "pyyaml", "tqdm": "tqdm"}
OPTIONAL = {"trl": "trl", "bitsandbytes": "bitsandbytes"}  # asked for with make-model --require
VERSIONS = ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets", "huggingface_hub",
            "tokenizers", "pyarrow", "fsspec")
IGNORE_INDEX = -100

# Issue 8 (LoRA-bf16 speed and memory, against trl) and issue 4 (QLoRA memory and the estimator).
ISSUE8 = {"mfu": 0.40, "mfu_seq": 4096, "peak_gb": 10.5, "peak_seq": 2048, "speedup": 1.3}
ISSUE4 = {"qlora_peak_gb": {2048: 5.5, 4096: 6.5}, "qlora_vs_bf16": 0.8, "estimate_error": 0.15}


# ----------------------------------------------------------------------------- the model and the data

def make_model(args) -> None:
    missing = sorted({dist for module, dist in {**REQUIRED, **{m: OPTIONAL[m] for m in args.require}}.items()
                      if importlib.util.find_spec(module) is None})
    if missing:
        raise SystemExit(f"missing Python packages: {', '.join(missing)} — install them with "
                         "pip install -e '.[bench]' (on a machine without internet, carry their wheels)")
    check_imports(sorted({*REQUIRED, *args.require}))
    print("versions: " + ", ".join(f"{name} {version}" for name, version in versions().items()))
    import torch

    from phi3_lora.checkpoint import atomic_directory
    from phi3_lora.tiny import tiny_tokenizer
    from transformers import Phi3ForCausalLM

    if args.shape not in TINY_LAYERS and not torch.cuda.is_available():
        raise SystemExit(f"no CUDA GPU here: the {args.shape} benchmark needs one (SHAPE=tiny runs the same "
                         "plumbing on the CPU with a tiny model)")
    config = model_config(args.shape)
    directory = Path(args.dir)
    if is_built(directory, config):
        print(f"reusing the random {args.shape} model in {directory}")
        return
    start = time.perf_counter()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialised directly in bf16 on the GPU: seconds, not minutes on the CPU
        model = Phi3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    with atomic_directory(directory) as tmp:  # an interrupted build is never mistaken for a whole one
        model.save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    print(f"random {args.shape} ({params / 1e6:,.1f}M parameters, bf16) built on {device} and saved to {directory} "
          f"in {time.perf_counter() - start:.0f}s")


def check_imports(modules: list[str]) -> None:
    """Import each of ``modules`` now, then run what the runs lean on once: a ``datasets`` map (over the
    machine's own pyarrow, which carried wheels cannot replace) and bitsandbytes' 4-bit kernels. An
    installed package that cannot work (a dependency missing from a carried wheel, an older pyarrow, a
    CUDA library that does not load) fails here in seconds, all of them in one message, not in every run
    after minutes."""
    import importlib

    broken = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # ImportError, or whatever a package raises while it initialises
            last_line = (str(err).strip().splitlines() or [""])[-1]
            broken.append(f"{module} ({type(err).__name__}: {last_line})")
    if not broken and "datasets" in modules:
        import datasets
        try:
            table = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]]})
            mapped = table.map(lambda row: {"input_ids": [7] * len(row["messages"])}, remove_columns=["messages"])
            if mapped["input_ids"] != [[7]]:
                raise RuntimeError(f"a one-row map gave {mapped['input_ids']}")
        except Exception as err:
            broken.append(f"datasets' map ({type(err).__name__}: {err})")
    if not broken and "bitsandbytes" in modules:
        import bitsandbytes.functional as bnb
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            weight = torch.randn(64, 64, dtype=torch.bfloat16, device=device)
            packed, state = bnb.quantize_4bit(weight, quant_type="nf4")
            if not (bnb.dequantize_4bit(packed, state, quant_type="nf4") - weight).abs().max() < 0.5:
                raise RuntimeError("an NF4 round trip of a random matrix is off by more than 0.5")
        except Exception as err:
            broken.append(f"bitsandbytes' 4-bit kernels on {device} ({type(err).__name__}: {err})")
    if broken:
        raise SystemExit(f"installed but not working: {'; '.join(broken)}")


def check_paged(args) -> None:
    """One step of bitsandbytes' paged 8-bit AdamW on a GPU parameter of 2^17 elements: states of 10^5
    elements or more live in CUDA managed memory (cudaMallocManaged), which no CPU test reaches and some
    GPU sandboxes refuse or stall on. Exits non-zero if the step fails or moves the parameter wrongly."""
    import torch
    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        print("paged optimizer: nothing to check (no bitsandbytes or no CUDA; nothing is paged then)")
        return
    import bitsandbytes as bnb
    param = torch.nn.Parameter(torch.ones(1 << 17, device="cuda"))
    param.grad = torch.ones_like(param)
    bnb.optim.PagedAdamW8bit([param], lr=0.1, weight_decay=0.0).step()  # Adam's first step: -lr * sign(grad)
    torch.cuda.synchronize()
    error = (param.detach() - 0.9).abs().max().item()
    if error > 1e-2:
        raise SystemExit(f"paged 8-bit AdamW's first step is off by {error:.3g} (expected every weight at 0.9)")
    print("paged optimizer: one step of PagedAdamW8bit with its states in CUDA managed memory works")


# The recipes' paged optimizers, unpaged (--no-paged): the same states in ordinary GPU memory.
UNPAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}


# The CPU shapes, 64 wide: tiny runs the plumbing; tiny-deep has Phi-3-mini's 32 layers, so per-operator overhead
# dominates its steps, as in the GPU's CPU-bound runs (seq 2048 with checkpointing).
TINY_LAYERS = {"tiny": 2, "tiny-deep": 32}


def model_config(shape: str):
    """Phi3Config of Phi-3-mini-4k-instruct (from phi3_lora.architectures), or of a tiny model."""
    from phi3_lora.architectures import known_shape
    from phi3_lora.tiny import tiny_phi3_config, tiny_tokenizer
    from transformers import Phi3Config

    if shape in TINY_LAYERS:
        return tiny_phi3_config(tiny_tokenizer(), layers=TINY_LAYERS[shape], hidden=64)
    s = known_shape("microsoft/Phi-3-mini-4k-instruct")
    return Phi3Config(vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                      num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                      num_key_value_heads=s.num_key_value_heads, max_position_embeddings=s.max_position_embeddings,
                      original_max_position_embeddings=s.original_max_position_embeddings, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                      sliding_window=2047, use_cache=False)


def is_built(directory: Path, config) -> bool:
    if not (directory / "config.json").is_file() or not (directory / "tokenizer_config.json").is_file():
        return False
    saved = json.loads((directory / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return all(saved.get(k) == getattr(config, k) for k in keys)


def write_long_chats(path: Path, seq: int, count: int) -> None:
    """Conversations whose assistant turn alone exceeds ``seq`` tokens (byte-level tokenizer: one a byte)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly vex the jumping frog".split()
    rows = []
    for k in range(count):
        text = " ".join(words[(k + j) % len(words)] for j in range(seq // 3))
        rows.append({"messages": [{"role": "user", "content": f"Tell me a long story, number {k}."},
                                  {"role": "assistant", "content": text}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def bench_config(args, work: Path):
    """The resolved config of a run: the recipe, then the benchmark's settings, then ``--set``.

    On the CPU the weights and 4-bit compute are float32 whatever the recipe says (bf16 matmuls are
    emulated there). With ``--no-paged`` a paged optimizer is replaced by its ``UNPAGED`` twin, and
    ``args.paged_replaced`` says whether one was.
    """
    import torch

    from phi3_lora.config import load_config

    data = work / "long_chats.jsonl"
    write_long_chats(data, args.seq, count=args.warmup + args.steps + 2)
    settings = [f"model.name_or_path={args.model}", "model.tokenizer=null", "model.attn_implementation=sdpa",
                f"data.path={data}", "data.split=train", "data.eval_path=null", "data.eval_split=null",
                "data.eval_size=0", f"data.max_seq_len={args.seq}", "data.train_on_prompt=true", "data.packing=false",
                "data.group_by_length=false", "training.per_device_batch_size=1",
                "training.per_device_eval_batch_size=1", "training.gradient_accumulation_steps=1",
                f"training.max_steps={args.warmup + args.steps}", "training.warmup_steps=1",
                "training.logging_steps=1", "training.eval_steps=0", "training.save_steps=0",
                f"output_dir={work / 'run'}"]
    cpu = [] if torch.cuda.is_available() else ["model.dtype=float32", "model.bnb_4bit_compute_dtype=float32"]
    cfg = load_config(args.recipe, settings + args.set + cpu)
    args.paged_replaced = args.no_paged and cfg.training.optimizer in UNPAGED
    if args.paged_replaced:
        unpaged = f"training.optimizer={UNPAGED[cfg.training.optimizer]}"
        cfg = load_config(args.recipe, settings + args.set + cpu + [unpaged])
    return cfg


def describe_rows(input_ids: list[list[int]], labels: list[list[int]], seq: int) -> dict:
    """Row count, supervised targets a row and a digest of the token ids (order-free) of the training rows."""
    lengths = sorted({len(ids) for ids in input_ids})
    if lengths != [seq]:
        raise SystemExit(f"training rows of {lengths} tokens: the benchmark needs every row exactly {seq} tokens")
    supervised = sorted({sum(label != IGNORE_INDEX for label in row[1:]) for row in labels})
    digest = hashlib.sha256(json.dumps(sorted(input_ids)).encode()).hexdigest()[:16]
    return {"rows": len(input_ids), "tokens_per_row": seq, "supervised_per_row": supervised, "rows_sha256": digest}


# ----------------------------------------------------------------------------- measuring

class StepClock:
    """Clock readings at the start and end of each optimizer step, after the GPU has finished its work."""

    def __init__(self, count_calls_from: int | None = None):
        import gc
        self.begins: list[float] = []
        self.ends: list[float] = []
        self.on_step_end = None  # called after each step's reading (the profiler's step)
        self.count_calls_from = count_calls_from  # from this step on (0-based), cProfile counts Python's calls
        self.calls, self.steps_counted = None, 0
        self.collections: list[tuple[int, int, float]] = []  # (step, generation, seconds) of each in-step collection
        self._collecting_since = None
        gc.callbacks.append(self._garbage_collection)

    def close(self) -> None:
        """Stop watching the garbage collector (a test makes several clocks in one process)."""
        import gc
        gc.callbacks.remove(self._garbage_collection)

    def _garbage_collection(self, phase: str, info: dict) -> None:
        """Python's garbage collections that run inside a step: a full one can stall a CPU-bound step."""
        if phase == "start":
            self._collecting_since = time.perf_counter()
        elif self._collecting_since is not None and len(self.begins) > len(self.ends):
            self.collections.append((len(self.ends), info["generation"], time.perf_counter() - self._collecting_since))

    def step_begin(self) -> None:
        self.begins.append(_synchronized_now())
        if self.count_calls_from is not None and len(self.ends) >= self.count_calls_from:
            import cProfile
            self.calls = self.calls or cProfile.Profile()
            self.calls.enable()

    def step_end(self) -> None:
        if self.calls is not None and len(self.ends) >= self.count_calls_from:
            self.calls.disable()
            self.steps_counted += 1
        self.ends.append(_synchronized_now())
        if self.on_step_end is not None:
            self.on_step_end()

    def python_calls_per_step(self) -> float | None:
        """Python function calls per step (C functions included) over the steps counted: where a GPU waits for
        the host (seq 2048 with checkpointing), the host's Python is much of the step."""
        if not self.steps_counted:
            return None
        import pstats
        return sum(calls for _, calls, *_ in pstats.Stats(self.calls).stats.values()) / self.steps_counted

    def figures(self, warmup: int, tokens: list[int]) -> dict:
        """Throughput of the steps after the first ``warmup``; ``tokens`` holds each step's tokens."""
        if len(self.ends) <= warmup or len(tokens) != len(self.ends):
            raise SystemExit(f"{len(self.ends)} steps timed ({len(tokens)} counted): too few for {warmup} "
                             "warm-up steps")
        wall = self.ends[-1] - self.ends[warmup - 1]
        inside = sum(end - begin for begin, end in zip(self.begins[warmup:], self.ends[warmup:]))
        timed_tokens = sum(tokens[warmup:])
        collections = {}
        for step, generation, seconds in self.collections:
            if step >= warmup:
                count, total = collections.get(str(generation), (0, 0.0))
                collections[str(generation)] = (count + 1, total + seconds)
        return {"warmup_steps": warmup, "timed_steps": len(self.ends) - warmup, "timed_tokens": timed_tokens,
                "timed_seconds": wall, "tokens_per_second": timed_tokens / wall, "in_step_fraction": inside / wall,
                "step_seconds": [round(b - a, 6) for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:])],
                "gc_in_timed_steps": {g: {"count": c, "seconds": round(t, 6)} for g, (c, t) in
                                      sorted(collections.items())},
                "python_calls_per_step": self.python_calls_per_step()}


@contextlib.contextmanager
def step_profiler(path: str | None, warmup: int, steps: int, clock: StepClock | None = None):
    """``torch.profiler`` over the last (up to 3) of the ``warmup`` + ``steps`` steps, after one step of the
    profiler's own warm-up (None: no profiling), stepped by ``clock`` after each of its readings when given.
    Writes PATH (``trace_summary``, then the busiest operators by device and by CPU time) and
    PATH.trace.json.gz. The recording stops, and is processed and written, after the last step's clock
    reading, so that work lands in no timed step; the profiled steps themselves are slowed, and the run's
    figures are marked so."""
    if not path:
        yield None
        return
    if steps < 2:
        raise SystemExit("--profile needs --steps 2 or more (one step to warm the profiler up, then the profiled)")
    active = min(3, steps - 1)
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def written(prof) -> None:
        events = prof.key_averages()
        wall = sum(e.cpu_time_total for e in events if e.key.startswith("ProfilerStep")) / 1e6  # steps end synced
        prof.export_chrome_trace(f"{path}.trace.json.gz")  # gzipped by torch for a .gz path
        lines = [f"{active} steps profiled in {wall:.3f} s of wall time", "",
                 *trace_summary(read_trace(f"{path}.trace.json.gz")), ""]
        for key in ("self_cuda_time_total", "self_cpu_time_total", "cpu_time_total"):
            lines += [f"--- sorted by {key}", events.table(sort_by=key, row_limit=30, max_name_column_width=60), ""]
        Path(path).write_text("\n".join(lines))
        print(lines[0])

    idle = warmup + steps - active - 1  # the profiler's own warm-up step, then the last `active` steps
    with profile(activities=activities, schedule=schedule(wait=idle, warmup=1, active=active, repeat=1),
                 on_trace_ready=written) as prof:
        if clock is not None:
            clock.on_step_end = prof.step
        yield prof


def trace_summary(trace: dict, top: int = 12) -> list[str]:
    """Lines describing each profiled step of a Chrome trace (``torch.profiler``'s export): wall time,
    GPU busy time as the union of the intervals of kernels and memory copies (overlaps count once), idle
    time and gaps over 1 ms, operator calls per thread, and GPU time by the innermost operator that
    launched the work."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep")),
                   key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    operators: dict = {}
    for e in events:
        if e.get("cat") == "cpu_op":
            operators.setdefault(e["args"].get("External id"), []).append(e)
    lines = []
    for step in steps:
        begin, end = step["ts"], step["ts"] + step["dur"]
        mine = [k for k in kernels if (launch := launches.get(k["args"].get("correlation"))) is not None
                and begin <= launch["ts"] <= end]
        busy = idle = 0.0
        covered = begin
        long_gaps = 0
        by_operator: dict = {}
        for k in mine:
            if k["ts"] > covered:
                idle += k["ts"] - covered
                long_gaps += k["ts"] - covered > 1000
            busy += max(0.0, k["ts"] + k["dur"] - max(k["ts"], covered))
            covered = max(covered, k["ts"] + k["dur"])
            launcher = operators.get(k["args"].get("External id"))
            name = min(launcher, key=lambda o: o["dur"])["name"] if launcher else "(no operator)"
            by_operator[name] = by_operator.get(name, 0.0) + k["dur"]
        calls = {step["tid"]: 0}  # operator calls by thread: the step's own first, then autograd's
        for e in events:
            if e.get("cat") == "cpu_op" and begin <= e["ts"] <= end:
                calls[e["tid"]] = calls.get(e["tid"], 0) + 1
        lines.append(f"{step['name']}: {step['dur'] / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms "
                     f"({busy / max(step['dur'], 1e-9):.0%}; union of {len(mine)} kernels and copies), idle before "
                     f"and between them {idle / 1e3:.1f} ms ({long_gaps} gaps over 1 ms), operator calls by thread "
                     + " + ".join(f"{n:,}" for n in calls.values()))
        for name, micros in sorted(by_operator.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {micros / 1e3:8.2f} ms  {name}")
    return lines or ["no profiled steps in this trace"]


def read_trace(path: str) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def print_trace_summary(args) -> None:
    print("\n".join(trace_summary(read_trace(args.trace))))


def _synchronized_now() -> float:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class PeakMemory:
    """The training peak: CUDA's allocator peak is reset once the model is loaded (its load peak kept)."""

    def loaded(self) -> None:
        import torch
        self.load_peak_gb = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.load_peak_gb = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()

    def figures(self) -> dict:
        import torch

        from phi3_lora.metrics import peak_memory_gb
        cuda = torch.cuda.is_available()
        return {"peak_memory_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss", "peak_gb": peak_memory_gb(),
                "reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
                "load_peak_gb": self.load_peak_gb}


def write_result(args, side: str, cfg, model_config, adapter_parameters: int, timing: dict, memory: dict,
                 final_loss: float | None, rows: dict, **extra) -> dict:
    """One run's figures (the fields every run has, then ``extra``) to ``--out``; printed too."""
    import torch

    from phi3_lora.metrics import mfu, peak_flops, train_flops_per_token
    from phi3_lora.model import resolve_dtype

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    flops = train_flops_per_token(model_config, args.seq, adapter_parameters)
    result = {"label": args.label, "side": side, "mode": "qlora" if cfg.model.load_in_4bit else "lora_bf16",
              "seq": args.seq, "gradient_checkpointing": cfg.training.gradient_checkpointing,
              "recipe": str(args.recipe), "overrides": args.set, "variant": args.variant, "device": device,
              "dtype": str(resolve_dtype(cfg.model.dtype)).removeprefix("torch."),
              "attention": cfg.model.attn_implementation, "optimizer": cfg.training.optimizer,
              "paged_replaced": args.paged_replaced, "profiled": bool(args.profile or args.count_calls), **timing,
              "flops_per_token": flops, "mfu": mfu(timing["tokens_per_second"], flops, peak_flops(device)),
              "adapter_parameters": adapter_parameters, **memory, "final_train_loss": final_loss, **rows,
              "versions": versions(), **extra}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.label}: {result['tokens_per_second']:.0f} tokens/s over {result['timed_steps']} steps, "
          f"MFU {_percent(result['mfu'])}, peak {_number(result['peak_gb'], 2)} GB, final loss "
          f"{_number(final_loss, 4)} -> {args.out}")
    return result


def calls_from(args) -> int | None:
    """With --count-calls, the first of the last (up to 3) timed steps, 0-based."""
    return args.warmup + args.steps - min(3, args.steps) if args.count_calls else None


def fresh_work_dir(out: str) -> Path:
    """``r.json``'s own directory ``r/`` (data, the run's outputs), emptied."""
    work = Path(out).with_suffix("")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


# ----------------------------------------------------------------------------- the two sides

def ours(args) -> None:
    from phi3_lora.loop import Trainer
    from phi3_lora.memory import estimate, model_shape

    work = fresh_work_dir(args.out)
    cfg = bench_config(args, work)
    clock, tokens = StepClock(calls_from(args)), []

    class TimedTrainer(Trainer):
        """Our Trainer with the benchmark's clock read around each optimizer step."""

        def train_step(self, batches):
            clock.step_begin()
            loss_sum, supervised, all_tokens, grad_norm = super().train_step(batches)
            clock.step_end()
            tokens.append(all_tokens)
            return loss_sum, supervised, all_tokens, grad_norm

    trainer = TimedTrainer(cfg)
    memory = PeakMemory()
    memory.loaded()
    with step_profiler(args.profile, args.warmup, args.steps, clock):
        summary = trainer.train()
    measured = memory.figures()
    predicted = estimate(cfg, model_shape(cfg)[0])
    logged = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    loop_rates = [m["total_tokens_per_second"] for m in logged if m.get("step", 0) > args.warmup
                  and "total_tokens_per_second" in m]
    dataset = trainer.train_data.dataset
    write_result(args, "ours", cfg, trainer.accelerator.unwrap_model(trainer.model).config, trainer.trainable_params,
                 clock.figures(args.warmup, tokens), measured, summary["final_train_loss"],
                 describe_rows(dataset["input_ids"], dataset["labels"], args.seq),
                 estimate_gb=(predicted.peak if trainer.eval_data is not None else predicted.training_peak) / 1e9,
                 estimate_parts_gb={k: getattr(predicted, k) / 1e9 for k in
                                    ("weights", "adapters", "gradients", "optimizer", "activations", "logits")},
                 loop_tokens_per_second=statistics.median(loop_rates) if loop_rates else None,
                 **({"dynamo": dynamo_counters()} if cfg.training.compile else {}))


def dynamo_counters() -> dict:
    """What torch.compile did in this run: frame compilations (each recompilation is one more), graphs, graph
    breaks by reason (its first line).

    A compiled run no faster than its eager twin is explained here: a graph break or a recompilation per
    decoder layer (past ``recompile_limit`` each further layer runs eagerly) shows as counts in the dozens.
    """
    from torch._dynamo.utils import counters
    return {group: {str(key).splitlines()[0][:200]: count for key, count in counters[group].most_common(10)}
            for group in ("frames", "stats", "graph_break", "unimplemented") if counters[group]}


def trl(args) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from phi3_lora.lora import parameter_counts, peft_config
    from phi3_lora.model import resolve_attention, resolve_dtype

    work = fresh_work_dir(args.out)
    cfg = bench_config(args, work)
    m, t = cfg.model, cfg.training
    if m.load_in_4bit or m.load_in_8bit or cfg.lora.backend != "peft":
        raise SystemExit("the trl side runs peft LoRA on an unquantized base only")
    clock = StepClock(calls_from(args))

    class Clock(TrainerCallback):
        """The benchmark's clock read around each optimizer step, as in our TimedTrainer."""

        def on_step_begin(self, args, state, control, **kwargs):
            clock.step_begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    dtype = resolve_dtype(m.dtype)
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(m.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=dtype,
                                                 attn_implementation=resolve_attention(m.attn_implementation))
    rows = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines()]
    from trl_sft import checkpointing_settings

    sft = SFTConfig(
        output_dir=str(work / "run"), max_steps=t.max_steps, per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type="constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm, seed=t.seed,
        optim="adamw_torch_fused" if t.optimizer == "adamw_torch" and cuda else t.optimizer,
        **checkpointing_settings(SFTConfig, t.gradient_checkpointing),
        bf16=dtype == torch.bfloat16, fp16=False, use_cpu=not cuda, max_length=cfg.data.max_seq_len,
        packing=False, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config(cfg.lora), callbacks=[Clock()])
    memory = PeakMemory()
    memory.loaded()
    with step_profiler(args.profile, args.warmup, args.steps, clock):
        trainer.train()
    measured = memory.figures()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    seen = [0] + [int(e["num_tokens"]) for e in logged]  # trl's own running count of the tokens trained on
    trainable, _ = parameter_counts(trainer.model)
    write_result(args, "trl", cfg, trainer.model.config, trainable,
                 clock.figures(args.warmup, [b - a for a, b in zip(seen, seen[1:])]), measured,
                 logged[-1]["loss"] if logged else None,
                 describe_rows(trainer.train_dataset["input_ids"], trainer.train_dataset["labels"], args.seq))


# ----------------------------------------------------------------------------- the report

def find(runs: list[dict], **fields) -> list[dict]:
    return [r for r in runs if all(r.get(k) == v for k, v in fields.items())]


def twin(runs: list[dict], run: dict, **fields) -> dict | None:
    """The first run with ``fields`` on the same settings as ``run`` (sequence length, checkpointing)."""
    found = find(runs, seq=run["seq"], gradient_checkpointing=run["gradient_checkpointing"], **fields)
    return found[0] if found else None


def trl_twin(runs: list[dict], run: dict) -> dict | None:
    """trl's run on the settings of our ``run`` (LoRA on the same base)."""
    return twin(runs, run, side="trl", mode=run["mode"]) if run["side"] == "ours" else None


def plain_twin(runs: list[dict], run: dict) -> dict | None:
    """Our run without a variant on the settings of the variant ``run``."""
    return twin(runs, run, side="ours", mode=run["mode"], variant="") if run.get("variant") else None


def speedup(runs: list[dict], run: dict) -> float | None:
    twin = trl_twin(runs, run)
    return run["tokens_per_second"] / twin["tokens_per_second"] if twin else None


def goal(text: str, run: dict | None, value: str | None, met: bool | None) -> dict:
    return {"goal": text, "run": run["label"] if run else None, "value": value, "met": met}


def checked(text: str, runs: list[dict], check) -> list[dict]:
    """``check(run)`` -> (value, met) for each of ``runs``, or one n/a line when none matches."""
    if not runs:
        return [goal(text, None, "no matching run", None)]
    return [goal(text, r, *check(r)) for r in runs]


def issue8_goals(runs: list[dict]) -> list[dict]:
    """MFU at seq 4096 without checkpointing, peak at 2048 with it, and tokens/s against trl."""
    g = ISSUE8

    def peak(r):
        on_gpu = r["peak_memory_kind"] == "cuda_max_allocated"
        return f"{r['peak_gb']:.2f} GB", r["peak_gb"] <= g["peak_gb"] if on_gpu else None

    def against_trl(r):
        ratio = speedup(runs, r)
        return f"{ratio:.2f}x (seq {r['seq']}, checkpointing {'on' if r['gradient_checkpointing'] else 'off'})", \
            ratio >= g["speedup"]

    return (checked(f"LoRA-bf16 MFU >= {g['mfu']:.0%} at seq {g['mfu_seq']} without checkpointing",
                    find(runs, side="ours", mode="lora_bf16", seq=g["mfu_seq"], gradient_checkpointing=False,
                         variant=""),
                    lambda r: (_percent(r["mfu"]), None if r["mfu"] is None else r["mfu"] >= g["mfu"]))
            + checked(f"LoRA-bf16 peak <= {g['peak_gb']} GB at seq {g['peak_seq']}, batch 1, with checkpointing",
                      find(runs, side="ours", mode="lora_bf16", seq=g["peak_seq"], gradient_checkpointing=True,
                           variant=""), peak)
            + checked(f"LoRA-bf16 tokens/s >= {g['speedup']}x trl's on the same settings",
                      [r for r in find(runs, side="ours", mode="lora_bf16", variant="") if trl_twin(runs, r)],
                      against_trl))


def issue4_goals(runs: list[dict]) -> list[dict]:
    """QLoRA's peak, its throughput against LoRA-bf16, and the estimator's error."""
    g = ISSUE4

    def error(r):
        e = (r["estimate_gb"] - r["peak_gb"]) / r["peak_gb"]
        return f"{e:+.0%} ({r['mode']}, seq {r['seq']})", abs(e) <= g["estimate_error"]

    def bf16_twin(q):
        return twin(runs, q, side="ours", mode="lora_bf16")

    def against_bf16(q):
        ratio = q["tokens_per_second"] / bf16_twin(q)["tokens_per_second"]
        return f"{ratio:.2f}x (seq {q['seq']})", ratio >= g["qlora_vs_bf16"]

    checks = checked(f"estimate within {g['estimate_error']:.0%} of the measured peak",
                     find(runs, side="ours", peak_memory_kind="cuda_max_allocated"), error)
    for seq, limit in g["qlora_peak_gb"].items():
        checks += checked(f"QLoRA peak <= {limit} GB at seq {seq}",
                          find(runs, side="ours", mode="qlora", seq=seq, peak_memory_kind="cuda_max_allocated"),
                          lambda r: (f"{r['peak_gb']:.2f} GB", r["peak_gb"] <= limit))
    return checks + checked(f"QLoRA tokens/s >= {g['qlora_vs_bf16']}x LoRA-bf16's",
                            [q for q in find(runs, side="ours", mode="qlora") if bf16_twin(q)], against_bf16)


GOALS = {"issue8": issue8_goals, "issue4": issue4_goals}


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def table(runs: list[dict]) -> list[str]:
    columns = [  # header, width, cell
        ("run", -26, lambda r: r["label"]), ("seq", 5, lambda r: str(r["seq"])),
        ("ckpt", 5, lambda r: "yes" if r["gradient_checkpointing"] else "no"),
        ("tokens/s", 9, lambda r: f"{r['tokens_per_second']:.0f}"),
        ("x trl", 6, lambda r: _number(speedup(runs, r), 2)), ("MFU", 6, lambda r: _percent(r["mfu"])),
        ("peak GB", 8, lambda r: _number(r["peak_gb"], 2)), ("reserved", 8, lambda r: _number(r["reserved_gb"], 2)),
        ("estimate", 8, lambda r: _number(r.get("estimate_gb"), 2)),
        ("final loss", 10, lambda r: _number(r["final_train_loss"], 4))]

    def line(cells):
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, columns))
    return [line([h for h, _, _ in columns])] + [line([cell(r) for _, _, cell in columns]) for r in runs]


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def read_runs(paths: list[str]) -> list[dict]:
    """The runs in ``paths``: a .json file holds one, a .jsonl file one a line."""
    runs = []
    for path in paths:
        text = Path(path).read_text()
        if path.endswith(".jsonl"):
            runs += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            runs.append(json.loads(text))
    return runs


def report(args) -> None:
    runs = read_runs(args.results)
    if not runs:
        raise SystemExit(f"no runs in {' '.join(args.results)}")
    device = runs[0]["device"]
    kind = ("torch.cuda.max_memory_allocated after loading" if device != "cpu"
            else "peak RSS of the process on the CPU")
    print(f"device: {device} · GB = 10^9 bytes · peak = {kind} · tokens/s over {runs[0]['timed_steps']} steps "
          f"after {runs[0]['warmup_steps']} warm-up · x trl = tokens/s over trl's on the same settings")
    print("\n".join(table(runs)))
    checks = GOALS[args.goals](runs)
    if device == "cpu":
        print("  (a CPU plumbing run of a tiny model: these figures say nothing about the goals)")
    replaced = [r["label"] for r in runs if r.get("paged_replaced")]
    if replaced:
        print(f"  (paged optimizers failed on this machine: {', '.join(replaced)} ran their unpaged twin)")
    profiled = [r["label"] for r in runs if r.get("profiled")]
    if profiled:
        print(f"  (profiled, so slowed by the profiler: {', '.join(profiled)})")
    for c in checks:
        status = {True: "met", False: "NOT met", None: "n/a"}[c["met"]]
        print(f"  [{status}] {c['goal']}: {' '.join(x for x in (c['run'], c['value']) if x)}")
    for r in runs:  # each variant (a lever switched) against the same run without it
        plain = plain_twin(runs, r)
        if plain:
            ratios = {"tokens_per_second": r["tokens_per_second"] / plain["tokens_per_second"],
                      "peak_gb": r["peak_gb"] / plain["peak_gb"]}
            r["vs_plain"] = {"run": plain["label"], **ratios}
            print(f"  variant {r['label']} ({' '.join(r['overrides'])}): tokens/s {ratios['tokens_per_second']:.2f}x, "
                  f"peak {ratios['peak_gb']:.2f}x of {plain['label']}{compiled_what(r)}")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "versions": runs[0].get("versions") or versions(), "goals_of": args.goals,
              "goals": checks, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.json}")


def compiled_what(run: dict) -> str:
    """'; compiled: F frame compilations, G graphs, B graph breaks' for a compiled run, else ''."""
    dynamo = run.get("dynamo")
    if dynamo is None:
        return ""
    frames, graphs = dynamo.get("frames", {}).get("total", 0), dynamo.get("stats", {}).get("unique_graphs", 0)
    breaks = sum(dynamo.get("graph_break", {}).values())
    return f"; compiled: {frames} frame compilations, {graphs} graphs, {breaks} graph breaks"


# ----------------------------------------------------------------------------- command line

def parser() -> argparse.ArgumentParser:
    from phi3_lora.cli import positive
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-model", help="build (or reuse) the random model and check what the runs need")
    make.add_argument("--dir", required=True)
    make.add_argument("--shape", choices=("phi3-mini", *TINY_LAYERS), default="phi3-mini")
    make.add_argument("--require", nargs="*", choices=sorted(OPTIONAL), default=[])
    for side in ("ours", "trl"):
        run = sub.add_parser(side, help=f"one run of {'our loop' if side == 'ours' else 'trl SFTTrainer'}")
        run.add_argument("--model", required=True, help="the directory make-model wrote")
        run.add_argument("--recipe", required=True, help="a training recipe, e.g. configs/phi3-mini-4k-lora.yaml")
        run.add_argument("--seq", type=positive(), required=True, help="tokens in every row")
        run.add_argument("--warmup", type=positive(), default=3, help="untimed steps first")
        run.add_argument("--steps", type=positive(), default=10, help="timed steps")
        run.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, applied last")
        run.add_argument("--no-paged", action="store_true",
                         help="run a paged optimizer unpaged (check-paged failed): " + ", ".join(
                             f"{a} -> {b}" for a, b in UNPAGED.items()))
        run.add_argument("--profile", metavar="PATH",
                         help="profile the last (up to 3) timed steps with torch.profiler: the table to PATH, the "
                              "trace to PATH.trace.json.gz; it slows them")
        run.add_argument("--count-calls", action="store_true",
                         help="count Python's function calls in the last (up to 3) timed steps with cProfile "
                              "(python_calls_per_step in the JSON); it slows them")
        run.add_argument("--label", required=True)
        run.add_argument("--variant", default="", help="names the --set overrides of an extra run (EXTRA_RUNS); "
                         "the goals are judged on runs without one, variants against their plain twin")
        run.add_argument("--out", required=True, help="the result JSON; its outputs go to the directory of its stem")
    sub.add_parser("check-paged", help="one step of a paged bitsandbytes optimizer on the GPU")
    summary = sub.add_parser("trace-summary", help="GPU busy time, gaps and kernel time by operator per profiled step")
    summary.add_argument("trace", help="a PATH.trace.json.gz that --profile wrote")
    rep = sub.add_parser("report", help="the table and the goals of several runs")
    rep.add_argument("results", nargs="+", help="run JSON files, or .jsonl files of one run a line")
    rep.add_argument("--goals", choices=sorted(GOALS), required=True)
    rep.add_argument("--json", required=True)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    commands = {"make-model": make_model, "check-paged": check_paged, "ours": ours, "trl": trl, "report": report,
                "trace-summary": print_trace_summary}
    commands[args.command](args)


if __name__ == "__main__":
    from phi3_lora.cli import run_main
    run_main(main)
