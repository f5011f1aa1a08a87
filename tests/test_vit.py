"""tiny_mm.vit against open_clip's vision tower (random weights, nothing downloaded).

open_clip's ``VisionTransformer`` is an independent implementation of the same
model: its state dict must load into ours with strict keys, the parameter
counts must match, and the embeddings must agree in float32.

The attention maps are checked against torch's own ``nn.MultiheadAttention``
(need_weights=True) in float64, block by block inside open_clip's tower;
attention rollout against the chapter's NumPy reference; the parameter count
formula against the instantiated module.
"""
import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn

import chapters.ch03_vit.reference as ref
from tiny_mm.attention import MultiHeadAttention
from tiny_mm.vit import VisionConfig, VisionTransformer, attention_rollout, vit_parameters
from tests.numerics import rel_err

torch.set_num_threads(2)


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


# --------------------------------------------------------------------------- attention maps


def torch_mha_like(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    """torch's nn.MultiheadAttention in float64, holding our module's weights (packed or not)."""
    E, H = ours.embed_dim, ours.num_heads
    theirs = nn.MultiheadAttention(E, H, bias=ours.bias, batch_first=True).double()
    state = ours.state_dict()
    if not ours.packed_in_proj:  # stack the separate q, k, v projections the way torch packs them
        state = {"in_proj_weight": torch.cat([state.pop(f"{n}_proj.weight") for n in "qkv"]),
                 **({"in_proj_bias": torch.cat([state.pop(f"{n}_proj.bias") for n in "qkv"])}
                    if ours.bias else {}),
                 **state}
    theirs.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    return theirs.eval()


def torch_masks(batch, lq, lk, causal, kv_lengths):
    """nn.MultiheadAttention's masks (True = may not attend): attn_mask (Lq, Lk), key_padding_mask (B, Lk)."""
    cols = torch.arange(lk)
    attn_mask = (cols[None, :] > torch.arange(lq)[:, None]) if causal else None  # top-left aligned
    padding = (cols[None, :] >= kv_lengths[:, None]) if kv_lengths is not None else None
    return attn_mask, padding


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(
    "B, Lq, Lk, E, H, causal, lengths",
    [
        (2, 7, 7, 16, 2, False, None),  # self-attention
        (3, 5, 9, 32, 4, False, [9, 1, 4]),  # cross-attention with padded keys
        (2, 6, 6, 16, 4, True, None),  # causal
        (2, 8, 5, 16, 1, True, [5, 2]),  # both masks, Lq != Lk
    ],
)
def test_attention_probs_match_torch_multihead_attention(rng, packed, B, Lq, Lk, E, H, causal, lengths):
    torch.manual_seed(int(rng.integers(2**31)))
    ours = MultiHeadAttention(E, H, packed_in_proj=packed)
    randomize(ours, rng)
    theirs = torch_mha_like(ours)
    query = rng.standard_normal((B, Lq, E))
    key = query if Lq == Lk and not lengths else rng.standard_normal((B, Lk, E))
    kv_lengths = None if lengths is None else torch.tensor(lengths)
    q32, k32 = torch.from_numpy(query).float(), torch.from_numpy(key).float()
    with torch.no_grad():
        probs = ours.attention_probs(q32, k32, causal=causal, kv_lengths=kv_lengths)  # (B, H, Lq, Lk)
        attn_mask, padding = torch_masks(B, Lq, Lk, causal, kv_lengths)
        q64, k64 = torch.from_numpy(query), torch.from_numpy(key)
        _, expected = theirs(q64, k64, k64, need_weights=True, average_attn_weights=False,
                             attn_mask=attn_mask, key_padding_mask=padding)  # (B, H, Lq, Lk)
    assert probs.shape == (B, H, Lq, Lk) and probs.dtype == torch.float32
    assert rel_err(probs, expected) < 1e-5
    assert torch.allclose(probs.double().sum(-1), torch.ones(B, H, Lq, dtype=torch.float64), atol=1e-6)
    # The probabilities are the ones forward uses: probs @ v, merged and projected, is forward's output.
    with torch.no_grad():
        _, _, v = ours._project_qkv(q32, k32, k32)  # (B, Lk, E)
        heads = probs @ v.view(B, Lk, H, E // H).transpose(1, 2)  # (B, H, Lq, Dh)
        rebuilt = ours.out_proj(heads.transpose(1, 2).reshape(B, Lq, E))  # (B, Lq, E)
        assert rel_err(rebuilt, ours(q32, k32, causal=causal, kv_lengths=kv_lengths)) < 1e-5


def test_attention_probs_row_that_sees_nothing_is_zero(rng):
    ours = MultiHeadAttention(16, 2)
    query = torch.from_numpy(rng.standard_normal((2, 3, 16))).float()
    key = torch.from_numpy(rng.standard_normal((2, 4, 16))).float()
    with torch.no_grad():
        probs = ours.attention_probs(query, key, kv_lengths=torch.tensor([0, 2]))  # (2, 2, 3, 4)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs[0], torch.zeros(2, 3, 4))
    assert torch.equal(probs[1, :, :, 2:], torch.zeros(2, 3, 2))
    assert torch.allclose(probs[1].sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.zeros(2, 3, 8),), {}, "query must have 16 features"),
        ((torch.zeros(2, 3, 16), torch.zeros(3, 4, 16)), {}, "same batch size"),
        ((torch.zeros(2, 3, 16),), {"kv_lengths": torch.tensor([1, 5])}, r"kv_lengths must lie in \[0, Lk\]"),
        ((torch.zeros(2, 3, 16),), {"causal": 1}, "causal must be True or False"),
    ],
)
def test_attention_probs_bad_input_raises(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(16, 2).attention_probs(*args, **kwargs)


def block_inputs_of(tower: OpenClipViT, images: torch.Tensor) -> list[torch.Tensor]:
    """What each of open_clip's attention layers reads as query (its ln_1 output), captured by hooks."""
    captured = []
    hooks = [block.attn.register_forward_pre_hook(lambda mod, args, kw: captured.append(args[0]),
                                                  with_kwargs=True)
             for block in tower.transformer.resblocks]
    try:
        with torch.no_grad():
            tower(images)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@pytest.mark.parametrize("image_size, patch_size, width, layers, heads", [(32, 8, 32, 2, 4), (24, 6, 16, 3, 2)])
def test_attention_maps_match_open_clip_and_torch_mha(rng, image_size, patch_size, width, layers, heads):
    """Every block's map against nn.MultiheadAttention(need_weights=True) inside open_clip's tower, in float64."""
    torch.manual_seed(int(rng.integers(2**31)))
    config = VisionConfig(image_size, patch_size, width, layers, heads, output_dim=8, quick_gelu=True)
    theirs = open_clip_tower(config)
    randomize(theirs, rng)
    ours = load_into_ours(theirs, config)
    theirs = theirs.double()
    images = rng.standard_normal((2, 3, image_size, image_size))
    with torch.no_grad():
        maps = ours.attention_maps(torch.from_numpy(images).float())  # (B, layers, H, N+1, N+1)
        inputs = block_inputs_of(theirs, torch.from_numpy(images))  # layers x (B, N+1, width), float64
        expected = torch.stack(
            [block.attn(x, x, x, need_weights=True, average_attn_weights=False)[1]
             for block, x in zip(theirs.transformer.resblocks, inputs)], dim=1
        )  # (B, layers, H, N+1, N+1)
    L = config.num_tokens
    assert maps.shape == (2, layers, heads, L, L)
    assert rel_err(maps, expected) < 1e-5
    assert torch.allclose(maps.double().sum(-1), torch.ones(2, layers, heads, L, dtype=torch.float64), atol=1e-6)
    # The pass that collects the maps is forward's pass: the embedding is unchanged.
    with torch.no_grad():
        assert rel_err(ours(torch.from_numpy(images).float()), theirs(torch.from_numpy(images))) < 1e-5


def test_attention_maps_reject_bad_images():
    model = VisionTransformer(VisionConfig(16, 4, 16, 1, 2, output_dim=8))
    with pytest.raises(ValueError, match=r"shape \(B, 3, 16, 16\)"):
        model.attention_maps(torch.zeros(1, 3, 8, 8))


def random_maps(rng, shape):
    """Row-stochastic random attention maps (B, layers, H, L, L), float64."""
    logits = 2.0 * rng.standard_normal(shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 5), (1, 1, 2, 7, 7), (3, 4, 1, 17, 17)])
