"""tiny_mm.clip against open_clip's CLIP (random weights, nothing downloaded).

open_clip is an independent implementation of the same model: its state dict,
saved to disk, must load through `load_clip` with strict keys and an inferred
architecture, and image embeddings, text embeddings and logits must agree in
float32. The readers' own tests (TorchScript, malicious files, Hugging Face
names) are in test_checkpoints.py.
"""
import math

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP as OpenClipCLIP
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from safetensors.torch import save_file

from tiny_mm.checkpoints import config_from_state_dict, load_clip
from tiny_mm.clip import CLIP, CLIPConfig, ResNetConfig, TextConfig, TextTransformer
from tiny_mm.tokenizer import tokenize
from tiny_mm.vit import VisionConfig
from tests.numerics import rel_err

torch.set_num_threads(2)

CAPTIONS = [
    "a photo of a cat.",
    "A RED Square, top-left!!",
    "two dogs & 3 birds (maybe 4?) — on the grass",
    "naïve café au lait",
    " ".join(["a very long caption"] * 30),  # truncated to 77 tokens, end token kept
]


def randomize(module, rng):
    """Fresh random values for every parameter (norms, positional tables, logit_scale too) and
    for BatchNorm's running statistics, which eval mode uses. Drawn by torch from a generator
    seeded by `rng` (float32 draws: ViT-B/32's 151M values in a few seconds). Matrices and
    kernels get std 1/sqrt(fan-in), so activations keep their scale through RN50's 16 blocks:
    with a fixed std they grow ~5x per convolution, the attention pool's softmax turns into a
    hard argmax, and float32 rounding can flip which position wins."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "logit_scale":
                std = 0.5
            elif p.dim() >= 2:
                std = p[0].numel() ** -0.5  # one row of a (out, in, k, k) weight: in * k * k
            else:
                std = 0.2
            p.normal_(0.0, std, generator=gen)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1, generator=gen)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=gen)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def small_open_clip(rng, quick_gelu: bool) -> OpenClipCLIP:
    """A small open_clip CLIP: heads = width // 64 as in the released models, 77 positions."""
    torch.manual_seed(int(rng.integers(2**31)))
    vision = CLIPVisionCfg(layers=2, width=128, head_width=64, image_size=32, patch_size=8)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=3)
    model = OpenClipCLIP(48, vision, text, quick_gelu=quick_gelu).eval()
    randomize(model, rng)
    return model


def check_matches(ours: CLIP, theirs, rng, image_size: int, batch: int = 2) -> None:
    images = torch.from_numpy(rng.standard_normal((batch, 3, image_size, image_size))).float()
    tokens = tokenize(CAPTIONS)  # (5, 77)
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images)) < 1e-5
        assert rel_err(ours.encode_text(tokens), theirs.encode_text(tokens)) < 1e-5
        per_image, per_text = ours(images, tokens)
        image = theirs.encode_image(images, normalize=True)  # (B, E)
        text = theirs.encode_text(tokens, normalize=True)  # (5, E)
        expected = theirs.logit_scale.exp() * image @ text.t()  # (B, 5)
    assert per_image.shape == (batch, len(CAPTIONS))
    # Random towers give nearly orthogonal embeddings (cosines ~1e-3 in 512 dimensions), so a
    # relative error of the logits would measure float32 cancellation. Cosines lie in [-1, 1]:
    # measure the error against the largest possible logit, exp(logit_scale), instead.
    bound = float(theirs.logit_scale.detach().exp())
    assert torch.isfinite(per_image).all() and torch.isfinite(per_text).all()
    assert float((per_image - expected).abs().max()) / bound < 1e-5
    assert float((per_text - expected.t()).abs().max()) / bound < 1e-5


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_small_clip_from_file_matches_open_clip(rng, tmp_path, quick_gelu, suffix):
    theirs = small_open_clip(rng, quick_gelu)
    path = tmp_path / f"model{suffix}"
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    ours = load_clip(path, quick_gelu=quick_gelu)
    assert n_params(ours) == n_params(theirs)
    assert float(ours.logit_scale.detach()) == float(theirs.logit_scale.detach())
    check_matches(ours, theirs, rng, image_size=32)


def test_config_is_inferred_from_shapes(rng):
    theirs = small_open_clip(rng, quick_gelu=False)
    config = config_from_state_dict(theirs.state_dict(), quick_gelu=False)
    assert config == CLIPConfig(
        embed_dim=48,
        vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2, output_dim=48,
                            quick_gelu=False),
        text=TextConfig(context_length=77, vocab_size=49408, width=128, heads=2, layers=3, quick_gelu=False),
    )


def test_vit_b_32_matches_open_clip(rng):
    """The real size, ~151M parameters, exact GELU as open_clip's ViT-B-32 config says."""
    torch.manual_seed(int(rng.integers(2**31)))
    theirs = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    randomize(theirs, rng)
    ours = load_clip(theirs.state_dict(), quick_gelu=False)  # files are read in the small tests
    config = ours.config
    vision = config.vision
    assert (config.embed_dim, vision.width, vision.layers, vision.heads) == (512, 768, 12, 12)
    assert (config.vision.image_size, config.vision.patch_size) == (224, 32)
    assert (config.text.width, config.text.layers, config.text.heads) == (512, 12, 8)
    assert n_params(ours) == n_params(theirs)
    check_matches(ours, theirs, rng, image_size=224, batch=1)


