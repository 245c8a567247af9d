"""Load a trained run for use after training: the base model, its tokenizer and the adapter.

Evaluation, chat and merging need the exact base the adapter was trained on. For a hub or
local model that is its name; for ``tiny-random-phi3`` it is rebuilt from the run's settings
(``model.*`` and the seed in ``training.seed``), which is why the run's config is read: from
``--config``, else the copy saved inside the adapter directory (``run_config.yaml``, written with the
adapter, so it always belongs to it), else the run's ``config.yaml`` beside it (adapters saved before
2026-12-06; ``OUTPUT_DIR/config.yaml`` is rewritten when a run starts, before its adapter is).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as data_lib
from .checkpoint import CheckpointError, load_adapter_state, read_safetensors, verify_adapter_weights
from .config import Config, ConfigError, load_config
from .lora import RUN_CONFIG
from .loss import supervised_tokens, token_loss_sum
from .model import load_model, load_tokenizer, resolve_dtype

logger = logging.getLogger(__name__)
QUANTIZATION_KEYS = ("model.load_in_4bit", "model.load_in_8bit")


def run_config(config: str | None, overrides: list[str], adapter: str | None = None,
               model: str | None = None) -> Config:
    """The settings to rebuild a run with: ``config``, else the run's config saved with ``adapter``, else
    the embedded demo recipe (an adapter with neither needs ``model``); then ``overrides``; ``model`` (a
    path or hub id) replaces ``model.name_or_path``."""
    if adapter is not None:
        check_adapter_dir(adapter)
    if config is None and adapter is not None:
        config = config_beside(adapter)
        if config is None and model is None:  # the demo recipe would rebuild some other base
            raise ConfigError(f"--adapter {adapter}: no run config in it ({RUN_CONFIG}) or beside it (config.yaml); "
                              "pass the run's --config, or --model for the base it was trained on")
    elif config is not None and adapter is not None and (Path(adapter) / RUN_CONFIG).is_file():
        warn_if_another_base(config, Path(adapter) / RUN_CONFIG)
    extra = [f"model.name_or_path={model}"] if model else []
    return load_config(config, [*overrides, *extra])


BASE_KEYS = ("model.", "lora.", "training.seed")  # what rebuilds the base and the adapters on it


def warn_if_another_base(config: str | Path, saved: Path) -> None:
    """``--config`` wins over the settings saved with the adapter; a warning names what differs in the keys that
    rebuild its base (``model.*``, ``lora.*``, the tiny model's seed)."""
    given, trained = load_config(config).resume_settings(), load_config(saved).resume_settings()
    changed = [k for k in given if k.startswith(BASE_KEYS) and given[k] != trained.get(k)]
    if changed:
        details = ", ".join(f"{k}: {trained.get(k)!r} -> {given[k]!r}" for k in changed[:4])
        logger.warning("--config %s differs from the run config saved with the adapter (%s) in %s; the adapter "
                       "was trained on the base that %s describes", config, saved, details, saved)


def has_run_config(config: str | None, adapter: str | None) -> bool:
    """Whether ``run_config`` reads a run's settings (``config``, or the one saved with ``adapter``), not the
    embedded demo recipe's, whose data and output_dir belong to no run of the user's."""
    return config is not None or (adapter is not None and config_beside(adapter) is not None)


def config_beside(adapter: str) -> Path | None:
    """The run config saved in the adapter directory, else the run's config.yaml next to it, if any."""
    for path in (Path(adapter) / RUN_CONFIG, Path(adapter).parent / "config.yaml"):
        if path.is_file():
            return path
    return None


def quantization_override(load_in_4bit: bool) -> list[str]:
    """The override that asks ``load_model`` for a 4-bit NF4 base (``--load_in_4bit``)."""
    return ["model.load_in_4bit=true"] if load_in_4bit else []


def unquantized(cfg: Config) -> bool:
    """Switch off 4/8-bit loading in ``cfg``; True when it was on (a QLoRA run)."""
    was = False
    for key in QUANTIZATION_KEYS:
        name = key.split(".", 1)[1]
        if getattr(cfg.model, name):
            setattr(cfg.model, name, False)
            was = True
    return was


def check_adapter_dir(adapter: str | Path) -> Path:
    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter_config.json there (expected OUTPUT_DIR/adapter "
                          "of a training run, in PEFT format)")
    return path


def read_adapter_config(adapter: str | Path) -> dict:
    """The adapter's ``adapter_config.json`` (peft's settings); a damaged one is a CheckpointError naming it."""
    file = check_adapter_dir(adapter) / "adapter_config.json"
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: {str(err).splitlines()[0]}") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(settings).__name__}")
    return settings


