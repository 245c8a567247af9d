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

import functools
import gc
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import data as data_lib
from . import checkpoint as ckpt
from .config import Config, ConfigError, effective_chunk_size, load_config
from .loss import supervised_tokens, token_loss_sum
from .lora import (adapters_for_autocast, adapters_for_deepspeed, attach_lora, fuse_adapter_outputs,
                   load_adapter_dir, parameter_counts, save_adapter, write_adapter)
from .metrics import (RunLog, Throughput, examples_flops_per_token, mfu, peak_flops, peak_memory_gb,
                      write_summary)
from .model import (compile_decoder_layers, enable_gradient_checkpointing, load_model, load_tokenizer,
                    resolve_dtype)
from .optim import build_optimizer, load_optimizer_state
from .preemption import PreemptionFlag


def make_accelerator(cfg: Config):
    """An Accelerator for this machine: gloo on CPU-only machines (DDP needs cpu=True, DeepSpeed a
    gloo process group), our own accumulation steps, TensorBoard under ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    kwargs = {}
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")  # set by accelerate launch from its config
    if ds_file and ds_file.lower() != "none" and not os.path.isfile(ds_file):
        raise ConfigError(f"DeepSpeed config file '{ds_file}' (deepspeed_config_file of the accelerate config) not "
                          f"found from {os.getcwd()}: launch from the repository root, or make the path absolute")
    if not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    return Accelerator(
        mixed_precision=mixed_precision(cfg), log_with="tensorboard",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.training.gradient_accumulation_steps, sync_with_dataloader=False),
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
        **kwargs)


def mixed_precision(cfg: Config) -> str:
    """``training.mixed_precision`` resolved: "auto" follows the weights' dtype on a GPU, "no" on the CPU."""
    mixed = cfg.training.mixed_precision
    if mixed == "auto":  # fp16 weights (also bf16's fallback on older GPUs) need fp16's loss scaling
        weights = resolve_dtype(cfg.model.dtype) if torch.cuda.is_available() else None
        mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(weights, "no")
    return mixed


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
             "gradient_accumulation_steps": t.gradient_accumulation_steps,
             "train_batch_size": t.per_device_batch_size * t.gradient_accumulation_steps * accelerator.num_processes}
    mismatches = []
    for key, value in owned.items():
        plugin.deepspeed_config.setdefault(key, value)  # absent, DeepSpeed's own default (clipping at 1.0) would rule
        plugin.fill_match(key, mismatches, must_match=True, **owned)
    wanted = mixed_precision(cfg)  # accelerate filled "auto" with it, kept explicit values and may have followed them
    check_4bit_storage_survives_deepspeed(cfg, wanted)
    for dtype in ("bf16", "fp16"):
        enabled = plugin.deepspeed_config.get(dtype, {}).get("enabled", False)
        if str(enabled).lower() != str(wanted == dtype).lower():
            mismatches.append(f"{dtype}.enabled={enabled} but training.mixed_precision resolves to {wanted}")
    if mismatches:
        raise ConfigError(f"the DeepSpeed config disagrees with the training config ({'; '.join(mismatches)}); "
                          "set those entries to \"auto\"")
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("offload_optimizer", {}).get("device", "none") != "none" and \
            plugin.deepspeed_config.get("zero_force_ds_cpu_optimizer", True):
        # accelerate swaps the optimizer for DeepSpeedCPUAdam over its param groups, which keep our lr, betas, eps
        # and weight decay (accelerate.utils.deepspeed.map_pytorch_optim_to_deepspeed); a bitsandbytes optimizer's
        # kind would be lost (8-bit states, paging; its AdamW becomes Adam with L2): refuse those
        if t.optimizer != "adamw_torch":
            raise ConfigError(f"ZeRO-Offload steps the optimizer with DeepSpeedCPUAdam (an AdamW in float32 on the "
                              f"CPU) in place of the configured one: training.optimizer must be adamw_torch (got "
                              f"{t.optimizer})")


