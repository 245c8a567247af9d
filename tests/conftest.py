"""Shared fixtures: paths, the real Phi-3 tokenizer from ../shared (skipped when absent), run helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_cluster import free_ports, slurm_cluster  # noqa: F401  (session fixture: a real two-node SLURM cluster)

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PHI3_LORA_SHARED", ROOT.parent / "shared"))
# Every process a test starts inherits this: one that crashes or aborts in native code (a ZeRO-3 process on the CPU
# has aborted at exit twice in hundreds of runs, not reproduced since) prints each thread's Python stack first.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
TRAIN = ROOT / "scripts" / "train.py"

# Small, fast runs of the tiny model on the demo data; each test adds its own overrides.
FAST = ["data.demo_size=120", "data.max_seq_len=256", "training.logging_steps=1", "training.eval_steps=0",
        "model.tiny_hidden_size=64", "training.per_device_eval_batch_size=16"]


def pytest_configure(config):
    """Silence two warnings about libraries' own code that the project cannot act on (the scripts silence the
    second too, see ``cli.quiet_library_noise``): bitsandbytes' import calls torch.compile, whose inductor imports
    torch.utils.mkldnn, which still uses ``torch.jit.script_method``; peft asks transformers for a deprecated
    ``is_gradient_checkpointing``."""
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real Phi-3 tokenizer and chat data live in ../shared "
                    "(set PHI3_LORA_SHARED to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def phi3_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(shared_path("phi3-tokenizer", "hf")))


def run_script(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def train(output_dir: Path, *overrides: str, launcher: list[str] | None = None, **kwargs):
    """Run scripts/train.py (optionally under a launcher) with FAST settings and the overrides."""
    args = (launcher or [sys.executable]) + [str(TRAIN), f"output_dir={output_dir}", *FAST, *overrides]
    return run_script(args, **kwargs)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(output_dir) if "loss" in m]


def accelerate_launch(num_processes: int, *extra: str) -> list[str]:
    """An accelerate launch on a free rendezvous port (not 29500: the suite runs two tests at a time)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", str(free_ports(1)[0]), "--mixed_precision", "no",
            "--dynamo_backend", "no", *extra]


def load_adapter_tensors(output_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(output_dir) / "adapter" / "adapter_model.safetensors"))


def in_process_trainer(cfg, *args):
    """A Trainer in this pytest process (no launcher start-up cost); accelerate's singletons reset first."""
    from accelerate.state import AcceleratorState, GradientState

    from phi3_lora.loop import Trainer
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Trainer(cfg, *args)
