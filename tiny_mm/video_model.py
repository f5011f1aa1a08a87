"""The whole chapter 10 model: raw clips in, action logits (and training features) out.

`tiny_mm.video_fusion` fuses token streams that are already embedded; this
module makes those tokens from the raw data of `tiny_mm.data.video` and puts a
fusion model (or a single-modality baseline) on top:

    frames  (B, T, 3, H, W) --VideoEmbedding--> video tokens (B, (T/t) (H/p)^2, d)
    audio   (B, S)          --AudioEmbedding--> audio tokens (B, K, d)
    text_ids (B, Lt)        --TextEmbedding-->  text tokens  (B, Lt, d)
                            --fusion.features--> fused (B, F), streams {m: (B, d)}
                            --fusion.head-->     logits (B, C)

t = tubelet, p = patch_size, K = audio_chunks, F = the fusion model's
`fused_dim` (d for early fusion and for a single modality, 3d otherwise).
By default the video embedder first subtracts each clip's mean frame, so its
tokens show motion rather than the static background (see `VideoEmbedding`).

Missing modalities: ``present`` (B, 3) bool, columns in `MODALITIES` order
(video, audio, text). Where ``present[b, i]`` is False, every embedded token of
modality i in example b is replaced by one learned vector ``missing[i]`` (d,),
so the model cannot read anything of that input; text lengths stay as they
are. ``targets[m]`` is the mean of m's embedded tokens of the real input,
taken before the replacement and detached: what masked-modality
reconstruction (``reconstruct[m]``, a Linear(F, d) on ``fused``) predicts.
``order_head`` (Linear(F, 1)) reads ``fused`` for temporal-order prediction.
Neither extra head is used by `forward`: the training objectives call them.

A single-modality model ("video", "audio" or "text") has only its own
embedder, and ``embed``, ``streams``, ``targets`` and ``reconstruct`` have
only its own key; it still takes all three inputs (and checks them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tiny_mm.data.video import NUM_CLASSES, VideoConfig, video_vocab
from tiny_mm.video_fusion import (
    MODALITIES,
    STRATEGIES,
    SingleModality,
    VideoFusionConfig,
    mean_tokens,
)

__all__ = [
    "MODEL_NAMES",
    "VideoModelConfig",
    "VideoEmbedding",
    "AudioEmbedding",
    "TextEmbedding",
    "VideoFusionOutput",
    "VideoFusionModel",
]

# The three single-modality baselines, then the four fusion strategies.
MODEL_NAMES: tuple[str, ...] = ("video", "audio", "text", "early", "late", "cross", "bottleneck")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ANCHOR: VideoModelConfig
@dataclass(frozen=True)
class VideoModelConfig:
    """Sizes of a `VideoFusionModel`.

    fusion: the fusion model's sizes (width d, heads, layers, classes, bottleneck).
    data: the clips' sizes (frames T, image_size H = W, the waveform's S samples).
    patch_size: p, side of a video patch; must divide image_size.
    tubelet: t, frames per video token; must divide frames.
    audio_chunks: K, equal pieces the waveform is cut into (one token each);
        must divide S = data.num_samples.
    vocab_size: rows of the token embedding (11 for `video_vocab()`).
    text_len: the longest caption, in tokens with BOS and EOS (learned positions).
    subtract_mean_frame: the video embedder first subtracts the clip's mean frame,
        so only what changes over time reaches the tokens (see `VideoEmbedding`).
    """

    fusion: VideoFusionConfig = field(default_factory=lambda: VideoFusionConfig(num_classes=NUM_CLASSES))
    data: VideoConfig = field(default_factory=VideoConfig)
    patch_size: int = 8
    tubelet: int = 2
    audio_chunks: int = 16
    vocab_size: int = field(default_factory=lambda: len(video_vocab()))
    text_len: int = 8
    subtract_mean_frame: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.fusion, VideoFusionConfig):
            raise ValueError(f"fusion must be a VideoFusionConfig, got {type(self.fusion).__name__}")
        if not isinstance(self.data, VideoConfig):
            raise ValueError(f"data must be a VideoConfig, got {type(self.data).__name__}")
        for name in ("patch_size", "tubelet", "audio_chunks", "vocab_size", "text_len"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.subtract_mean_frame, bool):
            raise ValueError(f"subtract_mean_frame must be a bool, got {self.subtract_mean_frame!r}")
        if self.data.image_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} must divide image_size {self.data.image_size}"
            )
        if self.data.frames % self.tubelet:
            raise ValueError(f"tubelet {self.tubelet} must divide frames {self.data.frames}")
        if self.data.num_samples % self.audio_chunks:
            raise ValueError(
                f"audio_chunks {self.audio_chunks} must divide the waveform's "
                f"{self.data.num_samples} samples (frames * frame_seconds * sample_rate)"
            )

    @classmethod
    def from_dict(cls, values: dict) -> VideoModelConfig:
        """The inverse of `dataclasses.asdict`: rebuilds the nested fusion and data configs
        (for configs stored as JSON next to a checkpoint)."""
        if not isinstance(values, dict):
            raise ValueError(f"values must be a dict, got {type(values).__name__}")
        values = dict(values)
        if isinstance(values.get("fusion"), dict):
            values["fusion"] = VideoFusionConfig(**values["fusion"])
        if isinstance(values.get("data"), dict):
            values["data"] = VideoConfig(**values["data"])
        return cls(**values)

    @property
    def patch_dim(self) -> int:
        """Numbers in one video token: 3 colours x tubelet frames x patch x patch."""
        return 3 * self.tubelet * self.patch_size**2

    @property
    def chunk_samples(self) -> int:
        """Samples in one audio chunk: S / audio_chunks."""
        return self.data.num_samples // self.audio_chunks

    @property
    def freq_bins(self) -> int:
        """Frequencies in one chunk's spectrum: chunk_samples // 2 + 1 (rfft)."""
        return self.chunk_samples // 2 + 1

    @property
    def tokens(self) -> dict[str, int]:
        """Tokens per stream: {"video": (T/t) (H/p)^2, "audio": K, "text": text_len (the most)}."""
        grid = self.data.image_size // self.patch_size
        return {
            "video": self.data.frames // self.tubelet * grid * grid,
            "audio": self.audio_chunks,
            "text": self.text_len,
        }
