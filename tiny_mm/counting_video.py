"""Exact parameter counts of the four fusion models of `tiny_mm.video_fusion`, by formula.

Nothing is built here; tests/test_video_fusion.py checks every formula against
``sum(p.numel())`` of the instantiated models on random configurations.

Notation: d the width, f = int(d * mlp_ratio) the MLP hidden size, L the
layers per encoder, C the classes, n_b the bottleneck tokens, M = 3 modalities.

- LayerNorm: gain and bias, 2d.
- attention (`MultiHeadAttention`, biases on q, k, v and out): 4d^2 + 4d.
- MLP: Linear(d, f) and Linear(f, d) with biases: 2df + f + d.
- TransformerBlock: two LayerNorms + attention + MLP = 4d^2 + 2df + 9d + f.
- CrossAttentionBlock: three LayerNorms (ln_q, ln_kv, ln_2) + attention + MLP
  = 4d^2 + 2df + 11d + f.

Per strategy:

- early: modality vectors 3d + CLS d + L blocks + final LayerNorm 2d + head (dC + C).
- late: 3 (L blocks + LayerNorm 2d) + head (3dC + C).
- cross: late + 3 cross-attention blocks.
- bottleneck: late + the bottleneck tokens n_b d. Fusion adds only n_b d
  parameters: the exchange itself is free, it is the attention the blocks
  already have.
"""
from __future__ import annotations

from tiny_mm.video_fusion import MODALITIES, VideoFusionConfig

__all__ = ["fusion_params", "block_params", "cross_block_params"]


def _hidden(config: VideoFusionConfig) -> int:
    return int(config.width * config.mlp_ratio)  # as tiny_mm.layers.mlp_hidden


def _attention(d: int) -> int:
    return 4 * d * d + 4 * d  # q, k, v, out: (d, d) weights and (d,) biases


def _mlp(d: int, f: int) -> int:
    return d * f + f + f * d + d  # c_fc and c_proj with biases


def block_params(config: VideoFusionConfig) -> int:
    """One `TransformerBlock`: ln_1, attention, ln_2, MLP = 4d^2 + 2df + 9d + f."""
    d = config.width
    return 2 * (2 * d) + _attention(d) + _mlp(d, _hidden(config))


def cross_block_params(config: VideoFusionConfig) -> int:
    """One `CrossAttentionBlock` with context width d: ln_q, ln_kv, attention, ln_2, MLP."""
    d = config.width
    return 3 * (2 * d) + _attention(d) + _mlp(d, _hidden(config))


# ANCHOR: fusion_params
def fusion_params(strategy: str, config: VideoFusionConfig) -> dict[str, int]:
    """Parameters of `tiny_mm.video_fusion.STRATEGIES[strategy](config)`, piece by piece.

    Args:
        strategy: "early", "late", "cross" or "bottleneck".
        config: a `VideoFusionConfig`.

    Returns:
        {"total", "encoders" (all self-attention blocks), "cross" (cross-attention
        blocks), "embeddings" (modality vectors, CLS, bottleneck tokens),
        "norms" (final LayerNorms), "head"}; total is the sum of the other five.
    """
    if not isinstance(config, VideoFusionConfig):
        raise ValueError(f"config must be a VideoFusionConfig, got {type(config).__name__}")
    d, L, C, m = config.width, config.layers, config.num_classes, len(MODALITIES)
    if strategy == "early":
        parts = {
            "encoders": L * block_params(config),  # one shared encoder
            "cross": 0,
            "embeddings": m * d + d,  # modality vectors (3, d) and the CLS token (d,)
            "norms": 2 * d,
            "head": d * C + C,
        }
    elif strategy in ("late", "cross", "bottleneck"):
        parts = {
            "encoders": m * L * block_params(config),  # one encoder per modality
            "cross": m * cross_block_params(config) if strategy == "cross" else 0,
            "embeddings": config.n_bottleneck * d if strategy == "bottleneck" else 0,
            "norms": m * 2 * d,
            "head": m * d * C + C,  # reads the three pooled vectors side by side
        }
    else:
        raise ValueError(f"unknown strategy {strategy!r}; known: early, late, cross, bottleneck")
    return {"total": sum(parts.values()), **parts}
# ANCHOR_END: fusion_params
