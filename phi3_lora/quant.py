"""Quantized base models for QLoRA: bitsandbytes settings, k-bit preparation, and clear errors.

The ``model`` section takes the names of transformers' ``BitsAndBytesConfig``
(``load_in_4bit``, ``load_in_8bit``, ``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``,
``bnb_4bit_compute_dtype``, ``bnb_4bit_quant_storage``). Every linear layer of the decoder
becomes a bitsandbytes ``Linear4bit`` (or ``Linear8bitLt``); ``lm_head`` stays unquantized, as
transformers leaves it, and so do the embeddings and norms.

What "preparing a k-bit model for training" means here, and why it is less than peft's
``prepare_model_for_kbit_training``:

* Every base parameter is frozen; only the LoRA adapters, which peft keeps in float32
  (``autocast_adapter_dtype``), train. float32 is needed there — the optimizer updates them.
* Nothing else is upcast. peft casts every non-4-bit parameter to float32; for Phi-3-mini
  that doubles the frozen embeddings and head (2 x 197 MB in bf16), and an fp32 RMSNorm
  weight turns the residual stream float32 (``Phi3RMSNorm`` returns ``weight * x``), which
  doubles the activations kept for backward. Neither buys precision that training needs:
  Phi3RMSNorm already computes its statistics in float32, and the loss upcasts the logits
  to float32 before the softmax (``loss.token_loss_sum``).
* bitsandbytes' CPU inference repacking, which breaks the backward after an evaluation, is
  switched off (see ``prepare_kbit_model``).
* With gradient checkpointing the input embeddings' outputs are made to require grad
  (``model.enable_gradient_checkpointing``), so that checkpointed blocks on a frozen base
  still pass gradients to the adapters.

``bitsandbytes_unused`` says when a run cannot need bitsandbytes at all, so that the training
script can skip its import (peft imports it whenever it is installed, and the import compiles
kernels: about a second on a CPU).

Nothing here knows about processes or ranks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import TINY_MODEL, Config, ConfigError, ModelConfig

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[qlora]'"
STORAGE_DTYPES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "float32": torch.float32}


def require_bitsandbytes(what: str) -> None:
    """Raise a one-line ConfigError naming ``what`` asked for bitsandbytes and how to install it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None


def is_quantized(cfg: ModelConfig) -> bool:
    return cfg.load_in_4bit or cfg.load_in_8bit


def bitsandbytes_unused(cfg: Config) -> bool:
    """True when the run cannot touch bitsandbytes: nothing is quantized, the optimizer is PyTorch's AdamW,
    and the base is the tiny model or a local checkpoint whose ``config.json`` was not saved quantized.
    False for a hub id (it may name a quantized checkpoint) and whenever in doubt."""
    if is_quantized(cfg.model) or cfg.training.optimizer != "adamw_torch":
        return False
    if cfg.model.name_or_path == TINY_MODEL:
        return True
    try:
        saved = json.loads((Path(cfg.model.name_or_path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "quantization_config" not in saved


def quantization_setting(cfg: ModelConfig) -> str:
    """The key that asked for quantization, for messages."""
    return "model.load_in_4bit" if cfg.load_in_4bit else "model.load_in_8bit"


def bnb_config(cfg: ModelConfig, weights_dtype: torch.dtype, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for ``cfg``, or None when the model is not quantized.

    Args:
        weights_dtype: dtype of the unquantized parts (embeddings, norms, lm_head).
        compute_dtype: dtype 4-bit weights are dequantized to for each matmul (already resolved).
    Raises:
        ConfigError: bitsandbytes is missing, or ZeRO-3 is on and the 4-bit storage dtype is not
            the weights' dtype (ZeRO-3 partitions parameters of one dtype).
    """
    if not is_quantized(cfg):
        return None
    require_bitsandbytes(quantization_setting(cfg))
    from transformers import BitsAndBytesConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    storage = STORAGE_DTYPES[cfg.bnb_4bit_quant_storage]
    if cfg.load_in_4bit and is_deepspeed_zero3_enabled() and storage != weights_dtype:
        raise ConfigError(f"model.bnb_4bit_quant_storage: ZeRO-3 shards 4-bit weights only when they are stored "
                          f"in the model's dtype; set it to {str(weights_dtype).removeprefix('torch.')}")
    return BitsAndBytesConfig(
        load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type, bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=["lm_head"])


def prepare_kbit_model(model):
    """Freeze every base parameter of a quantized model; upcast nothing (see the module docstring).

    Also keeps bitsandbytes' CPU inference repacking off: on CPUs with AVX512-BF16, the first
    forward of a ``Linear4bit`` in eval mode without grad (an evaluation) repacks its weight for a
    kernel that has no backward, and every later training forward goes through it — the
    gradient stops at that layer, silently (bitsandbytes 0.50). Training evaluates between steps.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for name in quantized_layer_names(model):
        module = model.get_submodule(name)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    logger.info("quantized %d linear layers; lm_head, embeddings and norms stay in %s",
                len(quantized_layer_names(model)), model.dtype)
    return model


def quantized_layer_names(model) -> list[str]:
    """Names of the bitsandbytes linear layers of ``model``."""
    return [name for name, module in model.named_modules()
            if type(module).__name__ in ("Linear4bit", "Linear8bitLt")]
