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

FLOPs (`fusion_flops`) are counted per example as
``torch.utils.flop_counter.FlopCounterMode`` counts them: 2 m n k for every
matrix product (linear layers, attention scores q k^T and the weighted sum
P v); softmax, LayerNorm, GELU, additions and pooling count nothing. A block
over T tokens costs 8 T d^2 (q, k, v, out) + 4 T^2 d (scores and sum) + 4 T d f
(MLP); a cross-attention block with T queries and S context tokens costs
4 T d^2 + 4 S d^2 + 4 T S d + 4 T d f. Text padding is ignored: all Tt tokens
are counted (the modules compute them, masked or not).
"""
from __future__ import annotations

from tiny_mm.video_fusion import MODALITIES, VideoFusionConfig

__all__ = [
    "fusion_params",
    "block_params",
    "cross_block_params",
    "fusion_flops",
    "block_flops",
    "cross_block_flops",
]


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


def block_flops(config: VideoFusionConfig, tokens: int) -> int:
    """Forward FLOPs of one `TransformerBlock` on T = tokens tokens: 8Td^2 + 4T^2d + 4Tdf."""
    d, f, t = config.width, _hidden(config), tokens
    projections = 4 * (2 * t * d * d)  # q, k, v and out: four (T, d) x (d, d) products
    attention = 2 * (2 * t * t * d)  # q k^T (T, D) x (D, T) and P v (T, T) x (T, D), over heads
    mlp = 2 * (2 * t * d * f)  # c_fc (T, d) x (d, f) and c_proj (T, f) x (f, d)
    return projections + attention + mlp


def cross_block_flops(config: VideoFusionConfig, queries: int, context: int) -> int:
    """Forward FLOPs of one `CrossAttentionBlock`: T = queries read S = context tokens.

    = 4Td^2 (q, out) + 4Sd^2 (k, v) + 4TSd (scores and sum) + 4Tdf (MLP).
    """
    d, f, t, s = config.width, _hidden(config), queries, context
    projections = 2 * (2 * t * d * d) + 2 * (2 * s * d * d)  # q, out: queries; k, v: context
    attention = 2 * (2 * t * s * d)  # q k^T (T, S) and P v, summed over heads
    mlp = 2 * (2 * t * d * f)  # only the queries go through the MLP
    return projections + attention + mlp


def _check_lengths(**lengths: int) -> None:
    for name, value in lengths.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (tokens of that stream), got {value!r}")


# ANCHOR: fusion_flops
def fusion_flops(
    strategy: str, config: VideoFusionConfig, Tv: int, Ta: int, Tt: int
) -> dict[str, int]:
    """Forward FLOPs for ONE example of `STRATEGIES[strategy](config)`, piece by piece.

    Args:
        strategy: "early", "late", "cross" or "bottleneck".
        config: a `VideoFusionConfig`.
        Tv, Ta, Tt: tokens in the video, audio and text streams (all text counted).

    Returns:
        {"total", "encoders" (all self-attention blocks), "cross" (cross-attention
        blocks), "head"}; total is their sum. A batch of B costs B times as much.
    """
    if not isinstance(config, VideoFusionConfig):
        raise ValueError(f"config must be a VideoFusionConfig, got {type(config).__name__}")
    _check_lengths(Tv=Tv, Ta=Ta, Tt=Tt)
    d, L, C, m = config.width, config.layers, config.num_classes, len(MODALITIES)
    tokens = {"video": Tv, "audio": Ta, "text": Tt}
    if strategy == "early":
        parts = {
            "encoders": L * block_flops(config, 1 + Tv + Ta + Tt),  # CLS + all three streams
            "cross": 0,
            "head": 2 * d * C,  # the CLS vector (d,) x (d, C)
        }
    elif strategy in ("late", "cross", "bottleneck"):
        # Bottleneck fusion: each modality's blocks also carry the n_b shared tokens.
        extra = config.n_bottleneck if strategy == "bottleneck" else 0
        cross = 0
        if strategy == "cross":
            total = sum(tokens.values())
            cross = sum(cross_block_flops(config, t, total - t) for t in tokens.values())
        parts = {
            "encoders": sum(L * block_flops(config, extra + t) for t in tokens.values()),
            "cross": cross,
            "head": 2 * m * d * C,  # the concatenated (3d,) x (3d, C)
        }
    else:
        raise ValueError(f"unknown strategy {strategy!r}; known: early, late, cross, bottleneck")
    return {"total": sum(parts.values()), **parts}
# ANCHOR_END: fusion_flops
