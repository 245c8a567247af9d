"""The loss of an optimizer step is token-normalised over all its micro-batches: accumulation is exact."""

import pytest
import torch

from conftest import FAST, in_process_trainer
from phi3_lora.config import load_config


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
    loss_sum, n_tokens, _, _ = trainer.train_step(batches)
    return captured, loss_sum / n_tokens, batches


def test_one_batch_of_8_equals_four_micro_batches_of_2(tmp_path):
    whole, loss_whole, batches_whole = first_step_gradients(
        fresh_trainer(tmp_path / "a", "training.per_device_batch_size=8", "training.gradient_accumulation_steps=1"))
    split, loss_split, batches_split = first_step_gradients(
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


def test_token_normalisation_is_not_a_mean_of_means(tmp_path):
    """The step loss weighs micro-batches by their supervised tokens (a mean of means would not)."""
    from phi3_lora.loop import supervised_tokens, token_loss_sum
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
