"""The loss: token-normalised over micro-batches (accumulation is exact); chunked cross-entropy and compiled
layers give the same numbers as whole logits and eager layers."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import FAST, in_process_trainer
from phi3_lora.config import effective_chunk_size, load_config
from phi3_lora.loss import supervised_tokens, token_loss_sum


def fresh_trainer(tmp_path, *overrides):
    cfg = load_config(None, [*FAST, f"output_dir={tmp_path}", "lora.dropout=0", "training.max_grad_norm=0",
                             "data.eval_size=0", *overrides])
    trainer = in_process_trainer(cfg)
    with torch.no_grad():  # B = 0 at init would leave A's gradient zero: give both factors values
        gen = torch.Generator().manual_seed(0)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return trainer


def first_step_gradients(trainer):
    """Run the loop's own train_step on the first optimizer step; capture gradients before the update."""
    captured = {}
    clip = trainer._clip_gradients

    def capture():
        captured.update({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
        return clip()

    trainer._clip_gradients = capture
    batches = next(trainer._batches_of_epoch())
    loss_sum, n_tokens, _, grad_norm = trainer.train_step(batches)
    return captured, loss_sum / n_tokens, batches, grad_norm


def reference_gradients(trainer):
    """The definition written out, outside the loop: d/dθ of the step's summed token losses over its
    supervised tokens, whole logits, one backward."""
    batches = next(trainer._batches_of_epoch())
    n_tokens = sum(supervised_tokens(b) for b in batches)
    (sum(token_loss_sum(trainer.model, b) for b in batches) / n_tokens).backward()
    return {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_one_batch_of_8_equals_four_micro_batches_of_2(tmp_path):
    one_batch = ("training.per_device_batch_size=8", "training.gradient_accumulation_steps=1")
    whole, loss_whole, batches_whole, norm_whole = first_step_gradients(fresh_trainer(tmp_path / "a", *one_batch))
    split, loss_split, batches_split, norm_split = first_step_gradients(
        fresh_trainer(tmp_path / "b", "training.per_device_batch_size=2", "training.gradient_accumulation_steps=4"))
    # the same 8 examples, of different lengths, in one batch and in four
    assert len(batches_whole) == 1 and len(batches_split) == 4
    ids_whole = sorted(batches_whole[0]["example_ids"].tolist())
    assert ids_whole == sorted(i for b in batches_split for i in b["example_ids"].tolist())
    lengths = batches_whole[0]["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1
    assert loss_whole == pytest.approx(loss_split, rel=1e-6)
    assert whole.keys() == split.keys() and len(whole) > 0
    for name in whole:
        assert whole[name].abs().sum() > 0, f"{name}: zero gradient"
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
    # both equal the definition, not only each other (a loop dividing by the wrong count would agree with itself)
    reference = reference_gradients(fresh_trainer(tmp_path / "c", *one_batch))
    assert reference.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(whole[name], reference[name], rtol=1e-5, atol=1e-6 * reference[name].abs().max(),
                                   msg=name)
    reference_norm = float(torch.cat([g.flatten() for g in reference.values()]).norm())
    assert float(norm_whole) == pytest.approx(reference_norm, rel=1e-5)  # the logged norm, before (no) clipping
    assert float(norm_split) == pytest.approx(reference_norm, rel=1e-5)


def test_gradients_are_clipped_to_max_grad_norm(tmp_path):
    """training.max_grad_norm: the step's gradients, as the optimizer gets them, are scaled to that global
    norm (torch's max_norm / (norm + 1e-6)); the returned (logged) norm is the one before clipping."""
    trainer = fresh_trainer(tmp_path, "training.max_grad_norm=0.01")
    before, after = {}, {}
    clip = trainer._clip_gradients

    def capture():
        trainable = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        before.update({n: p.grad.detach().clone() for n, p in trainable})
        norm = clip()
        after.update({n: p.grad.detach().clone() for n, p in trainable})
        return norm

    trainer._clip_gradients = capture
    _, _, _, norm = trainer.train_step(next(trainer._batches_of_epoch()))
    total = float(torch.sqrt(sum(g.double().pow(2).sum() for g in before.values())))
    assert total > 0.1 and float(norm) == pytest.approx(total, rel=1e-5)
    for name in before:
        torch.testing.assert_close(after[name], before[name] * (0.01 / (total + 1e-6)), rtol=1e-5, atol=1e-9,
                                   msg=name)


def test_token_normalisation_is_not_a_mean_of_means(tmp_path):
    """The step loss weighs micro-batches by their supervised tokens (a mean of means would not)."""
    trainer = fresh_trainer(tmp_path, "training.per_device_batch_size=2", "training.gradient_accumulation_steps=4")
    batches = next(trainer._batches_of_epoch())
    with torch.no_grad():
        sums = [float(token_loss_sum(trainer.model, b)) for b in batches]
        counts = [supervised_tokens(b) for b in batches]
    loss_sum, n_tokens, _, _ = trainer.train_step(batches)
    assert n_tokens == sum(counts)
    assert loss_sum / n_tokens == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert abs(mean_of_means - sum(sums) / sum(counts)) > 1e-4  # the two definitions really differ here


def lm_head_rows(trainer, monkeypatch):
    """The number of positions of every lm_head module call and of every chunk of logits the loss computes."""
    from phi3_lora import loss
    module_rows, chunk_rows = [], []
    loss.output_head(trainer.model).register_forward_hook(lambda m, i, o: module_rows.append(o.shape[:-1].numel()))
    real = loss.chunk_logits

    def counted(hidden, weight, bias):
        chunk_rows.append(len(hidden))
        return real(hidden, weight, bias)
    monkeypatch.setattr(loss, "chunk_logits", counted)
    return module_rows, chunk_rows


def test_chunk_size_default_depends_on_the_device(tmp_path):
    """Unset, the chunk is 128 tokens on the CPU and 1024 on a GPU; a value the user sets is kept; ZeRO-3
    always computes whole logits."""
    assert effective_chunk_size(None, 0, on_gpu=False) == 128
    assert effective_chunk_size(None, 0, on_gpu=True) == 1024
    assert effective_chunk_size(64, 0, on_gpu=False) == effective_chunk_size(64, 0, on_gpu=True) == 64
    assert effective_chunk_size(0, 0, on_gpu=False) == 0
    assert effective_chunk_size(None, 3, on_gpu=True) == effective_chunk_size(64, 3, on_gpu=False) == 0
    default = fresh_trainer(tmp_path / "default")
    assert default.loss_chunk_size == (128 if default.accelerator.device.type == "cpu" else 1024)
    assert fresh_trainer(tmp_path / "set", "training.loss_chunk_size=300").loss_chunk_size == 300


@pytest.mark.parametrize("packing", [False, True])
def test_chunked_cross_entropy_matches_whole_logits(tmp_path, monkeypatch, packing):
    """loss_chunk_size: same loss and gradients as whole logits, which never exist for more than a chunk."""
    settings = ["training.per_device_batch_size=4", "training.gradient_accumulation_steps=2",
                f"data.packing={str(packing).lower()}", "training.loss_chunk_size=50"]
    whole, loss_whole, batches, _ = first_step_gradients(fresh_trainer(tmp_path / "whole", *settings,
                                                                       "training.loss_chunk_size=0"))
    chunked_trainer = fresh_trainer(tmp_path / "chunked", *settings)
    module_rows, chunk_rows = lm_head_rows(chunked_trainer, monkeypatch)
    chunked, loss_chunked, _, _ = first_step_gradients(chunked_trainer)

    assert loss_chunked == pytest.approx(loss_whole, rel=1e-6)
    assert whole.keys() == chunked.keys() and len(whole) > 0
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
    supervised = sum(supervised_tokens(b) for b in batches)
    assert supervised > 2 * 50  # several chunks per micro-batch
    # each supervised position once, a chunk at a time, never recomputed; the model's own lm_head sees none
    assert max(chunk_rows) == 50 and sum(chunk_rows) == supervised
    assert len(module_rows) == 2 and set(module_rows) == {0}


class DeviceWaits(TorchDispatchMode):
    """Records the aten operators that make the host wait for a GPU (a value read back, or an output whose
    size depends on the data), as they are dispatched: on the CPU too, where nothing really waits."""

    WAITING = {"nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "unique", "_unique2", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.WAITING:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packing", [False, True])
def test_the_loss_backward_and_clipping_add_no_device_wait_to_the_forward(tmp_path, packing):
    """On a GPU a device wait mid-step stalls the queue. The collator finds the supervised positions on
    the CPU, so the chunked loss, the backward and the gradient clipping wait for nothing; the only waits
    are the model forward's own (transformers inspects the mask or position ids once, before any layer
    runs). Without the collator's positions the chunked loss finds them itself: one wait more, same loss."""
    trainer = fresh_trainer(tmp_path, f"data.packing={str(packing).lower()}", "training.max_grad_norm=1")
    batch = next(trainer._batches_of_epoch())[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with DeviceWaits() as forward:
        trainer.model(**inputs, use_cache=False)
    losses = {}
    for chunk_size in (0, 16):
        with DeviceWaits() as step:
            losses[chunk_size] = token_loss_sum(trainer.model, batch, chunk_size)
            losses[chunk_size].backward()
            norm = trainer._clip_gradients()
        assert step.seen == forward.seen, (chunk_size, step.seen)
        assert isinstance(norm, torch.Tensor) and float(norm) > 0  # read by the loop only when it logs
    assert len(batch["supervised_positions"]) == supervised_tokens(batch) > 16
    assert float(losses[16]) == pytest.approx(float(losses[0]), rel=1e-6)
    without = {k: v for k, v in batch.items() if k != "supervised_positions"}
    with torch.no_grad(), DeviceWaits() as found:
        loss_without = token_loss_sum(trainer.model, without, 16)
    assert found.seen == forward.seen + ["nonzero"]
    assert float(loss_without) == pytest.approx(float(losses[16]), rel=1e-6)


def test_chunked_loss_takes_the_last_hidden_state_by_a_hook_under_mixed_precision(tmp_path):
    """bf16 autocast as on a GPU (accelerate's native AMP, here on the CPU): the model is asked for no hidden
    states (transformers would hook every decoder layer, and accelerate cast what is returned to float32); the
    final norm's bf16 output is taken by a hook, which is removed afterwards."""
    from phi3_lora.loss import final_norm, output_head
    trainer = fresh_trainer(tmp_path, "model.dtype=bfloat16", "training.mixed_precision=bf16", "model.tiny_layers=3")
    assert trainer.accelerator.native_amp
    returned, heads_seen = [], []
    forward = trainer.model.forward  # accelerate's wrapper: autocast, then outputs cast to float32

    def recording(**kwargs):
        returned.append(forward(**kwargs))
        return returned[-1]
    trainer.model.forward = recording
    output_head(trainer.model).register_forward_pre_hook(lambda m, args: heads_seen.append(args[0]))
    batch = next(trainer._batches_of_epoch())[0]
    with trainer.accelerator.autocast():
        chunked = token_loss_sum(trainer.model, batch, chunk_size=7)
        whole = token_loss_sum(trainer.model, batch, chunk_size=0)
    assert returned[0].hidden_states is None and returned[0].logits.shape[1] == 0
    assert heads_seen[0].shape[1] == 0 and heads_seen[1].shape[1] == batch["input_ids"].shape[1]
    assert heads_seen[1].dtype == torch.bfloat16  # what the final norm hands lm_head, and the hook took
    assert not final_norm(trainer.model)._forward_hooks
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-2)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_head_cross_entropy_against_autograd(dtype, tolerance):
    """The hand-written gradient of FrozenHeadCrossEntropy is autograd's, in float32 and in bf16."""
    from phi3_lora.loss import chunked_cross_entropy
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).to(dtype).requires_grad_(False)
    hidden = torch.randn(37, 16, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (37,), generator=gen)
    want = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (want_grad,) = torch.autograd.grad(want * 0.5, hidden)
    got = chunked_cross_entropy(hidden, targets, head, chunk_size=10)
    (got_grad,) = torch.autograd.grad(got * 0.5, hidden)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert got_grad.dtype == dtype and want_grad.abs().sum() > 0
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=tolerance, atol=tolerance * 1e-2)


def test_chunked_loss_refuses_a_trainable_head():
    from phi3_lora.config import ConfigError
    from phi3_lora.loss import chunked_cross_entropy
    with pytest.raises(ConfigError, match="training.loss_chunk_size needs a frozen linear lm_head"):
        chunked_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.nn.Linear(4, 5), 2)


@pytest.mark.parametrize("variant", ["plain", "checkpointing", "qlora-checkpointing"])
def test_compiled_layers_train_like_eager_ones(tmp_path, variant):
    """training.compile: the same losses and adapter as eager (2 steps, fixed shapes: one compilation), and
    each layer one whole graph, also inside gradient checkpointing (a graph break there runs the layer eagerly)
    and around bitsandbytes' 4-bit layers."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # a fresh recompile budget: an exhausted one runs the layers eagerly, unnoticed
    runs = {}
    for compiled in ("false", "true"):
        out = tmp_path / compiled
        checkpointing = "true" if "checkpointing" in variant else "false"
        trainer = fresh_trainer(out, "data.max_seq_len=64", "training.per_device_batch_size=2",
                                "training.max_steps=2", f"training.compile={compiled}",
                                f"training.gradient_checkpointing={checkpointing}",
                                f"model.load_in_4bit={str(variant.startswith('qlora')).lower()}")
        layers = [m for m in trainer.model.modules() if type(m).__name__ == "Phi3DecoderLayer"]
        assert len(layers) == 2 and all((m._compiled_call_impl is not None) == (compiled == "true") for m in layers)
        assert all(m.gradient_checkpointing == (checkpointing == "true") for m in layers)
        counters.clear()
        summary = trainer.train()
        if compiled == "true":
            breaks = dict(counters["graph_break"])
            assert counters["stats"]["unique_graphs"] >= 1 and not breaks, breaks
        runs[compiled] = ([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()],
                          load_file(out / "adapter" / "adapter_model.safetensors"), summary)
    (eager_losses, eager, _), (losses, compiled, summary) = runs["false"], runs["true"]
    assert summary["examples_truncated"] > 0  # every row 64 tokens: one shape, one compilation
    assert losses == pytest.approx(eager_losses, rel=1e-5) and len(losses) == 2
    assert compiled.keys() == eager.keys() and len(eager) > 0  # names unchanged: no _orig_mod. prefix
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-6, msg=key)


def test_compile_with_dora_warns_of_the_graph_breaks_it_has(tmp_path, caplog):
    """peft's DoRA layers break the compiled graph (peft 0.21: ``type(weight).__module__.startswith`` in
    dequantize_module_weight); the loop says so, and the breaks are real (when peft fixes them, this fails and
    the warning goes)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # the earlier compile tests of this process used up the layers' recompile limit
    with caplog.at_level("WARNING", logger="phi3_lora.model"):
        trainer = fresh_trainer(tmp_path, "lora.use_dora=true", "training.compile=true", "data.max_seq_len=32")
    assert "training.compile with lora.use_dora" in caplog.text
    counters.clear()
    with torch.no_grad():
        token_loss_sum(trainer.model, next(trainer._batches_of_epoch())[0], 0)
    assert counters["graph_break"], "no graph break under DoRA any more: drop the warning in compile_decoder_layers"


