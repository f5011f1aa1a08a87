"""Exact cost formulas for the fusion models of chapter 1: FLOPs, parameters, activation memory.

Every function returns a `Cost`, and the tests check each one against the
modules it describes (`tiny_mm.layers`, `tiny_mm.fusion`) on random sizes.

What is counted (and what is not)
---------------------------------
FLOPs are counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts
them: 2*m*n*k for every (m, k) @ (k, n) matrix product, which covers the
linear layers and the two attention products (scores Q K^T and the weighted
sum P V). A bias add, the softmax, LayerNorm, GELU, residual adds and the
pooling are *not* counted: they are O(tokens * width) or O(scores) element-wise
work that is small next to the products at the sizes of the book.

Training FLOPs = forward + backward. The backward of a product A @ W costs
one product for dA and one for dW, each as large as the forward one, so
training is 3x the forward for every product whose input needs a gradient, and
2x when it does not (a first layer fed raw data: see `linear(input_grad=False)`).
In the fusion models every product's input depends on a LayerNorm's weight,
so every product needs both gradients and training is exactly 3x forward.

Parameters are exact (biases and LayerNorm weights included) and equal
``sum(p.numel() for p in module.parameters())``.

Activation memory is the bytes autograd keeps for the backward pass: every
distinct tensor storage saved by some operation, parameters excluded, counted
once however many operations save it. `saved_transformer_block` and friends
list the tensors one by one. LayerNorm also saves a mean and a 1/std per
token, in the input's dtype on a CPU (exact there for every dtype); on CUDA
those two are float32 for float16/bfloat16 inputs, 4 bytes more per token
and norm than counted here. The attention part is that of the plain rung
(`tiny_mm.attention.scaled_dot_product_attention`, which backend "auto" uses
on a CPU): it keeps Q, K, V and the probabilities P. The fused Triton kernel
keeps the output and one log-sum-exp per query row instead of P. Masks are
not counted: with causal=True or kv_lengths, the plain rung also keeps a
boolean (B, 1, Lq, Lk) mask.

Notation: B batch, L layers, d width, h heads, N image tokens, M text tokens,
f = int(d * mlp_ratio) the MLP hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = [
    "Cost",
    "mlp_hidden",
    "probs_bytes",
    "attention_scores",
    "linear",
    "attention_core",
    "layer_norm",
    "mlp",
    "multi_head_attention",
    "saved_transformer_block",
    "saved_cross_attention_block",
    "transformer_block",
    "cross_attention_block",
    "early_fusion",
    "late_fusion",
    "cross_modal_fusion",
    "fusion_layer",
]


# ANCHOR: Cost
@dataclass(frozen=True)
class Cost:
    """What a piece of a model costs for one forward (and backward) pass over a batch.

    flops_forward: matmul FLOPs of the forward pass (2mnk per product).
    flops_training: forward + backward matmul FLOPs.
    params: number of parameters.
    activation_bytes: bytes saved for the backward pass (distinct tensors, no parameters).
    score_entries: entries of the attention-score matrices, B * h * Lq * Lk summed
        over the attention operations.
    score_bytes: bytes of those matrices (the softmax outputs kept for backward).
    """

    flops_forward: int = 0
    flops_training: int = 0
    params: int = 0
    activation_bytes: int = 0
    score_entries: int = 0
    score_bytes: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __mul__(self, times: int) -> "Cost":
        return Cost(*(getattr(self, f.name) * times for f in fields(self)))

    __rmul__ = __mul__
# ANCHOR_END: Cost


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    """The MLP hidden size f = int(d * mlp_ratio) (as `tiny_mm.layers` builds it)."""
    return int(width * mlp_ratio)


def probs_bytes(entries: int, dtype_bytes: int) -> int:
    """Bytes kept for `entries` attention probabilities.

    The plain rung takes the softmax in float32 at least and keeps its output
    for the softmax's backward; for float16/bfloat16 inputs it also keeps the
    copy cast back to the input dtype for the P @ V product: 4 + 2 bytes each.
    """
    return entries * (dtype_bytes if dtype_bytes >= 4 else 4 + dtype_bytes)


def _check(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_heads(width: int, heads: int) -> None:
    _check(width=width, heads=heads)
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")


# --------------------------------------------------------------------------- pieces


# ANCHOR: attention_scores
def attention_scores(n_queries: int, n_keys: int, *, heads: int = 1, batch: int = 1) -> int:
    """Entries of the attention-score matrices: B * h * Lq * Lk.

    Per head and example: 324^2 = 104,976 for early fusion over 196 + 128
    tokens, 128 * 196 = 25,088 for 128 text tokens attending to 196 patches.
    """
    _check(n_queries=n_queries, n_keys=n_keys, heads=heads, batch=batch)
    return batch * heads * n_queries * n_keys
# ANCHOR_END: attention_scores


def linear(tokens: int, d_in: int, d_out: int, *, bias: bool = True, input_grad: bool = True) -> Cost:
    """nn.Linear(d_in, d_out) applied to `tokens` rows (tokens = B * L).

    Forward: one (tokens, d_in) @ (d_in, d_out) product, 2 * tokens * d_in * d_out.
    Backward: the same again for the weight gradient, and once more for the
    input gradient unless the input needs none (input_grad=False).
    Activation: the input, (tokens, d_in), is saved; `activation_bytes` is left
    at 0 here because blocks share inputs between linears (see saved_*).
    """
    _check(tokens=tokens, d_in=d_in, d_out=d_out)
    forward = 2 * tokens * d_in * d_out
    return Cost(
        flops_forward=forward,
        flops_training=forward * (3 if input_grad else 2),
        params=d_in * d_out + (d_out if bias else 0),
    )


def attention_core(
    n_queries: int, n_keys: int, width: int, heads: int, *, batch: int = 1, dtype_bytes: int = 4
) -> Cost:
    """softmax(Q K^T / sqrt(d_head)) V for B examples, h heads of size d / h.

    Scores Q K^T: h products (Lq, dh) @ (dh, Lk) -> 2 * Lq * Lk * d per example;
    the weighted sum P V: the same again. Backward: two products per forward
    product (Q, K, V and P all need gradients), so training = 3 x forward.
    The (Lq, Lk) probabilities P are the memory that grows quadratically
    (score_bytes: what the plain rung keeps of them, see `probs_bytes`).
    """
    _check_heads(width, heads)
    _check(n_queries=n_queries, n_keys=n_keys, batch=batch, dtype_bytes=dtype_bytes)
    forward = 2 * (2 * batch * n_queries * n_keys * width)  # Q K^T and P V
    entries = attention_scores(n_queries, n_keys, heads=heads, batch=batch)
    return Cost(
        flops_forward=forward,
        flops_training=3 * forward,
        score_entries=entries,
        score_bytes=probs_bytes(entries, dtype_bytes),
    )


def layer_norm(width: int) -> Cost:
    """nn.LayerNorm(width): 2 * width parameters (gain and bias), no matmul FLOPs."""
    _check(width=width)
    return Cost(params=2 * width)


def mlp(tokens: int, width: int, hidden: int) -> Cost:
    """`tiny_mm.layers.MLP`: Linear(d, f), GELU, Linear(f, d) on `tokens` rows."""
    return linear(tokens, width, hidden) + linear(tokens, hidden, width)


def multi_head_attention(
    n_queries: int,
    n_keys: int,
    width: int,
    heads: int,
    *,
    kv_width: int | None = None,
    batch: int = 1,
    dtype_bytes: int = 4,
    input_grad: bool = True,
) -> Cost:
    """`tiny_mm.attention.MultiHeadAttention(width, heads, kdim=vdim=kv_width)`.

    Q = x_q W_q (Lq rows), K = x_kv W_k and V = x_kv W_v (Lk rows, from kv_width
    to d), attention, then the output projection (Lq rows). Self-attention is
    n_queries == n_keys and kv_width == width. input_grad=False: the inputs
    x_q, x_kv need no gradient (raw data), so the three input projections
    skip their input gradients.
    """
    kv_width = width if kv_width is None else kv_width
    _check(batch=batch, n_queries=n_queries, n_keys=n_keys, kv_width=kv_width)
    q_rows, kv_rows = batch * n_queries, batch * n_keys
    return (
        linear(q_rows, width, width, input_grad=input_grad)  # W_q
        + linear(kv_rows, kv_width, width, input_grad=input_grad)  # W_k
        + linear(kv_rows, kv_width, width, input_grad=input_grad)  # W_v
        + attention_core(n_queries, n_keys, width, heads, batch=batch, dtype_bytes=dtype_bytes)
        + linear(q_rows, width, width)  # W_out
    )


# --------------------------------------------------------------------------- saved tensors


# ANCHOR: saved_transformer_block
def saved_transformer_block(
    tokens: int, width: int, heads: int, mlp_ratio: float = 4.0, *, batch: int = 1, dtype_bytes: int = 4
) -> dict[str, int]:
    """Bytes of each tensor a `TransformerBlock` over L = `tokens` tokens saves for backward.

    name -> bytes, for one forward of B examples. The block's input counts
    (ln_1 keeps it); its output does not (the next layer's norm keeps it).
    """
    _check_heads(width, heads)
    _check(tokens=tokens, batch=batch, dtype_bytes=dtype_bytes)
    rows, f = batch * tokens, mlp_hidden(width, mlp_ratio)
    act, stat = rows * width * dtype_bytes, rows * dtype_bytes  # stat: one number per token
    return {
        "x (ln_1 input)": act,
        "ln_1 mean": stat,
        "ln_1 1/std": stat,
        "ln_1(x) (input of W_q, W_k, W_v)": act,
        "Q heads (scores product)": act,
        "K heads (scores product)": act,
        "P = softmax(scores) (B, h, L, L)": probs_bytes(batch * heads * tokens * tokens, dtype_bytes),
        "V heads (weighted-sum product)": act,
        "merged heads (input of W_out)": act,
        "x + attn (ln_2 input)": act,
        "ln_2 mean": stat,
        "ln_2 1/std": stat,
        "ln_2(x) (c_fc input)": act,
        "c_fc output (GELU input)": rows * f * dtype_bytes,
        "GELU output (c_proj input)": rows * f * dtype_bytes,
    }
# ANCHOR_END: saved_transformer_block


def saved_cross_attention_block(
    n_queries: int,
    n_context: int,
    width: int,
    heads: int,
    mlp_ratio: float = 4.0,
    *,
    context_width: int | None = None,
    batch: int = 1,
    dtype_bytes: int = 4,
) -> dict[str, int]:
    """Bytes of each tensor a `CrossAttentionBlock` saves: Lq = n_queries, Lk = n_context.

    Includes the context itself (ln_kv keeps it); when several blocks read the
    same context tensor it is one tensor, counted once (see cross_modal_fusion).
    """
    context_width = width if context_width is None else context_width
    _check_heads(width, heads)
    _check(n_queries=n_queries, n_context=n_context, context_width=context_width, batch=batch)
    q_rows, kv_rows, f = batch * n_queries, batch * n_context, mlp_hidden(width, mlp_ratio)
    q_act = q_rows * width * dtype_bytes
    return {
        "x (ln_q input)": q_act,
        "ln_q mean": q_rows * dtype_bytes,
        "ln_q 1/std": q_rows * dtype_bytes,
        "ln_q(x) (input of W_q)": q_act,
        "context (ln_kv input)": kv_rows * context_width * dtype_bytes,
        "ln_kv mean": kv_rows * dtype_bytes,
        "ln_kv 1/std": kv_rows * dtype_bytes,
        "ln_kv(context) (input of W_k, W_v)": kv_rows * context_width * dtype_bytes,
        "Q heads (scores product)": q_act,
        "K heads (scores product)": kv_rows * width * dtype_bytes,
        "P = softmax(scores) (B, h, Lq, Lk)": probs_bytes(batch * heads * n_queries * n_context, dtype_bytes),
        "V heads (weighted-sum product)": kv_rows * width * dtype_bytes,
        "merged heads (input of W_out)": q_act,
        "x + attn (ln_2 input)": q_act,
        "ln_2 mean": q_rows * dtype_bytes,
        "ln_2 1/std": q_rows * dtype_bytes,
        "ln_2(x) (c_fc input)": q_act,
        "c_fc output (GELU input)": q_rows * f * dtype_bytes,
        "GELU output (c_proj input)": q_rows * f * dtype_bytes,
    }


# --------------------------------------------------------------------------- blocks


# ANCHOR: transformer_block
def transformer_block(
    tokens: int, width: int, heads: int, mlp_ratio: float = 4.0, *, batch: int = 1, dtype_bytes: int = 4
) -> Cost:
    """One `TransformerBlock` over `tokens` tokens: self-attention + MLP, two LayerNorms.

    Forward FLOPs per example: 8 L d^2 (four projections) + 4 L^2 d (scores and
    weighted sum) + 4 L d f (MLP; 16 L d^2 when f = 4d).
    """
    f = mlp_hidden(width, mlp_ratio)
    rows = batch * tokens
    cost = (
        layer_norm(width)
        + multi_head_attention(tokens, tokens, width, heads, batch=batch, dtype_bytes=dtype_bytes)
        + layer_norm(width)
        + mlp(rows, width, f)
    )
    saved = saved_transformer_block(tokens, width, heads, mlp_ratio, batch=batch, dtype_bytes=dtype_bytes)
    return cost + Cost(activation_bytes=sum(saved.values()))
# ANCHOR_END: transformer_block


def cross_attention_block(
    n_queries: int,
    n_context: int,
    width: int,
    heads: int,
    mlp_ratio: float = 4.0,
    *,
    context_width: int | None = None,
    batch: int = 1,
    dtype_bytes: int = 4,
    count_context: bool = True,
) -> Cost:
    """One `CrossAttentionBlock`: Lq = n_queries tokens attend to Lk = n_context tokens.

    Forward FLOPs per example (context_width = d): 4 Lq d^2 (W_q, W_out)
    + 4 Lk d^2 (W_k, W_v over the context) + 4 Lq Lk d + 4 Lq d f.
    count_context=False leaves the context tensor out of activation_bytes (it
    is already counted when another block saved the same tensor).
    """
    context_width = width if context_width is None else context_width
    f = mlp_hidden(width, mlp_ratio)
    cost = (
        layer_norm(width)  # ln_q
        + layer_norm(context_width)  # ln_kv
        + multi_head_attention(
            n_queries, n_context, width, heads, kv_width=context_width, batch=batch, dtype_bytes=dtype_bytes
        )
        + layer_norm(width)  # ln_2
        + mlp(batch * n_queries, width, f)
    )
    saved = saved_cross_attention_block(
        n_queries, n_context, width, heads, mlp_ratio,
        context_width=context_width, batch=batch, dtype_bytes=dtype_bytes,
    )
    if not count_context:
        del saved["context (ln_kv input)"]
    return cost + Cost(activation_bytes=sum(saved.values()))


def _final_norm(tokens: int, width: int, batch: int, dtype_bytes: int) -> Cost:
    """The encoder's last LayerNorm: its params, its saved input (B, L, d) and its statistics."""
    rows = batch * tokens
    return layer_norm(width) + Cost(activation_bytes=rows * (width + 2) * dtype_bytes)


def _classifier(width: int, num_classes: int | None, batch: int, dtype_bytes: int) -> Cost:
    """Optional Linear(d, classes) on the pooled (B, d) features (it saves them)."""
    if num_classes is None:
        return Cost()
    return linear(batch, width, num_classes) + Cost(activation_bytes=batch * width * dtype_bytes)


# --------------------------------------------------------------------------- the three strategies


def _check_model(layers: int, width: int, heads: int, n_image: int, n_text: int, batch: int) -> None:
    _check(layers=layers, n_image=n_image, n_text=n_text, batch=batch)
    _check_heads(width, heads)


# ANCHOR: early_fusion
def early_fusion(
    layers: int,
    width: int,
    heads: int,
    n_image: int,
    n_text: int,
    mlp_ratio: float = 4.0,
    *,
    batch: int = 1,
    dtype_bytes: int = 4,
    num_classes: int | None = None,
) -> Cost:
    """`tiny_mm.fusion.EarlyFusion`: L blocks over N + M tokens, final norm, mean pool, head.

    Forward per example and layer: 8 (N+M) d^2 + 4 (N+M)^2 d + 4 (N+M) d f.
    """
    _check_model(layers, width, heads, n_image, n_text, batch)
    tokens = n_image + n_text
    block = transformer_block(tokens, width, heads, mlp_ratio, batch=batch, dtype_bytes=dtype_bytes)
    modality_vectors = Cost(params=2 * width)
    return (
        modality_vectors
        + layers * block
        + _final_norm(tokens, width, batch, dtype_bytes)
        + _classifier(width, num_classes, batch, dtype_bytes)
    )
# ANCHOR_END: early_fusion


# ANCHOR: late_fusion
def late_fusion(
    layers: int,
    width: int,
    heads: int,
    n_image: int,
    n_text: int,
    mlp_ratio: float = 4.0,
    *,
    batch: int = 1,
    dtype_bytes: int = 4,
    num_classes: int | None = None,
) -> Cost:
    """`tiny_mm.fusion.LateFusion`: L blocks over N tokens, L over M, pooled, fused, head.

    Forward per example and layer: 8 (N+M) d^2 + 4 (N^2 + M^2) d + 4 (N+M) d f.
    The fusion head adds Linear(2d, d) + GELU once per example.
    """
    _check_model(layers, width, heads, n_image, n_text, batch)
    kw = dict(batch=batch, dtype_bytes=dtype_bytes)
    image = layers * transformer_block(n_image, width, heads, mlp_ratio, **kw)
    image = image + _final_norm(n_image, width, batch, dtype_bytes)  # ln_image
    text = layers * transformer_block(n_text, width, heads, mlp_ratio, **kw)
    text = text + _final_norm(n_text, width, batch, dtype_bytes)  # ln_text
    # fuse = Linear(2d, d) then GELU: the linear keeps the (B, 2d) concatenation, GELU its (B, d) input.
    fuse = linear(batch, 2 * width, width) + Cost(activation_bytes=batch * 3 * width * dtype_bytes)
    return image + text + fuse + _classifier(width, num_classes, batch, dtype_bytes)
# ANCHOR_END: late_fusion


# ANCHOR: cross_modal_fusion
def cross_modal_fusion(
    layers: int,
    width: int,
    heads: int,
    n_image: int,
    n_text: int,
    mlp_ratio: float = 4.0,
    *,
    batch: int = 1,
    dtype_bytes: int = 4,
    num_classes: int | None = None,
) -> Cost:
    """`tiny_mm.fusion.CrossModalFusion`: L image blocks, then L x (text block + cross block).

    Forward per example and layer: the two self-attention blocks of late fusion
    plus one cross-attention block, 4 M d^2 + 4 N d^2 + 4 M N d + 4 M d f.
    Every cross block reads the same final image tokens: that tensor is saved
    once, not L times.
    """
    _check_model(layers, width, heads, n_image, n_text, batch)
    kw = dict(batch=batch, dtype_bytes=dtype_bytes)
    image = layers * transformer_block(n_image, width, heads, mlp_ratio, **kw)
    shared_image_tokens = Cost(activation_bytes=batch * n_image * width * dtype_bytes)
    text_layer = transformer_block(n_text, width, heads, mlp_ratio, **kw) + cross_attention_block(
        n_text, n_image, width, heads, mlp_ratio, count_context=False, **kw
    )
    return (
        image
        + shared_image_tokens
        + layers * text_layer
        + _final_norm(n_text, width, batch, dtype_bytes)
        + _classifier(width, num_classes, batch, dtype_bytes)
    )
# ANCHOR_END: cross_modal_fusion


# ANCHOR: fusion_layer
def fusion_layer(
    strategy: str,
    width: int,
    heads: int,
    n_image: int,
    n_text: int,
    mlp_ratio: float = 4.0,
    *,
    batch: int = 1,
    dtype_bytes: int = 4,
) -> Cost:
    """One layer of a strategy, everything included (projections, attention, MLPs, norms).

    "early": one block over N + M tokens.  "late": an image block and a text
    block.  "cross": an image block, a text block and a cross-attention block
    (text queries, image keys).
    """
    kw = dict(batch=batch, dtype_bytes=dtype_bytes)
    image = transformer_block(n_image, width, heads, mlp_ratio, **kw)
    text = transformer_block(n_text, width, heads, mlp_ratio, **kw)
    if strategy == "early":
        return transformer_block(n_image + n_text, width, heads, mlp_ratio, **kw)
    if strategy == "late":
        return image + text
    if strategy == "cross":
        return image + text + cross_attention_block(n_text, n_image, width, heads, mlp_ratio, **kw)
    raise ValueError(f"strategy must be 'early', 'late' or 'cross', got {strategy!r}")
# ANCHOR_END: fusion_layer


# --------------------------------------------------------------------------- CLIP's parameters
#
# The parameter counts of released CLIP models, from their architecture numbers
# alone (no model is built). Names as open_clip spells them; "ViT-B/32" (OpenAI's
# spelling) is accepted too. Only parameters are counted: BatchNorm's running
# statistics are buffers, and so is the text tower's causal mask.

# ANCHOR: clip_archs
# name -> (embed_dim E, image tower, text tower (context, vocab, width, layers)).
# Image tower: ("vit", image_size, patch_size, width, layers) or ("resnet", image_size, stage depths, width).
_CLIP_ARCHS: dict[str, tuple[int, tuple, tuple[int, int, int, int]]] = {
    "RN50": (1024, ("resnet", 224, (3, 4, 6, 3), 64), (77, 49408, 512, 12)),
    "RN101": (512, ("resnet", 224, (3, 4, 23, 3), 64), (77, 49408, 512, 12)),
    "ViT-B-32": (512, ("vit", 224, 32, 768, 12), (77, 49408, 512, 12)),
    "ViT-B-16": (512, ("vit", 224, 16, 768, 12), (77, 49408, 512, 12)),
    "ViT-L-14": (768, ("vit", 224, 14, 1024, 24), (77, 49408, 768, 12)),
}
# ANCHOR_END: clip_archs


def _block_params(width: int, mlp_ratio: float = 4.0) -> int:
    """One pre-LN block: ln_1, packed q/k/v + out projection, ln_2, MLP; 12 d^2 + 13 d when f = 4d."""
    return transformer_block(1, width, 1, mlp_ratio).params  # the head count changes no shape


def clip_vit_params(image_size: int, patch_size: int, width: int, layers: int, embed_dim: int) -> int:
    """`tiny_mm.vit.VisionTransformer` (CLIP's ``visual``): conv1 (no bias), class and positional
    embeddings, ln_pre, the blocks, ln_post and the (width, E) projection.

    The formula is chapter 3's `tiny_mm.vit.vit_parameters`, which lists it piece by piece.
    """
    _check(image_size=image_size, patch_size=patch_size, width=width, layers=layers, embed_dim=embed_dim)
    from tiny_mm.vit import VisionConfig, vit_parameters  # torch-free callers of counting never pay for it

    config = VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                          heads=1, output_dim=embed_dim)  # the head count changes no shape
    return vit_parameters(config)["total"]


