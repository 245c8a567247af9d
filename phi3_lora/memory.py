"""Expected peak GPU memory of a training run, per device, from the model's real shape.

The figures are what PyTorch's allocator holds at the peak (``torch.cuda.max_memory_allocated``);
a card also needs the CUDA context and allocator slack, added as ``overhead`` below. Notation:
L layers, h hidden size, i intermediate size, d = h / heads, g = kv_heads * d, V vocabulary,
w = bytes of a weight in ``model.dtype``, a = bytes of the compute dtype (bf16: 2), N GPUs,
Z the ZeRO stage (0 = plain single-GPU/DDP), T = per_device_batch_size * max_seq_len tokens
of a micro-batch (every example at full length: the worst case), T_e the same for evaluation.

Parameters. The linear layers of one decoder layer are qkv_proj h x (h + 2g), o_proj h x h,
gate_up_proj h x 2i, down_proj i x h; P_lin is their sum times L. P_rest = 2 V h (input
embeddings and the untied lm_head) + (2L + 1) h (RMSNorm weights).

weights     16/32-bit: (P_lin + P_rest) w.
            4-bit:     P_lin (1/2 + q) + P_rest w, q = bytes of quantization constants a weight:
                       4/64 (one fp32 absmax per block of 64 weights) or, with double
                       quantization, 1/64 + 4/(64 * 256) (8-bit absmaxes, one fp32 constant per
                       256 blocks). 8-bit: P_lin + 4 (rows of all linear layers) + P_rest w.
            ZeRO-3 divides all of it by N, except the 4-bit constants (not parameters, replicated).
adapters    P_lora = sum over adapted layers (in, out) of r (in + out) (loralib's fused layers and an
            embed_tokens target: see ``adapter_tensor_sizes``), in float32: 4 P_lora (peft keeps
            adapters in fp32). ZeRO-3: / N.
gradients   4 P_lora; ZeRO >= 2: / N; DDP (N > 1, Z = 0) adds its gradient buckets, 4 P_lora.
optimizer   adamw_torch, paged_adamw_32bit: 8 bytes per adapter parameter (two fp32 moments).
            adamw_8bit, paged_adamw_8bit: 2 + 8/256 bytes per parameter of tensors with at least
            4096 elements (8-bit moments and their fp32 scales, one per block of 256), 8 for smaller.
            DeepSpeed (Z >= 1) adds the fp32 master copy, 4 P_lora. ZeRO >= 1: / N. (Paged
            states may move to CPU memory under pressure; they are counted on the GPU here.)
activations per token of one decoder layer, kept for backward (sdpa, flash and flex attention
            keep no T x T matrix; eager attention's is added below; sdpa's mask below):
              A = 2 * 4h                               fp32 copies inside the two RMSNorms
                + a (h + (h + 2g) + h + g + h)          qkv input, qkv output (v is a view of it),
                                                       rotated q and k, attention output
                + a (h + 2i + i + i)                    gate_up input and output, silu(gate), down input
                + sum over adapted layers of (a + 1) in + a r   LoRA dropout output and mask
                                                       (no dropout: a r only), lora_A output
            kept: without checkpointing L A T, with it L a h T (each layer's input); both plus
            T (4h + a h) (the final norm's fp32 copy and lm_head's input), and T a h more with
            a chunked loss (the hidden states' gradient, computed with the loss, kept for backward).
            With checkpointing one layer's A T is recomputed during backward.
            sdpa gets an explicit mask wherever packing, padding or a sliding window is in play (the GPU
            recipes pack; Phi-3-mini-4k's 2,047-token window needs one from 2,048 tokens on), and each
            layer's call converts it to the compute dtype and keeps that copy for backward: b S^2 a
            bytes (b = per_device_batch_size, S = max_seq_len) added to A T, the worst case (an unpacked,
            unpadded batch without a window has none). 34 MB a layer at b = 1, S = 4096 in bf16.
            eager attention keeps each layer's attention probabilities for backward, b H S^2 (4 + a)
            bytes (b = per_device_batch_size, H heads, S = max_seq_len): the fp32 softmax and its
            16-bit copy (one tensor when a = 4, 4 bytes); added to A T. Its evaluation holds one
            layer's b_e H S^2 (4 + 2a) at once (the scores, the fp32 softmax, the copy).
            backward working set: T a (2i + 2h) (gradients of the widest activations) plus one
            dequantized weight of the largest quantized layer, in a bytes (4/8-bit matmuls
            dequantize it for every call).
            logits, whole (``training.loss_chunk_size`` 0, and always under ZeRO-3): T V (4 + 4 + 4)
            at the start of backward (fp32 log-softmax kept for backward, its gradient, the fp32
            logits' gradient); the forward's a + 8 bytes per logit are less. Chunked (C > 0):
            min(T, C) V (a + 4 + a) during the forward (one chunk's logits and their fp32 copy, then
            its fp32 log-softmax turned softmax in place, and that in a bytes for the gradient's
            matmul); nothing at backward.
            ZeRO-3 adds two gathered decoder layers (the current and the prefetched one) in storage
            bytes.
            peak (training) = weights + adapters + gradients + optimizer + kept
                              + max(logits, working set [+ A T with checkpointing])
evaluation  weights + adapters + optimizer + R_e V (a + 8) + T_e a (h + 3i) + dequantized weight,
            R_e = T_e or min(T_e, C) as R (+ T_e a h, the chunks' copy): no activations are kept,
            but an evaluation batch's logits are; gradients are freed.

loading     a 4-bit or 8-bit base under ZeRO-3: all of its weights, unsharded. transformers loads a quantized
            model without zero.Init, and DeepSpeed moves it whole onto each GPU before its ZeRO-3
            optimizer partitions it. Otherwise the weights as above.

The peak is the largest of training, evaluation and loading. ``overhead`` = 0.5 GiB (CUDA context and
kernels) + 10% of the peak (allocator fragmentation), an assumption checked by
``benchmarks/gpu_qlora.sh`` on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .architectures import known_shape
from .config import TINY_MODEL, Config, ConfigError, effective_chunk_size

GIB = 1024 ** 3
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
BLOCK_4BIT, DOUBLE_QUANT_GROUP, BLOCK_8BIT_OPTIM, MIN_8BIT_OPTIM_SIZE = 64, 256, 256, 4096  # bitsandbytes 0.50
CONTEXT_BYTES, FRAGMENTATION = 0.5 * GIB, 0.10


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a Phi-3 config."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * (self.hidden_size // self.num_attention_heads)

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"qkv_proj": (h, h + 2 * self.kv_dim), "o_proj": (h, h), "gate_up_proj": (h, 2 * i),
                "down_proj": (i, h)}


def _from_config_dict(config: dict, source: str = "model config") -> Shape:
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
             "max_position_embeddings")
    missing = [n for n in names if not isinstance(config, dict) or n not in config]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}: not a Phi-3 config")
    try:
        values = {n: int(config[n]) for n in names}
        return Shape(num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                     **values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: a size that is not a whole number ({err})") from None


def model_shape(cfg: Config) -> tuple[Shape, str]:
    """The shape of ``model.name_or_path`` and where it came from.

    In order: the tiny model, a local directory's config.json, the built-in figures of released
    Phi-3 models (``architectures.py``), the hub (only the config is downloaded).
    """
    m = cfg.model
    if m.name_or_path == TINY_MODEL:
        from .model import load_tokenizer
        from .tiny import tiny_phi3_config
        config = tiny_phi3_config(load_tokenizer(m), layers=m.tiny_layers, hidden=m.tiny_hidden_size,
                                  heads=m.tiny_heads, kv_heads=m.tiny_kv_heads)  # its vocabulary: the tokenizer's
        return _from_config_dict(config.to_dict()), "the tiny model's config"
    local = Path(m.name_or_path) / "config.json"
    if local.is_file():
        try:
            return _from_config_dict(json.loads(local.read_text(encoding="utf-8")), str(local)), str(local)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{local}: not a valid model config ({str(err).splitlines()[0]})") from None
    known = known_shape(m.name_or_path)
    if known is not None:
        return Shape(known.hidden_size, known.intermediate_size, known.num_hidden_layers, known.num_attention_heads,
                     known.num_key_value_heads, known.vocab_size, known.max_position_embeddings), \
            "built-in figures (phi3_lora/architectures.py)"
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: cannot read the config of '{m.name_or_path}': "
                          f"{str(err).splitlines()[0]}") from None
    return _from_config_dict(config.to_dict()), f"the hub config of {m.name_or_path}"


@dataclass
class Estimate:
    """Bytes per device, by what holds them."""
    weights: float
    adapters: float
    gradients: float
    optimizer: float
    kept_activations: float   # kept for backward, with checkpointing as configured
    one_layer: float          # one decoder layer's kept activations (recomputed with checkpointing)
    working_set: float        # backward transients: widest gradients, a dequantized weight, ZeRO-3 gathers
    logits: float
    evaluation_activations: float
    adapter_parameters: int
    base_parameters: int
    checkpointing: bool
    loading: float = 0.0      # held while loading: a quantized base under ZeRO-3 is whole until DeepSpeed partitions it

    @property
    def activations(self) -> float:
        """Activation memory at the training peak: at the loss's backward, or inside a layer's."""
        recomputed = self.one_layer if self.checkpointing else 0.0
        return self.kept_activations + max(self.logits, recomputed + self.working_set)

    @property
    def states(self) -> float:
        return self.weights + self.adapters + self.gradients + self.optimizer

    @property
    def training_peak(self) -> float:
        return self.states + self.activations

    @property
    def evaluation_peak(self) -> float:
        return self.weights + self.adapters + self.optimizer + self.evaluation_activations

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.evaluation_peak, self.loading)

    @property
    def overhead(self) -> float:
        return CONTEXT_BYTES + FRAGMENTATION * self.peak

    @property
    def card(self) -> float:
        """What the GPU must have free: the peak plus overhead."""
        return self.peak + self.overhead


def adapted_layers(shape: Shape, targets: list[str]) -> dict[str, tuple[int, int]]:
    layers = shape.linear_layers()
    if targets == ["all-linear"]:
        return layers
    return {name: dims for name, dims in layers.items() if name in targets}


def adapter_tensor_sizes(shape: Shape, lora) -> list[int]:
    """Elements of every adapter tensor (A and B) of the model, as ``lora.backend`` shapes them.

    peft: r x in and out x r per adapted linear layer. loralib: the same, except that its fused
    layers have one A of r rows per enabled part and a B over the enabled parts' rows (qkv_proj's
    parts as ``lora.qkv_enable`` says; both halves of gate_up_proj). Both: ``embed_tokens`` as a
    target adds r x V and h x r.
    """
    h, g, i, r = shape.hidden_size, shape.kv_dim, shape.intermediate_size, lora.r
    fused = {"qkv_proj": ([h, g, g], list(lora.qkv_enable)), "gate_up_proj": ([i, i], [True, True])}
    per_layer = []
    for name, (fan_in, fan_out) in adapted_layers(shape, lora.target_modules).items():
        if lora.backend == "loralib" and name in fused:
            parts, enabled = fused[name]
            per_layer += [r * sum(enabled) * fan_in, r * sum(p for p, on in zip(parts, enabled) if on)]
        else:
            per_layer += [r * fan_in, r * fan_out]
    embedding = [r * shape.vocab_size, r * h] if "embed_tokens" in lora.target_modules else []
    return per_layer * shape.num_hidden_layers + embedding


def estimate(cfg: Config, shape: Shape, zero_stage: int = 0, num_gpus: int = 1,
             gradient_checkpointing: bool | None = None) -> Estimate:
    """Per-device memory of training ``cfg`` on ``shape`` (see the module docstring for the formulas).

    ``model.dtype=auto`` and ``bnb_4bit_compute_dtype=auto`` are taken as bfloat16: the estimate is
    for a GPU with bf16. ``gradient_checkpointing`` defaults to the config's setting.
    """
    m, t, lora = cfg.model, cfg.training, cfg.lora
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero stage must be 0-3, got {zero_stage}")
    if num_gpus < 1:
        raise ConfigError(f"number of GPUs must be at least 1, got {num_gpus}")
    ckpt = t.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    n = num_gpus
    weights_dtype = "bfloat16" if m.dtype == "auto" else m.dtype
    compute = m.bnb_4bit_compute_dtype if m.load_in_4bit and m.bnb_4bit_compute_dtype != "auto" else weights_dtype
    w, a = BYTES[weights_dtype], BYTES[compute]
    if t.mixed_precision in ("bf16", "fp16"):  # autocast: activations in 16 bits whatever the weights
        a = 2
    h, i, L, V = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers, shape.vocab_size
    g = shape.kv_dim
    layers = shape.linear_layers()
    p_layer = sum(fan_in * fan_out for fan_in, fan_out in layers.values())
    p_lin = L * p_layer
    p_rest = 2 * V * h + (2 * L + 1) * h
    rows = L * sum(fan_out for _, fan_out in layers.values())

    # weights
    constants = 0.0
    if m.load_in_4bit:
        q = (1 / BLOCK_4BIT + 4 / (BLOCK_4BIT * DOUBLE_QUANT_GROUP)) if m.bnb_4bit_use_double_quant \
            else 4 / BLOCK_4BIT
        packed, constants = p_lin / 2, p_lin * q
        layer_storage = p_layer / 2
    elif m.load_in_8bit:
        packed, constants = p_lin, 4 * rows
        layer_storage = p_layer
    else:
        packed = p_lin * w
        layer_storage = p_layer * w
    sharded = packed + p_rest * w
    weights = (sharded / n if zero_stage == 3 else sharded) + constants
    # transformers loads a quantized model without zero.Init, and DeepSpeed moves it whole onto each GPU
    # before its ZeRO-3 optimizer partitions it
    quantized = m.load_in_4bit or m.load_in_8bit
    loading = sharded + constants if quantized and zero_stage == 3 else weights

    # adapters, gradients, optimizer
    adapted = adapted_layers(shape, lora.target_modules)
    tensors = adapter_tensor_sizes(shape, lora)
    p_lora = sum(tensors)
    adapters = 4 * p_lora / (n if zero_stage == 3 else 1)
    gradients = 4 * p_lora / (n if zero_stage >= 2 else 1)
    if zero_stage == 0 and n > 1:
        gradients += 4 * p_lora
    if t.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        opt = sum((2 + 8 / BLOCK_8BIT_OPTIM) * k if k >= MIN_8BIT_OPTIM_SIZE else 8 * k for k in tensors)
    else:
        opt = 8 * p_lora
    if zero_stage >= 1:
        opt = (opt + 4 * p_lora) / n

    # activations
    tokens = t.per_device_batch_size * cfg.data.max_seq_len
    per_token = 2 * 4 * h + a * (h + (h + 2 * g) + h + g + h) + a * (h + 2 * i + i + i)
    for fan_in, _ in adapted.values():
        per_token += ((a + 1) * fan_in if lora.dropout > 0 else 0) + a * lora.r
    # eager attention's probabilities, per example and layer: kept for backward, and held during an evaluation
    scores = shape.num_attention_heads * cfg.data.max_seq_len ** 2 if m.attn_implementation == "eager" else 0
    mask = a * cfg.data.max_seq_len ** 2 if m.attn_implementation == "sdpa" else 0  # sdpa's mask, per example
    one_layer = per_token * tokens + t.per_device_batch_size * (scores * (4 + (a if a != 4 else 0)) + mask)
    chunk = effective_chunk_size(t.loss_chunk_size, zero_stage)
    selected = a * h if chunk else 0  # the hidden states' gradient (training) or their copy (evaluation)
    kept = (L * a * h * tokens if ckpt else L * one_layer) + tokens * (4 * h + a * h + selected)
    largest = max(fan_in * fan_out for fan_in, fan_out in layers.values())
    dequantized = largest * a if quantized else 0
    working = tokens * a * (2 * i + 2 * h) + dequantized + (2 * layer_storage if zero_stage == 3 else 0)
    logits = min(tokens, chunk) * V * (2 * a + 4) if chunk else tokens * V * 12
    eval_tokens = t.per_device_eval_batch_size * cfg.data.max_seq_len
    eval_logits = (min(eval_tokens, chunk) if chunk else eval_tokens) * V * (a + 8)
    evaluation = (eval_logits + eval_tokens * (a * (h + 3 * i) + selected) + dequantized
                  + t.per_device_eval_batch_size * scores * (4 + 2 * a))
    return Estimate(weights=weights, adapters=adapters, gradients=gradients, optimizer=opt, kept_activations=kept,
                    one_layer=one_layer, working_set=working, logits=logits, evaluation_activations=evaluation,
                    adapter_parameters=p_lora, base_parameters=p_lin + p_rest, checkpointing=ckpt, loading=loading)