# ANCHOR_END: VideoModelConfig


# --------------------------------------------------------------------------- embedders


# ANCHOR: embedders
class VideoEmbedding(nn.Module):
    """Tubelets -> tokens: each token holds t consecutive frames of one p x p patch.

    frames (B, T, 3, H, W) -> (B, N, d), N = (T/t) (H/p) (W/p), tokens ordered
    time first, then patch rows, then patch columns. Each tubelet is flattened
    in (colour, frame, row, column) order, the order of a Conv3d weight
    (d, 3, t, p, p), so this is a Conv3d with kernel = stride = (t, p, p) on
    (B, 3, T, H, W); then a learned position per token (space and time jointly).

    With subtract_mean_frame (the default) the clip's mean frame is subtracted
    first: the background and anything else that stays put cancel, and the
    moving disc shows as where it is now minus where it is on average. Without
    it, fusion models learn audio and caption first and stay at the 25% those
    two allow until the video's direction is found, which takes long: in our
    runs (Adam, lr 3e-3, batches of 64) late fusion left 25% only after ~250
    steps and early fusion not within 400; with it, both pass 99% in 150.
    """

    def __init__(self, config: VideoModelConfig) -> None:
        super().__init__()
        self.tubelet, self.patch = config.tubelet, config.patch_size
        self.subtract_mean_frame = config.subtract_mean_frame
        self.proj = nn.Linear(config.patch_dim, config.fusion.width)
        self.positions = nn.Parameter(torch.randn(config.tokens["video"], config.fusion.width) * 0.02)

    def forward(self, frames: Tensor) -> Tensor:
        B, T, C, H, W = frames.shape
        t, p = self.tubelet, self.patch
        if self.subtract_mean_frame:
            frames = frames - frames.mean(dim=1, keepdim=True)  # (B, T, 3, H, W): only the changes
        x = frames.reshape(B, T // t, t, C, H // p, p, W // p, p)  # (B, T/t, t, 3, H/p, p, W/p, p)
        x = x.permute(0, 1, 4, 6, 3, 2, 5, 7)  # (B, T/t, H/p, W/p, 3, t, p, p)
        x = x.reshape(B, -1, C * t * p * p)  # (B, N, 3 t p p)
        return self.proj(x) + self.positions  # (B, N, d)


class AudioEmbedding(nn.Module):
    """Waveform chunks -> tokens: each token holds one chunk's log-magnitude spectrum.

    audio (B, S) -> (B, K, d): the waveform is cut into K = audio_chunks equal
    chunks of S/K samples (no window, no overlap), each becomes
    log(1 + |rfft(chunk)|) over its S/(2K) + 1 frequencies, a Linear maps that to
    d, and a learned position per chunk is added. At the defaults (S = 6400,
    K = 16) a chunk is 50 ms with 20 Hz resolution: pitch shows as the peak's
    frequency, rhythm as which chunks are loud.
    """

    def __init__(self, config: VideoModelConfig) -> None:
        super().__init__()
        self.chunks = config.audio_chunks
        self.proj = nn.Linear(config.freq_bins, config.fusion.width)
        self.positions = nn.Parameter(torch.randn(config.audio_chunks, config.fusion.width) * 0.02)

    def forward(self, audio: Tensor) -> Tensor:
        B, S = audio.shape
        chunks = audio.reshape(B, self.chunks, S // self.chunks)  # (B, K, S/K)
        magnitude = torch.fft.rfft(chunks, dim=-1).abs()  # (B, K, S/(2K) + 1)
        # log(1 + x) rather than log1p(x): x >= 0 loses nothing, and on CPU it is ~7x faster.
        spectrum = torch.log(1 + magnitude)  # (B, K, S/(2K) + 1)
        return self.proj(spectrum) + self.positions  # (B, K, d)


class TextEmbedding(nn.Module):
    """Caption ids -> tokens: token embedding + a learned position.

    text_ids (B, Lt) -> (B, Lt, d), Lt <= text_len, one token per word (and BOS,
    EOS, padding). Padding gets embedded like any id; the fusion models mask it
    with text_lengths, so its content never matters.
    """

    def __init__(self, config: VideoModelConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.fusion.width)
        self.positions = nn.Parameter(torch.randn(config.text_len, config.fusion.width) * 0.02)

    def forward(self, text_ids: Tensor) -> Tensor:
        return self.token(text_ids) + self.positions[: text_ids.shape[1]]  # (B, Lt, d)
# ANCHOR_END: embedders


# --------------------------------------------------------------------------- the model


class VideoFusionOutput(NamedTuple):
    """logits (B, C); fused (B, F); streams {m: (B, d)}; targets {m: (B, d)}, detached."""

    logits: Tensor
    fused: Tensor
    streams: dict[str, Tensor]
    targets: dict[str, Tensor]


_EMBEDDERS: dict[str, type[nn.Module]] = {
    "video": VideoEmbedding,
    "audio": AudioEmbedding,
    "text": TextEmbedding,
}


# ANCHOR: VideoFusionModel
class VideoFusionModel(nn.Module):
    """Embedders + a fusion model (or one modality's baseline) + the objectives' extra heads.

    Args:
        name: one of `MODEL_NAMES`: "video", "audio", "text" (a `SingleModality`
            baseline) or "early", "late", "cross", "bottleneck" (`STRATEGIES`).
        config: a `VideoModelConfig` (default: the chapter's small model).

    Attributes:
        modalities: the modalities the model reads: all three, or its one.
        embedders: {m: embedder} for m in modalities.
        fusion: the fusion module; fusion.fused_dim = F.
        missing: (len(modalities), d), the learned stand-in of a missing modality.
        reconstruct: {m: Linear(F, d)}; order_head: Linear(F, 1).
    """

    def __init__(self, name: str, config: VideoModelConfig | None = None) -> None:
        super().__init__()
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
        config = VideoModelConfig() if config is None else config
        if not isinstance(config, VideoModelConfig):
            raise ValueError(f"config must be a VideoModelConfig, got {type(config).__name__}")
        self.name, self.config = name, config
        single = name in MODALITIES
        self.modalities: tuple[str, ...] = (name,) if single else MODALITIES
        d = config.fusion.width
        self.embedders = nn.ModuleDict({m: _EMBEDDERS[m](config) for m in self.modalities})
        self.missing = nn.Parameter(torch.randn(len(self.modalities), d) * 0.02)  # (M, d)
        self.fusion = SingleModality(config.fusion, name) if single else STRATEGIES[name](config.fusion)
        F = self.fusion.fused_dim
        self.reconstruct = nn.ModuleDict({m: nn.Linear(F, d) for m in self.modalities})
        self.order_head = nn.Linear(F, 1)

    def embed(
        self, frames: Tensor, audio: Tensor, text_ids: Tensor, text_lengths: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The real inputs' tokens: {"video": (B, Nv, d), "audio": (B, K, d), "text": (B, Lt, d)},
        only the model's own modalities. text_lengths is checked, not used (padding is embedded)."""
        self.check_inputs(frames, audio, text_ids, text_lengths)
        dtype = self.missing.dtype
        raw = {"video": frames.to(dtype), "audio": audio.to(dtype), "text": text_ids}
        return {m: self.embedders[m](raw[m]) for m in self.modalities}  # {m: (B, T_m, d)}

    def forward(
        self,
        frames: Tensor,
        audio: Tensor,
        text_ids: Tensor,
        text_lengths: Tensor | None,
        present: Tensor | None = None,
    ) -> VideoFusionOutput:
        """frames (B, T, 3, H, W), audio (B, S), text_ids (B, Lt), text_lengths (B,) | None
        (None: all Lt tokens are real), present (B, 3) bool | None (None: all present)
        -> VideoFusionOutput(logits (B, C), fused (B, F), streams, targets)."""
        self.check_present(present, frames)
        tokens = self.embed(frames, audio, text_ids, text_lengths)  # {m: (B, T_m, d)}
        targets = {
            m: mean_tokens(x, text_lengths if m == "text" else None).detach()  # (B, d)
            for m, x in tokens.items()
        }
        if present is not None:
            for i, m in enumerate(self.modalities):
                keep = present[:, MODALITIES.index(m), None, None]  # (B, 1, 1)
                tokens[m] = torch.where(keep, tokens[m], self.missing[i])  # (B, T_m, d)
        if len(self.modalities) == 1:
            # A SingleModality reads only its own stream; its tokens fill the other two slots.
            (m,) = self.modalities
            args = [tokens[m]] * 3
            lengths = text_lengths if m == "text" else None
        else:
            args = [tokens[m] for m in MODALITIES]
            lengths = text_lengths
        features = self.fusion.features(*args, lengths)
        logits = self.fusion.head(features.fused)  # (B, C)
        return VideoFusionOutput(logits, features.fused, features.streams, targets)

    # ANCHOR_END: VideoFusionModel

    # ------------------------------------------------------------------- input checks

    def check_inputs(
        self, frames: Tensor, audio: Tensor, text_ids: Tensor, text_lengths: Tensor | None
    ) -> None:
        """ValueError, naming the problem, unless the raw inputs fit the config and each other."""
        c = self.config
        T, H = c.data.frames, c.data.image_size
        for name, x, shape in (
            ("frames", frames, f"(B, {T}, 3, {H}, {H})"),
            ("audio", audio, f"(B, {c.data.num_samples})"),
            ("text_ids", text_ids, f"(B, Lt) with 1 <= Lt <= {c.text_len}"),
        ):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
        if frames.dim() != 5 or tuple(frames.shape[1:]) != (T, 3, H, H):
            raise ValueError(f"frames must have shape (B, {T}, 3, {H}, {H}), got {tuple(frames.shape)}")
        if audio.dim() != 2 or audio.shape[1] != c.data.num_samples:
            raise ValueError(f"audio must have shape (B, {c.data.num_samples}), got {tuple(audio.shape)}")
        if text_ids.dim() != 2 or not 1 <= text_ids.shape[1] <= c.text_len:
            raise ValueError(
                f"text_ids must have shape (B, Lt) with 1 <= Lt <= {c.text_len}, got {tuple(text_ids.shape)}"
            )
        for name, x in (("frames", frames), ("audio", audio)):
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if text_ids.is_floating_point() or text_ids.is_complex() or text_ids.dtype == torch.bool:
            raise ValueError(f"text_ids must be an integer tensor, got dtype {text_ids.dtype}")
        batches = {"frames": frames.shape[0], "audio": audio.shape[0], "text_ids": text_ids.shape[0]}
        if len(set(batches.values())) != 1:
            raise ValueError(f"frames, audio and text_ids need the same batch size, got {batches}")
        if text_ids.numel() and (bool((text_ids < 0).any()) or bool((text_ids >= c.vocab_size).any())):
            raise ValueError(
                f"text_ids must lie in [0, vocab_size = {c.vocab_size}), "
                f"got values in [{int(text_ids.min())}, {int(text_ids.max())}]"
            )
        if text_lengths is None:
            return
        B, Lt = text_ids.shape
        is_tensor = isinstance(text_lengths, Tensor)
        if not is_tensor or text_lengths.dim() != 1 or text_lengths.shape[0] != B:
            got = tuple(text_lengths.shape) if is_tensor else type(text_lengths).__name__
            raise ValueError(f"text_lengths must be a (B,) = ({B},) tensor, got {got}")
        if text_lengths.is_floating_point() or text_lengths.is_complex() or text_lengths.dtype == torch.bool:
            raise ValueError(f"text_lengths must be an integer tensor, got dtype {text_lengths.dtype}")
        if bool((text_lengths < 1).any()) or bool((text_lengths > Lt).any()):
            raise ValueError(f"text_lengths must lie in [1, Lt = {Lt}], got {text_lengths.tolist()}")

    @staticmethod
    def check_present(present: Tensor | None, frames: Tensor) -> None:
        """ValueError unless present is None or a (B, 3) bool tensor."""
        if present is None:
            return
        B = frames.shape[0] if isinstance(frames, Tensor) and frames.dim() > 0 else "B"
        if not isinstance(present, Tensor) or tuple(present.shape) != (B, len(MODALITIES)):
            got = tuple(present.shape) if isinstance(present, Tensor) else type(present).__name__
            raise ValueError(f"present must be a (B, 3) = ({B}, 3) tensor (video, audio, text), got {got}")
        if present.dtype != torch.bool:
            raise ValueError(f"present must be a bool tensor (True: the modality is there), got {present.dtype}")
