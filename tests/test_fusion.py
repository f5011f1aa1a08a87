"""tiny_mm.layers and tiny_mm.fusion: the blocks against PyTorch's own layers, the models' behaviour.

- `TransformerBlock` against ``nn.TransformerEncoderLayer(norm_first=True)``
  and `CrossAttentionBlock` against ``nn.MultiheadAttention`` + LayerNorms,
  with the same weights, in float64 (independent implementations).
- The three fusion models: output shapes, padding masks that really mask
  (padding content never changes the output), gradients reaching every
  parameter, one optimiser step that lowers the loss, and errors on bad input.
- The structural difference the chapter is about: in late fusion the text
  stream never depends on the image; in cross-modal fusion it does.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.numerics import torch_encoder_layer

from tiny_mm.fusion import CrossModalFusion, EarlyFusion, FusionConfig, LateFusion
from tiny_mm.layers import MLP, CrossAttentionBlock, TransformerBlock

MODELS = {"early": EarlyFusion, "late": LateFusion, "cross": CrossModalFusion}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite output"
    out, ref = out.detach(), ref.detach()
    return float((out - ref).norm() / ref.norm())


def seed_from(rng: np.random.Generator) -> None:
    torch.manual_seed(int(rng.integers(2**31)))


def randomise(module: nn.Module) -> nn.Module:
    """Every parameter (biases and LayerNorm gains included) random, so no term hides at 0 or 1."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


# --------------------------------------------------------------------------- layers


def test_mlp_names_and_shape(rng):
    seed_from(rng)
    mlp = MLP(6, 10)
    names = [name for name, _ in mlp.named_parameters()]
    assert names == ["c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"]
    x = torch.randn(2, 3, 6)
    ref = nn.functional.gelu(x @ mlp.c_fc.weight.T + mlp.c_fc.bias) @ mlp.c_proj.weight.T + mlp.c_proj.bias
    assert relative_error(mlp(x), ref) < 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_block_matches_torch_encoder_layer(rng, causal):
    seed_from(rng)
    d, h, b, n = 12, 3, 2, 7
    block = randomise(TransformerBlock(d, h, mlp_ratio=2.0, causal=causal)).double()
    ref = torch_encoder_layer(block)  # no dropout; the fast path is off for float64 / grad anyway
    x = torch.randn(b, n, d, dtype=torch.float64)
    lengths = torch.tensor([n, 4])
    padding = torch.arange(n)[None, :] >= lengths[:, None]  # (B, L): True = padding key
    causal_mask = torch.ones(n, n, dtype=torch.bool).triu(1) if causal else None  # True = hidden
    expected = ref(x, src_mask=causal_mask, src_key_padding_mask=padding, is_causal=causal)
    assert relative_error(block(x, kv_lengths=lengths), expected) < 1e-12
    assert relative_error(block(x), ref(x, src_mask=causal_mask, is_causal=causal)) < 1e-12


def test_transformer_block_names_follow_clip(rng):
    names = {name for name, _ in TransformerBlock(8, 2).named_parameters()}
    for prefix in ("ln_1.", "attn.", "ln_2.", "mlp.c_fc.", "mlp.c_proj."):
        assert any(name.startswith(prefix) for name in names), prefix


