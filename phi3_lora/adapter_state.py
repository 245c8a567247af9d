"""Load an adapter state_dict into a model, checked: strict=False for the base, strict for the adapter.

An adapter file holds only adapter tensors, so the frozen base weights are always "missing"
from it — that is expected. What is not: a key the model does not have (an adapter saved from a
different targets/rank setting, or a renamed module) and an adapter parameter the file lacks.
Both are errors, listed by name; ``torch``'s own shape check also still applies.
"""

from __future__ import annotations

import torch


class AdapterStateError(ValueError):
    """An adapter file does not fit the model it is loaded into; the message names the keys."""


def load_adapter_state(model, state: dict[str, torch.Tensor], source: str = "adapter state") -> None:
    """Copy ``state`` into ``model``'s trainable (adapter) parameters.

    Raises:
        AdapterStateError: ``state`` has keys the model lacks, or lacks adapter keys the model has.
    """
    own = model.state_dict()
    adapter_keys = {name for name, p in model.named_parameters() if p.requires_grad}
    problems = []
    unexpected = sorted(set(state) - set(own))
    missing = sorted(adapter_keys - set(state))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(state) & set(own))
                   if state[k].shape != own[k].shape]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if missing:
        problems.append(f"{len(missing)} adapter key(s) missing, e.g. {missing[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {wrong_shape[:2]}")
    if problems:  # checked before anything is copied: the model is left as it was
        raise AdapterStateError(f"{source}: does not fit this model: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)
