"""tiny_mm.captioning against chapter 6's NumPy reference, torch's own modules, and itself without a cache.

- a DecoderLayer in float32 equals the float64 reference with the same weights
  (output and cross-attention probabilities), and equals the same layer written
  with chapter 2's `MultiHeadAttention.forward` (causal self-attention, plain
  cross-attention);
- caption_loss and its gradient equal the reference's masked cross-entropy and
  hand-derived gradient; padding counts for nothing;
- generation with the key/value cache equals generation without it, greedy and
  sampled; sampling follows softmax(logits / T); the cross-attention maps it
  records are the ones a teacher-forced pass over the generated words computes;
- the patch encoder's convolution is "cut into patches, flatten, one Linear";
- bad input raises ValueError naming the problem.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chapters.ch06_captioning.reference as ref
from tests.numerics import rel_err
from tiny_mm.captioning import (
    Captioner,
    CaptionerConfig,
    DecoderLayer,
    caption_loss,
    generate,
    teacher_forcing,
)
from tiny_mm.data.words import BOS, EOS, PAD

SMALL = CaptionerConfig(image_size=16, patch_size=4, width=16, heads=2, encoder_layers=1, decoder_layers=2,
                        vocab_size=12, max_len=9)


def seeded(rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def randomize(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.4) -> None:
    """Fresh values in every parameter, LayerNorm gains and biases included (a fresh init has 1 and 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * (scale if p.dim() > 1 else 0.5))


def small_model(rng, dtype=torch.float32, scale: float = 0.4) -> Captioner:
    torch.manual_seed(int(rng.integers(2**31)))
    model = Captioner(SMALL).to(dtype).eval()
    randomize(model, seeded(rng), scale)
    return model


# --------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("width, heads, length, patches", [(32, 4, 9, 16), (24, 3, 1, 4), (16, 1, 6, 25)])
def test_decoder_layer_equals_numpy_reference(rng, width, heads, length, patches):
    layer = DecoderLayer(width, heads)
    randomize(layer, seeded(rng), scale=width**-0.5)
    x = torch.from_numpy(rng.standard_normal((3, length, width))).float()
    image = torch.from_numpy(rng.standard_normal((3, patches, width))).float()
    with torch.no_grad():
        out, probs = layer(x, image)  # float32
    params = {k: v.double().numpy() for k, v in layer.state_dict().items()}
    ref_out, ref_probs = ref.decoder_layer(x.double().numpy(), image.double().numpy(), params, heads)
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(probs, ref_probs) < 1e-5


def test_decoder_layer_equals_multi_head_attention_modules(rng):
    """The written-out attention of DecoderLayer = chapter 2's MultiHeadAttention.forward on the same weights."""
    layer = DecoderLayer(32, 4).double()
    randomize(layer, seeded(rng), scale=0.2)
    x = torch.from_numpy(rng.standard_normal((2, 7, 32)))
    image = torch.from_numpy(rng.standard_normal((2, 10, 32)))
    with torch.no_grad():
        out, probs = layer(x, image)
        y = x + layer.self_attn(layer.ln_1(x), causal=True)
        expected_probs = layer.cross_attn.attention_probs(layer.ln_2(y), image)
        y = y + layer.cross_attn(layer.ln_2(y), image)
        y = y + layer.mlp(layer.ln_3(y))
    assert rel_err(out, y) < 1e-12
    assert rel_err(probs, expected_probs) < 1e-12


