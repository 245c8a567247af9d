"""The offline stand-ins: a small random Phi-3 and a byte-level tokenizer with Phi-3's specials.

``tiny-random-phi3`` is the real ``Phi3ForCausalLM`` class (fused ``qkv_proj`` and
``gate_up_proj``, RMSNorm, rope or LongRoPE), only small and randomly initialised from a seed,
so that the whole pipeline — data, LoRA, the loop, DeepSpeed, 4-bit — runs and is tested on a
CPU without a model hub. Its tokenizer maps every UTF-8 byte to a token and carries Phi-3's
special tokens and chat template, so conversations render exactly as they do for Phi-3.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from .data import PHI3_CHAT_TEMPLATE

PHI3_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
PHI3_ADDED_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-2 are <unk>, <s>, </s>; 3-258 the bytes; then Phi-3's chat tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {tok: i for i, tok in enumerate(PHI3_SPECIAL_TOKENS)}
    vocab.update({ch: len(PHI3_SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": PHI3_ADDED_TOKENS})
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's byte-to-unicode map, for ordering the byte alphabet as bytes 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]


def tiny_phi3_config(tokenizer, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 4,
                     rope: str = "default", intermediate: int | None = None,
                     max_position_embeddings: int = 4096, initializer_range: float = 0.1) -> Phi3Config:
    """A small Phi3Config whose vocabulary fits ``tokenizer`` (rounded up to a multiple of 64, as Phi-3's)."""
    vocab = (len(tokenizer) + 63) // 64 * 64
    head_dim = hidden // heads
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    original_max = max_position_embeddings
    if rope == "longrope":  # as Phi-3-mini-128k: short factors up to the original length, long beyond
        original_max = max_position_embeddings // 4
        rope_parameters = {
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(head_dim // 2)],
            "long_factor": [1.0 + 1.5 * i for i in range(head_dim // 2)],
            "original_max_position_embeddings": original_max,
        }
    return Phi3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings, original_max_position_embeddings=original_max,
        rope_parameters=rope_parameters, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, sliding_window=None, use_cache=False,
        initializer_range=initializer_range,
    )


def tiny_phi3_model(config: Phi3Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Phi3ForCausalLM:
    """Phi3ForCausalLM with weights drawn from ``seed``: the same seed gives the same model everywhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config)
    return model.to(dtype)
