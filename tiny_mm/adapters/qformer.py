"""BLIP-2's Q-Former, small: learned queries that read a frozen image encoder (chapter 8).

A frozen image encoder gives N patch features per image; a frozen language
model wants a short prompt of vectors. The Q-Former sits between them: Q
learned query vectors read the image through cross-attention and come out as
Q vectors (Q = 32 of width 768 in BLIP-2), whatever N is.

    image_feats (B, N, image_width)  --ln_image-->  keys and values of the cross-attention
    queries     (Q, d) learned       text ids (B, T) -> token + position embeddings (B, T, d)
    each layer:
        self-attention over [queries ; text] (B, Q+T, d), under the objective's mask
        cross-attention from the QUERIES ONLY to the image (every `cross_attention_every`-th layer)
        MLP: one for the query positions, another for the text positions
    ln_post -> query outputs (B, Q, d), text outputs (B, T, d)

The queries and the text share only the self-attention; BLIP-2 calls the two
halves the image transformer and the text transformer. Which of them sees
which is set by a mask, one per training objective (`itc_mask`, `itm_mask`,
`itg_mask`):

    ITC  image-text contrastive  queries see queries, text sees text (unimodal)
    ITM  image-text matching     everything sees everything (bidirectional)
    ITG  image-grounded text     queries see queries; text token i sees every
         generation              query and the text tokens j <= i (causal)

`QFormer.forward(image_feats)` runs the queries alone (no text) and returns
their outputs (B, Q, d): what a frozen language model receives, after one
linear map to its width, as a soft prompt. `itc_loss`, `itm_loss` and
`itg_loss` are the three objectives; `train_step` sums them.
`query_pass_flops` counts what the query pass costs.

Where it departs from BLIP-2: the layers are pre-LayerNorm like every block
of this book (BERT's are post-LayerNorm); nothing starts from BERT's weights
(the text side learns the shapes words from scratch); [DEC] is a vector of
its own rather than a row of the vocabulary; the LM head is not tied to the
token embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tiny_mm.attention import MultiHeadAttention
from tiny_mm.layers import MLP, mlp_hidden

__all__ = [
    "OBJECTIVES",
    "itc_mask",
    "itm_mask",
    "itg_mask",
    "objective_mask",
    "QFormerLayer",
    "QFormer",
    "itc_similarity",
    "contrastive_loss",
    "hard_negative_probs",
    "sample_hard_negatives",
    "lm_loss",
    "itc_loss",
    "itm_loss",
    "itg_loss",
    "qformer_losses",
    "train_step",
    "query_pass_flops",
]

OBJECTIVES = ("itc", "itm", "itg")


# --------------------------------------------------------------------------- checks


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_text_lengths(text_lengths: Tensor | None, text_len: int) -> None:
    """ValueError unless text_lengths is None or an integer tensor (B,) with 1 <= values <= T."""
    if text_lengths is None:
        return
    if not isinstance(text_lengths, Tensor):
        raise ValueError(
            f"text_lengths must be an integer torch.Tensor (B,), got {type(text_lengths).__name__}"
        )
    if text_lengths.is_floating_point() or text_lengths.is_complex() or text_lengths.dtype == torch.bool:
        raise ValueError(f"text_lengths must be an integer tensor, got dtype {text_lengths.dtype}")
    if text_lengths.dim() != 1 or text_lengths.numel() == 0:
        raise ValueError(f"text_lengths must have shape (B,) with B >= 1, got {tuple(text_lengths.shape)}")
    if text_len == 0:
        raise ValueError("text_lengths was given but there is no text (text_len = 0)")
    if bool((text_lengths < 1).any()) or bool((text_lengths > text_len).any()):
        raise ValueError(
            f"text_lengths must lie in [1, T] = [1, {text_len}] (every caption keeps its first "
            f"token), got {text_lengths.tolist()}"
        )


def _check_ids(ids: Tensor, lengths: Tensor, vocab_size: int, max_text_len: int) -> None:
    """ValueError unless ids is (B, T) integer within the vocabulary and lengths fits it."""
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a (B, T) integer tensor, got {shape}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    if not 1 <= ids.shape[1] <= max_text_len:
        raise ValueError(
            f"ids has T = {ids.shape[1]} tokens; T must lie in [1, max_text_len = {max_text_len}]"
        )
    if bool((ids < 0).any()) or bool((ids >= vocab_size).any()):
        raise ValueError(
            f"ids must lie in [0, vocab_size = {vocab_size}), got min {int(ids.min())}, max {int(ids.max())}"
        )
    _check_text_lengths(lengths, ids.shape[1])
    if lengths is None or lengths.shape[0] != ids.shape[0]:
        got = None if lengths is None else tuple(lengths.shape)
        raise ValueError(f"lengths must have shape (B,) = ({ids.shape[0]},) like ids, got {got}")


# --------------------------------------------------------------------------- the three masks


# ANCHOR: masks
def _is_query(num_queries: int, text_len: int, device) -> Tensor:
    """(Q+T,) bool: True at the query positions, which come first."""
    return torch.arange(num_queries + text_len, device=device) < num_queries


def _hide_padding(mask: Tensor, num_queries: int, text_lengths: Tensor | None) -> Tensor:
    """(L, L) -> (B, L, L): nobody sees the padding after each caption's last token."""
    if text_lengths is None:
        return mask  # (L, L)
    keys = torch.arange(mask.shape[-1], device=mask.device)  # (L,)
    real = keys[None, :] < num_queries + text_lengths.to(mask.device)[:, None]  # (B, L): queries + real text
    return mask[None] & real[:, None, :]  # (B, L, L): key j hidden from every row when padding