def test_adapter_inputs_stay_16_bit_under_autocast_with_the_same_numbers(tmp_path):
    """Under bf16 autocast peft's float32 cast of each adapter's input is a round trip (autocast casts it back
    for the matmul), so the loop skips it: the same loss and gradients bit for bit (no dropout here), and
    the forward makes two full-width casts fewer per adapted layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CastsOfLayerInputs(TorchDispatchMode):
        """Counts dtype casts of (batch, sequence, features) tensors at least the hidden size (64) wide."""

        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 3 and args[0].shape[-1] >= 64:
                self.count += 1
            return func(*args, **(kwargs or {}))

    runs = {}
    for skipped in (True, False):
        trainer = fresh_trainer(tmp_path / str(skipped), "model.dtype=bfloat16", "training.mixed_precision=bf16",
                                "training.fuse_lora_add=false")  # peft's forward either way: bit for bit
        layers = [m for m in trainer.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert len(layers) == 8 and all(m.cast_input_dtype_enabled is False for m in layers)  # 2 layers x 4 targets
        if not skipped:
            for m in layers:  # peft's default
                m.cast_input_dtype_enabled = True
        batch = next(trainer._batches_of_epoch())[0]
        with torch.no_grad(), trainer.accelerator.autocast(), CastsOfLayerInputs() as casts:
            token_loss_sum(trainer.model, batch, 0)
        grads, loss, _, _ = first_step_gradients(trainer)
        runs[skipped] = casts.count, grads, loss
    (casts_skipped, grads_skipped, loss_skipped), (casts_peft, grads_peft, loss_peft) = runs[True], runs[False]
    assert casts_peft - casts_skipped == 2 * 8  # to float32 by peft, back to bfloat16 by autocast
    assert loss_skipped == loss_peft
    assert grads_skipped.keys() == grads_peft.keys() and len(grads_peft) == 16
    for name, grad in grads_peft.items():
        assert grad.dtype == torch.float32 and torch.equal(grads_skipped[name], grad), name


@pytest.mark.parametrize("settings", [(), ("model.dtype=bfloat16", "training.mixed_precision=bf16",
                                             "lora.use_dora=true")], ids=["float32-no-autocast", "bf16-autocast-dora"])
def test_adapter_input_casts_stay_without_autocast_and_for_dora(tmp_path, settings):
    """Without autocast a 16-bit input would meet float32 adapters; DoRA computes its weight norm in the input's
    dtype: in both cases every adapted layer keeps peft's cast."""
    trainer = fresh_trainer(tmp_path, *settings)
    layers = [m for m in trainer.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert len(layers) == 8 and all(m.cast_input_dtype_enabled for m in layers)
    assert bool(trainer.accelerator.native_amp) == bool(settings)


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_the_fp16_loss_scaler_skips_does_not_advance_the_schedule(tmp_path, monkeypatch, fused):
    """fp16 mixed precision (a GPU's, with torch's real GradScaler on the CPU, where accelerate makes none): a
    step whose gradients overflow (here an inf put into one adapter's gradient, as an fp16 overflow leaves) is
    skipped by the scaler, and the learning-rate schedule does not advance either, or every skipped step would
    cut the warmup and the decay short (fp16 runs skip their first few steps while the scale settles). Also with
    the fused AdamW the loop uses on CUDA (fused on the CPU here), which skips inside its kernel, unseen by
    accelerate."""
    from accelerate.optimizer import AcceleratedOptimizer

    import phi3_lora.loop
    if fused:
        monkeypatch.setattr(phi3_lora.loop, "build_optimizer",
                            lambda groups, t: torch.optim.AdamW(groups, lr=t.learning_rate, fused=True))
    trainer = fresh_trainer(tmp_path, "training.warmup_steps=0")  # cosine from step 0: every step moves the rate
    assert trainer.optimizer.optimizer.defaults["fused"] is (True if fused else None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    trainer.accelerator.scaler = scaler
    trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
    trainer.accelerator._optimizers = [trainer.optimizer]
    adapters = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in adapters.items()}
    batches, lr = trainer._batches_of_epoch(), trainer.scheduler.get_last_lr()[0]
    overflow = next(iter(adapters.values())).register_hook(lambda grad: grad * float("inf"))
    trainer.train_step(next(batches))
    overflow.remove()
    assert trainer.optimizer.step_was_skipped is not fused and scaler.get_scale() == 2.0 ** 15
    assert trainer.scheduler.last_epoch == 0 and trainer.scheduler.get_last_lr()[0] == lr
    assert all(torch.equal(p, before[n]) for n, p in adapters.items())
    trainer.train_step(next(batches))
    assert not trainer.optimizer.step_was_skipped and scaler.get_scale() == 2.0 ** 15
    assert trainer.scheduler.last_epoch == 1 and trainer.scheduler.get_last_lr()[0] < lr
    assert not all(torch.equal(p, before[n]) for n, p in adapters.items())


@pytest.mark.parametrize("rslora, scaling", [(False, 8 / 4), (True, 8 / 4 ** 0.5)])
def test_adapters_scale_by_alpha_over_r(rslora, scaling):
    """Every adapted layer multiplies its update by lora.alpha / lora.r (alpha / sqrt(r) with rsLoRA)."""
    from peft.tuners.lora import LoraLayer

    from phi3_lora.config import LoraConfig
    from phi3_lora.lora import attach_lora
    from phi3_lora.tiny import tiny_phi3_config, tiny_tokenizer
    from transformers import Phi3ForCausalLM
    model = attach_lora(Phi3ForCausalLM(tiny_phi3_config(tiny_tokenizer(), layers=2, hidden=64)),
                        LoraConfig(r=4, alpha=8, use_rslora=rslora), seed=0)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * 4 and all(m.scaling["default"] == pytest.approx(scaling) for m in layers)


def test_optimizer_groups_decay_matrices_only():
    """Weight decay on trainable matrices; none on 1-D parameters (norms, biases); frozen ones left out, and so
    is an empty group."""
    from phi3_lora.loop import optimizer_groups
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].requires_grad_(False)
    decayed, plain = optimizer_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert decayed["params"] == [model[0].weight]
    assert plain["params"] == [model[0].bias, model[1].weight, model[1].bias]
    model[0].bias.requires_grad_(False)
    model[1].requires_grad_(False)
    assert [g["weight_decay"] for g in optimizer_groups(model, 0.1)] == [0.1]


def test_steps_after_an_evaluation_train_with_dropout(tmp_path):
    """The first step trains with dropout, even on a base that from_pretrained left in eval mode; an evaluation
    puts the model in eval mode, and the next optimizer step's adapters see their dropout again. model.train(),
    a walk over every module, runs only when the mode changes."""
    trainer = fresh_trainer(tmp_path, "lora.dropout=0.5", "data.eval_size=8")
    trainer.model.eval()  # as from_pretrained leaves a model
    modes, switches = [], []
    dropouts = [m for name, m in trainer.model.named_modules() if name.endswith("lora_dropout.default")]
    for module in dropouts:
        module.register_forward_hook(lambda module, args, out: modes.append(module.training))
    train = trainer.model.train
    trainer.model.train = lambda mode=True: switches.append(mode) or train(mode)
    batches = trainer._batches_of_epoch()
    for _ in range(2):
        trainer.train_step(next(batches))
    assert len(modes) == 2 * len(dropouts) and all(modes) and switches == [True]
    modes.clear()
    trainer.evaluate()
    assert modes and not any(modes)
    modes.clear()
    trainer.train_step(next(batches))
    assert len(modes) == len(dropouts) and all(modes) and switches == [True, False, True]  # eval() is train(False)