def test_decoder_is_causal(rng):
    """Logits at position t do not depend on the words after t."""
    model = small_model(rng, torch.float64)
    images = torch.from_numpy(rng.standard_normal((2, 3, 16, 16)))
    ids = torch.from_numpy(rng.integers(0, SMALL.vocab_size, size=(2, 8)))
    changed = ids.clone()
    changed[:, 5:] = (ids[:, 5:] + 1) % SMALL.vocab_size
    with torch.no_grad():
        a, b = model(images, ids), model(images, changed)
    assert torch.equal(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-6


# --------------------------------------------------------------------------- the loss


def test_caption_loss_and_gradient_equal_reference(rng):
    logits = rng.standard_normal((4, 10, 45)) * 2
    ids = np.zeros((4, 11), dtype=np.int64)
    for b, n in enumerate(rng.integers(3, 12, size=4)):  # <bos> words <eos> <pad>...
        ids[b, :n] = [BOS, *rng.integers(4, 45, size=n - 2), EOS]
    inputs, targets = teacher_forcing(torch.from_numpy(ids))
    x = torch.from_numpy(logits).float().requires_grad_()
    loss = caption_loss(x, targets)
    loss.backward()
    ref_inputs, ref_targets = ref.teacher_forcing(ids)
    np.testing.assert_array_equal(inputs.numpy(), ref_inputs)
    np.testing.assert_array_equal(targets.numpy(), ref_targets)
    expected = ref.masked_cross_entropy(logits, ref_targets, pad=PAD)
    assert abs(float(loss.detach()) - expected) / expected < 1e-6
    assert rel_err(x.grad, ref.masked_cross_entropy_grad(logits, ref_targets, pad=PAD)) < 1e-5
    assert torch.all(x.grad[targets == PAD] == 0)


def test_caption_loss_refuses_bad_input():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="every target is padding"):
        caption_loss(logits, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        caption_loss(logits, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="int64 or int32"):
        caption_loss(logits, torch.ones(2, 3))
    with pytest.raises(ValueError, match="logits must have shape"):
        caption_loss(logits[0], torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 2"):
        teacher_forcing(torch.ones(2, 1, dtype=torch.long))


def test_training_gradient_reaches_every_parameter(rng):
    model = Captioner(SMALL)
    images = torch.randn(3, 3, 16, 16)
    inputs, targets = teacher_forcing(torch.from_numpy(rng.integers(3, 12, size=(3, 6))))
    caption_loss(model(images, inputs), targets).backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
              or p.grad.abs().sum() == 0]
    assert silent == []


# --------------------------------------------------------------------------- generation


def test_greedy_with_cache_equals_without(rng):
    model = small_model(rng, torch.float32)
    images = torch.from_numpy(rng.standard_normal((5, 3, 16, 16))).float()
    fast = generate(model, images, use_cache=True)
    slow = generate(model, images, use_cache=False)
    assert torch.equal(fast.tokens, slow.tokens)
    assert rel_err(fast.logits, slow.logits) < 1e-5
    assert rel_err(fast.cross_attention, slow.cross_attention) < 1e-5
    assert fast.tokens.shape[1] == fast.logits.shape[1] + 1 <= SMALL.max_len


def test_sampling_with_cache_equals_without(rng):
    """Same random numbers in, same words out: float64 keeps the two paths' logits 1e-15 apart."""
    model = small_model(rng, torch.float64, scale=0.2)
    images = torch.from_numpy(rng.standard_normal((6, 3, 16, 16)))
    seed = int(rng.integers(2**31))
    runs = [generate(model, images, temperature=1.3, generator=torch.Generator().manual_seed(seed), use_cache=c)
            for c in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert rel_err(runs[0].logits, runs[1].logits) < 1e-12


def test_sampling_follows_softmax_over_temperature(rng):
    """4000 first words drawn at T = 0.7: their frequencies match softmax(logits / 0.7) within sampling noise."""
    model = small_model(rng, torch.float64, scale=0.15)
    image = torch.from_numpy(rng.standard_normal((1, 3, 16, 16)))
    images = image.expand(4000, -1, -1, -1)
    out = generate(model, images, temperature=0.7, max_new_tokens=1, generator=seeded(rng))
    probs = torch.softmax(out.logits[0, 0] / 0.7, dim=-1).numpy()  # (V,)
    counts = np.bincount(out.tokens[:, 1].numpy(), minlength=SMALL.vocab_size) / 4000
    sigma = np.sqrt(probs * (1 - probs) / 4000)
    assert np.all(np.abs(counts - probs) <= 5 * sigma + 1e-3), (counts, probs)
    assert (probs > 0.02).sum() >= 2  # the test means something only if the draw is not one-hot


def test_greedy_picks_the_argmax_and_pads_after_eos(rng):
    model = small_model(rng, torch.float32)
    # Make <eos> likely so some captions end early: raise its output weight along the final-norm bias.
    with torch.no_grad():
        model.decoder.head.weight[EOS] = 3.0 * model.decoder.ln_final.bias / model.decoder.ln_final.bias.norm()
    images = torch.from_numpy(rng.standard_normal((8, 3, 16, 16))).float()
    out = generate(model, images)
    chosen = out.tokens[:, 1:]  # (B, S)
    assert torch.all(out.tokens[:, 0] == BOS)
    for b in range(8):
        ended = (chosen[b] == EOS).nonzero()
        stop = int(ended[0]) if len(ended) else chosen.shape[1]
        assert torch.equal(chosen[b, : stop + 1][: out.logits.shape[1]], out.logits[b, : stop + 1].argmax(-1))
        assert torch.all(chosen[b, stop + 1 :] == PAD)
    assert (chosen == EOS).any()


def test_recorded_cross_attention_is_the_teacher_forced_one(rng):
    """Map s of a generation = the cross-attention at position s when the generated words are fed back."""
    model = small_model(rng, torch.float64)
    images = torch.from_numpy(rng.standard_normal((3, 3, 16, 16)))
    out = generate(model, images, max_new_tokens=6)
    with torch.no_grad():
        _, maps = model.decoder(out.tokens[:, :-1], model.encode(images))  # (B, layers, h, S, N)
    expected = maps.permute(0, 3, 1, 2, 4)  # (B, S, layers, h, N)
    assert out.cross_attention.shape == (3, 6, SMALL.decoder_layers, SMALL.heads, SMALL.num_patches)
    assert rel_err(out.cross_attention, expected) < 1e-12
    assert torch.allclose(out.cross_attention.sum(-1), torch.ones(()).double())


def test_generate_refuses_bad_arguments(rng):
    model = small_model(rng)
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, images, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, images, max_new_tokens=SMALL.max_len)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 16, 16\)"):
        generate(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="word ids must lie"):
        model(images, torch.full((2, 3), SMALL.vocab_size))
    with pytest.raises(ValueError, match="exceed the decoder's 9 positions"):
        model(images, torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="int64 or int32"):
        model(images, torch.ones(2, 3))
    with pytest.raises(ValueError, match="one batch size"):
        model.decoder(torch.ones(3, 2, dtype=torch.long), model.encode(images))
    layer = model.decoder.layers[0]
    with pytest.raises(ValueError, match=r"image must be a floating-point tensor \(B, L, 16\)"):
        layer(torch.randn(2, 3, 16), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="x and image need one batch size"):
        layer(torch.randn(2, 3, 16), torch.randn(1, 4, 16))


