"""Load the base Phi-3 model and its tokenizer as the ``model`` section says.

The base model is a hub id, a local directory, or ``tiny-random-phi3`` (built offline, see
``tiny.py``). It is loaded in the requested dtype (bfloat16 on GPUs that support it, float32 on
the CPU), with the requested attention kernel (flash_attention_2 falls back to sdpa, with a
message, when flash-attn is missing), ``use_cache=False`` for training, and, when asked,
non-reentrant gradient checkpointing that works with adapters on a frozen base. This module
knows nothing of processes or ranks.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from .config import TINY_MODEL, ConfigError, ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` -> bfloat16 where a CUDA GPU supports it, else float32."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


def resolve_attention(name: str) -> str:
    if name == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available()):
        logger.warning("flash_attention_2 needs the flash-attn package and a CUDA GPU; using sdpa instead")
        return "sdpa"
    return name


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of ``model.tokenizer`` (or of the model); pads with eos, as Phi-3 does."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if source == TINY_MODEL:
        from .tiny import tiny_tokenizer
        return tiny_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.tokenizer: cannot load '{source}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer, seed: int = 0):
    """The base Phi3ForCausalLM (frozen later by the LoRA step), ready for training.

    Raises:
        ConfigError: the model cannot be found or loaded; the message names ``model.name_or_path``.
    """
    dtype = resolve_dtype(cfg.dtype)
    attention = resolve_attention(cfg.attn_implementation)
    if cfg.name_or_path == TINY_MODEL:
        from .tiny import tiny_phi3_config, tiny_phi3_model
        config = tiny_phi3_config(tokenizer, layers=cfg.tiny_layers, hidden=cfg.tiny_hidden_size,
                                  heads=cfg.tiny_heads, kv_heads=cfg.tiny_kv_heads, rope=cfg.tiny_rope)
        config._attn_implementation = attention
        model = tiny_phi3_model(config, seed=seed, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path, revision=cfg.revision, dtype=dtype, attn_implementation=attention,
                trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.name_or_path: cannot load '{cfg.name_or_path}': "
                              f"{str(err).splitlines()[0]}") from None
    model.config.use_cache = False
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"model.tokenizer: {len(tokenizer)} tokens do not fit the model's vocabulary "
                          f"of {model.config.vocab_size}")
    return model


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing: gradients reach adapters even though the inputs are frozen."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
