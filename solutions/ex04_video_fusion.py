"""Exercise 4 (chapter 10): design a fusion model for video understanding (visual + audio + captions).

The textbook's exercise asks for four things: propose an architecture, define
its fusion mechanism, specify its training objective, and estimate its
parameter count. Here each becomes a function you write and the grader checks
against the chapter's code.

The data (tiny_mm.data.video): each clip has three modalities, and each
carries only part of the answer.

    video    T frames of a coloured disc moving left, right, up or down
             (the direction; also the colour)
    audio    a tone, low or high (the pitch), steady or beeping (the rhythm)
    caption  "a red cat": the kind, cat or dog (and the colour again)

The action label is one of 32 classes: direction x pitch x rhythm x kind.
The colour is shared by video and caption but is not part of the label. A
model that sees only the video can be right at most 1 time in 8 (12.5%),
audio alone 12.5%, the caption alone 6.25%; all three together 100%. So the
model has to fuse. The chapter's embedders (tiny_mm.video_model) turn each
modality into a sequence of width-d tokens, and the fusion models of
tiny_mm.video_fusion take it from there:

    video (B, Tv, d), audio (B, Ta, d), text (B, Tt, d), text_lengths (B,) -> logits (B, 32)

What to do:
  1. `propose_config`: the architecture. Pick one of the chapter's four
     strategies (early, late, cross, bottleneck) and its sizes, within a
     budget of 200,000 parameters (its docstring says why that budget).
  2. `estimate_params`: the parameter count of any of the four, as a
     formula of the sizes, exact to the last bias.
  3. `bottleneck_layer`: the fusion mechanism of bottleneck fusion: one
     layer in which the three streams exchange information only through a
     few shared tokens.
  4. `fusion_objective`: the training objective, the textbook's weighted
     sum of four losses.
  Replace each `raise NotImplementedError(...)` with your code; the
  docstrings are the specification. Read chapter 10 and
  tiny_mm/video_fusion.py first.
  5. Grade your work:

         tinymm grade ex04

     The checks build the fusion models of tiny_mm.video_fusion on random
     sizes and count their parameters, run your bottleneck layer with real
     TransformerBlocks against the chapter's NumPy reference
     (chapters/ch10_video_fusion/reference.py) and probe what each of its
     outputs depends on, and compare your objective and its gradients with
     the reference on fresh random inputs.

The reference solution lives in solutions/ex04_video_fusion.py
(`tinymm grade ex04 --solutions` grades it). The stub in exercises/ is
generated from it with `python -m tiny_mm.stubs`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tiny_mm.contrastive import clip_loss
from tiny_mm.layers import TransformerBlock

MODALITIES = ("video", "audio", "text")  # the order of the streams, as in tiny_mm.video_fusion
PAIRS = (("video", "audio"), ("video", "text"), ("audio", "text"))  # the contrastive pairs
STRATEGIES = ("early", "late", "cross", "bottleneck")
BUDGET = 200_000  # parameters, see propose_config


# ---------------------------------------------------------------- 1. the architecture


def propose_config() -> dict:
    """Your architecture for the chapter's clips: a fusion strategy and its sizes.

    Returns a dict with exactly these keys:
        strategy: "early", "late", "cross" or "bottleneck" (tiny_mm.video_fusion.STRATEGIES).
        width: d, the token width (the embedders project every modality to d).
        heads: attention heads (must divide width).
        layers: transformer blocks per encoder.
        mlp_ratio: the MLP's hidden size is int(width * mlp_ratio).
        n_bottleneck: shared tokens of bottleneck fusion (the others ignore it;
            give 0 there). Bottleneck fusion with 0 tokens does not fuse at
            all: its three streams never meet before the head.

    The grader builds ``STRATEGIES[strategy](VideoFusionConfig(**sizes,
    num_classes=32))``, runs it on a batch of tokens, and counts its
    parameters: at most 200,000.

    Why a budget of 200,000: the chapter trains every model on a CPU in a few
    minutes (`tinymm train video-fusion`), on a few thousand clips whose
    label is 4 factors of 2 to 4 values each. At the chapter's default sizes
    (d = 32, 2 layers, 4 heads) the four strategies hold 26,656 (early) to
    117,824 (cross) parameters; 200,000 leaves room to choose, while a model
    many times larger would only train many times slower on the same small
    data. The textbook's design (d = 1024, 12 layers, about 155M parameters)
    is sized for real video and 400 classes, not for these clips.
    """
    # BEGIN SOLUTION hint: return {"strategy": ..., "width": ..., "heads": ..., "layers": ...,
    # hint: "mlp_ratio": ..., "n_bottleneck": ...}; check your choice with estimate_params
    # Bottleneck fusion: every modality keeps its own encoder (so each learns its own
    # factor), and 4 shared tokens let direction, pitch, rhythm and kind meet from layer 2 on,
    # for n_b * d = 128 parameters more than late fusion. d = 32, 2 layers: 79,648 parameters.
    return {"strategy": "bottleneck", "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 4.0,
            "n_bottleneck": 4}
    # END SOLUTION


# ---------------------------------------------------------------- 2. the parameter count


def check_sizes(strategy: str, width: int, heads: int, layers: int, mlp_ratio: float,
                num_classes: int, n_bottleneck: int) -> None:
    """Raise ValueError unless the sizes describe a model tiny_mm.video_fusion can build."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for name, value in (("width", width), ("heads", heads), ("layers", layers), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or int(width * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio must be a number giving an MLP hidden size >= 1, got {mlp_ratio!r}")
    if isinstance(n_bottleneck, bool) or not isinstance(n_bottleneck, int) or n_bottleneck < 0:
        raise ValueError(f"n_bottleneck must be an int >= 0, got {n_bottleneck!r}")