# --------------------------------------------------------------------------- the encoder


def test_patch_embedding_is_cut_flatten_linear(rng):
    """The strided convolution = cut (B, C, S, S) into P x P patches, flatten each (C, P, P), one Linear.

    Flattening needs the patch axes in front of the channel axis: unfolding then
    viewing (B, C, n, n, P, P) straight as (B, -1, C P P) would glue pieces of
    three different patches of one channel into each "patch" (the source's recipe).
    """
    model = small_model(rng)
    conv = model.encoder.patch_embed
    P, n = SMALL.patch_size, SMALL.grid_size
    images = torch.from_numpy(rng.standard_normal((2, 3, 16, 16))).float()
    pieces = images.unfold(2, P, P).unfold(3, P, P)  # (B, C, n, n, P, P)
    patches = pieces.permute(0, 2, 3, 1, 4, 5).reshape(2, n * n, 3 * P * P)  # (B, N, C P P)
    expected = patches @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias  # (B, N, d)
    with torch.no_grad():
        ours = conv(images).flatten(2).transpose(1, 2)  # (B, N, d)
    assert rel_err(ours, expected) < 1e-6
    glued = pieces.contiguous().view(2, -1, 3 * P * P)  # no permute: not patches
    wrong = glued @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias
    assert rel_err(wrong, expected) > 0.1


def test_config_refuses_bad_sizes():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CaptionerConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="divisible by heads"):
        CaptionerConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="decoder_layers must be a positive int"):
        CaptionerConfig(decoder_layers=0)
    with pytest.raises(ValueError, match="config must be a CaptionerConfig"):
        Captioner({"width": 64})
