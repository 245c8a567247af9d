"""The optimizer, by name (``training.optimizer``): PyTorch AdamW or a bitsandbytes AdamW.

* ``adamw_torch``: ``torch.optim.AdamW``, with the fused kernel on CUDA (one launch for all
  parameters); on the CPU PyTorch's default implementation, so CPU results stay comparable.
* ``adamw_8bit``: bitsandbytes' AdamW with both moments stored blockwise-quantized in 8 bits —
  2 bytes of state a parameter instead of 8. Tensors under 4,096 elements keep 32-bit states
  (bitsandbytes' ``min_8bit_size``), where quantization would save nothing.
* ``paged_adamw_8bit`` / ``paged_adamw_32bit``: the same states in CUDA unified memory, which
  the driver pages out to CPU memory when the GPU runs short instead of failing with
  out-of-memory (on the CPU bitsandbytes falls back to ordinary buffers, and says so). Loading
  a checkpoint's state would put it in ordinary GPU memory: ``page_loaded_state`` moves it back.

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


def page_loaded_state(optimizer) -> None:
    """After ``load_state_dict``: a paged optimizer's per-parameter states back in paged buffers.

    bitsandbytes pages the states it allocates itself, but a loaded state is an ordinary tensor that
    its first step moves to the GPU, so a resumed run would hold every state in GPU memory, what paging
    was chosen to avoid. Each state the size of its parameter is copied into the buffer bitsandbytes
    would have allocated (paged for large parameters on a GPU, ordinary otherwise). No-op for other
    optimizers (also DeepSpeed's, which keeps its own state).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if not getattr(inner, "is_paged", False):
        return
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and not getattr(value, "is_paged", False):
                    state[key] = inner.get_state_buffer(p, dtype=value.dtype)
                    state[key].copy_(value)
