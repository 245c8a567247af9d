"""Load the base Phi-3 model and its tokenizer as the ``model`` section says.

The base model is a hub id, a local directory, or ``tiny-random-phi3`` (built offline, see
``tiny.py``). It is loaded in the requested dtype (bfloat16 on GPUs that support it, float32 on
the CPU), with the requested attention kernel (flash_attention_2 falls back to sdpa, with a
message, without flash-attn or an Ampere or newer GPU), ``use_cache=False`` for training, and, when asked,
non-reentrant gradient checkpointing that works with adapters on a frozen base. With
``model.load_in_4bit``/``load_in_8bit`` the linear layers are quantized by bitsandbytes
(see ``quant.py``); the tiny model is then saved to a temporary directory and loaded back
through the same ``from_pretrained`` path as a real checkpoint. This module knows nothing of
processes or ranks.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import tempfile
from pathlib import Path

import torch

from .config import TINY_MODEL, ConfigError, ModelConfig
from .quant import bnb_config, is_quantized, prepare_kbit_model

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:  # the dtype is resolved for the accelerator and for the model
    logger.warning(message)


def gpu_lacks_bf16() -> bool:
    """A CUDA GPU without native bfloat16 (before Ampere: T4, V100, RTX 20xx); emulation does not count."""
    return torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    """``auto`` -> bfloat16 where a CUDA GPU supports it, else float32.

    bfloat16 asked for on a GPU without it falls back to float16, with a warning naming ``key``:
    emulated bf16 is several times slower, and float16 with loss scaling trains as well for LoRA.
    """
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16
        return torch.float32
    if name == "bfloat16" and gpu_lacks_bf16():
        _warn_once(f"{key}=bfloat16: this GPU has no native bfloat16; using float16 instead")
        return torch.float16
    return DTYPES[name]


def resolve_attention(name: str) -> str:
    """``model.attn_implementation``, or sdpa where flash-attention 2 cannot run: it needs the flash-attn
    package and an Ampere or newer GPU (compute capability 8.0; a T4 or V100 would fail in the first forward)."""
    if name != "flash_attention_2" or (importlib.util.find_spec("flash_attn") and torch.cuda.is_available()
                                       and torch.cuda.get_device_capability()[0] >= 8):
        return name
    logger.warning("flash_attention_2 needs the flash-attn package and an Ampere or newer GPU; using sdpa instead")
    return "sdpa"


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
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"  # the one the user set
        raise ConfigError(f"{key}: cannot load '{source}'{not_here(source)}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, tokenizer, seed: int = 0, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None):
    """The base Phi3ForCausalLM (frozen later by the LoRA step), ready for training.

    ``device``: load the checkpoint's weights straight onto it (else onto the CPU, and 4-bit/8-bit
    weights onto the current GPU, as bitsandbytes places them). Eight processes on a node would
    otherwise each hold the whole model in CPU memory first (Phi-3-medium: 28 GB each). ``dtype``: this
    one, not ``model.dtype`` resolved for this machine's GPU (a merge on the CPU keeps bfloat16).

    Raises:
        ConfigError: the model cannot be found or loaded; the message names ``model.name_or_path``.
    """
    dtype = dtype or resolve_dtype(cfg.dtype)
    attention = resolve_attention(cfg.attn_implementation)
    quantization = None
    if is_quantized(cfg):
        compute = dtype if cfg.bnb_4bit_compute_dtype == "auto" else \
            resolve_dtype(cfg.bnb_4bit_compute_dtype, "model.bnb_4bit_compute_dtype")
        quantization = bnb_config(cfg, dtype, compute)
    if cfg.name_or_path == TINY_MODEL:
        from .tiny import tiny_phi3_config, tiny_phi3_model
        config = tiny_phi3_config(tokenizer, layers=cfg.tiny_layers, hidden=cfg.tiny_hidden_size,
                                  heads=cfg.tiny_heads, kv_heads=cfg.tiny_kv_heads, rope=cfg.tiny_rope)
        config._attn_implementation = attention
        model = tiny_phi3_model(config, seed=seed, dtype=dtype)
        if quantization is not None:  # through the same from_pretrained path as a real checkpoint
            with tempfile.TemporaryDirectory(prefix="tiny-phi3-") as tmp:
                model.save_pretrained(tmp)
                model = _from_pretrained(tmp, None, dtype, attention, False, quantization, device)
            model.config._name_or_path = ""  # as the unquantized tiny model: no path that outlives the load
    else:
        model = _from_pretrained(cfg.name_or_path, cfg.revision, dtype, attention, cfg.trust_remote_code,
                                 quantization, device)
    if quantization is not None:
        model = prepare_kbit_model(model)
    model.config.use_cache = False
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"model.tokenizer: {len(tokenizer)} tokens do not fit the model's vocabulary "
                          f"of {model.config.vocab_size}")
    return model


def _from_pretrained(source: str, revision, dtype, attention: str, trust_remote_code: bool, quantization, device):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, attn_implementation=attention,
            trust_remote_code=trust_remote_code, quantization_config=quantization,
            device_map=None if device is None else {"": device})
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a damaged weights file
        raise ConfigError(f"model.name_or_path: cannot load '{source}'{not_here(source)}: "
                          f"{str(err).splitlines()[0]}") from None


def not_here(source: str) -> str:
    """Said of a model that fails to load and is no local path: the hub's error alone reads as a network fault."""
    return "" if Path(source).expanduser().exists() else " (no such directory here, so it was looked up on the hub)"


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing: gradients reach adapters even though the inputs are frozen."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def compile_decoder_layers(model) -> int:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``); returns how many.

    Per layer, as torchtune does: one small graph reused by every layer, gradient checkpointing
    still wraps each layer, and the parameter names (hence saved adapters) do not change, as they
    would under ``torch.compile(model)``'s ``_orig_mod.`` wrapper.
    """
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if any(getattr(m, "lora_magnitude_vector", None) for m in model.modules()):
        logger.warning("training.compile with lora.use_dora: peft's DoRA layers break each compiled decoder layer's "
                       "graph at every adapted linear (dequantize_module_weight), so compiling gains little")
    for layer in layers:
        layer.compile()
    return len(layers)
