"""What a run reports: TensorBoard scalars, ``metrics.jsonl`` lines, and ``summary.json``.

The writer is built with ``enabled=accelerator.is_main_process``: one process writes, the
others do nothing, so every scalar appears once. TensorBoard goes through accelerate's tracker
(``accelerator.log``), which also only writes on the main process.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from contextlib import contextmanager
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
    """Counts tokens and step-time parts between log events.

    The parts: ``data`` (waiting for this process's batches), ``forward_backward``, ``optimizer`` (under
    DeepSpeed the engine steps inside the backward, so its time is in ``forward_backward``) and ``sync``
    (waiting for the other processes at the step's two all-reduces; 0 on one process).
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.supervised = 0
        self.total = 0
        self.seconds = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0, "sync": 0.0}
        self.steps = 0

    def add(self, supervised: int, total: int, seconds: dict[str, float]) -> None:
        self.supervised += supervised
        self.total += total
        self.steps += 1
        for part, value in seconds.items():
            self.seconds[part] += value

    def step_time_parts(self) -> dict[str, float | None]:
        """Mean seconds per optimizer step spent in each part since the last reset (None without a step)."""
        return {f"step_{part}_seconds": value / self.steps if self.steps else None
                for part, value in self.seconds.items()}

    def rates(self) -> tuple[float, float]:
        """(supervised tokens/s, all tokens/s) since the last reset, time spent ``paused`` left out."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.supervised / elapsed, self.total / elapsed

    @contextmanager
    def paused(self):
        """Leave the time spent inside out of ``rates`` (an evaluation or a checkpoint between steps)."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - begin

    def reset(self) -> None:
        self.__init__()


def write_summary(output_dir: str | Path, summary: dict) -> Path:
    path = Path(output_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------- FLOPs and MFU

# Dense bf16 peak of one device, FLOP/s, for MFU; devices not listed get no MFU figure. The first name
# found in the device's name counts: the PCIe and NVL H100s come before the SXM one, which CUDA calls
# "NVIDIA H100 80GB HBM3".
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def matmul_parameters(config) -> int:
    """Weights that take part in matrix multiplies: every projection of every layer and the LM head."""
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    qkv = d * (config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim
    per_layer = qkv + config.num_attention_heads * head_dim * d + d * 2 * inter + inter * d
    return layers * per_layer + d * config.vocab_size


def train_flops_per_token(config, sequence_length: float, adapter_parameters: int) -> float:
    """FLOPs of one trained token with a frozen base and trainable adapters (no recomputation counted).

    * frozen matmuls: 2 N forward + 2 N backward (gradients of the activations only; the frozen
      weights get none) = 4 N, with N = ``matmul_parameters``;
    * adapters: 2 forward + 4 backward (activations and weights) = 6 N_adapter;
    * attention scores and values (QK^T and AV): 2 matmuls x 2 d FLOPs per attended key, over
      ``attended_keys`` keys on average (s/2 under the causal mask) = 4 d k forward per layer, 3x with
      backward = 12 d k L (= 6 s d L without a sliding window).
    Activation checkpointing recomputes the forward; like MFU everywhere, that is not counted. The LM
    head is in N for every token, as the model defines it, also where the chunked loss runs it only on
    supervised positions: for Phi-3-mini its 4 d V are 2.6% of 4 N, work counted but skipped for each
    unsupervised token.
    """
    keys = attended_keys(sequence_length, getattr(config, "sliding_window", None))
    attention = 12 * keys * config.hidden_size * config.num_hidden_layers
    return 4 * matmul_parameters(config) + 6 * adapter_parameters + attention


def examples_flops_per_token(config, lengths: list[int], adapter_parameters: int) -> float:
    """``train_flops_per_token`` averaged over the tokens of examples of ``lengths``: each example attends
    within itself (also when packed), so a long example's tokens cost more attention than a short one's."""
    counts = Counter(lengths)
    total = sum(length * n for length, n in counts.items())
    return sum(length * n * train_flops_per_token(config, length, adapter_parameters)
               for length, n in counts.items()) / total


def attended_keys(sequence_length: float, sliding_window: int | None = None) -> float:
    """Keys a query attends to, on average, in a causal sequence of ``sequence_length`` tokens: s/2, or with
    a sliding window of w keys (Phi-3-mini-4k's 2047) the mean of min(position, w), w - w^2 / 2s once s > w.
    Masked-out keys are not counted, even where a kernel computes them and throws them away."""
    s, w = sequence_length, sliding_window
    if not w or s <= w:
        return s / 2
    return w - w * w / (2 * s)


def peak_flops(device_name: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in device_name:
            return flops
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices, or None without a peak."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token / (peak * devices)


def peak_memory_gb() -> float:
    """Peak CUDA memory allocated by this process (GB), or its peak resident memory on the CPU."""
    import resource

    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