def itc_mask(num_queries: int, text_len: int, text_lengths: Tensor | None = None, *, device=None) -> Tensor:
    """Image-text contrastive (unimodal): queries see only queries, text sees only text.

    Returns bool (Q+T, Q+T), True where row i may attend to column j; with
    text_lengths (B,), (B, Q+T, Q+T) with the padding columns hidden.
    """
    _check_int("num_queries", num_queries, 0)
    _check_int("text_len", text_len, 0)
    _check_text_lengths(text_lengths, text_len)
    is_query = _is_query(num_queries, text_len, device)  # (L,)
    mask = is_query[:, None] == is_query[None, :]  # (L, L): same modality only
    return _hide_padding(mask, num_queries, text_lengths)


def itm_mask(num_queries: int, text_len: int, text_lengths: Tensor | None = None, *, device=None) -> Tensor:
    """Image-text matching (bidirectional): every position sees every position. Shapes as `itc_mask`."""
    _check_int("num_queries", num_queries, 0)
    _check_int("text_len", text_len, 0)
    _check_text_lengths(text_lengths, text_len)
    length = num_queries + text_len
    mask = torch.ones(length, length, dtype=torch.bool, device=device)  # (L, L)
    return _hide_padding(mask, num_queries, text_lengths)


def itg_mask(num_queries: int, text_len: int, text_lengths: Tensor | None = None, *, device=None) -> Tensor:
    """Image-grounded text generation: queries see only queries; text token i sees
    every query and the text tokens j <= i (causal). Shapes as `itc_mask`.

    The queries never see the text, so what they read from the image cannot
    leak the caption they are asked to predict.
    """
    _check_int("num_queries", num_queries, 0)
    _check_int("text_len", text_len, 0)
    _check_text_lengths(text_lengths, text_len)
    is_query = _is_query(num_queries, text_len, device)  # (L,)
    rows = torch.arange(num_queries + text_len, device=device)[:, None]  # (L, 1): position i
    cols = torch.arange(num_queries + text_len, device=device)[None, :]  # (1, L): position j
    text_row = ~is_query[:, None]  # (L, 1)
    mask = is_query[None, :] | (text_row & (cols <= rows))  # (L, L): any query, or earlier text
    return _hide_padding(mask, num_queries, text_lengths)
# ANCHOR_END: masks


_MASKS = {"itc": itc_mask, "itm": itm_mask, "itg": itg_mask}


def objective_mask(
    objective: str, num_queries: int, text_len: int, text_lengths: Tensor | None = None, *, device=None
) -> Tensor:
    """The mask of one objective ("itc", "itm" or "itg"); see `itc_mask` for the shapes."""
    if objective not in _MASKS:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return _MASKS[objective](num_queries, text_len, text_lengths, device=device)


