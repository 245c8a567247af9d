"""The training loop: one file, read top to bottom — setup, train, evaluate, save.

The same code runs on one CPU, one GPU, N GPUs with DDP and DeepSpeed ZeRO-2/3; every
distributed concern (process group, which process writes, collectives) lives here and in
``checkpoint.py``, never in the data or model code.

The loss of an optimizer step is the sum of the token cross-entropies over every micro-batch
of the step on every process, divided by the number of supervised tokens in all of them. The
step's global token count is gathered once, before its first backward; each micro-batch then
back-propagates its token *sum* divided by that count. Gradient accumulation and data
parallelism therefore change nothing: 1 x 8 examples, 4 x 2 and 2 processes x 2 x 2 give the
same gradients. (The backward of accelerate and DeepSpeed divides by the accumulation steps
and DDP/ZeRO average over processes; the scale below undoes both.)
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_lib
from .checkpoint import adapter_state_dict, save_peft_adapter
from .config import Config, ConfigError
from .lora import attach_lora, parameter_counts
from .metrics import RunLog, Throughput, write_summary
from .model import enable_gradient_checkpointing, load_model, load_tokenizer, resolve_dtype
from .optim import build_optimizer


def make_accelerator(cfg: Config):
    """An Accelerator for this machine: gloo on CPU-only machines (DDP needs cpu=True, DeepSpeed a
    gloo process group), our own accumulation steps, TensorBoard under ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    kwargs = {}
    if not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    mixed = cfg.training.mixed_precision
    if mixed == "auto":  # fp16 weights (also bf16's fallback on older GPUs) need fp16's loss scaling
        weights = resolve_dtype(cfg.model.dtype) if torch.cuda.is_available() else None
        mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weights, "no")
    return Accelerator(
        mixed_precision=mixed, log_with="tensorboard",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.training.gradient_accumulation_steps, sync_with_dataloader=False),
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
        **kwargs)


def fill_deepspeed_config(accelerator, cfg: Config) -> None:
    """Give DeepSpeed's "auto" entries their values from the training config, its single owner.

    We plan batches ourselves (no prepared DataLoader), so accelerate cannot infer the micro-batch
    size; and its own default for an "auto" gradient_clipping is 1.0, not ours.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    t = cfg.training
    owned = {"train_micro_batch_size_per_gpu": t.per_device_batch_size, "gradient_clipping": t.max_grad_norm,
             "gradient_accumulation_steps": t.gradient_accumulation_steps}
    mismatches = []
    for key in owned:
        plugin.fill_match(key, mismatches, must_match=True, **owned)
    if mismatches:
        raise ConfigError(f"the DeepSpeed config disagrees with the training config ({'; '.join(mismatches)}); "
                          "set those entries to \"auto\"")


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropies over the supervised tokens of ``batch``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), shifted.reshape(-1),
                           ignore_index=data_lib.IGNORE_INDEX, reduction="sum")


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum())


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms and biases (1-D parameters).

    Empty groups are left out: DeepSpeed drops them, which would desync the LR scheduler.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class Progress:
    """Where the run is: optimizer steps done, position in the data, tokens seen."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    supervised_tokens: int = 0
    last_train_loss: float | None = None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)