def test_cross_attention_block_matches_torch(rng):
    seed_from(rng)
    d, h, ctx, b, m, n = 8, 2, 5, 3, 4, 6
    block = randomise(CrossAttentionBlock(d, h, ctx, mlp_ratio=3.0)).double()
    ref = nn.MultiheadAttention(d, h, kdim=ctx, vdim=ctx, batch_first=True).double()  # separate q/k/v weights
    a = block.cross_attn
    with torch.no_grad():
        ref.q_proj_weight.copy_(a.q_proj.weight)
        ref.k_proj_weight.copy_(a.k_proj.weight)
        ref.v_proj_weight.copy_(a.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.out_proj.load_state_dict(a.out_proj.state_dict())
    x = torch.randn(b, m, d, dtype=torch.float64)
    context = torch.randn(b, n, ctx, dtype=torch.float64)
    lengths = torch.tensor([n, 2, 5])
    padding = torch.arange(n)[None, :] >= lengths[:, None]  # (B, Lk)

    kv = nn.functional.layer_norm(context, (ctx,), block.ln_kv.weight, block.ln_kv.bias)
    q = nn.functional.layer_norm(x, (d,), block.ln_q.weight, block.ln_q.bias)
    y = x + ref(q, kv, kv, key_padding_mask=padding, need_weights=False)[0]
    h2 = nn.functional.layer_norm(y, (d,), block.ln_2.weight, block.ln_2.bias)
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    expected = y + nn.functional.gelu(h2 @ fc.weight.T + fc.bias) @ proj.weight.T + proj.bias
    assert relative_error(block(x, context, context_lengths=lengths), expected) < 1e-12


def test_layers_reject_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        TransformerBlock(10, 3)
    with pytest.raises(ValueError, match="shape"):
        TransformerBlock(8, 2)(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="context"):
        CrossAttentionBlock(8, 2, 5)(torch.randn(2, 3, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="batch"):
        CrossAttentionBlock(8, 2)(torch.randn(2, 3, 8), torch.randn(3, 4, 8))


# --------------------------------------------------------------------------- fusion models


def make(strategy: str, rng, num_classes: int | None = 3, **sizes) -> tuple[nn.Module, FusionConfig]:
    seed_from(rng)
    sizes = {"layers": 2, "width": 16, "heads": 4, "mlp_ratio": 2.0, **sizes}
    config = FusionConfig(**sizes, num_classes=num_classes)
    return MODELS[strategy](config), config


@pytest.mark.parametrize("strategy", list(MODELS))
@pytest.mark.parametrize("num_classes", [None, 5])
def test_output_shapes(rng, strategy, num_classes):
    model, config = make(strategy, rng, num_classes)
    image, text = torch.randn(3, 7, 16), torch.randn(3, 4, 16)
    out = model(image, text)
    assert out.shape == (3, num_classes or config.width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("strategy", list(MODELS))
def test_text_padding_is_masked(rng, strategy):
    # Example b has text_lengths[b] real text tokens; whatever sits in the padding
    # must not change its output, while changing a real token must.
    model, _ = make(strategy, rng)
    image, text = torch.randn(3, 5, 16), torch.randn(3, 6, 16)
    lengths = torch.tensor([6, 2, 4])
    out = model(image, text, lengths)
    noisy = text.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = 100 * torch.randn(6 - n, 16)
    assert relative_error(model(image, noisy, lengths), out) < 1e-5
    changed = text.clone()
    changed[1, 0] += torch.randn(16)  # a real token of example 1 (a constant shift: LayerNorm removes it)
    moved = (model(image, changed, lengths) - out).abs().sum(dim=-1)  # (B,)
    assert moved[1] > 1e-3 and moved[0] < 1e-6 and moved[2] < 1e-6
    # All lengths full is the same as no lengths.
    assert relative_error(model(image, text, torch.full((3,), 6)), model(image, text)) < 1e-6


@pytest.mark.parametrize("strategy", list(MODELS))
def test_gradients_reach_every_parameter(rng, strategy):
    model, _ = make(strategy, rng)
    image, text = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    model(image, text, torch.tensor([3, 2])).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("strategy", list(MODELS))
def test_one_training_step_lowers_the_loss(rng, strategy):
    model, _ = make(strategy, rng)
    image, text = torch.randn(8, 5, 16), torch.randn(8, 3, 16)
    labels = torch.from_numpy(rng.integers(0, 3, size=8))
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss = nn.functional.cross_entropy(model(image, text), labels)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(image, text), labels)
    assert after < loss.detach()


@pytest.mark.parametrize("strategy", list(MODELS))
def test_models_add_no_positions(rng, strategy):
    # None of the models adds position information (the caller puts it in the tokens):
    # attention and mean pooling treat the image tokens as a set, so a shuffle of them
    # cannot change the output. A toy task that depends on where things are must
    # therefore encode positions in its tokens.
    model, _ = make(strategy, rng, num_classes=None)
    image, text = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    shuffled = image[:, torch.from_numpy(rng.permutation(6))]
    assert relative_error(model(shuffled, text), model(image, text)) < 1e-5


def test_late_fusion_text_features_ignore_the_image(rng):
    # The defining property of late fusion: the text encoder's output does not depend on
    # the image at all; in cross-modal fusion it does (through every cross block).
    late, _ = make("late", rng, num_classes=None)
    cross, _ = make("cross", rng, num_classes=None)
    image, other, text = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 3, 16)

    def text_stream(model, image):
        out = text
        if isinstance(model, LateFusion):
            for block in model.text_blocks:
                out = block(out)
            return out
        for block in model.image_blocks:
            image = block(image)
        for self_block, cross_block in zip(model.text_blocks, model.cross_blocks):
            out = cross_block(self_block(out), image)
        return out

    assert torch.equal(text_stream(late, image), text_stream(late, other))
    assert relative_error(text_stream(cross, image), text_stream(cross, other)) > 1e-3


@pytest.mark.parametrize("strategy", list(MODELS))
def test_models_reject_bad_input(rng, strategy):
    model, _ = make(strategy, rng)
    image, text = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="image"):
        model(torch.randn(2, 5, 8), text)
    with pytest.raises(ValueError, match="batch"):
        model(image, torch.randn(3, 3, 16))
    with pytest.raises(ValueError, match="text_lengths"):
        model(image, text, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="text_lengths"):
        model(image, text, torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="text_lengths"):
        model(image, text, torch.tensor([3]))


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        FusionConfig(width=10, heads=3)
    with pytest.raises(ValueError, match="layers"):
        FusionConfig(layers=0)
    with pytest.raises(ValueError, match="num_classes"):
        FusionConfig(num_classes=0)
