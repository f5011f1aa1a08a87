"""LLaVA's adapter: project patch features into the word-embedding space, as a prefix.

LLaVA (Liu et al., 2023) passes the image through a frozen CLIP encoder and
maps each of its patch features with one trained matrix into the space of the
language model's word embeddings; those vectors go in front of the text like
words the model never had in its vocabulary (a soft prompt). LLaVA-1.5 made the
map a two-layer MLP with a GELU between.

    features (B, N, d_img) --projector--> prefix (B, N, d) --> frozen LM([<bos> ; prefix ; words])

`PrefixLM` is the same plumbing for any encoder of image features: BLIP-2 puts
its Q-Former's query outputs there, through one more linear map (see
`tiny_mm.train_adapters`, which builds it when `tiny_mm.adapters.qformer` exists).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tiny_mm.language_model import TinyLM

__all__ = ["LlavaProjector", "PrefixLM"]


# ANCHOR: LlavaProjector
class LlavaProjector(nn.Module):
    """Patch features -> word-embedding space: a linear map (LLaVA) or Linear-GELU-Linear (LLaVA-1.5).

    Shapes: forward(features (B, N, d_img)) -> (B, N, d).
    """

    def __init__(self, media_width: int, width: int, kind: str = "linear") -> None:
        super().__init__()
        if kind == "linear":
            self.proj = nn.Linear(media_width, width)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(media_width, width), nn.GELU(), nn.Linear(width, width))
        else:
            raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
        # The last layer starts at zero: the prefix starts as blank vectors (plus positions), so the
        # frozen model first sees "nothing" rather than large random vectors unlike any word it
        # knows (a default-initialised map gives vectors ~30x the size of its word embeddings).
        # Our choice for a short CPU run, in the spirit of Flamingo's closed gates; LLaVA does not say.
        last = self.proj if kind == "linear" else self.proj[2]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.media_width, self.kind = media_width, kind

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 3 or features.shape[-1] != self.media_width:
            raise ValueError(f"features must have shape (B, N, {self.media_width}), got {tuple(features.shape)}")
        return self.proj(features)  # (B, N, d)
# ANCHOR_END: LlavaProjector


# ANCHOR: PrefixLM
class PrefixLM(nn.Module):
    """A frozen `TinyLM` reading an image through a soft prompt made by ``adapter``.

    Args:
        lm: the language model; frozen here.
        adapter: features (B, N, d_img) -> prefix (B, P, d): a `LlavaProjector`,
            or a Q-Former followed by a linear map.

    Shapes: forward(ids (B, L), features (B, N, d_img)) -> logits (B, L, V) of the
        word positions only. The sequence is <bos> (ids[:, 0]), the P prefix vectors,
        then ids[:, 1:]; the prefix positions predict nothing and are dropped.
    """

    def __init__(self, lm: TinyLM, adapter: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.adapter = adapter

    def train(self, mode: bool = True) -> "PrefixLM":
        super().train(mode)
        self.lm.eval()
        return self

    def forward(self, ids: Tensor, features: Tensor) -> Tensor:
        prefix = self.adapter(features)  # (B, P, d)
        # <bos>, then the image, then the words, as LLaVA lays out its prompts. Before <bos> the
        # image would sit in what the language model learned is the previous, unrelated text.
        logits = self.lm(ids, prefix=prefix, prefix_position=1)  # (B, 1 + P + L - 1, V)
        P = prefix.shape[1]
        return torch.cat([logits[:, :1], logits[:, 1 + P:]], dim=1)  # (B, L, V): the word positions
# ANCHOR_END: PrefixLM