def load_tokenizer_for(cfg: Config):
    tokenizer = load_tokenizer(cfg.model)
    data_lib.use_chat_template(tokenizer, cfg.data.chat_template)
    return tokenizer


def load_for_inference(cfg: Config, tokenizer, adapter: str | Path | None = None, dequantize: bool = False,
                       device: str | None = None, dtype: torch.dtype | None = None):
    """The base model of ``cfg`` in eval mode, with the PEFT adapter at ``adapter`` on top if given.

    ``dequantize``: a 4/8-bit base is loaded as in training, then its weights are expanded to ``model.dtype``:
    the weights a QLoRA adapter was trained on, in a form it can be merged into. ``device``: where the base's
    weights load (default: the CPU, and a 4/8-bit base's onto the current GPU, as bitsandbytes places them).
    ``dtype``: the weights' (and a dequantized base's) dtype, instead of ``model.dtype`` resolved for this
    machine's GPU.

    The adapter goes through the training loop's checked loader, not ``PeftModel.from_pretrained`` (which
    loads with ``strict=False`` unchecked): a damaged file (its weights checked against the checksums saved with
    them, where there are some), or an adapter of another model or rank, is a one-line CheckpointError naming
    the file.
    """
    if adapter is not None:
        path = check_adapter_dir(adapter)
        verify_adapter_weights(path)  # flipped bytes inside a tensor are still a valid safetensors file
        weights = path / "adapter_model.safetensors"
        state = read_safetensors(weights)  # before loading the base: a damaged file fails at once
    model = load_model(cfg.model, tokenizer, seed=cfg.training.seed, device=device, dtype=dtype)
    if dequantize:
        model = model.dequantize().to(dtype or resolve_dtype(cfg.model.dtype))
    if adapter is not None:
        from peft import PeftConfig, PeftModel
        try:
            adapter_config = PeftConfig.from_pretrained(str(path))
            adapter_config.inference_mode = False  # trainable until loaded: the loader checks every adapter parameter
            model = PeftModel(model, adapter_config)
        except Exception as err:  # peft raises several types for a malformed config, when reading or applying it
            raise CheckpointError(f"{path / 'adapter_config.json'}: {str(err).splitlines()[0]}") from None
        load_adapter_state(model, state, str(weights))
    model.requires_grad_(False)  # also the base alone: the chunked loss needs a frozen lm_head
    model.eval()
    return model


@torch.no_grad()
def dataset_loss(model, split: data_lib.TokenizedSplit, pad_token_id: int, batch_size: int,
                 chunk_size: int = 0, desc: str = "eval loss") -> tuple[float, int]:
    """Token-weighted loss over ``split`` (the loop's own loss function, logits in chunks of
    ``chunk_size`` supervised tokens, 0 = whole) and the supervised token count."""
    collate = data_lib.Collator(pad_token_id, varlen=data_lib.uses_varlen(model))
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    plan = data_lib.eval_plan(split, batch_size, data_lib.long_context_threshold(model.config))
    for indices in tqdm(plan, desc=desc, dynamic_ncols=True):
        batch = collate([[split.dataset[i]] for i in indices])
        batch = data_lib.to_device(batch, device)  # flash-attention's bounds include plain ints
        total += float(token_loss_sum(model, batch, chunk_size).double())
        tokens += supervised_tokens(batch)
    return total / max(tokens, 1), tokens
