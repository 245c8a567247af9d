"""Packing is exact: packed rows give every example the same loss and gradients as unpacked batches.

And the LongRoPE guard: a long example batched with short ones would switch them all to the long
rope factors; the plan never lets the two kinds meet.
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import in_process_trainer
from phi3_lora.config import ConfigError, load_config
from phi3_lora.data import IGNORE_INDEX, Collator, TrainItems, build_datasets, use_chat_template
from phi3_lora.lora import attach_lora
from phi3_lora.loss import MODEL_INPUTS, token_loss_sum
from phi3_lora.model import load_model, load_tokenizer


def setup(*overrides):
    cfg = load_config(None, ["data.demo_size=40", "data.eval_size=0", "lora.dropout=0", "model.tiny_hidden_size=64",
                             "data.max_seq_len=400", *overrides])
    tokenizer = load_tokenizer(cfg.model)
    use_chat_template(tokenizer, cfg.data.chat_template)
    train, _ = build_datasets(cfg.data, tokenizer, seed=0)
    model = attach_lora(load_model(cfg.model, tokenizer, seed=0), cfg.lora, seed=0)
    with torch.no_grad():  # non-zero B so that every adapter weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return cfg, tokenizer, train, model


def per_example_losses(model, batch, rows):
    """Token cross-entropy sums per example id. ``rows`` lists the example ids of each row, in order;
    in a packed row an example starts where position_ids return to 0."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits.float()
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                   ignore_index=IGNORE_INDEX, reduction="none")
    positions = batch.get("position_ids", torch.arange(batch["input_ids"].size(1)).expand_as(batch["input_ids"]))
    segment = (positions == 0).cumsum(1)[:, 1:] - 1  # which example of its row each target token belongs to
    return {example: token_losses[r][segment[r] == k].sum()
            for r, ids in enumerate(rows) for k, example in enumerate(ids)}


def test_packed_and_unpacked_give_the_same_per_example_losses_and_gradients():
    cfg, tokenizer, train, model = setup()
    items = TrainItems(train, max_seq_len=400, packing=True, long_threshold=None)
    rows = items.rows[:3]
    assert min(len(row) for row in rows) > 1  # rows really hold several examples
    packed_batch = Collator(tokenizer.pad_token_id, packed=True)([items[r] for r in range(3)])
    unpacked_batch = Collator(tokenizer.pad_token_id)([[train.dataset[i]] for row in rows for i in row])

    packed = per_example_losses(model, packed_batch, rows)
    unpacked = per_example_losses(model, unpacked_batch, [[i] for row in rows for i in row])
    assert packed.keys() == unpacked.keys() and len(packed) >= 4
    for i in packed:
        torch.testing.assert_close(packed[i], unpacked[i], rtol=1e-5, atol=1e-5, msg=f"example {i}")

    grads = []
    for batch in (packed_batch, unpacked_batch):
        model.zero_grad()
        token_loss_sum(model, batch).backward()  # the loop's own loss function
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, packed_grad in grads[0].items():
        # relative to the tensor's scale: the losses are sums over ~4000 tokens, so the gradients are large
        error = float((packed_grad - grads[1][name]).abs().max() / grads[1][name].abs().max())
        assert error < 1e-5, f"{name}: relative difference {error:.2e}"


def _attend(q, k, v, scale, causal):  # one sequence: [length, heads, dim]
    out = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (q, k, v)), is_causal=causal, scale=scale)
    return out.transpose(0, 1)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False):
    """A CPU stand-in for flash-attn's kernel (CUDA only), with its signature: each row one sequence."""
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.size(0))])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """A CPU stand-in for flash-attn's variable-length kernel: the sequences lie end to end, split at cu_seqlens."""
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)  # the real kernel takes ints
    bounds = cu_seqlens_q.tolist()
    assert max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    return torch.cat([_attend(q[a:b], k[a:b], v[a:b], softmax_scale, causal) for a, b in zip(bounds, bounds[1:])])


