"""Shapes of the released Phi-3 models, for the offline parts: recipe tests and memory estimates.

Figures from each model's ``config.json`` on the hub. Training never uses these (it reads the
real config with the weights); tests build a tiny model of the same kind (rope type, grouped
query attention) from them, and the memory estimator sizes a model without downloading it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phi3Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope: str  # "default" or "longrope"
    vocab_size: int = 32064
    original_max_position_embeddings: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32)
MEDIUM = dict(hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
              num_key_value_heads=10)

KNOWN_MODELS: dict[str, Phi3Shape] = {
    "microsoft/Phi-3-mini-4k-instruct": Phi3Shape(**MINI, max_position_embeddings=4096, rope="default"),
    "microsoft/Phi-3-mini-128k-instruct": Phi3Shape(**MINI, max_position_embeddings=131072, rope="longrope"),
    "microsoft/Phi-3.5-mini-instruct": Phi3Shape(**MINI, max_position_embeddings=131072, rope="longrope"),
    "microsoft/Phi-3-medium-4k-instruct": Phi3Shape(**MEDIUM, max_position_embeddings=4096, rope="default"),
    "microsoft/Phi-3-medium-128k-instruct": Phi3Shape(**MEDIUM, max_position_embeddings=131072, rope="longrope"),
}


def known_shape(name_or_path: str) -> Phi3Shape | None:
    """The shape of a released Phi-3 by hub id (case-insensitive), or None."""
    lowered = {k.lower(): v for k, v in KNOWN_MODELS.items()}
    return lowered.get(name_or_path.lower())