def check_fits_this_run(cfg: Config, accelerator) -> None:
    """Settings this launch cannot honour (its device, its DeepSpeed stage) are a one-line error before loading."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if cfg.model.attn_implementation == "flex_attention" and accelerator.device.type != "cuda":
        raise ConfigError("model.attn_implementation=flex_attention trains on CUDA GPUs only (PyTorch has no "
                          f"flex-attention backward on the {accelerator.device.type}); use sdpa here")
    if cfg.training.compile and is_deepspeed_zero3_enabled():
        raise ConfigError("training.compile=true does not work under DeepSpeed ZeRO-3: the hooks that gather each "
                          "layer's partitioned weights break its compiled graph at every linear and recompile it on "
                          "every call until torch.compile gives up and runs it eagerly; set training.compile=false")


def check_4bit_storage_survives_deepspeed(cfg: Config, precision: str) -> None:
    """Under DeepSpeed with fp16/bf16, every floating-point parameter is cast to that dtype at start (any ZeRO
    stage). 4-bit weights packed into float words (``bnb_4bit_quant_storage``) would be converted as numbers,
    which destroys them: their storage dtype must be that one already (uint8 storage is never cast)."""
    storage = cfg.model.bnb_4bit_quant_storage
    wanted = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    if cfg.model.load_in_4bit and storage != "uint8" and wanted and storage != wanted:
        raise ConfigError(f"model.bnb_4bit_quant_storage={storage}: DeepSpeed casts every floating-point parameter to "
                          f"{wanted} ({precision}), which would convert the packed 4-bit weights as numbers; store "
                          f"them in {wanted} (and set model.dtype={wanted} under ZeRO-3), or make "
                          "training.mixed_precision match the storage")


def base_model_device(accelerator) -> torch.device | None:
    """Where the base model's weights load: straight onto this process's GPU, unless ZeRO-3 partitions
    them as they load; None (the CPU; ``prepare`` moves the model) elsewhere."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return accelerator.device if accelerator.device.type == "cuda" and not is_deepspeed_zero3_enabled() else None


