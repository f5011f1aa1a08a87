"""Four ways to fuse three token streams (video, audio, text) into one prediction.

The inputs are already-embedded token sequences (positions included: adding
them is the embedder's job), so these modules do not depend on the data:

    video (B, Tv, d)          Tv video tokens (frames or tubelets), width d
    audio (B, Ta, d)          Ta audio tokens (spectrogram patches), width d
    text  (B, Tt, d)          Tt text tokens, width d
    text_lengths (B,) | None  valid text tokens of each example (padding at the
                              end); None: all Tt are valid
    -> logits (B, num_classes)

- `EarlyFusion`: a learned modality-type vector is added to each stream's
  tokens, and one encoder of L blocks runs over [CLS; video; audio; text].
  Every token sees every token from the first layer on. The CLS token's
  output, normalised, feeds the head.
- `LateFusion`: one encoder of L blocks per modality; they never see each
  other. Each stream is normalised and mean-pooled, the three vectors are
  concatenated (3d) and a linear head reads them.
- `CrossModalFusion`: the three encoders of late fusion, then one
  cross-attention block per modality in which that modality's tokens read the
  other two modalities' encoder outputs (video reads [audio; text], audio
  reads [video; text], text reads [video; audio]; all three read the encoder
  outputs, not each other's updated tokens). Pooled and concatenated as in
  late fusion.
- `BottleneckFusion` (Nagrani et al. 2021, "Attention Bottlenecks for
  Multimodal Fusion", fusion from the first layer on): each modality keeps its
  own L blocks, and n_bottleneck shared tokens z are the only channel between
  modalities. In layer l every modality m runs its block over [z; x_m]; the
  bottleneck part of each output is that modality's copy z_m, and the next
  layer's z is the mean of the three copies. Video tokens therefore never
  attend to audio or text tokens; they learn about them only through z, one
  layer late. With n_bottleneck = 0 the streams are independent (late fusion
  with the same pooling).

- `SingleModality`: the baseline. One encoder over one stream (the other two
  are ignored), normalised, mean-pooled, a linear head.

Besides `forward` (logits), every model has `features(...) -> FusionFeatures`:

    fused   (B, F)        what the head reads; forward(...) = head(features(...).fused)
    streams {m: (B, d)}   each modality's own pooled, normalised output

F is the attribute `fused_dim`: d for early fusion (its CLS output after
ln_final) and for a single modality, 3d for late, cross-modal and bottleneck
fusion (the three pooled streams side by side). For early fusion, streams[m]
is the mean of m's output tokens after ln_final. The training objectives of
chapter 10 read these: contrastive losses between streams, masked-modality
reconstruction and temporal order from `fused`.

Exact parameter counts of the four fusion models are in `tiny_mm.counting_video`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tiny_mm.layers import CrossAttentionBlock, TransformerBlock

__all__ = [
    "MODALITIES",
    "VideoFusionConfig",
    "FusionFeatures",
    "EarlyFusion",
    "LateFusion",
    "CrossModalFusion",
    "BottleneckFusion",
    "SingleModality",
    "STRATEGIES",
]

MODALITIES = ("video", "audio", "text")  # the order of the streams everywhere in this file


@dataclass(frozen=True)
class VideoFusionConfig:
    """Sizes shared by the four fusion models.

    width: d, the width of all three token streams.
    heads: h, attention heads (d divisible by h).
    layers: L, transformer blocks per encoder (early fusion: in its one encoder).
    mlp_ratio: MLP hidden size is int(d * mlp_ratio).
    num_classes: C, the number of logits.
    n_bottleneck: shared tokens of `BottleneckFusion` (0: no exchange at all);
        the other models ignore it.
    """

    width: int = 32
    heads: int = 4
    layers: int = 2
    mlp_ratio: float = 4.0
    num_classes: int = 8
    n_bottleneck: int = 4

    def __post_init__(self) -> None:
        for name in ("width", "heads", "layers", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)):
            raise ValueError(f"mlp_ratio must be a number, got {self.mlp_ratio!r}")
        if int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must give an MLP hidden size >= 1, got {self.mlp_ratio}")
        nb = self.n_bottleneck
        if isinstance(nb, bool) or not isinstance(nb, int) or nb < 0:
            raise ValueError(f"n_bottleneck must be an int >= 0, got {nb!r}")


class FusionFeatures(NamedTuple):
    """What a fusion model computes before its head.

    fused:   (B, F), the head's input (F = the model's `fused_dim`).
    streams: {modality: (B, d)}, each modality's own pooled, normalised output
             (a single-modality model has only its own).
    """

    fused: Tensor
    streams: dict[str, Tensor]


# --------------------------------------------------------------------------- helpers


def check_inputs(
    video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None, width: int
) -> None:
    """ValueError unless video (B, Tv, d), audio (B, Ta, d), text (B, Tt, d) and
    text_lengths (B,) with values in [1, Tt] fit together."""
    streams = {"video": video, "audio": audio, "text": text}
    for name, x in streams.items():
        if not isinstance(x, Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of shape (B, T, {width}), got {type(x).__name__}"
            )
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{name} must have shape (B, T, {width}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} needs at least one token, got shape {tuple(x.shape)}")
    batches = {name: x.shape[0] for name, x in streams.items()}
    if len(set(batches.values())) != 1:
        raise ValueError(f"video, audio and text need the same batch size, got {batches}")
    kinds = {name: (x.dtype, x.device) for name, x in streams.items()}
    if len(set(kinds.values())) != 1:
        raise ValueError(f"video, audio and text must share dtype and device, got {kinds}")
    if text_lengths is None:
        return
    batch, tt = text.shape[:2]
    is_tensor = isinstance(text_lengths, Tensor)
    if not is_tensor or text_lengths.dim() != 1 or text_lengths.shape[0] != batch:
        shape = tuple(text_lengths.shape) if is_tensor else type(text_lengths).__name__
        raise ValueError(f"text_lengths must be a (B,) = ({batch},) tensor, got {shape}")
    if text_lengths.is_floating_point() or text_lengths.is_complex() or text_lengths.dtype == torch.bool:
        raise ValueError(f"text_lengths must be an integer tensor, got dtype {text_lengths.dtype}")
    if text_lengths.device != text.device:
        raise ValueError(f"text_lengths must be on {text.device}, got {text_lengths.device}")
    if bool((text_lengths < 1).any()) or bool((text_lengths > tt).any()):
        raise ValueError(f"text_lengths must lie in [1, Tt = {tt}], got {text_lengths.tolist()}")


def mean_tokens(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Mean over the valid tokens of each example: x (B, T, d), lengths (B,) or None -> (B, d)."""
    if lengths is None:
        return x.mean(dim=1)  # (B, d)
    valid = torch.arange(x.shape[1], device=x.device) < lengths[:, None]  # (B, T)
    total = (x * valid[..., None].to(x.dtype)).sum(dim=1)  # (B, d): padding contributes nothing
    return total / lengths[:, None].to(x.dtype)  # (B, d)