def test_flash_attention_sees_each_packed_example_alone(monkeypatch):
    """Packing under flash_attention_2 (the GPU recipes' kernel), with flash-attn's CUDA kernels replaced by
    the CPU stand-ins above and transformers' own flash-attention path around them: the collator's one row
    with each example's bounds gives every example its unpacked loss and the same gradients, and no layer
    has to find the bounds from position_ids (a device sync on a GPU). Packed rows as sdpa takes them
    would let examples attend to the ones before them in their row: transformers runs the variable-length
    kernel on single rows only."""
    import transformers.modeling_flash_attention_utils as flash_utils

    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: (
        flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input, flash_utils._unpad_input))
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    found_bounds = []
    monkeypatch.setattr(flash_utils, "prepare_fa_kwargs_from_position_ids", lambda *args: found_bounds.append(args))
    cfg, tokenizer, train, model = setup()
    items = TrainItems(train, max_seq_len=400, packing=True, long_threshold=None)
    rows = items.rows[:3]
    unpacked_batch = Collator(tokenizer.pad_token_id)([[train.dataset[i]] for row in rows for i in row])
    one_row = [[i for row in rows for i in row]]
    varlen_batch = Collator(tokenizer.pad_token_id, packed=True, varlen=True)([items[r] for r in range(3)])
    lengths = [len(train.dataset[i]["input_ids"]) for i in one_row[0]]
    assert varlen_batch["input_ids"].shape == (1, sum(lengths))  # no padding
    assert varlen_batch["cu_seq_lens_q"].tolist() == [sum(lengths[:k]) for k in range(len(lengths) + 1)]
    rows_batch = Collator(tokenizer.pad_token_id, packed=True)([items[r] for r in range(3)])
    # unpacked, one example an item (data.packing=false, and evaluation): under flash the same one row, unpadded
    unpacked_varlen = Collator(tokenizer.pad_token_id, varlen=True)([[train.dataset[i]] for i in one_row[0]])
    assert unpacked_varlen.keys() == varlen_batch.keys() and "attention_mask" not in unpacked_varlen
    for key, value in varlen_batch.items():
        assert torch.equal(torch.as_tensor(unpacked_varlen[key]), torch.as_tensor(value)), key

    with torch.no_grad():
        unpacked = per_example_losses(model, unpacked_batch, [[i] for i in one_row[0]])
        model.config._attn_implementation_internal = "flash_attention_2"  # set_attn_implementation wants flash-attn
        varlen = per_example_losses(model, varlen_batch, one_row)
        leaky = per_example_losses(model, rows_batch, rows)
    assert varlen.keys() == unpacked.keys() and len(varlen) >= 4
    for i in varlen:
        torch.testing.assert_close(varlen[i], unpacked[i], rtol=1e-5, atol=1e-5, msg=f"example {i}")
    assert max(abs(float(leaky[i] - unpacked[i])) for i in leaky) > 1e-2
    assert not found_bounds

    grads = []
    for attention, batch in (("flash_attention_2", varlen_batch), ("sdpa", unpacked_batch)):
        model.config._attn_implementation_internal = attention
        model.zero_grad()
        token_loss_sum(model, batch, chunk_size=64).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, varlen_grad in grads[0].items():
        error = float((varlen_grad - grads[1][name]).abs().max() / grads[1][name].abs().max())
        assert error < 1e-5, f"{name}: relative difference {error:.2e}"

    # evaluate.py's loss (inference.dataset_loss) collates its batches the same way under flash-attention
    from phi3_lora.inference import dataset_loss
    losses = {}
    for attention in ("flash_attention_2", "sdpa"):
        model.config._attn_implementation_internal = attention
        losses[attention] = dataset_loss(model, train, tokenizer.pad_token_id, batch_size=4)
    assert losses["flash_attention_2"][1] == losses["sdpa"][1]  # the same supervised tokens
    assert losses["flash_attention_2"][0] == pytest.approx(losses["sdpa"][0], rel=1e-5)


def test_packing_is_not_isolated_with_a_cache():
    """Why the loop passes use_cache=False: with a cache, transformers does not split packed rows."""
    cfg, tokenizer, train, model = setup()
    items = TrainItems(train, max_seq_len=400, packing=True, long_threshold=None)
    row = next(r for r in items.rows if len(r) > 1)
    batch = Collator(tokenizer.pad_token_id, packed=True)([[train.dataset[i] for i in row]])
    with torch.no_grad():
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    first = len(train.dataset[row[0]]["input_ids"])
    torch.testing.assert_close(isolated[:, :first], leaky[:, :first])  # the first example is the same
    assert (isolated[:, first:] - leaky[:, first:]).abs().max() > 1e-3  # later ones saw the first


