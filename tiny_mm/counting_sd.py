"""Stable Diffusion v1's parameters, counted from the real implementations' modules on the meta device.

The textbook (source 000) gives Stable Diffusion "about 860M parameters total".
This module builds the three parts of Stable Diffusion v1 from their published
configurations, written out below, on PyTorch's meta device (shapes only: no
memory, no weights, nothing downloaded) and counts them:

    text encoder   CLIP ViT-L/14's text tower (transformers' CLIPTextModel): 77 tokens, width 768
    U-Net          diffusers' UNet2DConditionModel: 4 latent channels in and out, widths
                   320, 640, 1280, 1280, cross-attention to 768-wide text tokens
    VAE            diffusers' AutoencoderKL: 512 x 512 x 3 <-> 64 x 64 x 4

diffusers and transformers are in the project's dev extra (`make setup` installs them).
"""
from __future__ import annotations

__all__ = ["UNET_V1", "VAE_V1", "TEXT_ENCODER_V1", "stable_diffusion_params"]

# Stable Diffusion v1.x (v1.1 to v1.5 share these), as the released model configurations give them.
UNET_V1 = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
VAE_V1 = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "sample_size": 512,
}
TEXT_ENCODER_V1 = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def stable_diffusion_params() -> dict[str, int]:
    """{"text encoder", "U-Net", "VAE encoder", "VAE decoder": parameters} of Stable Diffusion v1."""
    try:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError as error:
        raise ImportError(f"counting Stable Diffusion needs diffusers and transformers ({error}); "
                          "`make setup` installs them, or `pip install diffusers transformers`") from error
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        unet = UNet2DConditionModel(**UNET_V1)
        vae = AutoencoderKL(**VAE_V1)
        text = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_V1))
    return {
        "text encoder": _count(text),
        "U-Net": _count(unet),
        # quant_conv / post_quant_conv are the 1 x 1 convolutions on each side of the latent
        "VAE encoder": _count(vae.encoder) + _count(vae.quant_conv),
        "VAE decoder": _count(vae.decoder) + _count(vae.post_quant_conv),
    }