def test_attention_rollout_matches_numpy_reference(rng, shape):
    maps = random_maps(rng, shape)
    out = attention_rollout(torch.from_numpy(maps).float())  # (B, L, L)
    expected = ref.attention_rollout(maps)
    assert rel_err(out, torch.from_numpy(expected)) < 1e-5
    assert torch.allclose(out.double().sum(-1), torch.ones(shape[0], shape[-1], dtype=torch.float64), atol=1e-5)


def test_attention_rollout_of_a_model(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = VisionTransformer(VisionConfig(16, 4, 16, 3, 2, output_dim=8)).eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.from_numpy(rng.standard_normal((2, 3, 16, 16))).float())
        out = attention_rollout(maps)
    assert rel_err(out, torch.from_numpy(ref.attention_rollout(maps.double().numpy()))) < 1e-5


@pytest.mark.parametrize("maps, match", [(torch.zeros(2, 3, 4, 5), "shape"), (torch.zeros(1, 1, 1, 4, 5), "shape"),
                                         (torch.zeros(1, 1, 1, 3, 3, dtype=torch.long), "floating-point")])
def test_attention_rollout_bad_input_raises(maps, match):
    with pytest.raises(ValueError, match=match):
        attention_rollout(maps)


# --------------------------------------------------------------------------- parameter count


@pytest.mark.parametrize(
    "config",
    [
        VisionConfig(),  # ViT-B/32
        VisionConfig(patch_size=16),  # ViT-B/16
        VisionConfig(patch_size=14, width=1024, layers=24, heads=16, output_dim=768),  # ViT-L/14
        VisionConfig(32, 8, 48, 3, 4, mlp_ratio=2.5, output_dim=20),  # hidden 120: not 4W
    ],
    ids=["B-32", "B-16", "L-14", "small"],
)
def test_vit_parameters_match_the_module(config):
    with torch.device("meta"):  # shapes only: no memory for ViT-L's 300M numbers
        model = VisionTransformer(config)
    counts = vit_parameters(config)
    assert counts["total"] == n_params(model)
    by_piece = {}
    for name, p in model.named_parameters():
        piece = "blocks" if name.startswith("transformer.") else name.split(".")[0]
        by_piece[piece] = by_piece.get(piece, 0) + p.numel()
    assert by_piece == {k: v for k, v in counts.items() if k != "total"}


def test_vit_b_32_has_12_w2_plus_13_w_per_block():
    W = 768
    assert vit_parameters(VisionConfig())["blocks"] == 12 * (12 * W * W + 13 * W)