def clip_resnet_params(image_size: int, stages: tuple[int, ...], width: int, embed_dim: int) -> int:
    """`tiny_mm.clip.ModifiedResNet`: a 3-conv stem, four Bottleneck stages, attention pooling.

    Convolutions have no bias; a BatchNorm has 2 parameters per channel. A
    Bottleneck(in, p) holds 1x1 (in -> p), 3x3 (p -> p), 1x1 (p -> 4p), a
    BatchNorm after each, and a 1x1 + BatchNorm shortcut when it strides or
    changes the channel count (every first block of a stage). The attention
    pool over C = 32 width channels: a positional table of (H/32)^2 + 1 rows,
    q, k, v projections (C -> C) and c_proj (C -> E), all with biases.
    """
    _check(image_size=image_size, width=width, embed_dim=embed_dim)

    def conv_bn(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k + 2 * c_out

    half = width // 2
    total = conv_bn(3, half, 3) + conv_bn(half, half, 3) + conv_bn(half, width, 3)  # the stem
    inplanes = width
    for stage, blocks in enumerate(stages):
        planes = width * 2**stage
        for block in range(blocks):
            total += conv_bn(inplanes, planes, 1) + conv_bn(planes, planes, 3) + conv_bn(planes, 4 * planes, 1)
            if block == 0:  # stage 0 changes channels (w -> 4w), the others stride: a shortcut conv
                total += conv_bn(inplanes, 4 * planes, 1)
            inplanes = 4 * planes
    channels = 32 * width
    grid = image_size // 32
    total += (grid * grid + 1) * channels  # attnpool.positional_embedding
    total += 3 * (channels * channels + channels)  # q_proj, k_proj, v_proj
    total += channels * embed_dim + embed_dim  # c_proj
    return total


def clip_text_params(context_length: int, vocab_size: int, width: int, layers: int, embed_dim: int) -> int:
    """CLIP's text tower: token_embedding, positional_embedding, the causal blocks, ln_final,
    text_projection (width, E)."""
    _check(context_length=context_length, vocab_size=vocab_size, width=width, layers=layers, embed_dim=embed_dim)
    return (
        (vocab_size + context_length) * width  # token_embedding, positional_embedding
        + layers * _block_params(width)
        + layer_norm(width).params  # ln_final
        + width * embed_dim  # text_projection
    )


# ANCHOR: clip_params
def clip_params(model_name: str) -> dict[str, int]:
    """Parameters of a released CLIP model: {"total", "visual", "text"}, by formula.

    visual: everything under ``visual.``; text: token_embedding,
    positional_embedding, transformer, ln_final, text_projection; total =
    visual + text + 1 (logit_scale). Equal to the instantiated open_clip models
    (tests/test_clip_params.py). Measured here: RN50 102,007,137; RN101
    119,688,033; ViT-B/32 151,277,313; ViT-B/16 149,620,737; ViT-L/14
    427,616,513 (the "~151M" and "~428M" usually quoted for ViT-B/32 and ViT-L/14).
    """
    name = model_name.replace("/", "-") if isinstance(model_name, str) else model_name
    if name not in _CLIP_ARCHS:
        raise ValueError(f"unknown CLIP model {model_name!r}; known: {', '.join(_CLIP_ARCHS)}")
    embed_dim, vision, (context, vocab, text_width, text_layers) = _CLIP_ARCHS[name]
    if vision[0] == "vit":
        _, image_size, patch, width, layers = vision
        visual = clip_vit_params(image_size, patch, width, layers, embed_dim)
    else:
        _, image_size, stages, width = vision
        visual = clip_resnet_params(image_size, stages, width, embed_dim)
    text = clip_text_params(context, vocab, text_width, text_layers, embed_dim)
    return {"total": visual + text + 1, "visual": visual, "text": text}
# ANCHOR_END: clip_params


__all__ += ["clip_params", "clip_vit_params", "clip_resnet_params", "clip_text_params"]


# Whisper and GPT-2 (chapter 9) live in tiny_mm/counting_whisper.py, which needs the Whisper
# model's config (and so torch); they are importable from here too, on first use.
_WHISPER_NAMES = ("whisper_params", "whisper_memory", "whisper_flops", "gpt2_params", "WHISPER_DIMS", "GPT2_SIZES")
# The video fusion strategies (chapter 10) live in tiny_mm/counting_video.py, for the same reason.
_VIDEO_NAMES = ("fusion_params", "block_params", "cross_block_params", "fusion_flops", "block_flops",
                "cross_block_flops")


def __getattr__(name: str):
    if name in _WHISPER_NAMES:
        from tiny_mm import counting_whisper

        return getattr(counting_whisper, name)
    if name in _VIDEO_NAMES:
        from tiny_mm import counting_video

        return getattr(counting_video, name)
    raise AttributeError(f"module 'tiny_mm.counting' has no attribute {name!r}")