def test_longrope_one_long_example_changes_a_short_ones_loss_unless_kept_apart():
    cfg, tokenizer, train, model = setup("model.tiny_rope=longrope", "data.max_seq_len=2048")
    from phi3_lora.data import long_context_threshold
    threshold = long_context_threshold(model.config)
    assert threshold == 1024  # the tiny LongRoPE model's original context (4096 / 4)
    short = train.dataset[0]
    long_ids = (short["input_ids"] * (threshold // len(short["input_ids"]) + 2))[:threshold + 50]
    long = {"input_ids": long_ids, "labels": [IGNORE_INDEX] * len(long_ids), "example_id": 999}
    collate = Collator(tokenizer.pad_token_id, packed=True)
    with torch.no_grad():
        alone = per_example_losses(model, collate([[short]]), [[0]])[0]
        mixed = per_example_losses(model, collate([[short], [long]]), [[0], [1]])[0]
    assert abs(float(alone - mixed)) > 1e-4  # the trap: the long row flipped the short one's factors
    # the guard: TrainItems gives the kinds to the plan, which never puts them in one step
    from phi3_lora.data import plan_epoch
    lengths = [len(x) for x in train.dataset["input_ids"]]
    fake = type("Split", (), {"dataset": _ListDataset([*[train.dataset[i] for i in range(len(lengths))], long])})()
    items = TrainItems(fake, max_seq_len=2048, packing=True, long_threshold=threshold)
    # the long example has a row of its own (it would fit beside short ones: 2048 > 1074 + a short one)
    assert sum(items.kinds) == 1 and items.rows[items.kinds.index(1)] == [len(lengths)]
    assert len(long_ids) + len(short["input_ids"]) <= 2048
    for steps in (plan_epoch(len(items), epoch, 0, 2, 2, 1, 0, kinds=items.kinds) for epoch in range(3)):
        for step in steps:
            positions = [max(len(e["input_ids"]) for e in items[r]) for micro in step for r in micro]
            assert all(p > threshold for p in positions) or all(p <= threshold for p in positions)


def test_padding_of_a_packed_row_does_not_switch_short_examples_to_the_long_factors():
    """Two examples under LongRoPE's original context packed in one row, beside a short row: the short
    row's padding is as long as the packed row, and had positions beyond the threshold (long factors
    for the whole batch); padding keeps position 0, so the short example's loss is its loss alone."""
    from phi3_lora.data import long_context_threshold
    cfg, tokenizer, train, model = setup("model.tiny_rope=longrope", "data.max_seq_len=2048")
    threshold = long_context_threshold(model.config)
    short = train.dataset[0]

    def example(n, example_id):
        ids = (short["input_ids"] * (n // len(short["input_ids"]) + 1))[:n]
        return {"input_ids": ids, "labels": ids, "example_id": example_id}

    collate = Collator(tokenizer.pad_token_id, packed=True)
    batch = collate([[example(threshold - 24, 1), example(threshold - 24, 2)], [short]])
    assert batch["input_ids"].size(1) - len(short["input_ids"]) > threshold  # the padding is longer than 1024
    assert int(batch["position_ids"].max()) == threshold - 25
    with torch.no_grad():
        alone = per_example_losses(model, collate([[short]]), [[0]])[0]
        batched = per_example_losses(model, batch, [[1, 2], [0]])
    torch.testing.assert_close(batched[0], alone, rtol=1e-5, atol=1e-5)
    assert float(batched[1]) > 0 and float(batched[2]) > 0


def test_longrope_kinds_switch_where_transformers_switches_the_factors():
    """The boundary, from transformers' own behaviour: an example of exactly the original context (1024
    tokens, largest position 1023) leaves a short one's factors alone, one token more switches them; the
    kinds say the same."""
    from phi3_lora.data import long_context_kinds, long_context_threshold
    cfg, tokenizer, train, model = setup("model.tiny_rope=longrope", "data.max_seq_len=2048")
    threshold = long_context_threshold(model.config)
    short = train.dataset[0]
    collate = Collator(tokenizer.pad_token_id, packed=True)
    changed = {}
    with torch.no_grad():
        alone = per_example_losses(model, collate([[short]]), [[0]])[0]
        for n in (threshold, threshold + 1):
            ids = (short["input_ids"] * (n // len(short["input_ids"]) + 1))[:n]
            other = {"input_ids": ids, "labels": [IGNORE_INDEX] * n, "example_id": 999}
            mixed = per_example_losses(model, collate([[short], [other]]), [[0], [1]])[0]
            changed[n] = abs(float(alone - mixed)) > 1e-4
    assert changed == {threshold: False, threshold + 1: True}
    assert long_context_kinds([threshold, threshold + 1, 5], threshold) == [0, 1, 0]


def test_longrope_eval_loss_does_not_depend_on_the_batch_size():
    """Evaluation batches keep LongRoPE's kinds apart too (the loop's evaluate and evaluate.py's dataset_loss
    share eval_plan): one long example among short ones, the same loss at batch 1 and batch 8, where a plain
    batch of all 8 gives another."""
    from phi3_lora.data import TokenizedSplit, long_context_threshold
    from phi3_lora.inference import dataset_loss
    from phi3_lora.loss import supervised_tokens
    cfg, tokenizer, train, model = setup("model.tiny_rope=longrope", "data.max_seq_len=2048")
    threshold = long_context_threshold(model.config)
    short = train.dataset[0]
    long_ids = (short["input_ids"] * (threshold // len(short["input_ids"]) + 2))[:threshold + 50]
    rows = [train.dataset[i] for i in range(3)] + [{"input_ids": long_ids, "labels": long_ids, "example_id": 999}]
    rows += [train.dataset[i] for i in range(3, 7)]
    split = TokenizedSplit(_ListDataset(rows), truncated=0, dropped=0)
    by_batch_size = {size: dataset_loss(model, split, tokenizer.pad_token_id, size)[0] for size in (1, 8)}
    assert by_batch_size[8] == pytest.approx(by_batch_size[1], rel=1e-5)
    with torch.no_grad():
        batch = Collator(tokenizer.pad_token_id)([[row] for row in rows])
        mixed = float(token_loss_sum(model, batch)) / supervised_tokens(batch)
    assert abs(mixed - by_batch_size[1]) > 1e-4  # the trap the plan avoids


class _ListDataset(list):
    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self]
        return list.__getitem__(self, key)


def test_flex_attention_gives_packed_rows_the_losses_of_sdpa_under_a_sliding_window(tmp_path):
    """model.attn_implementation=flex_attention (a GPU speed option): on the CPU its forward (PyTorch has
    no flex backward there) gives every packed example sdpa's loss, with a sliding window shorter than the
    examples so that the window's mask is exercised; training with it on the CPU is a one-line error."""
    cfg, tokenizer, train, model = setup()
    items = TrainItems(train, max_seq_len=400, packing=True, long_threshold=None)
    rows = items.rows[:2]
    batch = Collator(tokenizer.pad_token_id, packed=True)([items[r] for r in range(2)])
    window = 24
    assert min(len(train.dataset[i]["input_ids"]) for row in rows for i in row) > window
    model.config.sliding_window = window
    losses = {}
    for attention in ("sdpa", "flex_attention", "eager"):
        model.set_attn_implementation(attention)
        with torch.no_grad():
            losses[attention] = per_example_losses(model, batch, rows)
    model.config.sliding_window = None
    with torch.no_grad():
        without_window = per_example_losses(model, batch, rows)
    for i, loss in losses["sdpa"].items():
        torch.testing.assert_close(losses["flex_attention"][i], loss, rtol=1e-5, atol=1e-5, msg=f"example {i}")
        torch.testing.assert_close(losses["eager"][i], loss, rtol=1e-5, atol=1e-5, msg=f"example {i}")
        assert abs(float(without_window[i] - loss)) > 1e-3  # the window did change the losses

    if torch.cuda.is_available():
        return  # it trains there
    flex = load_config(None, [f"output_dir={tmp_path}", "model.attn_implementation=flex_attention"])
    with pytest.raises(ConfigError, match="^model.attn_implementation=flex_attention trains on CUDA GPUs only"):
        in_process_trainer(flex)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written
