"""The cookbook's own LoRA: Microsoft's ``loralib`` layers on Phi-3 (``lora.backend=loralib``).

The targeted modules of the plain ``Phi3ForCausalLM`` are replaced in place, keeping the base
weights (frozen) and adding ``lora_A``/``lora_B``:

* ``o_proj``, ``down_proj`` (and any other plain linear target) → ``lora.Linear``;
* the fused ``qkv_proj`` → ``lora.MergedLinear`` with ``enable_lora`` = ``lora.qkv_enable``
  (e.g. ``[true, false, true]`` adapts q and v only), and ``gate_up_proj`` → ``lora.MergedLinear``
  with both halves enabled;
* ``embed_tokens`` → ``lora.Embedding`` when the targets name it.

loralib's ``MergedLinear`` splits its outputs into equal parts, but with grouped-query
attention (Phi-3-medium: 40 query heads, 10 key, 10 value → 5120 / 1280 / 1280 rows) the q, k,
v parts differ in size; ``UnevenMergedLinear`` takes explicit part sizes and is used then.
``merge_weights=False`` everywhere: loralib would otherwise merge the update into the base on
``model.eval()`` (hidden behaviour that breaks evaluation in the middle of training).

Saving writes ``lora_state_dict`` as safetensors (``loralib_adapter.safetensors``) and, beside
it, the same adapter as a standard PEFT adapter, exact in the math, so the result serves like
any other (evaluate, chat, merge, vLLM...): a ``lora.Linear`` is a PEFT LoRA as is; a
``MergedLinear`` over k enabled parts of rank r is a PEFT LoRA of rank k·r whose A stacks the
parts' A matrices and whose B is block-diagonal (part g's rows use only columns g·r..(g+1)·r),
with alpha scaled by k to keep alpha / rank; ``lora.Embedding`` maps to PEFT's embedding LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import loralib
import torch
from torch import nn

from .checkpoint import load_adapter_state, read_safetensors
from .config import PHI3_TARGET_MODULES, ConfigError, LoraConfig

STATE_FILE = "loralib_adapter.safetensors"


class UnevenMergedLinear(loralib.MergedLinear):
    """``lora.MergedLinear`` whose fused output is split into parts of given, possibly unequal, sizes.

    Same parameters and layout as the parent: ``lora_A`` stacks r rows per enabled part,
    ``lora_B`` holds the enabled parts' output rows (in order) with r columns each.
    """

    def __init__(self, in_features: int, split_sizes: list[int], r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, enable_lora: list[bool] | None = None, **kwargs):
        enable_lora = list(enable_lora or [True] * len(split_sizes))
        nn.Linear.__init__(self, in_features, sum(split_sizes), **kwargs)
        loralib.LoRALayer.__init__(self, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=False)
        self.split_sizes = list(split_sizes)
        self.enable_lora = enable_lora
        self.fan_in_fan_out = False
        self.lora_A = nn.Parameter(self.weight.new_zeros((r * sum(enable_lora), in_features)))
        self.lora_B = nn.Parameter(self.weight.new_zeros(
            (sum(s for s, on in zip(split_sizes, enable_lora) if on), r)))
        self.scaling = self.lora_alpha / self.r
        self.weight.requires_grad = False
        self.lora_ind = torch.cat([torch.full((s,), on, dtype=torch.bool, device=self.weight.device)
                                   for s, on in zip(split_sizes, enable_lora)])
        self.reset_parameters()

    def merge_AB(self):
        rows = [s for s, on in zip(self.split_sizes, self.enable_lora) if on]
        blocks = [b @ a for b, a in zip(self.lora_B.split(rows), self.lora_A.split(self.r))]
        return self.zero_pad(torch.cat(blocks))


def part_sizes(module) -> list[int]:
    """Output rows of each part of a (Uneven)MergedLinear."""
    if isinstance(module, UnevenMergedLinear):
        return module.split_sizes
    n = len(module.enable_lora)
    return [module.out_features // n] * n


def _targets(cfg: LoraConfig) -> list[str]:
    return list(PHI3_TARGET_MODULES) if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)


def _replacement(name: str, module: nn.Module, cfg: LoraConfig, config) -> nn.Module:
    """A loralib layer of the same shape as ``module``, sharing its (frozen) weights."""
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    if isinstance(module, nn.Embedding):
        new = loralib.Embedding(module.num_embeddings, module.embedding_dim, r=cfg.r, lora_alpha=cfg.alpha,
                                merge_weights=False, padding_idx=module.padding_idx, **factory)
    elif not isinstance(module, nn.Linear) or type(module) is not nn.Linear:
        raise ConfigError(f"lora.target_modules: {name} is a {type(module).__name__}; lora.backend=loralib adapts "
                          "plain nn.Linear and nn.Embedding layers only (no 4-bit bases: use peft for QLoRA)")
    elif name.endswith("qkv_proj"):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        sizes = [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2
        if sum(sizes) != module.out_features:
            raise ConfigError(f"{name}: {module.out_features} outputs do not split into q, k, v of {sizes}")
        new = _merged(module, sizes, list(cfg.qkv_enable), cfg, factory)
    elif name.endswith("gate_up_proj"):
        new = _merged(module, [module.out_features // 2] * 2, [True, True], cfg, factory)
    else:
        new = loralib.Linear(module.in_features, module.out_features, r=cfg.r, lora_alpha=cfg.alpha,
                             lora_dropout=cfg.dropout, merge_weights=False, bias=module.bias is not None, **factory)
    new.weight = module.weight
    if getattr(module, "bias", None) is not None:
        new.bias = module.bias
    return new


def _merged(module: nn.Linear, sizes: list[int], enable: list[bool], cfg: LoraConfig, factory: dict) -> nn.Module:
    common = dict(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, enable_lora=enable,
                  bias=module.bias is not None, **factory)
    if len(set(sizes)) == 1:
        return loralib.MergedLinear(module.in_features, module.out_features, merge_weights=False, **common)
    return UnevenMergedLinear(module.in_features, sizes, **common)


def attach_loralib(model, cfg: LoraConfig, seed: int):
    """Replace the targeted modules of ``model`` by loralib layers (adapters drawn from ``seed``), in place,
    and mark only the adapters (and biases as ``lora.bias`` says) trainable. Returns ``model``."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ConfigError("lora.backend=loralib: the base was loaded partitioned (DeepSpeed ZeRO-3), and loralib "
                          "layers are built from whole weights; use ZeRO-2 or DDP, or the peft backend")
    targets = _targets(cfg)
    found = {t: [] for t in targets}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in found:
            found[leaf].append(name)
    missing = [t for t, names in found.items() if not names]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} match no module of this model "
                          f"(lora.backend=loralib adapts {', '.join(PHI3_TARGET_MODULES)} and embed_tokens)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in sorted(n for names in found.values() for n in names):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, _replacement(name, getattr(parent, leaf), cfg, model.config))
    loralib.mark_only_lora_as_trainable(model, bias=cfg.bias)
    model.loralib_config = cfg  # what the saver needs to write the adapter's settings
    return model


