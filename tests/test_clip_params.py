"""tiny_mm.counting.clip_params against instantiated models, counted by PyTorch.

The expected counts are ``sum(p.numel())`` over open_clip's own models
(open_clip.create_model(name, pretrained=None), built on the meta device: shapes
without memory, nothing downloaded) and over tiny_mm's CLIP built from open_clip's
architecture config of the same name. The formulas are also checked on random
small sizes against tiny_mm's towers.
"""
import open_clip
import pytest
import torch

from tiny_mm.clip import CLIP, CLIPConfig, ModifiedResNet, ResNetConfig, TextConfig, TextTransformer
from tiny_mm.counting import clip_params, clip_resnet_params, clip_text_params, clip_vit_params
from tiny_mm.vit import VisionConfig, VisionTransformer

NAMES = ["RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14"]
TEXT_PARTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def split_counts(model: torch.nn.Module) -> dict[str, int]:
    """{"total", "visual", "text"} by parameter name; also checks nothing else but logit_scale is left."""
    counts = {"total": 0, "visual": 0, "text": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        if name.startswith("visual."):
            counts["visual"] += p.numel()
        elif name.startswith(TEXT_PARTS):
            counts["text"] += p.numel()
        else:
            assert name == "logit_scale", f"unexpected parameter {name}"
    return counts


def tiny_mm_config(name: str) -> CLIPConfig:
    """tiny_mm's config from open_clip's JSON config for `name` (heads of 64 as in the releases)."""
    cfg = open_clip.get_model_config(name)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if isinstance(v["layers"], (list, tuple)):
        vision = ResNetConfig(layers=tuple(v["layers"]), width=v["width"], image_size=v["image_size"],
                              heads=v["width"] * 32 // 64, output_dim=cfg["embed_dim"])
    else:
        vision = VisionConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                              layers=v["layers"], heads=v["width"] // 64, output_dim=cfg["embed_dim"])
    text = TextConfig(context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"],
                      heads=t["heads"], layers=t["layers"])
    return CLIPConfig(embed_dim=cfg["embed_dim"], vision=vision, text=text)


@pytest.mark.parametrize("name", NAMES)
def test_clip_params_equal_open_clip(name):
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    assert clip_params(name) == split_counts(model)


@pytest.mark.parametrize("name", NAMES)
def test_clip_params_equal_tiny_mm_clip(name):
    with torch.device("meta"):
        model = CLIP(tiny_mm_config(name))
    assert clip_params(name) == split_counts(model)


def test_openai_spelling_is_accepted():
    assert clip_params("ViT-B/32") == clip_params("ViT-B-32")
    assert clip_params("ViT-L/14") == clip_params("ViT-L-14")


@pytest.mark.parametrize("name", ["ViT-B-64", "vit-b-32", "", 32])
def test_unknown_name_lists_the_known_ones(name):
    with pytest.raises(ValueError, match="known: .*RN50.*ViT-B-32.*ViT-B-16.*ViT-L-14"):
        clip_params(name)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tower_formulas_on_random_sizes(rng):
    """Sizes no released model has, so a formula fitted to the table above would fail."""
    with torch.device("meta"):
        for _ in range(3):
            patch, grid = int(rng.integers(2, 9)), int(rng.integers(1, 6))
            width, layers, embed = 16 * int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(3, 40))
            vit = VisionTransformer(VisionConfig(patch * grid, patch, width, layers, heads=1, output_dim=embed))
            assert clip_vit_params(patch * grid, patch, width, layers, embed) == n_params(vit)

            stages = tuple(int(n) for n in rng.integers(1, 4, size=4))
            rn_width, size = 2 * int(rng.integers(1, 9)), 32 * int(rng.integers(1, 4))
            resnet = ModifiedResNet(ResNetConfig(stages, rn_width, size, heads=1, output_dim=embed))
            assert clip_resnet_params(size, stages, rn_width, embed) == n_params(resnet)

            context, vocab = int(rng.integers(2, 80)), int(rng.integers(10, 1000))
            text = TextTransformer(TextConfig(context, vocab, width, heads=1, layers=layers), embed)
            assert clip_text_params(context, vocab, width, layers, embed) == n_params(text)
