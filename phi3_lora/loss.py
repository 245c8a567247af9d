"""The training loss: the sum of next-token cross-entropies over the supervised tokens of a batch.

Two ways to compute the same number, chosen by ``training.loss_chunk_size`` (by default 1024 on a
GPU, 128 on the CPU: ``config.effective_chunk_size``):

- ``chunk_size=0``: the model returns logits for every position, as Hugging Face
  does; cross-entropy upcasts them to fp32. For Phi-3's 32,064-word vocabulary that is
  ``tokens x 32064 x 4`` bytes (0.5 GB at 4,096 tokens) plus as much again for their gradient.
- ``chunk_size=N``: the model stops at the last hidden state (``logits_to_keep`` = no position,
  the state taken by a hook on the final norm);
  only the supervised positions are kept, and ``lm_head`` + cross-entropy run over N of them at a
  time, each chunk's gradient for the hidden state computed in the same pass (``lm_head`` is
  frozen), so logits exist for at most N tokens and are never recomputed: the same two ``lm_head``
  matmuls a token as whole logits, none for unsupervised positions.

Both give the same loss and gradients up to fp32 summation order (``tests/test_loss.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import IGNORE_INDEX, supervised_positions

NO_POSITIONS = torch.empty(0, dtype=torch.long)  # logits_to_keep that makes lm_head see zero positions
# What of a collated batch the model reads; the flash-attention bounds come with packing under flash-attention
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")


def token_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropies over the supervised tokens of ``batch``.

    Args:
        model: the causal LM, as prepared by accelerate (DDP, DeepSpeed engine) or bare.
        batch: ``input_ids``, ``labels`` (``IGNORE_INDEX`` where unsupervised) and ``attention_mask``
            or ``position_ids`` (packed rows, with flash-attention's bounds under ``varlen``); the chunked loss
            also takes the collator's ``supervised_positions`` (else it finds them itself, a device sync on a GPU).
        chunk_size: 0 = logits for all positions at once; N = chunked, see the module docstring.
    Returns:
        A 0-dim fp32 tensor.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if not chunk_size:
        logits = model(**inputs, use_cache=False).logits
        targets = batch["labels"][:, 1:].reshape(-1)
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets,
                               ignore_index=IGNORE_INDEX, reduction="sum")
    hidden = last_hidden_state(model, inputs)
    positions = batch.get("supervised_positions")  # found by the collator on the CPU: nothing waits for the GPU
    if positions is None:
        positions = supervised_positions(batch["labels"])
    return chunked_cross_entropy(hidden.flatten(0, 1)[positions], batch["labels"].flatten()[positions + 1],
                                 output_head(model), chunk_size)


def last_hidden_state(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's last hidden state after its final norm (what ``lm_head`` sees), with ``lm_head`` run on no position.

    Taken by a forward hook on the final norm rather than with ``output_hidden_states``: that option has
    transformers hook every decoder layer (Python work per layer, and a graph break in each layer that
    ``training.compile`` compiles, which then runs eagerly under gradient checkpointing), and under bf16/fp16
    mixed precision accelerate casts what the model returns to float32 (a copy of the state and of its gradient).
    """
    captured = []
    handle = final_norm(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**inputs, use_cache=False, logits_to_keep=NO_POSITIONS.to(inputs["input_ids"].device))
    finally:
        handle.remove()
    return captured[-1]


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                          chunk_size: int) -> torch.Tensor:
    """Sum of ``cross_entropy(head(hidden), targets)`` over rows, ``chunk_size`` rows at a time.

    ``head`` must be a frozen ``nn.Linear``, as Phi-3's lm_head is here (also under QLoRA, and LoRA
    never targets it, see ``lora.check_targets``).
    """
    if type(head) is not torch.nn.Linear or any(p.requires_grad for p in head.parameters()):
        what = type(head).__name__ if type(head) is not torch.nn.Linear else "a trainable Linear"
        raise ConfigError(f"training.loss_chunk_size needs a frozen linear lm_head, not {what}; "
                          "set training.loss_chunk_size=0")
    if len(targets) == 0:  # 0, still attached to the graph: an empty micro-batch's backward must run too
        return hidden.sum().float()
    return FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_size)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits in float32 (a function of its own so that tests can count the rows)."""
    return F.linear(hidden, weight, bias).float()


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of ``cross_entropy(hidden @ weight.T + bias, targets)`` for a frozen head, chunk by chunk.

    Forward computes, per chunk, the logits, the loss, and d loss / d hidden = (softmax - onehot) @
    weight, as the backward of the whole-logits path would (float32 softmax, the product in the
    weight's dtype); backward only scales that saved gradient. Two matmuls a token, as with whole
    logits, and no logits survive their chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, len(targets), chunk_size):
            part = slice(start, start + chunk_size)
            target = targets[part]
            # one fused pass (logsumexp, then subtracting it, took a third longer on the CPU); the logits go with it
            log_probs = torch.log_softmax(chunk_logits(hidden[part], weight, bias), dim=-1)
            total -= log_probs.gather(1, target[:, None]).sum()
            if grad is not None:
                probs = log_probs.exp_()  # softmax, in place
                probs[torch.arange(len(target), device=target.device), target] -= 1
                grad[part] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def output_head(model) -> torch.nn.Module:
    """``lm_head`` of ``model`` through the DDP / DeepSpeed (``.module``) and PEFT wrappers."""
    return _unwrapped(model).get_output_embeddings()


def final_norm(model) -> torch.nn.Module:
    """The decoder's last norm (``model.model.norm`` of Phi-3) through the same wrappers."""
    return _unwrapped(model).get_decoder().norm


def _unwrapped(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is supervised: the count ``token_loss_sum`` sums over."""
    if "supervised_positions" in batch:
        return len(batch["supervised_positions"])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