def is_loralib_model(model) -> bool:
    return any(isinstance(m, loralib.LoRALayer) for m in model.modules())


# ----------------------------------------------------------------------------- export to PEFT

def peft_export(model, state: dict[str, torch.Tensor], cfg: LoraConfig):
    """The PEFT ``LoraConfig`` and state_dict that compute exactly what the loralib layers of ``model`` do."""
    from peft import LoraConfig as PeftLoraConfig

    lora_keys = {k for k in state if "lora_" in k}
    if lora_keys != set(state):
        raise ConfigError(f"lora.bias={cfg.bias}: trained biases ({sorted(set(state) - lora_keys)[:2]}) have no "
                          "place in a PEFT LoRA adapter; export needs lora.bias=none")
    out, targets, rank_pattern, alpha_pattern = {}, set(), {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, loralib.LoRALayer) or f"{name}.lora_A" not in state:
            continue
        leaf = name.rsplit(".", 1)[-1]
        targets.add(leaf)
        a, b = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        prefix = f"base_model.model.{name}"
        if isinstance(module, loralib.Embedding):
            out[f"{prefix}.lora_embedding_A"], out[f"{prefix}.lora_embedding_B"] = a, b
            continue
        if isinstance(module, loralib.MergedLinear):
            enabled = [size for size, on in zip(part_sizes(module), module.enable_lora) if on]
            k = len(enabled)
            block_b = b.new_zeros((module.out_features, k * cfg.r))
            rows = torch.arange(module.out_features)[module.lora_ind.cpu()]  # output rows of the enabled parts
            for g, (part_rows, part_b) in enumerate(zip(rows.split(enabled), b.split(enabled))):
                block_b[part_rows, g * cfg.r:(g + 1) * cfg.r] = part_b
            b = block_b
            if k != 1:
                rank_pattern[leaf], alpha_pattern[leaf] = k * cfg.r, k * cfg.alpha
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a, b
    config = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=sorted(targets),
                            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, bias="none",
                            task_type="CAUSAL_LM", base_model_name_or_path=getattr(model, "name_or_path", None))
    return config, {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- save / load

def write_loralib_adapter(model, state: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Write ``loralib_adapter.safetensors`` (``lora_state_dict``) and the PEFT export into ``directory``.

    ``state`` is the gathered adapter state (``checkpoint.adapter_state_dict``); its keys must be
    exactly those of ``loralib.lora_state_dict(model, bias)`` (checked).
    """
    from safetensors.torch import save_file

    cfg: LoraConfig = model.loralib_config
    expected = set(loralib.lora_state_dict(model, bias=cfg.bias))
    if set(state) != expected:
        raise RuntimeError(f"loralib adapter state has {len(state)} tensors, lora_state_dict names {len(expected)}")
    peft_config, peft_state = peft_export(model, state, cfg)
    settings = {"backend": "loralib", "r": cfg.r, "alpha": cfg.alpha, "qkv_enable": cfg.qkv_enable,
                "target_modules": cfg.target_modules, "bias": cfg.bias}
    directory = Path(directory)
    save_file(state, str(directory / STATE_FILE), metadata={"phi3_lora": json.dumps(settings)})
    peft_config.save_pretrained(str(directory))
    save_file(peft_state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_loralib_adapter(model, adapter_dir: str | Path) -> None:
    """Load ``adapter_dir/loralib_adapter.safetensors`` into a model prepared by ``attach_loralib`` (checked)."""
    path = Path(adapter_dir) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: no {STATE_FILE} (not a loralib adapter)")
    load_adapter_state(model, read_safetensors(path), source=str(path))