def loss_chunk_size(cfg: Config, accelerator) -> int:
    """``training.loss_chunk_size`` as this run uses it (see ``config.effective_chunk_size``)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    requested = cfg.training.loss_chunk_size
    chunk_size = effective_chunk_size(requested, 3 if is_deepspeed_zero3_enabled() else 0,
                                      on_gpu=accelerator.device.type != "cpu")
    if chunk_size == 0 and requested != 0:
        accelerator.print("training.loss_chunk_size: off under ZeRO-3 (lm_head is partitioned); "
                          "the loss is computed from whole logits")
    return chunk_size


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
    window_loss_sum: float = 0.0  # token loss sum and supervised tokens since the last logged step
    window_tokens: int = 0
    train_seconds: float = 0.0  # wall time in train(), every attempt of a resumed run together


EVAL_SIGNAL_EVERY = 8  # evaluation batches between two checks for a preemption signal (an all-reduce each)
SCALER_FILE = "scaler.json"  # a checkpoint's fp16 loss scale: without it a resumed run would skip steps anew


class Trainer:
    """Fine-tunes a Phi-3 model with LoRA as ``cfg`` says. ``Trainer(cfg).train()`` is a whole run."""

    def __init__(self, cfg: Config, preemption: PreemptionFlag | None = None):
        from accelerate.utils import set_seed

        self.cfg, t = cfg, cfg.training
        self.preemption = preemption  # None: train() installs its own
        self.accelerator = acc = make_accelerator(cfg)
        check_fits_this_run(cfg, acc)
        ckpt.check_can_create(cfg.output_dir, "output_dir")  # before the minutes of loading, not after
        self.resume_dir = None
        self._stop_if_signalled_before_training()  # one during the imports: stop now, not after the loading
        self.out = Path(cfg.output_dir)
        self.tokenizer = load_tokenizer(cfg.model)
        data_lib.use_chat_template(self.tokenizer, cfg.data.chat_template)
        self.train_data, self.eval_data = data_lib.build_datasets(cfg.data, self.tokenizer, t.seed)

        def put_back_and_find_resume_checkpoint():  # a checkpoint put back may be the one to resume
            for entry in ckpt.restore_interrupted_replacements(cfg.output_dir):
                print(f"note: put back {entry}, which a crash while replacing it had left as .{entry.name}.old")
            return find_resume_checkpoint(cfg)

        self.resume_dir = decided_by_main_process(acc, put_back_and_find_resume_checkpoint)
        self.loss_chunk_size = loss_chunk_size(cfg, acc)

        model = self._build_model()
        long_threshold = data_lib.long_context_threshold(acc.unwrap_model(model).config)
        self.train_items = data_lib.TrainItems(self.train_data, cfg.data.max_seq_len, cfg.data.packing, long_threshold)
        self.eval_batches = None if self.eval_data is None else data_lib.eval_plan(
            self.eval_data, t.per_device_eval_batch_size, long_threshold, acc.num_processes, acc.process_index)
        varlen = data_lib.uses_varlen(acc.unwrap_model(model))
        self.collate = data_lib.Collator(self.tokenizer.pad_token_id, packed=cfg.data.packing, varlen=varlen)
        self.eval_collate = data_lib.Collator(self.tokenizer.pad_token_id, varlen=varlen)
        self.steps_per_epoch = data_lib.steps_per_epoch(len(self.train_items), t.per_device_batch_size,
                                                        t.gradient_accumulation_steps, acc.num_processes,
                                                        self.train_items.kinds)
        self.total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * self.steps_per_epoch)
        self.flops_per_token = examples_flops_per_token(acc.unwrap_model(model).config,
                                                        self.train_items.example_lengths, self.trainable_params)
        optimizer = build_optimizer(optimizer_groups(model, t.weight_decay), t)
        self.scheduler = self._make_scheduler(optimizer)
        fill_deepspeed_config(acc, cfg)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]  # clipped every step
        self._training_mode = False  # model.train() not called yet (from_pretrained leaves the base in eval mode)
        set_seed(t.seed + acc.process_index)  # dropout differs per process, as it would per example

        self.progress = Progress()
        if self.resume_dir:
            self._restore(self.resume_dir)
            if self.progress.step > self.total_steps:
                raise ConfigError(f"cannot resume {self.resume_dir}: it is at step {self.progress.step}, past this "
                                  f"run's {self.total_steps} steps (training.max_steps / training.num_epochs)")
        # the step of the newest checkpoint of this run, known alike on every process (never read from a listing of
        # checkpoints/, which another node's network file system may show late: they would disagree on saving)
        here = self.resume_dir and self.resume_dir == ckpt.step_directory(self.out, self.progress.step).resolve()
        self.saved_step = self.progress.step if here else None  # a checkpoint resumed from elsewhere is not here
        self._stop_if_signalled_before_training()
        self._attempt = (time.perf_counter(), self.progress.train_seconds)  # train() restarts this clock
        self._open_outputs()

    def _build_model(self):
        """Base model, LoRA adapters (restored when resuming), gradient checkpointing."""
        cfg, acc = self.cfg, self.accelerator
        base = load_model(cfg.model, self.tokenizer, seed=cfg.training.seed, device=base_model_device(acc))
        if any(hasattr(p, "ds_id") for p in base.parameters()):
            acc.print(f"base model loaded partitioned across {acc.num_processes} processes (ZeRO-3 zero.Init)")
        model = attach_lora(base, cfg.lora, seed=cfg.training.seed)
        if self.uses_deepspeed:
            adapters_for_deepspeed(model, acc.mixed_precision)
        elif acc.native_amp and acc.mixed_precision in ("bf16", "fp16"):  # every forward of the loop is autocast
            adapters_for_autocast(model)
        plugin = acc.state.deepspeed_plugin
        if cfg.training.fuse_lora_add and (plugin is None or plugin.zero_stage != 3):  # ZeRO-3: see the function
            fuse_adapter_outputs(model)
        if self.resume_dir:  # before prepare: the adapter parameters are still whole here, also under ZeRO-3
            load_adapter_dir(model, self.resume_dir / "adapter")
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.training.compile:
            acc.print(f"compiling {compile_decoder_layers(model)} decoder layers (the first steps are slower)")
        self.trainable_params, self.total_params = parameter_counts(model)
        return model

    def _open_outputs(self) -> None:
        """config.yaml, metrics.jsonl (trimmed to the resumed step), TensorBoard; the main process writes."""
        acc, p = self.accelerator, self.progress
        if acc.is_main_process:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"output_dir {self.out}: cannot be created ({err.strerror})") from None
            if not self.resume_dir and (self.out / "adapter").is_dir():
                acc.print(f"note: {self.out} holds an earlier run's adapter; this run replaces it when it ends "
                          "(its metrics, TensorBoard curves and summary go now)")
            (self.out / "config.yaml").write_text(self.cfg.to_yaml())
            ckpt.remove_stale_temporaries(self.out)
            trim_metrics(self.out / "metrics.jsonl", p.step if self.resume_dir else -1)  # fresh: an old run's go
            if not self.resume_dir:  # the earlier run's summary would describe a run no other file here belongs to
                (self.out / "summary.json").unlink(missing_ok=True)
        # purge_step: TensorBoard drops the events of this directory's earlier writers from that step on (those an
        # interrupted run wrote after its last checkpoint; all of an earlier run's when this one starts afresh)
        purge_step = p.step + 1 if self.resume_dir else 0
        acc.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": purge_step}})
        self.log = RunLog(self.out, acc, enabled=acc.is_main_process)
        if self.resume_dir:
            acc.print(f"resumed from {self.resume_dir} at step {p.step} (epoch {p.epoch}, "
                      f"{p.step_in_epoch} steps into it)")
        packing = (f" packed into {len(self.train_items):,} rows ({100 * self.train_items.packing_efficiency:.1f}% "
                   "full)" if self.cfg.data.packing else "")
        evaluation = "" if self.eval_data is None else f" | eval examples: {len(self.eval_data):,}" + (
            f" ({self.eval_data.copies_of_training:,} copies of training examples left out)"
            if self.eval_data.copies_of_training else "")
        acc.print(f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
                  f"({100 * self.trainable_params / self.total_params:.3f}%) | train examples: "
                  f"{len(self.train_data):,}{packing}{evaluation} | steps: {self.total_steps} | "
                  f"processes: {acc.num_processes}")

    def _make_scheduler(self, optimizer):
        from transformers import get_scheduler

        t = self.cfg.training
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * self.total_steps)
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps)

    # ------------------------------------------------------------------------- training

    def train(self) -> dict:
        """Run to ``total_steps``: evaluate before the first step, every ``eval_steps`` and at the end;
        checkpoint every ``save_steps``; on a preemption signal, checkpoint and raise ``Preempted``."""
        acc, t, p = self.accelerator, self.cfg.training, self.progress
        own_flag = self.preemption is None
        preemption = self.preemption = self.preemption or PreemptionFlag(t.preemption_signals)
        start = time.perf_counter()
        self._attempt = (start, p.train_seconds)  # when this attempt began; the earlier attempts' seconds
        if not p.eval_losses:
            self.evaluate()
        self._stop_if_signalled_before_training()
        bar = tqdm(total=self.total_steps, initial=p.step, desc="training",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        # Python's full garbage collections examine every object it tracks, the imports' and the model's included:
        # 0.33 s a collection in the middle of a step for the 32-layer tiny model on a CPU (2 in 60 steps, 4.9% of
        # their time). Those objects live as long as the run; frozen, the collections skip them (6 ms for 4).
        freezing = gc.get_freeze_count() == 0  # else the process froze objects itself: leave its choice alone
        if freezing:
            gc.collect()
            gc.freeze()
        window, whole_run = Throughput(), Throughput()  # their clocks start after that collection
        try:
            while p.step < self.total_steps:
                data_clock = time.perf_counter()
                for batches in self._batches_of_epoch():
                    data_seconds = time.perf_counter() - data_clock
                    loss_sum, n_tokens, n_all, grad_norm = self.train_step(batches)
                    p.step += 1
                    p.step_in_epoch += 1
                    p.supervised_tokens += n_tokens
                    p.window_loss_sum += loss_sum
                    p.window_tokens += n_tokens
                    for counter in (window, whole_run):
                        counter.add(n_tokens, n_all, {"data": data_seconds, **self.last_step_seconds})
                    bar.update(1)
                    if p.step % t.logging_steps == 0 or p.step == self.total_steps:
                        self._log_train(window, grad_norm, bar)
                    if t.eval_steps and p.step % t.eval_steps == 0 and p.step < self.total_steps:
                        with window.paused():
                            self.evaluate()
                    if p.step_in_epoch == self.steps_per_epoch:
                        p.epoch += 1
                        p.step_in_epoch = 0
                    if t.save_steps and p.step % t.save_steps == 0 and p.step < self.total_steps:
                        with window.paused():
                            self.save_checkpoint()
                    if self._any_process_signalled(preemption):
                        self._stop_for_preemption(preemption.received)
                    if p.step >= self.total_steps:
                        break
                    data_clock = time.perf_counter()
            bar.close()
            if not p.eval_losses or p.eval_losses[-1][0] != p.step:
                self.evaluate()
                if self._any_process_signalled(preemption):  # resuming evaluates again, then finishes
                    self._stop_for_preemption(preemption.received)
            if t.save_steps:
                self.save_checkpoint()
        finally:
            if freezing:
                gc.unfreeze()  # collectable again once the run is over (a Trainer in a longer-lived process)
            if own_flag:
                preemption.restore()
        return self.finish(time.perf_counter() - start, whole_run)

    def _step_was_skipped(self, scale_before: float | None) -> bool:
        """fp16's loss scaler skips a step whose gradients overflowed (and lowers its scale). accelerate says so
        for most optimizers, but a fused AdamW (ours on CUDA) skips the update inside its kernel and is always
        reported as stepped: the lowered scale tells it then."""
        if self.optimizer.step_was_skipped:
            return True
        return scale_before is not None and self.accelerator.scaler.get_scale() < scale_before

    def _stop_if_signalled_before_training(self) -> None:
        """A preemption signal before this attempt's first step: nothing new to save, so stop as preempted."""
        if self.preemption is not None and self._any_process_signalled(self.preemption):
            raise ckpt.Preempted(f"stopped by {signal.Signals(self.preemption.received).name} before training "
                                 f"{'resumed' if self.resume_dir else 'began'} (nothing new to save); run again "
                                 "with training.resume_from=auto to continue")

    def _any_process_signalled(self, preemption: PreemptionFlag) -> bool:
        """True on every process if any received a preemption signal (they must stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return preemption.received is not None
        flag = torch.tensor([0 if preemption.received is None else preemption.received], device=self.accelerator.device)
        received = int(self.accelerator.reduce(flag, "max"))
        if received:
            preemption.received = received
        return bool(received)

    def _stop_for_preemption(self, number: int) -> None:
        if self.saved_step != self.progress.step:  # not saved at this step already (save_steps divides it)
            self.save_checkpoint()
        self._end_training()
        raise ckpt.Preempted(f"stopped by {signal.Signals(number).name} after step {self.progress.step}: "
                             f"checkpoint {ckpt.step_directory(self.out, self.progress.step)} saved; run again "
                             "with training.resume_from=auto to continue")

    def _batches_of_epoch(self):
        """This process's micro-batches, one list per optimizer step, from the current data position."""
        t, acc = self.cfg.training, self.accelerator
        lengths = self.train_items.lengths if self.cfg.data.group_by_length else None
        plan = data_lib.plan_epoch(len(self.train_items), self.progress.epoch, t.seed, t.per_device_batch_size,
                                   t.gradient_accumulation_steps, acc.num_processes, acc.process_index,
                                   kinds=self.train_items.kinds, lengths=lengths)
        for step in plan[self.progress.step_in_epoch:]:
            yield [self.collate([self.train_items[i] for i in idx]) for idx in step]

    def train_step(self, batches: list[dict]) -> tuple[float, int, int, torch.Tensor | None]:
        """One optimizer step over this process's micro-batches.

        Returns the step's global (token loss sum, supervised tokens, all tokens) and the grad norm (a
        0-dim tensor, read only when logged). On one GPU the step waits for the device once, at its end
        (the loss sum; under fp16 also for the loss scale around the optimizer step; with packing and sdpa also
        once a micro-batch, where transformers looks for the examples' bounds in ``position_ids``; flash-attention
        gets them from the collator): the supervised positions come from the collator and the step's clock uses CUDA
        events, so the CPU keeps queueing work while the GPU runs the forward, backward and optimizer.
        """
        acc = self.accelerator
        self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step uses; after it the scheduler says the next
        counts = [sum(supervised_tokens(b) for b in batches), sum(int(b["num_tokens"]) for b in batches)]
        clock = _StepClock(cuda=acc.device.type == "cuda")
        if acc.num_processes > 1:  # the batches are still on the CPU: one process needs no round trip to the GPU
            counts = [int(v) for v in acc.reduce(torch.tensor(counts, device=acc.device), "sum")]
        clock.lap("sync")  # waiting for the slowest process's batches
        n_tokens, n_all = counts
        scale = acc.num_processes * self.cfg.training.gradient_accumulation_steps / max(n_tokens, 1)
        if not self._training_mode:  # the first step and after an evaluation only: a walk over every module (1,673
            self.model.train()       # for 32 layers with adapters) adds milliseconds of Python to a step
            self._training_mode = True
        loss_sum = torch.zeros((), device=acc.device)
        grad_norm = None
        for batch in batches:
            batch = data_lib.to_device(batch, acc.device)
            with acc.accumulate(self.model), acc.autocast():  # autocast also covers a chunked loss's lm_head
                loss = token_loss_sum(self.model, batch, self.loss_chunk_size)
                acc.backward(loss * scale)  # under DeepSpeed this also steps the optimizer on the last one
                loss_sum += loss.detach()
                if acc.sync_gradients:
                    clock.lap("forward_backward")
                    grad_norm = self._clip_gradients()
                    scale_before = acc.scaler.get_scale() if acc.scaler is not None else None  # fp16 only: a wait
                    self.optimizer.step()
                    if not self._step_was_skipped(scale_before):
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    clock.lap("optimizer")
        loss_sum = float(acc.reduce(loss_sum, "sum"))  # the step's one wait for the device
        clock.lap("sync")
        self.last_step_seconds = clock.seconds()
        return loss_sum, n_tokens, n_all, grad_norm

    def _clip_gradients(self) -> torch.Tensor | None:
        max_norm = self.cfg.training.max_grad_norm or float("inf")
        # under DeepSpeed its engine clips in its own step (gradient_clipping), and this is the norm it found there
        return self.accelerator.clip_grad_norm_(self.trainable_parameters, max_norm)

    def _log_train(self, window: Throughput, grad_norm, bar) -> None:
        p = self.progress
        loss = p.window_loss_sum / max(p.window_tokens, 1)
        p.last_train_loss, p.window_loss_sum, p.window_tokens = loss, 0.0, 0
        supervised_rate, total_rate = window.rates()
        lr = self.step_lr
        utilisation = self._mfu(total_rate)
        extra = {"mfu": utilisation} if utilisation is not None else {}
        grad_norm = None if grad_norm is None else float(grad_norm)
        self.log.train(self.progress.step, loss, lr, grad_norm, supervised_rate, total_tokens_per_second=total_rate,
                       peak_memory_gb=peak_memory_gb(), **window.step_time_parts(), **extra)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        window.reset()

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted loss over the whole evaluation set, all processes together; None without evaluation
        data, or when a preemption signal stopped it: a long evaluation must not use up the grace time before
        the kill that the checkpoint needs (checked every ``EVAL_SIGNAL_EVERY`` batches, by all processes)."""
        if self.eval_data is None:
            return None
        acc = self.accelerator
        self.model.eval()
        self._training_mode = False
        totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
        stopped = False
        for n, idx in enumerate(self.eval_batches):
            if n % EVAL_SIGNAL_EVERY == 0 and self.preemption is not None and \
                    self._any_process_signalled(self.preemption):
                stopped = True
                break
            batch = self.eval_collate([[self.eval_data.dataset[i]] for i in idx])
            batch = data_lib.to_device(batch, acc.device)
            with acc.autocast():
                totals[0] += token_loss_sum(self.model, batch, self.loss_chunk_size).double()
            totals[1] += supervised_tokens(batch)
        if hasattr(self.model, "empty_partition_cache"):  # DeepSpeed: ZeRO-3 prefetched parameters for a
            self.model.empty_partition_cache()  # backward that never comes; gathering one in flight would fail
        if stopped:
            acc.print(f"step {self.progress.step}: evaluation stopped by "
                      f"{signal.Signals(self.preemption.received).name}")
            return None
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
        state = ckpt.adapter_state_dict(peft_model)  # every process: a gather under ZeRO-3
        target = self.out / "adapter"
        if acc.is_main_process:
            save_adapter(peft_model, state, target, run_config=self.cfg.to_yaml())
            self.tokenizer.save_pretrained(self.out / "tokenizer")
        acc.wait_for_everyone()
        return target

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically. Every process calls it (gathers, DeepSpeed's save)."""
        acc, p = self.accelerator, self.progress
        self._count_train_seconds()
        target = ckpt.step_directory(self.out, p.step)
        tmp = target.parent / f".{target.name}.tmp"
        if acc.is_main_process:
            ckpt.remove_path(tmp)
            (tmp / "rng").mkdir(parents=True)
        acc.wait_for_everyone()
        peft_model = acc.unwrap_model(self.model)
        state = ckpt.adapter_state_dict(peft_model)
        if self.uses_deepspeed:  # each process writes its optimizer partition; frozen weights are left out
            self.model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        plain, tensors = ckpt.rng_state()
        (tmp / "rng" / f"rank-{acc.process_index}.json").write_text(json.dumps(plain))
        save_file(tensors, str(tmp / "rng" / f"rank-{acc.process_index}.safetensors"))
        if acc.is_main_process:
            write_adapter(peft_model, state, tmp / "adapter", run_config=self.cfg.to_yaml())
            if not self.uses_deepspeed:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:  # fp16 loss scaling (a GPU, no DeepSpeed, which saves its own): scale, growth
                (tmp / SCALER_FILE).write_text(json.dumps(acc.scaler.state_dict()))
            (tmp / "config.yaml").write_text(self.cfg.to_yaml())
            last_eval = p.eval_losses[-1] if p.eval_losses else None
            trainer_state = {**asdict(p), "num_processes": acc.num_processes, "fingerprint": self.cfg.fingerprint(),
                             "train_data": self.train_data_fingerprint,
                             "eval_loss_at_save": last_eval[1] if last_eval and last_eval[0] == p.step else None}
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.commit_directory(tmp, target, manifest=True, extra={"step": p.step})
            protected = {self.resume_dir} if self.resume_dir else set()
            ckpt.rotate(self.out, self.cfg.training.save_total_limit, protected)
        acc.wait_for_everyone()
        self.saved_step = p.step
        return target

    @functools.cached_property
    def train_data_fingerprint(self) -> dict:
        """What a checkpoint's data position refers to: the number of training examples and their tokens' hash."""
        return {"examples": len(self.train_data), "sha256": data_lib.fingerprint(self.train_data)}

    def _restore(self, path: Path) -> None:
        """Optimizer, scheduler, this process's RNG and the data position from a verified checkpoint."""
        acc = self.accelerator
        state = read_trainer_state(path)
        if state["num_processes"] != acc.num_processes:
            raise ConfigError(f"{path} was saved by {state['num_processes']} processes, this run has "
                              f"{acc.num_processes}: resume with the same number (the data order depends on it)")
        saved_data = state.get("train_data")  # absent from checkpoints saved before it was recorded
        if saved_data and saved_data != self.train_data_fingerprint:
            raise ConfigError(f"cannot resume {path}: the training data changed since it was saved "
                              f"({saved_data['examples']:,} examples then, {len(self.train_data):,} now, or other "
                              "tokens): its position in the epoch would point at other examples")
        if self.uses_deepspeed:
            if not (path / "deepspeed").is_dir():
                raise ckpt.CheckpointError(f"{path}: saved without DeepSpeed, cannot resume under DeepSpeed")
            with ckpt.deepspeed_loads_safely(self.model):  # DeepSpeed itself would unpickle its files
                self.model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            if (path / "deepspeed").is_dir():
                raise ckpt.CheckpointError(f"{path}: saved under DeepSpeed, resume it under DeepSpeed")
            load_optimizer_state(self.optimizer, ckpt.torch_load(path / "optimizer.pt"),  # moved to the params
                                 source=path / "optimizer.pt")
        self.scheduler.load_state_dict(ckpt.torch_load(path / "scheduler.pt"))
        saved_rate, step = self.scheduler.get_last_lr()[0], self.scheduler.last_epoch
        rate = self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](step)  # this run's schedule, same step
        if not math.isclose(rate, saved_rate, rel_tol=1e-6, abs_tol=1e-12):
            acc.print(f"note: the learning-rate schedule spans this run's {self.total_steps} steps, not the length "
                      f"{path.name} was saved with: after step {step} the rate is {rate:.4g}, "
                      f"where the checkpoint's schedule gives {saved_rate:.4g}")
        if acc.scaler is not None and (path / SCALER_FILE).is_file():  # else the scale starts afresh, at 2**16
            acc.scaler.load_state_dict(json.loads((path / SCALER_FILE).read_text()))
        rng_json = path / "rng" / f"rank-{acc.process_index}.json"
        if not rng_json.is_file():
            raise ckpt.CheckpointError(f"{rng_json}: file not found")
        tensors = ckpt.read_safetensors(path / "rng" / f"rank-{acc.process_index}.safetensors")
        try:
            ckpt.set_rng_state(json.loads(rng_json.read_text()), tensors)
        except (KeyError, TypeError, ValueError) as err:  # a marker made anew over hand-assembled files
            raise ckpt.CheckpointError(f"{rng_json}: not the RNG states this toolkit saves ({err})") from None
        fields = {k: v for k, v in state.items() if k in Progress.__dataclass_fields__}
        self.progress = Progress(**{**fields, "eval_losses": [tuple(e) for e in fields["eval_losses"]]})

    def _device_name(self) -> str:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    def _mfu(self, tokens_per_second: float) -> float | None:
        """MFU of all processes at this rate of tokens through the model; None without a known peak."""
        return mfu(tokens_per_second, self.flops_per_token, peak_flops(self._device_name()),
                   self.accelerator.num_processes)

    def _end_training(self) -> None:
        """Close TensorBoard and the process group, all processes together: each waits until every one is done
        with its collectives, and a DeepSpeed engine takes its hooks off (``destroy``) while the group still
        exists. (A ZeRO-3 process on the CPU has aborted now and then at exit, after its work was written.)"""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.uses_deepspeed:
            self.model.destroy()
        acc.end_training()

    @property
    def uses_deepspeed(self) -> bool:
        return self.accelerator.state.deepspeed_plugin is not None

    def _count_train_seconds(self) -> None:
        start, before = self._attempt
        self.progress.train_seconds = before + time.perf_counter() - start

    def finish(self, wall_time: float, whole_run: Throughput) -> dict:
        """Save the adapter, write summary.json, print where everything is. ``wall_time`` and ``whole_run``
        cover this attempt; the supervised tokens and their rate cover every attempt of a resumed run."""
        acc, p = self.accelerator, self.progress
        self._count_train_seconds()
        adapter = self.save_adapter()
        step_parts = whole_run.step_time_parts()
        in_steps = sum(whole_run.seconds.values())  # training only: no evaluation, no saving
        # None when this attempt made no step (resumed at the last one to evaluate and finish)
        rate_in_steps = whole_run.total / max(in_steps, 1e-9) if whole_run.steps else None
        utilisation = self._mfu(rate_in_steps) if rate_in_steps is not None else None
        summary = {
            "steps": p.step, "epochs_completed": p.epoch, "final_train_loss": p.last_train_loss,
            "first_eval_loss": p.eval_losses[0][1] if p.eval_losses else None,
            "final_eval_loss": p.eval_losses[-1][1] if p.eval_losses else None,
            "supervised_tokens": p.supervised_tokens,
            "supervised_tokens_per_second": p.supervised_tokens / max(p.train_seconds, 1e-9),
            "tokens_this_run": whole_run.total,
            "tokens_per_second_in_steps": rate_in_steps,
            "mfu": utilisation, **step_parts, "peak_memory_gb": peak_memory_gb(),
            "wall_time_seconds": p.train_seconds, "wall_time_this_attempt_seconds": wall_time,
            "num_processes": acc.num_processes,
            "distributed_type": str(acc.distributed_type).split(".")[-1],
            "train_examples": len(self.train_data), "examples_truncated": self.train_data.truncated,
            "packing_efficiency": self.train_items.packing_efficiency,
            "examples_dropped": self.train_data.dropped,
            "eval_examples": 0 if self.eval_data is None else len(self.eval_data),
            "eval_copies_of_training_left_out": 0 if self.eval_data is None else self.eval_data.copies_of_training,
            "trainable_parameters": self.trainable_params, "total_parameters": self.total_params,
            "adapter": str(adapter.resolve()), "output_dir": str(self.out.resolve()),
        }
        if acc.is_main_process:
            write_summary(self.out, summary)
        self._end_training()
        acc.print(
            f"\ndone: {p.step} steps in {p.train_seconds:.1f}s"
            f"{'' if self.resume_dir is None else f' ({wall_time:.1f}s in this attempt)'}, "
            f"{summary['supervised_tokens_per_second']:.0f} "
            f"supervised tokens/s over the run (evaluations and saves included) on {acc.num_processes} process(es); "
            f"{'no steps in this attempt' if rate_in_steps is None else f'{rate_in_steps:.0f} tokens/s in the steps'}"
            f"{'' if utilisation is None else f', MFU {100 * utilisation:.1f}%'}, "
            f"peak memory {summary['peak_memory_gb']:.2f} GB\n"
            f"  final train loss {_fmt(p.last_train_loss)}, eval loss {_fmt(summary['first_eval_loss'])} -> "
            f"{_fmt(summary['final_eval_loss'])}\n"
            f"  adapter:     {adapter}\n  summary:     {self.out / 'summary.json'}\n"
            f"  metrics:     {self.out / 'metrics.jsonl'}\n  tensorboard: tensorboard --logdir {self.out}")
        return summary