def estimate_params(strategy: str, width: int, heads: int, layers: int, mlp_ratio: float = 4.0,
                    num_classes: int = 32, n_bottleneck: int = 4) -> int:
    """Parameters of ``tiny_mm.video_fusion.STRATEGIES[strategy](VideoFusionConfig(...))``.

    Exactly what ``sum(p.numel() for p in model.parameters())`` counts, as a
    formula of the sizes: do not build the model (the point is to know its
    size before you build it). Read tiny_mm/video_fusion.py and
    tiny_mm/layers.py for what each model holds. In short, with d = width
    and f = int(d * mlp_ratio):

    - a TransformerBlock: LayerNorm, attention (query, key, value and output
      projections, d x d each, every one with a bias), LayerNorm, MLP
      d -> f -> d with biases. A LayerNorm has a gain and a bias.
    - a CrossAttentionBlock: the same, with a third LayerNorm (one for the
      queries, one for the context).
    - early: 3 modality vectors and a CLS vector (d each), L blocks, a final
      LayerNorm, a linear head d -> num_classes.
    - late: per modality L blocks and a LayerNorm; a head 3d -> num_classes.
    - cross: late, plus one CrossAttentionBlock per modality.
    - bottleneck: late, plus n_bottleneck learned tokens of width d.

    heads does not change the count (it must divide width); n_bottleneck
    counts only for "bottleneck". Call `check_sizes` first: it raises the
    ValueError bad sizes must give.
    """
    # BEGIN SOLUTION hint: check_sizes(...); count a LayerNorm, an attention, an MLP, a block, then add
    # hint: up each strategy's pieces (every Linear and every LayerNorm has a bias)
    check_sizes(strategy, width, heads, layers, mlp_ratio, num_classes, n_bottleneck)
    d, f = width, int(width * mlp_ratio)
    layer_norm = 2 * d  # gain and bias
    attention = 4 * d * d + 4 * d  # query, key, value, out: (d, d) weights and (d,) biases
    mlp = (d * f + f) + (f * d + d)  # c_fc and c_proj
    block = 2 * layer_norm + attention + mlp
    if strategy == "early":
        return 3 * d + d + layers * block + layer_norm + (d * num_classes + num_classes)
    per_modality = layers * block + layer_norm  # its encoder and the LayerNorm before pooling
    total = 3 * per_modality + (3 * d * num_classes + num_classes)  # + the head over 3d features
    if strategy == "cross":
        total += 3 * (3 * layer_norm + attention + mlp)  # ln_q, ln_kv, ln_2
    if strategy == "bottleneck":
        total += n_bottleneck * d  # the shared tokens: fusion itself adds nothing else
    return total
    # END SOLUTION


# ---------------------------------------------------------------- 3. the fusion mechanism


