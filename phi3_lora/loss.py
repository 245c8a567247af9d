"""The training loss: the sum of next-token cross-entropies over the supervised tokens of a batch.

Two ways to compute the same number:

- ``chunk_size=0`` (the default): the model returns logits for every position, as Hugging Face
  does; cross-entropy upcasts them to fp32. For Phi-3's 32,064-word vocabulary that is
  ``tokens x 32064 x 4`` bytes (0.5 GB at 4,096 tokens) plus as much again for their gradient.
- ``chunk_size=N``: the model stops at the last hidden state (``logits_to_keep`` = no position);
  only the supervised positions are kept, and ``lm_head`` + cross-entropy run over N of them at a
  time under activation checkpointing, so logits exist for at most N tokens, in forward and in
  backward (where each chunk's logits are recomputed: one more ``lm_head`` matmul per token).

Both give the same loss and gradients up to fp32 summation order (``tests/test_loss.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

NO_POSITIONS = torch.empty(0, dtype=torch.long)  # logits_to_keep that makes lm_head see zero positions


def token_loss_sum(model, batch: dict[str, torch.Tensor], chunk_size: int = 0) -> torch.Tensor:
    """Sum (not mean) of the next-token cross-entropies over the supervised tokens of ``batch``.

    Args:
        model: the causal LM, as prepared by accelerate (DDP, DeepSpeed engine) or bare.
        batch: ``input_ids``, ``labels`` (``IGNORE_INDEX`` where unsupervised) and ``attention_mask``
            or ``position_ids`` (packed rows).
        chunk_size: 0 = logits for all positions at once; N = chunked, see the module docstring.
    Returns:
        A 0-dim fp32 tensor.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    targets = batch["labels"][:, 1:]
    if not chunk_size:
        logits = model(**inputs, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    outputs = model(**inputs, use_cache=False, output_hidden_states=True,
                    logits_to_keep=NO_POSITIONS.to(targets.device))
    hidden = outputs.hidden_states[-1][:, :-1]  # after the final norm: what lm_head would see
    supervised = targets != IGNORE_INDEX
    return chunked_cross_entropy(hidden[supervised], targets[supervised], output_head(model), chunk_size)


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                          chunk_size: int) -> torch.Tensor:
    """Sum of ``cross_entropy(head(hidden), targets)`` over rows, ``chunk_size`` rows at a time,
    each chunk's logits freed after its loss and recomputed in backward."""
    if len(targets) == 0:  # 0, still attached to the graph: an empty micro-batch's backward must run too
        return hidden.sum().float()
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(targets), chunk_size):
        part = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_cross_entropy, hidden[part], targets[part], head, use_reentrant=False)
        else:  # evaluation: nothing is kept for a backward
            total = total + _head_cross_entropy(hidden[part], targets[part], head)
    return total


def _head_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def output_head(model) -> torch.nn.Module:
    """``lm_head`` of ``model`` through the DDP / DeepSpeed (``.module``) and PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_output_embeddings()


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is supervised: the count ``token_loss_sum`` sums over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
