"""The optimizer, by name (``training.optimizer``): PyTorch AdamW or a bitsandbytes AdamW.

* ``adamw_torch``: ``torch.optim.AdamW``, with the fused kernel on CUDA (one launch for all
  parameters); on the CPU PyTorch's default implementation, so CPU results stay comparable.
* ``adamw_8bit``: bitsandbytes' AdamW with both moments stored blockwise-quantized in 8 bits —
  2 bytes of state a parameter instead of 8. Tensors under 4,096 elements keep 32-bit states
  (bitsandbytes' ``min_8bit_size``), where quantization would save nothing.
* ``paged_adamw_8bit`` / ``paged_adamw_32bit``: the same states in CUDA unified memory, which
  the driver pages out to CPU memory when the GPU runs short instead of failing with
  out-of-memory (on the CPU bitsandbytes falls back to ordinary buffers, and says so). Loading
  a checkpoint's state would put it in ordinary GPU memory: ``load_optimizer_state`` pages it.

All take the parameter groups of ``loop.optimizer_groups`` and the AdamW settings of the
``training`` section.
"""

from __future__ import annotations

import torch

from .config import TrainingConfig
from .quant import require_bitsandbytes

BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                  "paged_adamw_32bit": "PagedAdamW32bit"}


def build_optimizer(groups: list[dict], cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names, over ``groups``.

    Raises:
        ConfigError: a bitsandbytes optimizer is asked for and bitsandbytes is not installed.
    """
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw_torch":
        return torch.optim.AdamW(groups, fused=True if torch.cuda.is_available() else None, **kwargs)
    require_bitsandbytes(f"training.optimizer={cfg.optimizer}")
    import bitsandbytes as bnb

    return getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optimizer])(groups, **kwargs)


MOMENTS = ("exp_avg", "exp_avg_sq", "state1", "state2")  # PyTorch's AdamW; bitsandbytes' (8-bit: uint8, same shape)


def check_moment_shapes(optimizer, state: dict, source) -> None:
    """Each saved AdamW moment has its parameter's shape, else a CheckpointError naming ``source``."""
    from .checkpoint import CheckpointError

    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = state.get("state", {}) if isinstance(state, dict) else {}
    for index, moments in saved.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(moments, dict):
            continue  # PyTorch's own load_state_dict names a mismatch of groups and parameters
        for key in MOMENTS:
            value = moments.get(key)
            if torch.is_tensor(value) and value.shape != params[index].shape:
                raise CheckpointError(f"{source}: its '{key}' of parameter {index} has shape {tuple(value.shape)}, "
                                      f"the parameter {tuple(params[index].shape)}: the state of another model or rank")


def load_optimizer_state(optimizer, state: dict, source="the optimizer state") -> None:
    """``optimizer.load_state_dict(state)``; a paged optimizer's per-parameter states go into paged buffers.

    bitsandbytes pages only the buffers it allocates itself: its ``load_state_dict`` would put the
    loaded states in ordinary GPU memory, so a resumed run would hold them all there, what paging was
    chosen to avoid. For a paged optimizer the states are loaded where they are (the CPU), and each
    state the size of its parameter is copied into the buffer bitsandbytes would have allocated
    (paged for large parameters on a GPU, ordinary otherwise); the rest (quantization maps, scales)
    goes to the GPU at its first step, as bitsandbytes does. ``optimizer`` may be accelerate's wrapper.
    Moments of another shape than their parameter's (another rank's file) are a CheckpointError naming
    ``source``: PyTorch would load them, and the first step would fail.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    check_moment_shapes(inner, state, source)
    if not getattr(inner, "is_paged", False):
        return optimizer.load_state_dict(state)
    inner.load_state_dict(state, move_to_device=False)
    for group in inner.param_groups:
        for p in group["params"]:
            param_state = inner.state.get(p, {})
            for key, value in param_state.items():
                if torch.is_tensor(value) and value.shape == p.shape and not getattr(value, "is_paged", False):
                    param_state[key] = inner.get_state_buffer(p, dtype=value.dtype)
                    param_state[key].copy_(value)
