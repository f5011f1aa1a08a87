"""tiny_mm: the PyTorch library of the book.

Names are imported on first use, so `import tiny_mm` (and `tinymm --help`)
stays fast and does not pull in torch until a model or loss is needed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "clip_loss": "tiny_mm.contrastive",
    "ClipLoss": "tiny_mm.contrastive",
    "gather_with_grad": "tiny_mm.contrastive",
    "scaled_dot_product_attention": "tiny_mm.attention",
    "MultiHeadAttention": "tiny_mm.attention",
    "MLP": "tiny_mm.layers",
    "TransformerBlock": "tiny_mm.layers",
    "CrossAttentionBlock": "tiny_mm.layers",
    "FusionConfig": "tiny_mm.fusion",
    "EarlyFusion": "tiny_mm.fusion",
    "LateFusion": "tiny_mm.fusion",
    "CrossModalFusion": "tiny_mm.fusion",
    "VisionConfig": "tiny_mm.vit",
    "VisionTransformer": "tiny_mm.vit",
    "tokenize": "tiny_mm.tokenizer",
    "Tokenizer": "tiny_mm.tokenizer",
    "ShapesConfig": "tiny_mm.data.shapes",
    "ShapesDataset": "tiny_mm.data.shapes",
    "split_by_combinations": "tiny_mm.data.shapes",
    "CLIP": "tiny_mm.clip",
    "CLIPConfig": "tiny_mm.clip",
    "TextConfig": "tiny_mm.clip",
    "load_clip": "tiny_mm.checkpoints",
    "clip_params": "tiny_mm.counting",
    "build_classifier": "tiny_mm.zeroshot",
    "TrainConfig": "tiny_mm.train_clip",
    "shapes_zero_shot": "tiny_mm.train_clip",
    "attention_rollout": "tiny_mm.vit",
    "vit_parameters": "tiny_mm.vit",
    "WhisperDims": "tiny_mm.whisper",
    "Whisper": "tiny_mm.whisper",
    "greedy_decode": "tiny_mm.whisper",
    "transcribe_prompt": "tiny_mm.whisper",
    "load_whisper": "tiny_mm.checkpoints",
    "log_mel_spectrogram": "tiny_mm.audio",
    "whisper_params": "tiny_mm.counting_whisper",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'tiny_mm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