def _encoder(config: VideoFusionConfig) -> nn.ModuleList:
    """L TransformerBlocks of width d."""
    return nn.ModuleList(
        TransformerBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)
    )


def _pool_streams(
    norms: nn.ModuleDict, streams: dict[str, Tensor], text_lengths: Tensor | None
) -> dict[str, Tensor]:
    """Normalise each stream and mean-pool its valid tokens: {m: (B, d)}."""
    return {
        m: mean_tokens(norms[m](streams[m]), text_lengths if m == "text" else None)  # (B, d)
        for m in MODALITIES
    }


def _concat_features(pooled: dict[str, Tensor]) -> FusionFeatures:
    """The three pooled streams side by side: fused (B, 3d), video | audio | text."""
    return FusionFeatures(torch.cat([pooled[m] for m in MODALITIES], dim=-1), pooled)


# --------------------------------------------------------------------------- the models


# ANCHOR: EarlyFusion
class EarlyFusion(nn.Module):
    """One encoder over [CLS; video; audio; text] with modality-type vectors added.

    Shapes: forward(video (B, Tv, d), audio (B, Ta, d), text (B, Tt, d),
        text_lengths (B,) | None) -> (B, num_classes); features: fused (B, d), the
        CLS output after ln_final; streams[m] (B, d), the mean of m's output tokens.
    """

    def __init__(self, config: VideoFusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.modality = nn.Parameter(torch.randn(len(MODALITIES), d) * 0.02)  # (3, d): which stream
        self.cls = nn.Parameter(torch.randn(d) * 0.02)  # (d,): reads the whole sequence
        self.blocks = _encoder(config)
        self.ln_final = nn.LayerNorm(d)
        self.fused_dim = d
        self.head = nn.Linear(d, config.num_classes)

    def features(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> FusionFeatures:
        check_inputs(video, audio, text, text_lengths, self.config.width)
        batch = video.shape[0]
        cls = self.cls.to(video.dtype).expand(batch, 1, -1)  # (B, 1, d)
        streams = [x + self.modality[i] for i, x in enumerate((video, audio, text))]
        x = torch.cat([cls, *streams], dim=1)  # (B, 1 + Tv + Ta + Tt, d)
        # Text comes last, so "key j is valid iff j < 1 + Tv + Ta + text_length" masks its padding.
        lengths = None if text_lengths is None else 1 + video.shape[1] + audio.shape[1] + text_lengths
        for block in self.blocks:
            x = block(x, kv_lengths=lengths)  # (B, 1 + Tv + Ta + Tt, d)
        x = self.ln_final(x)  # (B, 1 + Tv + Ta + Tt, d): per token, so x[:, 0] is the CLS output
        parts = torch.split(x[:, 1:], [video.shape[1], audio.shape[1], text.shape[1]], dim=1)
        streams = {
            m: mean_tokens(part, text_lengths if m == "text" else None)  # (B, d)
            for m, part in zip(MODALITIES, parts)
        }
        return FusionFeatures(x[:, 0], streams)  # fused (B, d)

    def forward(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> Tensor:
        return self.head(self.features(video, audio, text, text_lengths).fused)  # (B, C)
# ANCHOR_END: EarlyFusion


# ANCHOR: LateFusion
class LateFusion(nn.Module):
    """Three separate encoders; their pooled outputs meet only in the linear head.

    Shapes: forward(video (B, Tv, d), audio (B, Ta, d), text (B, Tt, d),
        text_lengths (B,) | None) -> (B, num_classes); features: streams[m] (B, d),
        fused (B, 3d) = the three side by side.
    """

    def __init__(self, config: VideoFusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.encoders = nn.ModuleDict({m: _encoder(config) for m in MODALITIES})
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in MODALITIES})
        self.fused_dim = len(MODALITIES) * d
        self.head = nn.Linear(self.fused_dim, config.num_classes)

    def encode(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Each stream through its own encoder: {"video": (B, Tv, d), "audio": ..., "text": ...}."""
        check_inputs(video, audio, text, text_lengths, self.config.width)
        streams = {"video": video, "audio": audio, "text": text}
        for m in MODALITIES:
            lengths = text_lengths if m == "text" else None
            for block in self.encoders[m]:
                streams[m] = block(streams[m], kv_lengths=lengths)  # (B, T_m, d)
        return streams

    def features(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> FusionFeatures:
        streams = self.encode(video, audio, text, text_lengths)  # {m: (B, T_m, d)}
        return _concat_features(_pool_streams(self.norms, streams, text_lengths))  # fused (B, 3d)

    def forward(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> Tensor:
        return self.head(self.features(video, audio, text, text_lengths).fused)  # (B, C)
# ANCHOR_END: LateFusion


# ANCHOR: CrossModalFusion
class CrossModalFusion(LateFusion):
    """Late fusion's separate encoders, then each modality's tokens cross-attend to the other two.

    After the three encoders (`LateFusion.encode`), video reads [audio; text],
    audio reads [video; text] and text reads [video; audio], all from the
    encoder outputs (one `CrossAttentionBlock` per modality). Text padding is
    masked as a key. Pooling, `features` and head are late fusion's.

    Shapes: forward(video (B, Tv, d), audio (B, Ta, d), text (B, Tt, d),
        text_lengths (B,) | None) -> (B, num_classes).
    """

    def __init__(self, config: VideoFusionConfig) -> None:
        super().__init__(config)
        d, h, r = config.width, config.heads, config.mlp_ratio
        self.cross = nn.ModuleDict({m: CrossAttentionBlock(d, h, d, r) for m in MODALITIES})

    def encode(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Encoders, then cross-attention: {"video": (B, Tv, d), "audio": ..., "text": ...}."""
        enc = super().encode(video, audio, text, text_lengths)  # each stream alone
        fused = {}
        for m in MODALITIES:
            others = [o for o in MODALITIES if o != m]  # text, if there, is last: padding at the end
            context = torch.cat([enc[o] for o in others], dim=1)  # (B, T_o1 + T_o2, d)
            lengths = None
            if text_lengths is not None and "text" in others:
                lengths = enc[others[0]].shape[1] + text_lengths  # (B,)
            fused[m] = self.cross[m](enc[m], context, context_lengths=lengths)  # (B, T_m, d)
        return fused
# ANCHOR_END: CrossModalFusion


# ANCHOR: BottleneckFusion
class BottleneckFusion(nn.Module):
    """Per-modality blocks that exchange information only through n_bottleneck shared tokens.

    Layer l: for each modality m, [z_m; x_m] = block_m[l]([z; x_m]); then
    z = mean over m of z_m. The bottleneck goes first in each sequence so that
    text padding stays at the end (kv_lengths = n_bottleneck + text_lengths).

    Shapes: forward(video (B, Tv, d), audio (B, Ta, d), text (B, Tt, d),
        text_lengths (B,) | None) -> (B, num_classes).
    """

    def __init__(self, config: VideoFusionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.width
        self.bottleneck = nn.Parameter(torch.randn(config.n_bottleneck, d) * 0.02)  # (nb, d)
        self.encoders = nn.ModuleDict({m: _encoder(config) for m in MODALITIES})
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in MODALITIES})
        self.fused_dim = len(MODALITIES) * d
        self.head = nn.Linear(self.fused_dim, config.num_classes)

    def encode(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The L fusion layers: ({"video": (B, Tv, d), ...}, final bottleneck (B, nb, d))."""
        check_inputs(video, audio, text, text_lengths, self.config.width)
        nb = self.config.n_bottleneck
        streams = {"video": video, "audio": audio, "text": text}
        z = self.bottleneck.to(video.dtype).expand(video.shape[0], -1, -1)  # (B, nb, d)
        lengths = {m: None for m in MODALITIES}
        if text_lengths is not None:
            lengths["text"] = nb + text_lengths  # (B,): z first, then the valid text tokens
        for layer in range(self.config.layers):
            copies = []
            for m in MODALITIES:
                # The only keys modality m sees: the shared tokens and its own tokens.
                y = self.encoders[m][layer](torch.cat([z, streams[m]], dim=1), kv_lengths=lengths[m])
                copies.append(y[:, :nb])  # (B, nb, d): modality m's update of the bottleneck
                streams[m] = y[:, nb:]  # (B, T_m, d)
            z = torch.stack(copies).mean(dim=0)  # (B, nb, d): what every modality reads next layer
        return streams, z

    def features(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> FusionFeatures:
        streams, _ = self.encode(video, audio, text, text_lengths)  # {m: (B, T_m, d)}
        return _concat_features(_pool_streams(self.norms, streams, text_lengths))  # fused (B, 3d)

    def forward(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> Tensor:
        return self.head(self.features(video, audio, text, text_lengths).fused)  # (B, C)
# ANCHOR_END: BottleneckFusion


# ANCHOR: SingleModality
class SingleModality(nn.Module):
    """The baseline: one modality's encoder, LayerNorm, mean-pool, linear head.

    Takes the same arguments as the fusion models so the models can be swapped,
    and reads only the stream named `modality` (the other two are checked for
    shape like everywhere else, then ignored).

    Shapes: forward(video (B, Tv, d), audio (B, Ta, d), text (B, Tt, d),
        text_lengths (B,) | None) -> (B, num_classes); features: fused (B, d) =
        streams[modality] (B, d), and streams has no other key.
    """

    def __init__(self, config: VideoFusionConfig, modality: str) -> None:
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.config = config
        self.modality = modality
        self.encoder = _encoder(config)
        self.norm = nn.LayerNorm(config.width)
        self.fused_dim = config.width
        self.head = nn.Linear(config.width, config.num_classes)

    def features(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> FusionFeatures:
        check_inputs(video, audio, text, text_lengths, self.config.width)
        x = {"video": video, "audio": audio, "text": text}[self.modality]  # (B, T_m, d)
        lengths = text_lengths if self.modality == "text" else None
        for block in self.encoder:
            x = block(x, kv_lengths=lengths)  # (B, T_m, d)
        pooled = mean_tokens(self.norm(x), lengths)  # (B, d)
        return FusionFeatures(pooled, {self.modality: pooled})

    def forward(
        self, video: Tensor, audio: Tensor, text: Tensor, text_lengths: Tensor | None = None
    ) -> Tensor:
        return self.head(self.features(video, audio, text, text_lengths).fused)  # (B, C)
# ANCHOR_END: SingleModality


STRATEGIES: dict[str, type[nn.Module]] = {
    "early": EarlyFusion,
    "late": LateFusion,
    "cross": CrossModalFusion,
    "bottleneck": BottleneckFusion,
}