class Trainer:
    """Fine-tunes a Phi-3 model with LoRA as ``cfg`` says. ``Trainer(cfg).train()`` is a whole run."""

    def __init__(self, cfg: Config):
        from accelerate.utils import set_seed

        self.cfg = cfg
        t = cfg.training
        self.accelerator = make_accelerator(cfg)
        acc = self.accelerator
        self.tokenizer = load_tokenizer(cfg.model)
        data_lib.use_chat_template(self.tokenizer, cfg.data.chat_template)
        self.train_data, self.eval_data = data_lib.build_datasets(cfg.data, self.tokenizer, t.seed)
        self.collate = data_lib.Collator(self.tokenizer.pad_token_id)
        self.steps_per_epoch = data_lib.steps_per_epoch(len(self.train_data), t.per_device_batch_size,
                                                        t.gradient_accumulation_steps, acc.num_processes)
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * self.steps_per_epoch)

        base = load_model(cfg.model, self.tokenizer, seed=t.seed)
        if any(hasattr(p, "ds_id") for p in base.parameters()):
            acc.print(f"base model loaded partitioned across {acc.num_processes} processes (ZeRO-3 zero.Init)")
        model = attach_lora(base, cfg.lora, seed=t.seed)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.trainable_params, self.total_params = parameter_counts(model)
        optimizer = build_optimizer(optimizer_groups(model, t.weight_decay), t)
        self.scheduler = self._make_scheduler(optimizer)
        fill_deepspeed_config(acc, cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        set_seed(t.seed + acc.process_index)  # dropout differs per process, as it would per example

        self.progress = Progress()
        self.out = Path(cfg.output_dir)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
        acc.init_trackers("tensorboard")
        self.log = RunLog(self.out, acc, enabled=acc.is_main_process)
        acc.print(f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
                  f"({100 * self.trainable_params / self.total_params:.3f}%) | train examples: "
                  f"{len(self.train_data):,} | steps: {self.total_steps} | processes: {acc.num_processes}")

    def _make_scheduler(self, optimizer):
        from transformers import get_scheduler

        t = self.cfg.training
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * self.total_steps)
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)

    # ------------------------------------------------------------------------- training

    def train(self) -> dict:
        """Run to ``total_steps``, evaluating before the first step, every ``eval_steps`` and at the end."""
        acc, t = self.accelerator, self.cfg.training
        start = time.perf_counter()
        self.evaluate()
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="training",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        window = Throughput()
        window_loss = torch.zeros(2, dtype=torch.float64)  # (token loss sum, supervised tokens) since last log
        while self.progress.step < self.total_steps:
            for batches in self._batches_of_epoch():
                loss_sum, n_tokens, n_all, grad_norm = self.train_step(batches)
                self.progress.step += 1
                self.progress.step_in_epoch += 1
                self.progress.supervised_tokens += n_tokens
                window.add(n_tokens, n_all)
                window_loss += torch.tensor([loss_sum, n_tokens], dtype=torch.float64)
                bar.update(1)
                if self.progress.step % t.logging_steps == 0 or self.progress.step == self.total_steps:
                    self._log_train(window, window_loss, grad_norm, bar)
                    window.reset()
                    window_loss.zero_()
                if t.eval_steps and self.progress.step % t.eval_steps == 0 and self.progress.step < self.total_steps:
                    self.evaluate()
                if self.progress.step >= self.total_steps:
                    break
            else:
                self.progress.epoch += 1
                self.progress.step_in_epoch = 0
        bar.close()
        if not self.progress.eval_losses or self.progress.eval_losses[-1][0] != self.progress.step:
            self.evaluate()
        return self.finish(time.perf_counter() - start)

    def _batches_of_epoch(self):
        """This process's micro-batches, one list per optimizer step, from the current data position."""
        t, acc = self.cfg.training, self.accelerator
        plan = data_lib.plan_epoch(len(self.train_data), self.progress.epoch, t.seed, t.per_device_batch_size,
                                   t.gradient_accumulation_steps, acc.num_processes, acc.process_index)
        for step in plan[self.progress.step_in_epoch:]:
            yield [self.collate([self.train_data.dataset[i] for i in idx]) for idx in step]

    def train_step(self, batches: list[dict]) -> tuple[float, int, int, float | None]:
        """One optimizer step over this process's micro-batches.

        Returns the step's global (token loss sum, supervised tokens, all tokens) and the grad norm.
        """
        acc = self.accelerator
        local = torch.tensor([sum(supervised_tokens(b) for b in batches),
                              sum(int(b["attention_mask"].sum()) for b in batches if len(b["example_ids"]))],
                             device=acc.device)
        n_tokens, n_all = (int(v) for v in acc.reduce(local, "sum"))
        scale = acc.num_processes * self.cfg.training.gradient_accumulation_steps / max(n_tokens, 1)
        self.model.train()
        loss_sum = torch.zeros((), device=acc.device)
        grad_norm = None
        for batch in batches:
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(self.model):
                loss = token_loss_sum(self.model, batch)
                acc.backward(loss * scale)
                loss_sum += loss.detach()
                if acc.sync_gradients:
                    grad_norm = self._clip_gradients()
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        return float(acc.reduce(loss_sum, "sum")), n_tokens, n_all, grad_norm

    def _clip_gradients(self) -> float | None:
        max_norm = self.cfg.training.max_grad_norm or float("inf")
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return None if norm is None else float(norm)

    def _log_train(self, window: Throughput, window_loss: torch.Tensor, grad_norm, bar) -> None:
        loss = float(window_loss[0] / max(window_loss[1], 1))
        self.progress.last_train_loss = loss
        supervised_rate, total_rate = window.rates()
        lr = self.scheduler.get_last_lr()[0]
        self.log.train(self.progress.step, loss, lr, grad_norm, supervised_rate,
                       total_tokens_per_second=total_rate)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted loss over the whole evaluation set, all processes together."""
        if self.eval_data is None:
            return None
        acc, t = self.accelerator, self.cfg.training
        plan = data_lib.plan_epoch(len(self.eval_data), 0, 0, t.per_device_eval_batch_size, 1,
                                   acc.num_processes, acc.process_index, shuffle=False)
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        for (idx,) in plan:
            batch = self.collate([self.eval_data.dataset[i] for i in idx])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            totals[0] += token_loss_sum(self.model, batch).double()
            totals[1] += supervised_tokens(batch)
        totals = acc.reduce(totals, "sum")
        loss = float(totals[0] / totals[1])
        self.progress.eval_losses.append((self.progress.step, loss))
        self.log.evaluation(self.progress.step, loss)
        acc.print(f"step {self.progress.step}: eval loss {loss:.4f} (perplexity {math.exp(min(loss, 50)):.2f})")
        return loss

    # ------------------------------------------------------------------------- saving

    def save_adapter(self) -> Path:
        """Write ``output_dir/adapter`` (PEFT format) and the tokenizer; collective, main process writes."""
        acc = self.accelerator
        peft_model = acc.unwrap_model(self.model)
        state = adapter_state_dict(peft_model)  # every process: a gather under ZeRO-3
        target = self.out / "adapter"
        if acc.is_main_process:
            save_peft_adapter(peft_model, state, target)
            self.tokenizer.save_pretrained(self.out / "tokenizer")
        acc.wait_for_everyone()
        return target

    def finish(self, wall_time: float) -> dict:
        acc, p = self.accelerator, self.progress
        adapter = self.save_adapter()
        summary = {
            "steps": p.step, "epochs_completed": p.epoch, "final_train_loss": p.last_train_loss,
            "first_eval_loss": p.eval_losses[0][1] if p.eval_losses else None,
            "final_eval_loss": p.eval_losses[-1][1] if p.eval_losses else None,
            "supervised_tokens": p.supervised_tokens,
            "supervised_tokens_per_second": p.supervised_tokens / max(wall_time, 1e-9),
            "wall_time_seconds": wall_time, "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type).split(".")[-1],
            "train_examples": len(self.train_data), "examples_truncated": self.train_data.truncated,
            "examples_dropped": self.train_data.dropped,
            "trainable_parameters": self.trainable_params, "total_parameters": self.total_params,
            "adapter": str(adapter.resolve()), "output_dir": str(self.out.resolve()),
        }
        if acc.is_main_process:
            write_summary(self.out, summary)
        acc.end_training()
        acc.print(
            f"\ndone: {p.step} steps in {wall_time:.1f}s, {summary['supervised_tokens_per_second']:.0f} "
            f"supervised tokens/s on {acc.num_processes} process(es)\n"
            f"  final train loss {_fmt(p.last_train_loss)}, eval loss {_fmt(summary['first_eval_loss'])} -> "
            f"{_fmt(summary['final_eval_loss'])}\n"
            f"  adapter:     {adapter}\n  summary:     {self.out / 'summary.json'}\n"
            f"  metrics:     {self.out / 'metrics.jsonl'}\n  tensorboard: tensorboard --logdir {self.out}")
        return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
