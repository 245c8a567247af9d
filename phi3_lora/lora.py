"""Attach LoRA adapters (the ``lora`` section, the cookbook's ``peft_config``) to a frozen base.

Phi-3 fuses its projections, so the default targets are ``qkv_proj, o_proj, gate_up_proj,
down_proj``; peft has no Phi-3 default. A requested target that matches no module is an error,
not a silent skip (the cookbook's own notebook asks for ``q_proj, k_proj, v_proj`` that Phi-3
does not have). Only adapter parameters train.

Two backends sit behind ``attach_lora`` and ``save_adapter``: peft (the default) and the
cookbook's loralib (``lora.backend=loralib``, see ``loralib_backend.py``); the loop does not
care which.
"""

from __future__ import annotations

import math

import torch

from .config import ConfigError, LoraConfig


def linear_module_names(model) -> list[str]:
    """Full names of every linear layer (``model.layers.0.self_attn.qkv_proj``, ``lm_head``...)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")]


def check_targets(model, targets: list[str]) -> None:
    """Every requested target must name at least one linear layer of the model other than ``lm_head``, or
    ``embed_tokens`` (peft adapts embeddings too), as peft matches them: the whole name or a suffix after a
    dot (``qkv_proj``, ``self_attn.qkv_proj``, ``layers.31.mlp.down_proj``)."""
    if targets == ["all-linear"]:
        return
    embeddings = [n for n, module in model.named_modules() if isinstance(module, torch.nn.Embedding)]
    names = [n for n in linear_module_names(model) + embeddings if n.rsplit(".", 1)[-1] != "lm_head"]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} match no module of this model; "
                          f"Phi-3's linear layers are {', '.join(kinds)} (or a suffix of their full names, such as "
                          f"self_attn.qkv_proj or layers.0.mlp.down_proj)")


def peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}[cfg.init]
    targets = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias=cfg.bias, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
                          init_lora_weights=init, task_type="CAUSAL_LM")


def attach_lora(model, cfg: LoraConfig, seed: int):
    """Add fresh adapters drawn from ``seed`` to ``model`` (a peft model, or the model itself with
    loralib layers in place); the base is frozen."""
    from peft import get_peft_model

    if cfg.backend == "loralib":
        from .loralib_backend import attach_loralib
        return attach_loralib(model, cfg, seed)
    check_targets(model, cfg.target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config(cfg))


def adapters_for_autocast(model) -> None:
    """Ready the adapters for forwards under bf16/fp16 autocast (the loop's, with a 16-bit base on a GPU).

    peft builds its adapters in float32 and casts their input (a round trip here: see
    ``skip_adapter_input_casts``). loralib builds its layers in the base's dtype: its adapters are
    moved to float32 here, so that the optimizer updates float32 weights (a 16-bit weight drops
    updates below its precision; fp16's loss scaler refuses 16-bit gradients) while autocast runs
    their matmuls in 16 bits.
    """
    from .loralib_backend import is_loralib_model

    if not is_loralib_model(model):
        return skip_adapter_input_casts(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def adapters_for_deepspeed(model, mixed_precision: str) -> None:
    """Give the adapters the run's 16-bit dtype under DeepSpeed with bf16/fp16, as DeepSpeed's engine does itself,
    except where ZeRO-3's zero.Init has partitioned the base: it then casts nothing, and the float32 adapters peft
    builds would make the ZeRO-3 optimizer take float32 for its dtype — fp16 without loss scaling or overflow
    checks, bf16 with each adapter's input cast to float32. DeepSpeed's optimizer keeps float32 master copies."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is None:
        return
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def skip_adapter_input_casts(model) -> None:
    """Stop peft casting each adapter's input to float32 (its adapters' dtype).

    Only for forwards under bf16/fp16 autocast, where the cast is a round trip: autocast casts the input
    back to 16 bits for the adapter's first matmul, so the adapters see the same values (bit for bit
    when there is no dropout) and each adapted layer saves two full-width casts of its input forward,
    and their two backward. peft's own 4-bit layers already skip the cast under autocast. Without
    autocast a 16-bit input would meet float32 adapter weights: the loop calls this only under it.
    Layers with a variant (DoRA) keep the cast: DoRA computes its weight norm in the input's dtype.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer) and not getattr(layer, "lora_variant", None):
            layer.cast_input_dtype_enabled = False


def fuse_adapter_outputs(model) -> int:
    """Give peft's plain LoRA layers a forward that adds the adapter in the up-projection's GEMM; returns how many.

    peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the up-projection, the scaling and the sum
    each read and write a tensor as wide as the layer's output (Phi-3-mini's ``gate_up_proj``: 16,384 per token),
    and the scaling's backward one more; the 4-bit layers clone the base output first too. Here the three are one
    ``torch.addmm(base(x), down, lora_B.weight.T, alpha=scaling)``, whose epilogue does the scaling and the sum,
    and whose backward scales only the rank-wide gradient: four full-width passes and two operators fewer
    forward per adapted layer, and the same again in a checkpointed layer's recomputation. Same values up to
    the rounding of a fused sum (``tests/test_lora.py``).

    Not for ZeRO-3, whose hooks gather ``lora_B``'s partitioned weight only when ``lora_B`` itself is called: the
    caller leaves such a model alone. Layers with a variant (DoRA) or an adapter bias keep peft's forward, and so
    does any call it handles differently: adapters disabled or merged, several active, one added later with a
    variant or a bias, extra arguments (``adapter_names``), or a base output of another dtype than the sum's (a
    4-bit or 8-bit base returns its input's dtype whatever autocast says: float32 activations under bf16 autocast
    stay float32 there, as in peft). The forward is a ``functools.partial``, as accelerate attaches its hooks, so
    the model still pickles and deep-copies.
    """
    import functools

    from peft.tuners.lora import LoraLayer

    fused = 0
    for layer in model.modules():
        if (isinstance(layer, LoraLayer) and type(layer).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")
                and layer.lora_B and "forward" not in vars(layer)
                and all(_adds_plainly(layer, name) for name in layer.lora_B)):
            layer.forward = functools.partial(_forward_adding_in_gemm, layer)
            fused += 1
    return fused


def _adds_plainly(layer, name: str) -> bool:
    """Adapter ``name`` of a peft LoRA layer is plain LoRA: no variant (DoRA) and no bias on its up-projection."""
    return name not in getattr(layer, "lora_variant", ()) and layer.lora_B[name].bias is None


def _forward_adding_in_gemm(self, x, *args, **kwargs):
    """``fuse_adapter_outputs``' forward of one peft LoRA layer (``self``)."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    autocast = torch.is_autocast_enabled(x.device.type)
    if (args or kwargs or name not in self.lora_A or self.disable_adapters or self.merged
            or not _adds_plainly(self, name)
            or not (x.dtype == self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype
                    or (autocast and not self.cast_input_dtype_enabled))):
        return type(self).forward(self, x, *args, **kwargs)  # peft's own, with its casts
    result = self.base_layer(x)
    down = self.lora_A[name](self.lora_dropout[name](x.reshape(-1, x.shape[-1])))  # 2-D: no views inside linear
    if result.dtype != (torch.get_autocast_dtype(x.device.type) if autocast else x.dtype):
        return result + (self.lora_B[name](down) * self.scaling[name]).view(result.shape)  # peft's sum, its dtype
    summed = torch.addmm(result.reshape(-1, result.shape[-1]), down, self.lora_B[name].weight.t(),
                         alpha=self.scaling[name])
    return summed.view(result.shape)


