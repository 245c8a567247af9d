"""Typed training configuration: the single source of truth for a run.

A run's settings come from three layers, applied in order: the dataclass defaults below, a
YAML recipe (``--config PATH``), and ``KEY=VALUE`` overrides on the command line
(``training.max_steps=20 lora.r=8 output_dir=/tmp/run``). Every setting is validated here,
up front, before any model or data is touched: unknown keys (with the nearest valid key
suggested), wrong types, impossible values and cross-field rules all raise ``ConfigError``
with a one-line message that names the key.

The sections read like the Phi-3 cookbook: ``model``, ``data``, ``lora`` (its
``peft_config``) and ``training`` (its ``training_config``), plus a top-level ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .preemption import DEFAULT_SIGNALS

TINY_MODEL = "tiny-random-phi3"
DEMO_DATA = "demo"
PHI3_TARGET_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

# What runs without --config: the tiny random Phi-3 learning the generated demo chat tasks on a CPU
# in well under a minute (its eval loss falls from about 6.3 to about 1.3). Defaults fill in the rest.
DEMO_RECIPE = {
    "model": {"name_or_path": TINY_MODEL},
    "data": {"path": DEMO_DATA, "max_seq_len": 512},
    "lora": {"r": 16, "alpha": 32},
    "training": {"learning_rate": 1e-3, "warmup_steps": 20, "max_steps": 300, "per_device_batch_size": 8,
                 "logging_steps": 10, "eval_steps": 50},
    "output_dir": "outputs/demo",
}


# Settings that may change between a checkpoint and its resumption: how long, how often, where.
CHANGEABLE_ON_RESUME = {
    "output_dir", "data.num_proc", "training.max_steps", "training.num_epochs", "training.logging_steps",
    "training.eval_steps", "training.save_steps", "training.save_total_limit", "training.resume_from",
    "training.preemption_signals", "training.per_device_eval_batch_size", "training.loss_chunk_size",
    "training.compile",
}


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or impossible. The message names the key."""