# --------------------------------------------------------------------------- the model


# ANCHOR: QFormerLayer
class QFormerLayer(nn.Module):
    """One Q-Former layer: shared self-attention, cross-attention for the queries, two MLPs.

        x = x + attn(ln_1(x), mask)                        all Q+T positions
        queries = queries + cross_attn(ln_cross(queries), image)   if this layer has one
        queries = queries + mlp_query(ln_query(queries))
        text    = text + mlp_text(ln_text(text))

    Args:
        width: d. heads: attention heads (d divisible by heads).
        image_width: width of the (already normalised) image features.
        cross_attention: whether this layer reads the image.
        mlp_ratio: MLP hidden size is int(d * mlp_ratio).
        text: whether there is a text side (its LayerNorm and MLP); without it T must be 0.

    Shapes: forward(x (B, Q+T, d), num_queries Q, image (B, N, image_width) or None,
        attn_mask bool broadcastable to (B, 1, Q+T, Q+T) or None) -> (B, Q+T, d).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        image_width: int,
        *,
        cross_attention: bool,
        mlp_ratio: float = 4.0,
        text: bool = True,
    ) -> None:
        super().__init__()
        hidden = mlp_hidden(width, mlp_ratio)
        self.width, self.has_cross_attention, self.has_text = width, cross_attention, text
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads)
        if cross_attention:
            self.ln_cross = nn.LayerNorm(width)
            self.cross_attn = MultiHeadAttention(width, heads, kdim=image_width, vdim=image_width)
        self.ln_query = nn.LayerNorm(width)
        self.mlp_query = MLP(width, hidden)
        if text:
            self.ln_text = nn.LayerNorm(width)
            self.mlp_text = MLP(width, hidden)

    def forward(
        self, x: Tensor, num_queries: int, image: Tensor | None, attn_mask: Tensor | None = None
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask)  # (B, Q+T, d): the only mixing of the two
        queries, text = x[:, :num_queries], x[:, num_queries:]  # (B, Q, d), (B, T, d)
        if self.has_cross_attention and num_queries > 0:
            # Only the queries read the image: the text reaches it through the queries, if the mask lets it.
            queries = queries + self.cross_attn(self.ln_cross(queries), image, image)  # (B, Q, d)
        queries = queries + self.mlp_query(self.ln_query(queries))  # (B, Q, d)
        if self.has_text:
            text = text + self.mlp_text(self.ln_text(text))  # (B, T, d)
        elif text.shape[1]:
            raise ValueError("this layer has no text side, but the input holds text positions")
        return torch.cat([queries, text], dim=1)  # (B, Q+T, d)
# ANCHOR_END: QFormerLayer


class QFormer(nn.Module):
    """BLIP-2's querying transformer, with the heads of its three objectives.

    Args:
        num_queries: Q, the number of learned queries (32 in BLIP-2).
        width: d, the width of queries and text (768 in BLIP-2).
        heads: attention heads (12 in BLIP-2).
        depth: number of layers (12 in BLIP-2).
        image_width: width of the frozen image features (1408 for BLIP-2's EVA ViT-g).
        vocab_size: rows of the token embedding and of the LM head.
        max_text_len: the most text tokens (learned positions).
            Leave both vocab_size and max_text_len None for a Q-Former with no text
            side and no objective heads: what BLIP-2 keeps for its second stage
            (queries in, query outputs out; `forward` only).
        cross_attention_every: layer i reads the image when i % cross_attention_every == 0
            (2 in BLIP-2: every other layer, the first included; 1: every layer).
        mlp_ratio: MLP hidden size is int(d * mlp_ratio).
        itc_dim: width of the contrastive embeddings (256 in BLIP-2; default d).
        init_logit_scale: starting 1 / temperature of ITC (1 / 0.07), learned, capped at 100.

    Shapes:
        forward(image_feats (B, N, image_width)) -> (B, Q, d): the query outputs, no text.
        encode_text(ids (B, T), lengths (B,)) -> (B, T, d): the text alone, no queries.
        joint(image_feats, ids, lengths, objective) -> ((B, Q, d), (B, T, d)).
    """

    def __init__(
        self,
        num_queries: int,
        width: int,
        heads: int,
        depth: int,
        image_width: int,
        vocab_size: int | None = None,
        max_text_len: int | None = None,
        *,
        cross_attention_every: int = 2,
        mlp_ratio: float = 4.0,
        itc_dim: int | None = None,
        init_logit_scale: float = 1 / 0.07,
    ) -> None:
        super().__init__()
        itc_dim = width if itc_dim is None else itc_dim
        if (vocab_size is None) != (max_text_len is None):
            raise ValueError(
                f"give both vocab_size and max_text_len (a text side) or neither (queries only), "
                f"got vocab_size={vocab_size!r}, max_text_len={max_text_len!r}"
            )
        has_text = vocab_size is not None
        sizes = dict(num_queries=num_queries, width=width, heads=heads, depth=depth, image_width=image_width,
                     cross_attention_every=cross_attention_every, itc_dim=itc_dim)
        if has_text:
            sizes.update(vocab_size=vocab_size, max_text_len=max_text_len)
        for name, value in sizes.items():
            _check_int(name, value, 1)
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if not (math.isfinite(init_logit_scale) and 0 < init_logit_scale <= 100):
            raise ValueError(f"init_logit_scale must lie in (0, 100], got {init_logit_scale}")
        self.num_queries, self.width, self.image_width = num_queries, width, image_width
        self.vocab_size, self.max_text_len, self.has_text = vocab_size, max_text_len, has_text

        # ANCHOR: QFormer_init
        # Small random starts (std 0.02, as BERT's): a pre-LN stack takes them as they are.
        self.query_tokens = nn.Parameter(0.02 * torch.randn(num_queries, width))  # (Q, d)
        self.ln_image = nn.LayerNorm(image_width)  # BLIP-2's ln_vision on the frozen features
        self.layers = nn.ModuleList(
            QFormerLayer(width, heads, image_width, cross_attention=i % cross_attention_every == 0,
                         mlp_ratio=mlp_ratio, text=has_text)
            for i in range(depth)
        )
        self.ln_post = nn.LayerNorm(width)
        if not has_text:
            return  # the second stage's Q-Former: queries in, query outputs out
        # The text side, for the first stage's three objectives.
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(max_text_len, width))  # (T_max, d)
        # BLIP-2's [DEC] token: for generation the first text token (BOS here) is
        # replaced by this vector, so the shared layers can tell "encode" from "decode".
        self.decode_token = nn.Parameter(0.02 * torch.randn(width))  # (d,)
        # The heads of the three objectives.
        self.itc_image_proj = nn.Linear(width, itc_dim)  # each query output -> contrastive space
        self.itc_text_proj = nn.Linear(width, itc_dim)  # the first text token's output -> same space
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.itm_head = nn.Linear(width, 2)  # per query: (no match, match) logits
        self.lm_head = nn.Linear(width, vocab_size)  # per text position: the next token
        # ANCHOR_END: QFormer_init

    def _require_text(self) -> None:
        if not self.has_text:
            raise ValueError(
                "this QFormer has no text side (built without vocab_size and max_text_len): it runs "
                "forward(image_feats) only; build it with both for the three objectives"
            )

    @property
    def logit_scale(self) -> Tensor:
        """1 / temperature of ITC: exp(log_logit_scale), capped at 100 as in CLIP. 0-dim."""
        self._require_text()
        return self.log_logit_scale.exp().clamp(max=100.0)

    # ----------------------------------------------------------------- inputs
    def _check_image(self, image_feats: Tensor) -> None:
        if not isinstance(image_feats, Tensor):
            raise ValueError(f"image_feats must be a torch.Tensor (B, N, {self.image_width}), "
                             f"got {type(image_feats).__name__}")
        if image_feats.dim() != 3 or image_feats.shape[-1] != self.image_width or 0 in image_feats.shape:
            raise ValueError(f"image_feats must have shape (B, N, {self.image_width}) with B, N >= 1, "
                             f"got {tuple(image_feats.shape)}")
        if not image_feats.is_floating_point():
            raise ValueError(f"image_feats must be floating point, got dtype {image_feats.dtype}")

    def _embed_text(self, ids: Tensor, decode: bool) -> Tensor:
        """ids (B, T) -> token + position embeddings (B, T, d); [DEC] in place of BOS when decoding."""
        text = self.token_embedding(ids)  # (B, T, d)
        if decode:
            first = self.decode_token.expand(ids.shape[0], 1, self.width)  # (B, 1, d)
            text = torch.cat([first, text[:, 1:]], dim=1)  # (B, T, d)
        return text + self.positional_embedding[: ids.shape[1]]  # (B, T, d)

    # ANCHOR: QFormer_run
    def _run(
        self, x: Tensor, num_queries: int, image: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The layers over x (B, Q+T, d) -> (query outputs (B, Q, d), text outputs (B, T, d))."""
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, L, L): every head shares its example's mask
        image = None if image is None else self.ln_image(image)  # (B, N, image_width)
        for layer in self.layers:
            x = layer(x, num_queries, image, mask)  # (B, Q+T, d)
        x = self.ln_post(x)  # (B, Q+T, d)
        return x[:, :num_queries], x[:, num_queries:]

    def forward(self, image_feats: Tensor) -> Tensor:
        """The queries alone read the image: image_feats (B, N, image_width) -> (B, Q, d).

        This is what the Q-Former hands to a frozen language model (after a
        linear map to its width), and what ITC and ITG see on the image side:
        under their masks the queries never look at the text.
        """
        self._check_image(image_feats)
        queries = self.query_tokens.expand(image_feats.shape[0], -1, -1)  # (B, Q, d)
        return self._run(queries, self.num_queries, image_feats, None)[0]  # (B, Q, d)

    def joint(
        self, image_feats: Tensor, ids: Tensor, lengths: Tensor, objective: str
    ) -> tuple[Tensor, Tensor]:
        """[queries ; text] in one pass, under the objective's mask.

        Args:
            image_feats: (B, N, image_width) frozen image features.
            ids: (B, T) token ids, BOS first, padded after each caption.
            lengths: (B,) real tokens per caption (1 <= lengths <= T).
            objective: "itc", "itm" or "itg" (the mask; "itg" also puts [DEC] in place of BOS).

        Returns:
            (query outputs (B, Q, d), text outputs (B, T, d)); text outputs at
            padding positions are meaningless.
        """
        self._require_text()
        self._check_image(image_feats)
        _check_ids(ids, lengths, self.vocab_size, self.max_text_len)
        if ids.shape[0] != image_feats.shape[0]:
            raise ValueError(
                f"image_feats and ids need the same batch size, got {image_feats.shape[0]} and {ids.shape[0]}"
            )
        mask = objective_mask(
            objective, self.num_queries, ids.shape[1], lengths, device=ids.device
        )  # (B, Q+T, Q+T)
        queries = self.query_tokens.expand(ids.shape[0], -1, -1)  # (B, Q, d)
        x = torch.cat([queries, self._embed_text(ids, decode=objective == "itg")], dim=1)  # (B, Q+T, d)
        return self._run(x, self.num_queries, image_feats, mask)
    # ANCHOR_END: QFormer_run

    def encode_text(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The text alone, as BLIP-2's text transformer encodes it for ITC: (B, T) -> (B, T, d).

        No queries and no image; padding is hidden. Under the ITC mask the text
        part of `joint` computes exactly this.
        """
        self._require_text()
        _check_ids(ids, lengths, self.vocab_size, self.max_text_len)
        mask = itc_mask(0, ids.shape[1], lengths, device=ids.device)  # (B, T, T): padding only
        return self._run(self._embed_text(ids, decode=False), 0, None, mask)[1]  # (B, T, d)

    def itm_logits(self, query_out: Tensor) -> Tensor:
        """(B, Q, d) -> (B, 2): each query's (no match, match) logits, averaged over the queries."""
        self._require_text()
        return self.itm_head(query_out).mean(dim=1)  # (B, 2)


# --------------------------------------------------------------------------- the objectives


# ANCHOR: itc
def itc_similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Image i against text j: the best cosine over image i's queries.

    Args:
        image_emb: (B_i, Q, e) query embeddings, L2-normalised.
        text_emb: (B_t, e) text embeddings (first token), L2-normalised.

    Returns:
        (B_i, B_t): sim[i, j] = max_q <image_emb[i, q], text_emb[j]>.
    """
    if image_emb.dim() != 3 or text_emb.dim() != 2 or image_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"need image_emb (B_i, Q, e) and text_emb (B_t, e), got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    per_query = torch.einsum("iqe,je->ijq", image_emb, text_emb)  # (B_i, B_t, Q)
    return per_query.max(dim=-1).values  # (B_i, B_t)


def contrastive_loss(logits: Tensor) -> Tensor:
    """Symmetric InfoNCE on a square (B, B) logit matrix whose diagonal holds the pairs. 0-dim."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1] or logits.shape[0] < 1:
        raise ValueError(f"logits must be a square (B, B) matrix, got {tuple(logits.shape)}")
    labels = torch.arange(logits.shape[0], device=logits.device)  # (B,): pair i is column i
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def itc_loss(model: QFormer, image_feats: Tensor, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Image-text contrastive loss under the unimodal mask.

    Returns:
        (loss 0-dim, logits (B, B)): logits[i, j] = scale * itc_similarity, image i vs text j.
    """
    query_out, text_out = model.joint(image_feats, ids, lengths, "itc")  # (B, Q, d), (B, T, d)
    image_emb = F.normalize(model.itc_image_proj(query_out), dim=-1)  # (B, Q, e)
    text_emb = F.normalize(model.itc_text_proj(text_out[:, 0]), dim=-1)  # (B, e): the first token
    logits = model.logit_scale * itc_similarity(image_emb, text_emb)  # (B, B)
    return contrastive_loss(logits), logits
# ANCHOR_END: itc


# ANCHOR: itm
def hard_negative_probs(logits: Tensor) -> Tensor:
    """Row i: the chance of picking column j as row i's negative, softmax over j != i.

    logits (B, B), pairs on the diagonal -> (B, B), rows summing to 1, zero diagonal.
    A text that looks like image i's own caption is the likeliest pick: a hard negative.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1] or logits.shape[0] < 2:
        raise ValueError(
            f"hard negatives need a square (B, B) logit matrix with B >= 2, got {tuple(logits.shape)}"
        )
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)  # (B, B)
    return torch.softmax(logits.masked_fill(eye, float("-inf")), dim=-1)  # (B, B)


def sample_hard_negatives(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each row i, one column j != i drawn from `hard_negative_probs`. (B, B) -> (B,) long."""
    probs = hard_negative_probs(logits.detach().float())  # (B, B): no gradient through the choice
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def itm_loss(
    model: QFormer,
    image_feats: Tensor,
    ids: Tensor,
    lengths: Tensor,
    itc_logits: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Image-text matching loss under the bidirectional mask, with hard negatives.

    Builds 3B pairs: the B true pairs (label 1); each image with a hard negative
    text drawn from row i of the ITC logits (label 0); each text with a hard
    negative image drawn from column j (label 0). Mean cross-entropy. 0-dim.
    """
    batch = ids.shape[0]
    if tuple(itc_logits.shape) != (batch, batch):
        raise ValueError(f"itc_logits must be (B, B) = ({batch}, {batch}), got {tuple(itc_logits.shape)}")
    neg_text = sample_hard_negatives(itc_logits, generator)  # (B,): a wrong text for each image
    neg_image = sample_hard_negatives(itc_logits.T, generator)  # (B,): a wrong image for each text
    images = torch.cat([image_feats, image_feats, image_feats[neg_image]])  # (3B, N, image_width)
    texts = torch.cat([ids, ids[neg_text], ids])  # (3B, T)
    text_lengths = torch.cat([lengths, lengths[neg_text], lengths])  # (3B,)
    query_out, _ = model.joint(images, texts, text_lengths, "itm")  # (3B, Q, d)
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(ids.device)  # (3B,)
    return F.cross_entropy(model.itm_logits(query_out), labels)
# ANCHOR_END: itm


# ANCHOR: itg
def lm_loss(logits: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
    """Next-token cross-entropy, padding left out.

    Args:
        logits: (B, T, V); position t predicts token t + 1.
        ids: (B, T) the captions. lengths: (B,) real tokens each.

    Returns:
        0-dim mean over the predicted positions t + 1 < lengths[b].
    """
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(
            f"logits must be (B, T, V) for ids (B, T) = {tuple(ids.shape)}, got {tuple(logits.shape)}"
        )
    if not isinstance(lengths, Tensor) or tuple(lengths.shape) != (ids.shape[0],):
        got = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must have shape (B,) = ({ids.shape[0]},), got {got}")
    targets = ids[:, 1:]  # (B, T-1): the token after each position
    positions = torch.arange(1, ids.shape[1], device=ids.device)  # (T-1,)
    real = positions[None, :] < lengths[:, None]  # (B, T-1): the target is not padding
    if not bool(real.any()):
        raise ValueError("no caption has a token to predict (every length is 1)")
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")  # (B, T-1)
    return per_token[real].mean()


def itg_loss(model: QFormer, image_feats: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
    """Image-grounded text generation under the causal mask: predict each next caption token. 0-dim."""
    _, text_out = model.joint(image_feats, ids, lengths, "itg")  # (B, T, d)
    return lm_loss(model.lm_head(text_out), ids, lengths)  # (B, T, V) inside
# ANCHOR_END: itg


# ANCHOR: train_step
def qformer_losses(
    model: QFormer,
    image_feats: Tensor,
    ids: Tensor,
    lengths: Tensor,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The three losses of BLIP-2's first stage on one batch: {"itc", "itm", "itg", "total"} (0-dim each)."""
    if ids.shape[0] < 2:
        raise ValueError(f"ITC and ITM need at least two pairs in a batch, got {ids.shape[0]}")
    itc, itc_logits = itc_loss(model, image_feats, ids, lengths)
    itm = itm_loss(model, image_feats, ids, lengths, itc_logits, generator)
    itg = itg_loss(model, image_feats, ids, lengths)
    return {"itc": itc, "itm": itm, "itg": itg, "total": itc + itm + itg}


def train_step(
    model: QFormer,
    optimizer: torch.optim.Optimizer,
    image_feats: Tensor,
    ids: Tensor,
    lengths: Tensor,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimiser step on the sum of the three losses; returns each loss as a float."""
    model.train()
    losses = qformer_losses(model, image_feats, ids, lengths, generator)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return {name: float(value.detach()) for name, value in losses.items()}
# ANCHOR_END: train_step


# --------------------------------------------------------------------------- cost


# ANCHOR: flops
def query_pass_flops(
    num_queries: int,
    num_image_tokens: int,
    width: int,
    depth: int,
    image_width: int,
    *,
    cross_attention_every: int = 2,
    mlp_ratio: float = 4.0,
) -> int:
    """Matmul FLOPs of `QFormer.forward` for one image (queries only, no text), 2 per multiply-add.

    With Q queries, N image tokens, width d, image width D, hidden h = int(d * mlp_ratio):

        self-attention, every layer:     4 projections 2*4*Q*d^2  + scores and mixing 2*2*Q*Q*d
        cross-attention, its layers:     q and out 2*2*Q*d^2 + keys and values 2*2*N*D*d + 2*2*Q*N*d
        query MLP, every layer:          2*2*Q*d*h

    The keys and values are projected from all N image tokens in every
    cross-attention layer, so that term grows with N * D, not with Q.
    """
    for name, value in dict(num_queries=num_queries, num_image_tokens=num_image_tokens, width=width,
                            depth=depth, image_width=image_width,
                            cross_attention_every=cross_attention_every).items():
        _check_int(name, value, 1)
    Q, N, d, D = num_queries, num_image_tokens, width, image_width
    hidden = mlp_hidden(width, mlp_ratio)
    cross_layers = len(range(0, depth, cross_attention_every))  # layers 0, every, 2 * every, ...
    self_attention = 2 * 4 * Q * d * d + 2 * 2 * Q * Q * d
    cross_attention = 2 * 2 * Q * d * d + 2 * 2 * N * D * d + 2 * 2 * Q * N * d
    mlp = 2 * 2 * Q * d * hidden
    return depth * (self_attention + mlp) + cross_layers * cross_attention
# ANCHOR_END: flops