RUN_CONFIG = "run_config.yaml"  # in each adapter directory: the settings that rebuild its base (``inference.py``)


def save_adapter(model, state_dict: dict[str, torch.Tensor], target, run_config: str | None = None) -> None:
    """Write the adapter of the unwrapped ``model`` (state gathered by ``checkpoint.adapter_state_dict``)
    to ``target`` atomically: PEFT format, plus the loralib state for a loralib model, the run's
    config (YAML text) as ``run_config.yaml`` when given, and the marker with every file's checksum."""
    from .checkpoint import atomic_directory

    with atomic_directory(target, manifest=True) as tmp:
        write_adapter(model, state_dict, tmp, run_config)


def write_adapter(model, state_dict: dict[str, torch.Tensor], directory, run_config: str | None = None) -> None:
    """``save_adapter`` into ``directory`` (one being assembled, e.g. inside a checkpoint)."""
    from pathlib import Path

    from .checkpoint import write_peft_adapter
    from .loralib_backend import is_loralib_model, write_loralib_adapter

    Path(directory).mkdir(parents=True, exist_ok=True)
    if is_loralib_model(model):
        write_loralib_adapter(model, state_dict, directory)
    else:
        write_peft_adapter(model, state_dict, directory)
    if run_config is not None:
        (Path(directory) / RUN_CONFIG).write_text(run_config)


def load_adapter_dir(model, directory) -> None:
    """Load a saved adapter directory into ``model`` with the checked ``strict=False`` loader."""
    from pathlib import Path

    from .checkpoint import load_adapter_state, read_safetensors
    from .loralib_backend import STATE_FILE, is_loralib_model

    path = Path(directory) / (STATE_FILE if is_loralib_model(model) else "adapter_model.safetensors")
    load_adapter_state(model, read_safetensors(path), str(path))


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts: 4-bit weights count as their unpacked size (whatever dtype packs
    them), parameters that ZeRO-3 partitioned as loaded as their whole size."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:
            n = math.prod(quant_state.shape)
        elif hasattr(p, "ds_numel"):
            n = p.ds_numel
        else:
            n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
