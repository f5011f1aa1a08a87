"""Transformer building blocks shared by every model of the book.

Three modules, named as in OpenAI's CLIP (``ResidualAttentionBlock``) so that
real checkpoints map onto them key for key later:

- `MLP`: Linear ``c_fc`` (width -> hidden), GELU, Linear ``c_proj`` (hidden -> width).
- `TransformerBlock`: the pre-LayerNorm residual block
      x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
- `CrossAttentionBlock`: the same block, but the attention's queries come from
  one stream and its keys and values from another (the "context"):
      x = x + cross_attn(ln_q(x), ln_kv(context));  x = x + mlp(ln_2(x))

Shapes are batch-first throughout: (B, L, width).

What each block costs (FLOPs, parameters, activation memory) is written out in
`tiny_mm.counting`, and the tests check those formulas against these modules.
"""
from __future__ import annotations

from torch import Tensor, nn

from tiny_mm.attention import MultiHeadAttention

__all__ = ["MLP", "TransformerBlock", "CrossAttentionBlock", "mlp_hidden"]


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    """Hidden size of the MLP: int(width * mlp_ratio), as CLIP computes it (768 * 4 = 3072)."""
    return int(width * mlp_ratio)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _check_tokens(name: str, x: Tensor, width: int) -> None:
    """ValueError unless x is a (B, L, width) floating tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, L, {width}), got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"{name} must have shape (B, L, {width}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


# ANCHOR: MLP
class MLP(nn.Module):
    """Position-wise feed-forward network: c_proj(GELU(c_fc(x))).

    Args:
        width: model width d (input and output size).
        hidden: hidden size (4 * d in CLIP, ViT and Whisper).

    Shapes: forward(x (..., d)) -> (..., d).
    """

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        _check_positive(width=width, hidden=hidden)
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()  # exact (erf) GELU; OpenAI's CLIP uses QuickGELU, open_clip's models GELU
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # (..., hidden) inside, (..., d) out
# ANCHOR_END: MLP


# ANCHOR: TransformerBlock
class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block (self-attention then MLP, each residual).

    Args:
        width: model width d.
        heads: number of attention heads h (d must be divisible by h).
        mlp_ratio: MLP hidden size is int(d * mlp_ratio).
        causal: if True, token i attends only to tokens j <= i (a text decoder).
        packed_in_proj: keep the attention's q, k, v weights in one (3d, d)
            ``attn.in_proj_weight``, named as in ``nn.MultiheadAttention`` (and
            CLIP's checkpoints); see `MultiHeadAttention`.

    Shapes: forward(x (B, L, d), kv_lengths (B,) or None, attn_mask or None) -> (B, L, d).
        kv_lengths[b] = number of valid tokens of example b (the rest is
        padding at the end): no token attends to a padding token. Padding
        positions still produce (meaningless) outputs; pool them away.
        attn_mask: bool, broadcastable to (B, h, L, L), True where token i may
        see token j (any other pattern, e.g. the Q-Former's).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        *,
        causal: bool = False,
        packed_in_proj: bool = False,
    ) -> None:
        super().__init__()
        _check_positive(width=width, heads=heads, mlp_ratio=mlp_ratio)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads, self.causal = width, heads, causal
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, packed_in_proj=packed_in_proj)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio))

    def forward(
        self, x: Tensor, kv_lengths: Tensor | None = None, attn_mask: Tensor | None = None
    ) -> Tensor:
        _check_tokens("x", x, self.width)
        x = x + self.attn(
            self.ln_1(x), causal=self.causal, kv_lengths=kv_lengths, attn_mask=attn_mask
        )  # (B, L, d)
        return x + self.mlp(self.ln_2(x))  # (B, L, d)
# ANCHOR_END: TransformerBlock


# ANCHOR: CrossAttentionBlock
class CrossAttentionBlock(nn.Module):
    """Pre-LayerNorm cross-attention block: queries from x, keys and values from a context.

    The block is self-contained (its own norms and its own MLP), as in
    Flamingo's cross-attention layers (there with a tanh gate) that sit between
    the layers of a frozen language model:

        x = x + cross_attn(query=ln_q(x), key=value=ln_kv(context))
        x = x + mlp(ln_2(x))

    Every token of x reads from every (valid) token of the context; the
    context itself is not changed.

    Args:
        width: width d of the query stream x (and of the block's output).
        heads: number of heads h (d divisible by h).
        context_width: width of the context tokens (default: d). Keys and values
            are projected from context_width to d.
        mlp_ratio: MLP hidden size is int(d * mlp_ratio).

    Shapes: forward(x (B, Lq, d), context (B, Lk, context_width),
        context_lengths (B,) or None, attn_mask or None) -> (B, Lq, d).
        context_lengths[b] = number of valid context tokens of example b
        (padding at the end). attn_mask: bool, broadcastable to (B, h, Lq, Lk),
        True where a query token may read a context token (e.g. Flamingo's
        media mask: each text token reads only its own image).
    """

    def __init__(
        self, width: int, heads: int, context_width: int | None = None, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        context_width = width if context_width is None else context_width
        _check_positive(width=width, heads=heads, context_width=context_width, mlp_ratio=mlp_ratio)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads, self.context_width = width, heads, context_width
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(context_width)
        self.cross_attn = MultiHeadAttention(width, heads, kdim=context_width, vdim=context_width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_hidden(width, mlp_ratio))

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        context_lengths: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        _check_tokens("x", x, self.width)
        _check_tokens("context", context, self.context_width)
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"x and context need the same batch size, got {x.shape[0]} and {context.shape[0]}"
            )
        kv = self.ln_kv(context)  # (B, Lk, context_width): keys and values share one normalised copy
        x = x + self.cross_attn(
            self.ln_q(x), kv, kv, kv_lengths=context_lengths, attn_mask=attn_mask
        )  # (B, Lq, d)
        return x + self.mlp(self.ln_2(x))  # (B, Lq, d)
# ANCHOR_END: CrossAttentionBlock