def decided_by_main_process(accelerator, decide):
    """``decide()`` on the main process alone, its result (or the user error it raised) on every process: the
    processes must agree, and the nodes' views of a shared file system may differ for a while (NFS caches)."""
    outcome = [(None, None)]
    if accelerator.is_main_process:
        try:
            outcome = [(decide(), None)]
        except (ConfigError, ckpt.CheckpointError) as err:
            outcome = [(None, err)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(outcome)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint ``training.resume_from`` asks for, verified and checked against ``cfg``; or None.

    Raises:
        ConfigError: a fresh start into an output_dir that holds checkpoints, or settings that changed.
        CheckpointError: the checkpoint is incomplete, damaged or missing files.
    """
    choice = cfg.training.resume_from
    found = ckpt.complete_checkpoints(cfg.output_dir)
    if choice == "none":
        if found:
            raise ConfigError(f"output_dir {cfg.output_dir} already holds checkpoints (newest: {found[-1].name}); "
                              "continue them with training.resume_from=auto, or choose another output_dir")
        return None
    if choice == "auto":
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(choice)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"training.resume_from: {path} is not a directory")
    ckpt.verify_checkpoint(path)
    resumed_step = read_trainer_state(path)["step"]  # verified; any directory name
    later = [c.name for c in found if ckpt.saved_step(c) > resumed_step]
    if later:
        raise ConfigError(f"cannot resume {path}: {cfg.output_dir} also holds later checkpoints ({', '.join(later)}) "
                          "of the run this one would leave behind, which rotation and resume_from=auto would take for "
                          "this run's; move or delete them first")
    saved = load_config(path / "config.yaml").resume_settings()
    changed = [k for k, v in cfg.resume_settings().items() if saved.get(k) != v]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {cfg.resume_settings()[k]!r}" for k in changed[:4])
        raise ConfigError(f"cannot resume {path}: settings changed since it was saved ({details}); "
                          "only lengths, logging, evaluation and saving settings may change")
    return path.resolve()


def read_trainer_state(checkpoint: Path) -> dict:
    """A verified checkpoint's ``trainer_state.json``, with the fields resuming reads checked: files that match
    a marker made anew over other content (a hand-assembled checkpoint) are a CheckpointError naming it."""
    file = checkpoint / "trainer_state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ckpt.CheckpointError(f"{file}: not valid JSON ({err})") from None
    counts = ("step", "epoch", "step_in_epoch", "num_processes")
    if not (isinstance(state, dict) and all(type(state.get(k)) is int for k in counts)
            and isinstance(state.get("eval_losses"), list)):
        raise ckpt.CheckpointError(f"{file}: not the trainer state this toolkit saves (needs {', '.join(counts)} "
                                   "as integers and eval_losses)")
    return state


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines of steps after ``step`` (written after the checkpoint we resume from), and a
    line torn by a kill mid-write."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, TypeError, KeyError):
            continue
    path.write_text("".join(line + "\n" for line in kept))


class _StepClock:
    """Seconds spent in the named parts of one optimizer step, without waiting for the device.

    On the CPU, wall time between laps. On CUDA, an event is recorded at each lap and the parts are
    the device's time between them, read by ``seconds()`` once the step has waited for the device
    anyway (a synchronize at each lap would stall the queue mid-step); the first part starts when
    the step's first work is queued, which on an idle device is when it runs.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: list[tuple[str | None, object]] = [(None, self._now())]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, part: str) -> None:
        self.marks.append((part, self._now()))

    def seconds(self) -> dict[str, float]:
        """Seconds by part (summed over laps of the same name); on CUDA, waits for the last event."""
        if self.cuda:
            self.marks[-1][1].synchronize()
        totals: dict[str, float] = {}
        for (_, start), (part, end) in zip(self.marks, self.marks[1:]):
            elapsed = start.elapsed_time(end) / 1000 if self.cuda else end - start
            totals[part] = totals.get(part, 0.0) + elapsed
        return totals


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