def check_layer_inputs(blocks: dict[str, TransformerBlock], z: Tensor, streams: dict[str, Tensor],
                       text_lengths: Tensor | None) -> None:
    """Raise ValueError unless blocks, z, streams and text_lengths fit together."""
    for name, given in (("blocks", blocks), ("streams", streams)):
        if not isinstance(given, dict) or set(given) != set(MODALITIES):
            keys = sorted(given) if isinstance(given, dict) else type(given).__name__
            raise ValueError(f"{name} must be a dict with keys {MODALITIES}, got {keys}")
    if not isinstance(z, Tensor) or z.dim() != 3:
        raise ValueError(f"z must be a (B, n_bottleneck, d) tensor, got {getattr(z, 'shape', type(z))}")
    batch, _, d = z.shape
    for m in MODALITIES:
        x = streams[m]
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] != batch or x.shape[2] != d:
            raise ValueError(f"streams[{m!r}] must be (B, T, d) = ({batch}, T, {d}), "
                             f"got {getattr(x, 'shape', type(x))}")
    if text_lengths is not None:
        tt = streams["text"].shape[1]
        if not isinstance(text_lengths, Tensor) or tuple(text_lengths.shape) != (batch,):
            raise ValueError(f"text_lengths must be a ({batch},) tensor, got {getattr(text_lengths, 'shape', None)}")
        if bool((text_lengths < 1).any()) or bool((text_lengths > tt).any()):
            raise ValueError(f"text_lengths must lie in [1, {tt}], got {text_lengths.tolist()}")


