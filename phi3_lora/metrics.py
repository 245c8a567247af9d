"""What a run reports: TensorBoard scalars, ``metrics.jsonl`` lines, and ``summary.json``.

The writer is built with ``enabled=accelerator.is_main_process``: one process writes, the
others do nothing, so every scalar appears once. TensorBoard goes through accelerate's tracker
(``accelerator.log``), which also only writes on the main process.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class RunLog:
    """Appends one JSON object per log event to ``metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, output_dir: str | Path, accelerator, enabled: bool):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        self.enabled = enabled

    def _write(self, entry: dict, scalars: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        self.accelerator.log(scalars, step=step)

    def train(self, step: int, loss: float, learning_rate: float, grad_norm: float | None,
              tokens_per_second: float, **extra: float) -> None:
        entry = {"step": step, "loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
                 "tokens_per_second": tokens_per_second, **extra}
        scalars = {f"train/{k}": v for k, v in entry.items() if k != "step" and v is not None}
        self._write(entry, scalars, step)

    def evaluation(self, step: int, loss: float) -> None:
        perplexity = math.exp(min(loss, 50.0))
        entry = {"step": step, "eval_loss": loss, "eval_perplexity": perplexity}
        self._write(entry, {"eval/loss": loss, "eval/perplexity": perplexity}, step)


class Throughput:
    """Counts tokens between log events and turns them into tokens per second."""

    def __init__(self):
        self.start = time.perf_counter()
        self.supervised = 0
        self.total = 0

    def add(self, supervised: int, total: int) -> None:
        self.supervised += supervised
        self.total += total

    def rates(self) -> tuple[float, float]:
        """(supervised tokens/s, all tokens/s) since the last reset."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.supervised / elapsed, self.total / elapsed

    def reset(self) -> None:
        self.__init__()


def write_summary(output_dir: str | Path, summary: dict) -> Path:
    path = Path(output_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