def _field(default, help: str, choices: tuple | None = None, minimum: float | None = None,
           exclusive_minimum: bool = False):
    meta = {"help": help, "choices": choices, "minimum": minimum, "exclusive_minimum": exclusive_minimum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = _field(TINY_MODEL, "Hub id or local directory of a Phi-3 checkpoint; "
                               f"'{TINY_MODEL}' builds a small, seeded, random Phi-3 offline.")
    tokenizer: str | None = _field(None, "Tokenizer hub id or directory (default: the model's own).")
    revision: str | None = _field(None, "Hub revision (branch, tag or commit) of the model.")
    dtype: str = _field("auto", "Weights dtype: auto = bfloat16 on GPUs that support it, else float32.",
                        choices=("auto", "bfloat16", "float16", "float32"))
    attn_implementation: str = _field("sdpa", "Attention kernel; flash_attention_2 falls back to sdpa "
                                      "with a message without flash-attn or an Ampere or newer GPU; "
                                      "flex_attention (PyTorch's, compiled on first use) skips the blocks a "
                                      "sliding window or packing masks out, and trains on CUDA GPUs only.",
                                      choices=("flash_attention_2", "sdpa", "eager", "flex_attention"))
    trust_remote_code: bool = _field(False, "Run model code from the hub (Phi-3 is native to "
                                     "transformers; leave this off).")
    tiny_layers: int = _field(2, f"Layers of '{TINY_MODEL}'.", minimum=1)
    tiny_hidden_size: int = _field(128, f"Hidden size of '{TINY_MODEL}'.", minimum=8)
    tiny_heads: int = _field(4, f"Attention heads of '{TINY_MODEL}'.", minimum=1)
    tiny_kv_heads: int = _field(4, f"Key/value heads of '{TINY_MODEL}' (fewer than heads = GQA).", minimum=1)
    tiny_rope: str = _field("default", f"Rope scaling of '{TINY_MODEL}': default or longrope (as 128k models).",
                            choices=("default", "longrope"))
    load_in_4bit: bool = _field(False, "QLoRA: load the base's linear layers (not lm_head) in 4 bits with "
                                "bitsandbytes (pip install -e '.[qlora]').")
    load_in_8bit: bool = _field(False, "Load the base's linear layers (not lm_head) in 8 bits (LLM.int8) with "
                                "bitsandbytes.")
    bnb_4bit_quant_type: str = _field("nf4", "4-bit data type: nf4 (NormalFloat, as QLoRA) or fp4.",
                                      choices=("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = _field(False, "Quantize the 4-bit scales too (saves ~0.4 bits a weight).")
    bnb_4bit_compute_dtype: str = _field("auto", "dtype the 4-bit weights are dequantized to for each matmul: "
                                         "auto = model.dtype (float32 on the CPU); bfloat16 on a GPU without bf16 "
                                         "falls back to float16 with a warning. Under bf16/fp16 autocast the matmul "
                                         "itself runs in 16 bits whatever this says.",
                                         choices=("auto", "bfloat16", "float16", "float32"))
    bnb_4bit_quant_storage: str = _field("uint8", "dtype the packed 4-bit weights are stored in; set it to "
                                         "model.dtype (bfloat16) so DeepSpeed ZeRO-3 can shard them.",
                                         choices=("uint8", "bfloat16", "float16", "float32"))


@dataclass
class DataConfig:
    path: str = _field(DEMO_DATA, f"Hub dataset, local .json/.jsonl/.parquet file, or saved datasets "
                       f"directory; '{DEMO_DATA}' generates the embedded demo chat tasks.")
    format: str = _field("auto", "Row format: messages (OpenAI role/content), sharegpt (conversations "
                         "of from/value), alpaca (instruction/input/output); auto detects it.",
                         choices=("auto", "messages", "sharegpt", "alpaca"))
    split: str = _field("train", "Split to train on (hub datasets and saved DatasetDicts).")
    eval_path: str | None = _field(None, "Separate evaluation data (same formats); default: held out "
                                   "from the training data, or the eval split.")
    eval_split: str | None = _field(None, "Split to evaluate on, e.g. test (hub datasets / DatasetDicts).")
    eval_size: float = _field(0.05, "Without an eval split or path: held-out fraction (< 1) or row count "
                              "(>= 1) of the training data; 0 disables evaluation.", minimum=0)
    max_seq_len: int = _field(2048, "Longest tokenized example, in tokens.", minimum=8)
    overlong: str = _field("truncate", "Examples longer than max_seq_len: truncate (keep the start) or drop.",
                           choices=("truncate", "drop"))
    train_on_prompt: bool = _field(False, "Supervise every token, not only the assistant turns.")
    group_by_length: bool = _field(False, "Put items of similar length in the same micro-batches (less "
                                   "padding; the order stays random at the step level).")
    packing: bool = _field(False, "Pack several examples into each row of up to max_seq_len tokens (no padding, "
                           "no cross-example attention); per_device_batch_size then counts rows.")
    chat_template: str = _field("tokenizer", "tokenizer = the tokenizer's own chat template; phi3 = the "
                                "built-in Phi-3 template (renders system prompts).",
                                choices=("tokenizer", "phi3"))
    num_proc: int = _field(1, "Processes for tokenization (datasets.map).", minimum=1)
    demo_size: int = _field(1200, f"Conversations generated for data.path={DEMO_DATA}.", minimum=10)


@dataclass
class LoraConfig:
    backend: str = _field("peft", "LoRA implementation: peft, or loralib (the cookbook's lora.Linear / "
                          "lora.MergedLinear / lora.Embedding layers).", choices=("peft", "loralib"))
    r: int = _field(16, "LoRA rank.", minimum=1)
    alpha: float = _field(32.0, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).",
                          minimum=0, exclusive_minimum=True)
    dropout: float = _field(0.05, "Dropout on the LoRA input.", minimum=0)
    target_modules: list[str] = _field(PHI3_TARGET_MODULES, "Module names to adapt (Phi-3's fused "
                                       "projections), or ['all-linear'].")
    bias: str = _field("none", "Train biases: none, all, or lora_only.", choices=("none", "all", "lora_only"))
    use_rslora: bool = _field(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = _field(False, "Weight-decomposed LoRA (DoRA).")
    init: str = _field("default", "Adapter init: default (B = 0, Kaiming A), gaussian, pissa, olora. pissa and "
                       "olora also change the base weights: the adapter is right only where peft re-runs that init "
                       "on load (evaluate.py, chat.py, PeftModel.from_pretrained); serve the merge_adapter.py output.",
                       choices=("default", "gaussian", "pissa", "olora"))
    qkv_enable: list[bool] = _field([True, True, True], "loralib backend: adapt the q, k, v parts of the fused "
                                    "qkv_proj (e.g. [true,false,true] = q and v only).")


@dataclass
class TrainingConfig:
    learning_rate: float = _field(2e-4, "Peak learning rate.", minimum=0, exclusive_minimum=True)
    lr_scheduler: str = _field("cosine", "Schedule after warmup.", choices=("linear", "cosine", "constant"))
    warmup_steps: int = _field(0, "Linear warmup steps (overrides warmup_ratio when > 0).", minimum=0)
    warmup_ratio: float = _field(0.0, "Warmup as a fraction of all optimizer steps.", minimum=0)
    per_device_batch_size: int = _field(4, "Examples per micro-batch per process.", minimum=1)
    per_device_eval_batch_size: int = _field(8, "Examples per evaluation batch per process.", minimum=1)
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step per process.", minimum=1)
    num_epochs: float = _field(1.0, "Epochs to train when max_steps is not set.", minimum=0,
                               exclusive_minimum=True)
    max_steps: int = _field(-1, "Optimizer steps to train; -1 = derive from num_epochs.", minimum=-1)
    max_grad_norm: float = _field(1.0, "Clip the global gradient norm to this; 0 disables clipping.", minimum=0)
    weight_decay: float = _field(0.0, "AdamW weight decay (never applied to norms and biases).", minimum=0)
    adam_beta1: float = _field(0.9, "AdamW beta1.", minimum=0)
    adam_beta2: float = _field(0.999, "AdamW beta2.", minimum=0)
    adam_epsilon: float = _field(1e-8, "AdamW epsilon.", minimum=0, exclusive_minimum=True)
    seed: int = _field(42, "Seed for data order, LoRA init and dropout.")
    logging_steps: int = _field(10, "Log training scalars every N optimizer steps.", minimum=1)
    eval_steps: int = _field(100, "Evaluate every N optimizer steps (also before the first and at the end); "
                             "0 = only before and at the end.", minimum=0)
    save_steps: int = _field(0, "Save a resumable checkpoint every N optimizer steps (and at the end); "
                             "0 = only the final adapter.", minimum=0)
    save_total_limit: int = _field(0, "Keep the newest N checkpoints plus the best by eval loss; 0 = keep all.",
                                   minimum=0)
    resume_from: str = _field("none", "auto = the newest complete checkpoint in output_dir (else start fresh), "
                              "a checkpoint directory, or none.")
    preemption_signals: list[str] = _field(list(DEFAULT_SIGNALS), "On these signals: finish the optimizer "
                                           "step, save a checkpoint, exit with status 75 (requeue me).")
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward (non-reentrant).")
    loss_chunk_size: int | None = _field(None, "Compute lm_head + cross-entropy over this many supervised tokens at "
                                         "a time, with their gradient (never recomputed), so the 32,064-wide logits "
                                         "never exist for the whole sequence; 0 = all positions at once, as Hugging "
                                         "Face does (and as ZeRO-3 runs do); default: 1024 on a GPU, 128 on the CPU "
                                         "(where a chunk's logits stay in cache).", minimum=0)
    compile: bool = _field(False, "torch.compile each decoder layer (in place: names and saved adapters unchanged); "
                           "the first steps pay the compilation.")
    fuse_lora_add: bool = _field(True, "Add each LoRA update to its layer's output inside the up-projection's GEMM "
                                 "(torch.addmm, the scaling in its epilogue) instead of peft's separate scale and "
                                 "add; ignored under ZeRO-3 and by the loralib backend.")
    mixed_precision: str = _field("auto", "Autocast: auto = bf16 when the weights are bf16 on a GPU, fp16 (with loss "
                                  "scaling) when they are fp16, else no.",
                                  choices=("auto", "no", "bf16", "fp16"))
    optimizer: str = _field("adamw_torch", "adamw_torch (PyTorch AdamW, fused on CUDA), adamw_8bit, "
                            "paged_adamw_8bit or paged_adamw_32bit (bitsandbytes; 8-bit states take 2 bytes a "
                            "parameter instead of 8, paged states move to CPU memory under pressure).",
                            choices=("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output_dir: str = _field("outputs/run", "Where the adapter, tokenizer, config.yaml, metrics and "
                             "TensorBoard files are written.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def resume_settings(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that saved the checkpoint (dotted keys)."""
        flat = {}
        for key in all_keys():
            if key not in CHANGEABLE_ON_RESUME:
                section, _, name = key.rpartition(".")
                flat[key] = getattr(getattr(self, section) if section else self, name)
        return flat

    def fingerprint(self) -> str:
        """A short hash of ``resume_settings``."""
        return hashlib.sha256(json.dumps(self.resume_settings(), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading

def _sections() -> dict[str, type]:
    """Section name -> its dataclass (``{"model": ModelConfig, ...}``)."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def all_keys() -> dict[str, dataclasses.Field]:
    """Every dotted key (``lora.r``, ``output_dir``...) mapped to its dataclass field."""
    keys = {}
    sections = _sections()
    for f in dataclasses.fields(Config):
        if f.name in sections:
            keys.update({f"{f.name}.{sub.name}": sub for sub in dataclasses.fields(sections[f.name])})
        else:
            keys[f.name] = f
    return keys


def _field_type(key: str):
    section, _, name = key.rpartition(".")
    owner = _sections()[section] if section else Config
    return typing.get_type_hints(owner)[name]


# The names of the Phi-3 cookbook's sample_finetune.py (its training_config is transformers' TrainingArguments, its
# peft_config peft's LoraConfig), and other common ones, for the keys that hold the same setting here.
OTHER_NAMES = {
    "training_config": "training", "peft_config": "lora", "lora_config": "lora", "model_config": "model",
    "lr": "training.learning_rate", "lr_scheduler_type": "training.lr_scheduler",
    "bf16": "training.mixed_precision", "fp16": "training.mixed_precision",
    "num_train_epochs": "training.num_epochs", "epochs": "training.num_epochs",
    "per_device_train_batch_size": "training.per_device_batch_size", "batch_size": "training.per_device_batch_size",
    "warmup": "training.warmup_steps", "grad_clip": "training.max_grad_norm", "optim": "training.optimizer",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "rank": "lora.r", "lora_r": "lora.r",
    "max_seq_length": "data.max_seq_len", "max_length": "data.max_seq_len", "dataset": "data.path",
    "model_name_or_path": "model.name_or_path", "model_name": "model.name_or_path", "torch_dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
}


def _suggest(key: str) -> str:
    """`` (did you mean 'KEY'?)`` for an unknown key: the key that holds another tool's name for the setting
    (``OTHER_NAMES``), the section a section's misspelling names, the same name in another section
    (``training.output_dir``), else the closest key by spelling; or nothing."""
    keys, sections = list(all_keys()), list(_sections())
    last = key.rpartition(".")[2]
    if last.lower() in OTHER_NAMES:
        close = [OTHER_NAMES[last.lower()]]
    elif "." not in key and (near := difflib.get_close_matches(key.lower(), sections, n=1, cutoff=0.6)):
        close = near  # a section ("trainig:", "Training:") with keys of its own
    else:
        close = [k for k in keys if k.rpartition(".")[2] == last] or \
            difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a bare name like "r" or "learning_rat": match on the last part
        tails = {k.rpartition(".")[2]: k for k in keys}
        close = [tails[t] for t in difflib.get_close_matches(last, list(tails), n=1, cutoff=0.6)]
    if close and close[0] in sections:
        return f" (did you mean the section '{close[0]}'?)"
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the declared type of ``key``; convert int to float where declared."""
    declared = _field_type(key)
    optional = False
    if typing.get_origin(declared) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(declared) if a is not type(None)]
        optional = len(args) < len(typing.get_args(declared))
        declared = args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: must not be empty")
    if typing.get_origin(declared) is list:
        item = typing.get_args(declared)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            if item is bool:
                value = [_read_yaml_value(v) for v in value]
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{key}: expected a list of {'true/false values' if item is bool else 'strings'}, "
                              f"got {value!r}")
        return value
    if declared is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if declared is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if declared is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value}")
        return float(value)
    if declared is str:
        if not isinstance(value, str):  # YAML read it as a number or date: 1.10 -> 1.1, 0123 -> 83 (octal)
            read_as_such = isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool)
            hint = (" (YAML reads unquoted numbers and dates as such: 1.10 becomes 1.1, 0123 becomes 83); quote it"
                    if read_as_such else "")
            raise ConfigError(f"{key}: expected text, got the {type(value).__name__} {value!r}{hint}")
        return value
    raise ConfigError(f"{key}: unsupported type {declared}")  # pragma: no cover - a bug in this module


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in _sections() and value is None:
            continue  # a section whose entries are all commented out
        if isinstance(value, dict) and key in _sections():
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


class _Yaml12BoolLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans, true and false only: YAML 1.1 also reads yes, no,
    on and off as booleans, which made ``training.mixed_precision: no`` the boolean False. A key given
    twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *defaults" merges, it is no key
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"'{key}' is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep)


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12BoolLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _read_yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12BoolLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.max_steps=20"`` -> ``("training.max_steps", 20)``; the value is read as YAML, except for a
    text setting, which takes the text as typed (``model.revision=1.10`` stays ``"1.10"``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. training.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key in all_keys() and _is_text(key):
        text = raw.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return key, text[1:-1]  # quoted as YAML would be: the text inside
        return key, None if text in ("", "null", "~") else text
    try:
        value = _read_yaml_value(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _is_text(key: str) -> bool:
    declared = _field_type(key)
    return declared is str or (typing.get_origin(declared) in (typing.Union, types.UnionType)
                               and str in typing.get_args(declared))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise ConfigError(f"{path}: empty config file")
    try:
        tree = _read_yaml_value(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a Config from defaults, a YAML recipe (default: the embedded demo) and overrides.

    Raises:
        ConfigError: for an unknown key, a wrong type or an impossible value; the message names the key.
    """
    tree, origin = (DEMO_RECIPE, "embedded demo") if path is None else (read_yaml(path), str(path))
    settings: dict[str, Any] = {key: (value, origin) for key, value in _flatten(tree).items()}
    for text in overrides:
        key, value = parse_override(text)
        settings[key] = (value, "command line")
    known = all_keys()
    cfg = Config()
    for key, (value, origin) in settings.items():
        if key in _sections():
            raise ConfigError(f"'{key}' ({origin}) is a section: give its keys ({key}.KEY=VALUE, or a mapping under "
                              f"'{key}:' in YAML), not the {type(value).__name__} {value!r}")
        if key not in known:
            raise ConfigError(f"unknown key '{key}' ({origin}){_suggest(key)}")
        value = _coerce(key, value)
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Per-key choices and bounds, then the rules that involve several keys."""
    for key, f in all_keys().items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        if choices and value not in choices:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")
        if minimum is not None and value is not None:
            too_small = value <= minimum if f.metadata.get("exclusive_minimum") else value < minimum
            if too_small:
                bound = "greater than" if f.metadata.get("exclusive_minimum") else "at least"
                raise ConfigError(f"{key}: must be {bound} {minimum:g}, got {value}")
    t = cfg.training
    if t.warmup_ratio >= 1:
        raise ConfigError(f"training.warmup_ratio: must be below 1, got {t.warmup_ratio}")
    for key, value in (("lora.dropout", cfg.lora.dropout), ("training.adam_beta1", t.adam_beta1),
                       ("training.adam_beta2", t.adam_beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"training.seed: must be in [0, 2**32), got {t.seed}")
    if t.max_steps == 0:
        raise ConfigError("training.max_steps: must be positive, or -1 to derive it from num_epochs")
    import signal
    for name in t.preemption_signals:
        if name not in signal.Signals.__members__:
            raise ConfigError(f"training.preemption_signals: unknown signal '{name}' (e.g. SIGTERM, SIGUSR1)")
        if name in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"training.preemption_signals: {name} cannot be caught (SLURM sends SIGTERM first)")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules: name at least one module (or all-linear)")
    _validate_lora_backend(cfg.lora)
    if "lm_head" in cfg.lora.target_modules:  # said now for both backends, not after the model loads
        raise ConfigError("lora.target_modules: lm_head is not adapted here (the loss keeps the output head frozen); "
                          "Phi-3's linear layers are qkv_proj, o_proj, gate_up_proj, down_proj")
    m = cfg.model
    if m.tiny_hidden_size % m.tiny_heads or m.tiny_heads % m.tiny_kv_heads:
        raise ConfigError("model.tiny_*: hidden size must divide by heads, and heads by kv heads")
    if m.load_in_4bit and m.load_in_8bit:
        raise ConfigError("model.load_in_4bit and model.load_in_8bit: choose one")
    if m.bnb_4bit_quant_storage != "uint8" and not m.load_in_4bit:
        raise ConfigError("model.bnb_4bit_quant_storage: only applies with model.load_in_4bit=true")
    if cfg.lora.init in ("pissa", "olora") and (m.load_in_4bit or m.load_in_8bit):
        raise ConfigError(f"lora.init={cfg.lora.init} rewrites the base weights from their decomposition, which a "
                          "4-bit or 8-bit base does not have; use the default init with a quantized base")
    if not str(cfg.output_dir).strip():
        raise ConfigError("output_dir: must not be empty")


def _validate_lora_backend(lora: LoraConfig) -> None:
    if len(lora.qkv_enable) != 3 or not any(lora.qkv_enable):
        raise ConfigError(f"lora.qkv_enable: expected three true/false values for q, k, v, at least one true, "
                          f"got {lora.qkv_enable}")
    if lora.backend == "peft" and not all(lora.qkv_enable):
        raise ConfigError("lora.qkv_enable: adapting only some of q, k, v needs lora.backend=loralib")
    if lora.backend == "loralib":
        for key, unsupported in (("use_dora", lora.use_dora), ("use_rslora", lora.use_rslora),
                                 ("init", lora.init != "default")):
            if unsupported:
                raise ConfigError(f"lora.{key}: not available with lora.backend=loralib (use the peft backend)")


def help_text() -> str:
    """Every key with its default and meaning, grouped by section, for ``--help``; where the embedded demo
    (a run without ``--config``) sets another value, that value too."""
    demo = {f"{section}.{k}": v for section, values in DEMO_RECIPE.items() if isinstance(values, dict)
            for k, v in values.items()}
    demo.update({k: v for k, v in DEMO_RECIPE.items() if not isinstance(v, dict)})
    lines, current = ["\n(KEY = default; \"demo:\" is the value a run without --config, the embedded demo, uses)"], None
    for key, f in all_keys().items():
        section = key.rpartition(".")[0] or "top level"
        if section != current:
            lines.append(f"\n[{section}]")
            current = section
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(choices)}." if choices else ""
        in_demo = f" (demo: {demo[key]!r})" if key in demo and demo[key] != default else ""
        lines.append(f"  {key} = {default!r}{in_demo}\n      {f.metadata['help']}{extra}")
    return "\n".join(lines)


GPU_LOSS_CHUNK, CPU_LOSS_CHUNK = 1024, 128  # training.loss_chunk_size's default on each kind of device


def effective_chunk_size(requested: int | None, zero_stage: int, on_gpu: bool = True) -> int:
    """The chunk size a run uses: ``requested``; by default (None) 1024 on a GPU and 128 on the CPU, where a
    chunk's logits (16 MB in fp32) stay in cache between the softmax and the second matmul (the README's
    "Memory and speed levers" gives the benchmarks); 0 (whole logits) under ZeRO-3, where lm_head is
    partitioned and gathered by DeepSpeed's hooks only inside the model's forward, and each chunk would be a
    collective that processes with different token counts could not match."""
    if zero_stage == 3:
        return 0
    if requested is None:
        return GPU_LOSS_CHUNK if on_gpu else CPU_LOSS_CHUNK
    return requested