def bottleneck_layer(
    blocks: dict[str, TransformerBlock],
    z: Tensor,
    streams: dict[str, Tensor],
    text_lengths: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One layer of bottleneck fusion (Nagrani et al. 2021, tiny_mm.video_fusion.BottleneckFusion).

    Args:
        blocks: {"video", "audio", "text"} -> that modality's TransformerBlock
            for this layer (width d). Call it as block(x, kv_lengths=...).
        z: (B, nb, d) the shared bottleneck tokens entering the layer (nb may be 0).
        streams: {"video": (B, Tv, d), "audio": (B, Ta, d), "text": (B, Tt, d)}.
        text_lengths: (B,) valid text tokens of each example (the padding is
            at the end), or None: every text token is valid.

    Returns:
        (z_new (B, nb, d), {"video": (B, Tv, d), "audio": (B, Ta, d), "text": (B, Tt, d)}).

    For each modality m, run blocks[m] over the sequence [z; x_m], the
    bottleneck tokens first, then m's own tokens. The last T_m outputs are
    m's new tokens; the first nb are m's copy of the bottleneck. z_new is the
    mean of the three copies. So in this layer each modality attends only to
    z and to itself; what it learns of the others arrives through z_new, in
    the next layer. No token may attend to a text padding token (the text
    block's kv_lengths counts the nb bottleneck tokens in front). Call
    `check_layer_inputs` first.
    """
    # BEGIN SOLUTION hint: check_layer_inputs(...); for each modality run its block over
    # hint: torch.cat([z, x_m], dim=1) (text: kv_lengths = nb + text_lengths), split the output into
    # hint: m's copy of z and m's tokens; z_new = the mean of the three copies
    check_layer_inputs(blocks, z, streams, text_lengths)
    nb = z.shape[1]
    copies, new_streams = [], {}
    for m in MODALITIES:
        # The bottleneck goes first, so the text padding stays at the end of the sequence.
        lengths = nb + text_lengths if m == "text" and text_lengths is not None else None  # (B,) or None
        y = blocks[m](torch.cat([z, streams[m]], dim=1), kv_lengths=lengths)  # (B, nb + T_m, d)
        copies.append(y[:, :nb])  # (B, nb, d): m's copy of the bottleneck
        new_streams[m] = y[:, nb:]  # (B, T_m, d)
    z_new = torch.stack(copies).mean(dim=0)  # (B, nb, d): what every modality reads next layer
    return z_new, new_streams
    # END SOLUTION


# ---------------------------------------------------------------- 4. the training objective


def check_objective_inputs(logits: Tensor, labels: Tensor, streams: dict[str, Tensor], recon_pred: Tensor,
                           recon_target: Tensor, order_logits: Tensor, ordered: Tensor,
                           weights: tuple[float, float, float]) -> None:
    """Raise ValueError unless the objective's inputs fit together (shapes and dtypes)."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (B, C) tensor, got {getattr(logits, 'shape', type(logits))}")
    batch = logits.shape[0]
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (batch,) or labels.is_floating_point():
        raise ValueError(f"labels must be a ({batch},) integer tensor, got {getattr(labels, 'shape', None)}")
    if not isinstance(streams, dict) or set(streams) != set(MODALITIES):
        keys = sorted(streams) if isinstance(streams, dict) else type(streams).__name__
        raise ValueError(f"streams must be a dict with keys {MODALITIES}, got {keys}")
    tensors = {**{f"streams[{m!r}]": streams[m] for m in MODALITIES}, "recon_pred": recon_pred,
               "recon_target": recon_target, "order_logits": order_logits, "ordered": ordered}
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    d = streams["video"].shape[-1]
    for m in MODALITIES:
        if tuple(streams[m].shape) != (batch, d):
            raise ValueError(f"streams[{m!r}] must be (B, d) = ({batch}, {d}), got {tuple(streams[m].shape)}")
    if recon_pred.dim() != 2 or recon_pred.shape != recon_target.shape or recon_pred.shape[0] != batch:
        raise ValueError(f"recon_pred and recon_target must both be (B, d') with B = {batch}, got "
                         f"{tuple(recon_pred.shape)} and {tuple(recon_target.shape)}")
    if tuple(order_logits.shape) != (batch,) or tuple(ordered.shape) != (batch,) or ordered.dtype != torch.bool:
        raise ValueError(f"order_logits must be ({batch},) and ordered a ({batch},) bool tensor, got "
                         f"{tuple(order_logits.shape)} and {tuple(ordered.shape)} {ordered.dtype}")
    if len(weights) != 3:
        raise ValueError(f"weights must be (lambda1, lambda2, lambda3), got {weights!r}")


def fusion_objective(
    logits: Tensor,
    labels: Tensor,
    streams: dict[str, Tensor],
    logit_scale: float,
    recon_pred: Tensor,
    recon_target: Tensor,
    order_logits: Tensor,
    ordered: Tensor,
    weights: tuple[float, float, float] = (0.1, 0.05, 0.05),
) -> Tensor:
    """The textbook's objective: L = L_action + l1 L_contrast + l2 L_mask + l3 L_temporal.

    Args:
        logits: (B, C) action logits; labels: (B,) int, the action classes.
        streams: {"video", "audio", "text"} -> (B, d), each modality's pooled
            features of the same B clips (rows not normalised).
        logit_scale: s > 0, the contrastive loss's 1 / temperature.
        recon_pred: (B, d') the features of a masked modality, predicted from the others.
        recon_target: (B, d') what they really are. A target: no gradient may
            flow into it.
        order_logits: (B,) one logit per clip: "its frames are in order".
        ordered: (B,) bool, True where the frames really are in order.
        weights: (l1, l2, l3); the textbook's are (0.1, 0.05, 0.05).

    Returns:
        a 0-dim tensor, differentiable with respect to every input but labels,
        ordered and recon_target. The four terms:

        - L_action: mean cross-entropy of logits against labels.
        - L_contrast = L_VA + L_VT + L_AT: chapter 4's symmetric CLIP loss
          (tiny_mm.contrastive.clip_loss) of each pair in PAIRS, on the
          streams' rows L2-normalised, with logit_scale.
        - L_mask: mean over the B clips of ||recon_pred - recon_target||^2
          (the squared L2 distance, summed over d').
        - L_temporal: mean binary cross-entropy of order_logits against ordered.

    Call `check_objective_inputs` first.
    """
    # BEGIN SOLUTION hint: check_objective_inputs(...); the four terms, one line or two each
    # hint: (F.cross_entropy, F.normalize, clip_loss, F.binary_cross_entropy_with_logits); detach the target
    check_objective_inputs(logits, labels, streams, recon_pred, recon_target, order_logits, ordered, weights)
    action = F.cross_entropy(logits, labels)
    unit = {m: F.normalize(streams[m], dim=-1) for m in MODALITIES}  # (B, d) each, rows of length 1
    contrastive = sum(clip_loss(unit[a], unit[b], logit_scale) for a, b in PAIRS)
    masked = ((recon_pred - recon_target.detach()) ** 2).sum(dim=-1).mean()  # squared distance per clip
    temporal = F.binary_cross_entropy_with_logits(order_logits, ordered.to(order_logits.dtype))
    l1, l2, l3 = weights
    return action + l1 * contrastive + l2 * masked + l3 * temporal
    # END SOLUTION