def test_text_tower_alone_matches_open_clip(rng):
    """TextTransformer holds the same text parameters as CLIP, without the image tower."""
    theirs = small_open_clip(rng, quick_gelu=True)
    tower_keys = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    text_state = {k: v for k, v in theirs.state_dict().items() if k.startswith(tower_keys)}
    ours = TextTransformer(TextConfig(width=128, heads=2, layers=3), embed_dim=48).eval()
    ours.load_state_dict(text_state, strict=True)
    tokens = tokenize(CAPTIONS)
    with torch.no_grad():
        assert rel_err(ours(tokens), theirs.encode_text(tokens)) < 1e-5


def test_wrong_activation_gives_different_outputs(rng):
    """Loaded with the other activation, outputs must differ: the matching tests can fail."""
    theirs = small_open_clip(rng, quick_gelu=True)
    wrong = load_clip(theirs.state_dict(), quick_gelu=False)
    images = torch.from_numpy(rng.standard_normal((2, 3, 32, 32))).float()
    tokens = tokenize(CAPTIONS[:2])
    with torch.no_grad():
        assert rel_err(wrong.encode_image(images), theirs.encode_image(images)) > 1e-3
        assert rel_err(wrong.encode_text(tokens), theirs.encode_text(tokens)) > 1e-3


def test_module_prefix_is_stripped(rng):
    theirs = small_open_clip(rng, quick_gelu=True)
    ours = load_clip({f"module.{k}": v for k, v in theirs.state_dict().items()})
    tokens = tokenize(CAPTIONS[:2])
    with torch.no_grad():
        assert rel_err(ours.encode_text(tokens), theirs.encode_text(tokens)) < 1e-5


def test_mismatched_keys_are_named(rng):
    state = small_open_clip(rng, quick_gelu=True).state_dict()
    del state["ln_final.bias"]
    state["extra.weight"] = torch.zeros(3)
    named = r"missing keys \['ln_final.bias'\].*unexpected keys \['extra.weight'\]"
    with pytest.raises(ValueError, match=named):
        load_clip(state)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # OpenAI traced
@pytest.mark.parametrize("quick_gelu", [True, False])
def test_torchscript_archive_matches_open_clip(rng, tmp_path, quick_gelu):
    """OpenAI released traced TorchScript archives; a traced open_clip model is the same format."""
    theirs = small_open_clip(rng, quick_gelu)
    images = torch.zeros(1, 3, 32, 32)
    tokens = tokenize(["a trace"])
    path = tmp_path / "traced.pt"
    torch.jit.trace(theirs, (images, tokens), check_trace=False).save(str(path))
    ours = load_clip(path, quick_gelu=quick_gelu)
    check_matches(ours, theirs, rng, image_size=32)


def small_resnet_clip(rng, quick_gelu: bool) -> OpenClipCLIP:
    """A small open_clip CLIP with a ResNet image tower: stages (1, 2, 1, 1), width 16, 64 pixels."""
    torch.manual_seed(int(rng.integers(2**31)))
    vision = CLIPVisionCfg(layers=(1, 2, 1, 1), width=16, head_width=64, image_size=64)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    model = OpenClipCLIP(40, vision, text, quick_gelu=quick_gelu).eval()
    randomize(model, rng)
    return model


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_small_resnet_clip_matches_open_clip(rng, tmp_path, quick_gelu):
    theirs = small_resnet_clip(rng, quick_gelu)
    path = tmp_path / "rn.pt"
    torch.save(theirs.state_dict(), path)
    ours = load_clip(path, quick_gelu=quick_gelu)
    assert ours.config.vision == ResNetConfig(layers=(1, 2, 1, 1), width=16, image_size=64, heads=8,
                                              output_dim=40)
    assert n_params(ours) == n_params(theirs)
    check_matches(ours, theirs, rng, image_size=64)


def test_rn50_matches_open_clip(rng):
    """RN50's sizes, ~102M parameters, inferred from its state dict; one image at 224."""
    torch.manual_seed(int(rng.integers(2**31)))
    theirs = open_clip.create_model("RN50", pretrained=None).eval()
    randomize(theirs, rng)
    ours = load_clip(theirs.state_dict(), quick_gelu=False)
    assert ours.config.vision == ResNetConfig()  # the defaults are RN50's
    assert n_params(ours) == n_params(theirs)
    images = torch.from_numpy(rng.standard_normal((1, 3, 224, 224))).float()
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), theirs.encode_image(images)) < 1e-5


def test_logit_scale_starts_at_one_over_0_07():
    config = CLIPConfig(
        embed_dim=8,
        vision=VisionConfig(16, 8, 16, 1, 1, output_dim=8),
        text=TextConfig(context_length=77, vocab_size=49408, width=16, heads=1, layers=1),
    )
    model = CLIP(config)
    assert math.isclose(float(model.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-6)
    keys = set(model.state_dict())
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
            "logit_scale", "visual.proj", "transformer.resblocks.0.attn.in_proj_weight"} <= keys


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.zeros(2, 76, dtype=torch.long), r"shape \(B, 77\)"),
        (torch.zeros(2, 77), "int64 or int32"),
        (torch.full((1, 77), 49408), r"\[0, 49408\)"),
        ([[0] * 77], "torch.Tensor"),
    ],
)
def test_bad_tokens_raise(tokens, match):
    config = CLIPConfig(
        embed_dim=8,
        vision=VisionConfig(16, 8, 16, 1, 1, output_dim=8),
        text=TextConfig(width=16, heads=1, layers=1),
    )
    with pytest.raises(ValueError, match=match):
        CLIP(config).encode_text(tokens)
