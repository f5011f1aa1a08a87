"""tiny_mm.vit against open_clip's vision tower (random weights, nothing downloaded).

open_clip's ``VisionTransformer`` is an independent implementation of the same
model: its state dict must load into ours with strict keys, the parameter
counts must match, and the embeddings must agree in float32.
"""
import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn

from tiny_mm.vit import VisionConfig, VisionTransformer

torch.set_num_threads(2)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm())


def randomize(module, rng):
    """Fresh random values for every parameter (LayerNorm gains and biases too, not just 1 and 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(0.2 * rng.standard_normal(tuple(p.shape))))


def open_clip_tower(config: VisionConfig) -> OpenClipViT:
    return OpenClipViT(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        output_dim=config.output_dim,
        act_layer=OpenClipQuickGELU if config.quick_gelu else nn.GELU,
    ).eval()


def load_into_ours(theirs: nn.Module, config: VisionConfig) -> VisionTransformer:
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # raises on any missing or unexpected key
    return ours


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("quick_gelu", [True, False])
@pytest.mark.parametrize(
    "image_size, patch_size, width, layers, heads", [(32, 8, 32, 2, 4), (24, 6, 16, 3, 2)]
)
def test_small_tower_matches_open_clip(rng, quick_gelu, image_size, patch_size, width, layers, heads):
    torch.manual_seed(int(rng.integers(2**31)))
    config = VisionConfig(image_size, patch_size, width, layers, heads, mlp_ratio=4.0, output_dim=24,
                          quick_gelu=quick_gelu)
    theirs = open_clip_tower(config)
    randomize(theirs, rng)
    ours = load_into_ours(theirs, config)
    assert n_params(ours) == n_params(theirs)
    images = torch.from_numpy(rng.standard_normal((3, 3, image_size, image_size))).float()
    with torch.no_grad():
        expected = theirs(images)  # (B, output_dim)
        out, tokens = ours(images, return_tokens=True)
    assert rel_err(out, expected) < 1e-5
    assert tokens.shape == (3, config.num_tokens, width)
    # The class token's output, projected, is the embedding.
    assert rel_err(tokens[:, 0] @ ours.proj, expected) < 1e-5


def test_activation_choice_matters(rng):
    """Loaded into the other activation, the outputs must differ: the test above can fail."""
    config = VisionConfig(32, 8, 32, 2, 4, output_dim=24, quick_gelu=True)
    theirs = open_clip_tower(config)
    randomize(theirs, rng)
    wrong = load_into_ours(theirs, VisionConfig(32, 8, 32, 2, 4, output_dim=24, quick_gelu=False))
    images = torch.from_numpy(rng.standard_normal((2, 3, 32, 32))).float()
    with torch.no_grad():
        assert rel_err(wrong(images), theirs(images)) > 1e-3


def test_vit_b_32_matches_open_clip(rng):
    """The real size: open_clip's ViT-B-32 (exact GELU), randomly initialised, ~88M parameters."""
    torch.manual_seed(int(rng.integers(2**31)))
    theirs = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    config = VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12, output_dim=512,
                          quick_gelu=False)
    ours = load_into_ours(theirs, config)
    assert n_params(ours) == n_params(theirs)
    images = torch.from_numpy(rng.standard_normal((1, 3, 224, 224))).float()
    with torch.no_grad():
        assert rel_err(ours(images), theirs(images)) < 1e-5


def test_default_config_is_vit_b_32():
    config = VisionConfig()
    sizes = (config.image_size, config.patch_size, config.width, config.layers, config.heads)
    assert sizes == (224, 32, 768, 12, 12)
    assert config.grid_size == 7 and config.num_tokens == 50


def test_patch_embedding_is_a_conv_without_bias():
    model = VisionTransformer(VisionConfig(16, 4, 16, 1, 2, output_dim=8))
    assert model.conv1.bias is None
    assert tuple(model.conv1.weight.shape) == (16, 3, 4, 4)  # (out=width, in=3, P, P): Conv2d(in, out, ...)
    assert tuple(model.class_embedding.shape) == (16,)
    assert tuple(model.positional_embedding.shape) == (17, 16)
    assert tuple(model.proj.shape) == (16, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=30, patch_size=8), "multiple of patch_size"),
        (dict(width=30, heads=4), "divisible by heads"),
        (dict(layers=0), "layers must be a positive int"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_bad_config_raises(kwargs, match):
    base = dict(image_size=32, patch_size=8, width=32, layers=1, heads=4, output_dim=8)
    with pytest.raises(ValueError, match=match):
        VisionConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.zeros(2, 3, 24, 32), r"shape \(B, 3, 32, 32\)"),
        (torch.zeros(2, 1, 32, 32), r"shape \(B, 3, 32, 32\)"),
        (torch.zeros(3, 32, 32), r"shape \(B, 3, 32, 32\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating-point"),
        (np.zeros((2, 3, 32, 32)), "torch.Tensor"),
    ],
)
def test_bad_images_raise(images, match):
    model = VisionTransformer(VisionConfig(32, 8, 32, 1, 4, output_dim=8))
    with pytest.raises(ValueError, match=match):
        model(images)
