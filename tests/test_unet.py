"""`tiny_mm.unet`: the U-Net's pieces and the whole network against chapter 11's NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch11_text_to_image.reference as ref
from tests.numerics import float64_weights, randomize, rel_err
from tiny_mm.data.words import BOS, EOS, PAD
from tiny_mm.denoiser import Caption, patchify
from tiny_mm.diffusion import NoiseSchedule
from tiny_mm.unet import CrossAttentionBlock, ResBlock, TextUNet, UNetConfig, load_unet, save_unet

SMALL = UNetConfig(text_vocab=20, text_len=7, image_size=8, patch=2, channels=8, groups=4, heads=2,
                   text_width=6, text_layers=1)  # one text block, so its weights are exercised too


def small_model(rng, dtype=torch.float64) -> TextUNet:
    model = TextUNet(SMALL).to(dtype)
    randomize(model, rng, 0.3)  # every weight random: the zero-initialised convolutions too
    return model.eval()


def random_inputs(rng, batch: int, dtype=torch.float64):
    z = torch.as_tensor(rng.standard_normal((batch, SMALL.num_tokens, SMALL.token_dim)), dtype=dtype)
    t = torch.as_tensor(rng.integers(0, 1000, batch))
    lengths = torch.as_tensor(rng.integers(2, SMALL.text_len + 1, batch))
    ids = torch.as_tensor(rng.integers(4, SMALL.text_vocab, (batch, SMALL.text_len)))
    ids[:, 0] = BOS
    for b, n in enumerate(lengths.tolist()):
        ids[b, n - 1] = EOS
        ids[b, n:] = PAD
    return z, t, Caption(ids, lengths)


def prefixed(weights: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def test_conv2d_and_group_norm_references_agree_with_torch(rng):
    # The reference's own pieces, checked once against torch's kernels so the tests below rest on them.
    x = rng.standard_normal((2, 6, 7, 5))
    w, b = rng.standard_normal((4, 6, 3, 3)), rng.standard_normal(4)
    for stride, padding in ((1, 1), (2, 1), (1, 0)):
        expected = F.conv2d(torch.as_tensor(x), torch.as_tensor(w), torch.as_tensor(b), stride=stride, padding=padding)
        assert rel_err(expected, ref.conv2d(x, w, b, stride, padding)) < 1e-12
    gain, bias = rng.standard_normal(6), rng.standard_normal(6)
    expected = F.group_norm(torch.as_tensor(x), 3, torch.as_tensor(gain), torch.as_tensor(bias))
    assert rel_err(expected, ref.group_norm(x, 3, gain, bias)) < 1e-12


@pytest.mark.parametrize("c_in, c_out", [(8, 8), (8, 12)])
def test_res_block_matches_reference(rng, c_in, c_out):
    block = ResBlock(c_in, c_out, emb_dim=10, groups=4).double()
    randomize(block, rng, 0.3)
    x, emb = torch.as_tensor(rng.standard_normal((3, c_in, 6, 6))), torch.as_tensor(rng.standard_normal((3, 10)))
    with torch.no_grad():
        out = block(x, emb)
    assert out.shape == (3, c_out, 6, 6)
    assert rel_err(out, ref.res_block(x.numpy(), emb.numpy(), float64_weights(block), groups=4)) < 1e-10


def test_a_fresh_res_block_is_its_skip_path(rng):
    block = ResBlock(8, 8, emb_dim=10, groups=4)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 10)), x)


def test_cross_attention_block_matches_reference_and_ignores_padding(rng):
    block = CrossAttentionBlock(8, 2, 6).double()
    randomize(block, rng, 0.3)
    x, text = torch.as_tensor(rng.standard_normal((3, 16, 8))), torch.as_tensor(rng.standard_normal((3, 5, 6)))
    lengths = torch.tensor([1, 5, 3])
    with torch.no_grad():
        out = block(x, text, lengths)
        garbage = text.clone()
        garbage[0, 1:], garbage[2, 3:] = 1e3, -1e3  # positions past each caption's length
        assert torch.equal(block(x, garbage, lengths), out)
    expected = ref.cross_attention_block(x.numpy(), text.numpy(), lengths.numpy(), float64_weights(block), 2)
    assert rel_err(out, expected) < 1e-10


def test_whole_unet_matches_reference_composition(rng):
    # The forward pass composed from the reference's pieces and the module's float64 weights.
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 3)
    with torch.no_grad():
        out = model(z, t, caption)
        text = model.text_encoder(caption).numpy()  # the text tower: TransformerBlock, tested in chapter 2
    w, g, heads, lengths = float64_weights(model), SMALL.groups, SMALL.heads, caption.lengths.numpy()
    real = (np.arange(SMALL.text_len)[None] < lengths[:, None])[..., None]
    pooled = (text * real).sum(1) / real.sum(1)
    emb = ref.timestep_embedding(t.numpy(), SMALL.channels) @ w["time_mlp.0.weight"].T + w["time_mlp.0.bias"]
    emb = emb / (1 + np.exp(-emb)) @ w["time_mlp.2.weight"].T + w["time_mlp.2.bias"]
    emb = emb + pooled @ w["text_pool_proj.weight"].T + w["text_pool_proj.bias"]

    def res(name, x):
        return ref.res_block(x, emb, prefixed(w, name + "."), g)

    def on_grid(block, name, x):
        B, C, H, W = x.shape
        tokens = x.reshape(B, C, H * W).transpose(0, 2, 1)
        tokens = block(tokens, text, lengths, prefixed(w, name + "."), heads)
        return tokens.transpose(0, 2, 1).reshape(B, C, H, W)

    def up(x):
        return x.repeat(2, axis=2).repeat(2, axis=3)  # nearest-neighbour upsampling

    S, p = SMALL.image_size, SMALL.patch
    image = z.numpy().reshape(3, S // p, S // p, 3, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(3, 3, S, S)
    grid = np.linspace(-1, 1, S)
    image = np.concatenate([image, np.broadcast_to(grid[:, None], (3, 1, S, S)),
                            np.broadcast_to(grid[None, :], (3, 1, S, S))], axis=1)  # the row and column planes
    h0 = res("down_0", ref.conv2d(image, w["conv_in.weight"], w["conv_in.bias"], padding=1))
    h1 = ref.conv2d(h0, w["downsample_1.weight"], w["downsample_1.bias"], stride=2, padding=1)
    h1 = on_grid(ref.cross_attention_block, "down_1_attn", res("down_1", h1))
    h2 = ref.conv2d(h1, w["downsample_2.weight"], w["downsample_2.bias"], stride=2, padding=1)
    h2 = on_grid(ref.denoiser_block, "down_2_attn", res("down_2", h2))
    m = res("mid_2", on_grid(ref.denoiser_block, "mid_attn", res("mid_1", h2)))
    u = up(on_grid(ref.denoiser_block, "up_2_attn", res("up_2", np.concatenate([m, h2], 1))))
    u = up(on_grid(ref.cross_attention_block, "up_1_attn", res("up_1", np.concatenate([u, h1], 1))))
    u = res("up_0", np.concatenate([u, h0], 1))
    u = ref.group_norm(u, g, w["norm_out.weight"], w["norm_out.bias"])
    u = ref.conv2d(u / (1 + np.exp(-u)), w["conv_out.weight"], w["conv_out.bias"], padding=1)
    assert rel_err(out, patchify(torch.as_tensor(u), p)) < 1e-10


def test_float32_matches_float64(rng):
    model64 = small_model(rng)
    model32 = TextUNet(SMALL)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    z, t, caption = random_inputs(rng, 2)
    with torch.no_grad():
        assert rel_err(model32.eval()(z.float(), t, caption), model64(z, t, caption)) < 1e-5


def test_the_unet_reads_the_caption_and_none_means_the_empty_one(rng):
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 2)
    other = Caption(caption.ids.flip(0), caption.lengths.flip(0))
    with torch.no_grad():
        assert not torch.allclose(model(z, t, caption), model(z, t, other))
        empty = Caption(torch.full_like(caption.ids, PAD), torch.full_like(caption.lengths, 2))
        empty.ids[:, 0], empty.ids[:, 1] = BOS, EOS
        assert torch.equal(model(z, t, None), model(z, t, empty))


def test_a_fresh_unet_predicts_zero_and_gradients_reach_every_weight(rng):
    model = TextUNet(SMALL)
    z, t, caption = random_inputs(rng, 2, torch.float32)
    assert torch.equal(model(z, t, caption), torch.zeros_like(z))
    randomize(model, rng, 0.3)
    model(z, t, caption).square().sum().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_v_and_eps_outputs(rng):
    schedule = NoiseSchedule(50, "cosine")
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 2)
    t = t % 50
    a = schedule.alphas_cumprod[t][:, None, None]
    with torch.no_grad():
        out = model(z, t, caption)
        assert rel_err(model.eps(schedule)(z, t, caption), (1 - a).sqrt() * z + a.sqrt() * out) < 1e-12


def test_bad_inputs_and_configs_say_what_is_wrong(rng):
    model = TextUNet(SMALL)
    z, t, caption = random_inputs(rng, 2, torch.float32)
    with pytest.raises(ValueError, match=r"z_t must have shape \(B, 16, 12\)"):
        model(z[:, :5], t, caption)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(z, t[:1], caption)
    with pytest.raises(ValueError, match="caption ids"):
        model(z, t, Caption(caption.ids[:, :3], caption.lengths))
    with pytest.raises(ValueError, match="divisible by groups"):
        UNetConfig(channels=12, groups=8)
    with pytest.raises(ValueError, match="divisible by 4"):
        UNetConfig(image_size=30, patch=5)
    with pytest.raises(ValueError, match="prediction"):
        UNetConfig(prediction="x0")
    with pytest.raises(ValueError, match="text_layers"):
        UNetConfig(text_layers=-1)
    with pytest.raises(ValueError, match="UNetConfig"):
        TextUNet(object())


def test_save_and_load_round_trip(rng, tmp_path):
    model = small_model(rng, torch.float32)
    save_unet(model, tmp_path / "unet.pt")
    loaded = load_unet(tmp_path / "unet.pt")
    assert loaded.config == SMALL
    z, t, caption = random_inputs(rng, 2, torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(z, t, caption), model(z, t, caption))


def test_with_no_text_layers_each_word_is_its_embedding_and_position(rng):
    # The default U-Net reads the words themselves: LayerNorm(word embedding + position embedding).
    model = TextUNet(UNetConfig(text_vocab=20, text_len=7, image_size=8, patch=2, channels=8, groups=4,
                                heads=2, text_width=6))
    assert len(model.text_encoder.blocks) == 0
    _, _, caption = random_inputs(rng, 3, torch.float32)
    enc = model.text_encoder
    expected = F.layer_norm(enc.embedding.weight[caption.ids] + enc.positional_embedding, (6,),
                            enc.ln_final.weight, enc.ln_final.bias)
    with torch.no_grad():
        assert rel_err(enc(caption), expected) < 1e-6
    # unit-scale words, 50 times the positions: the words stay apart as cross-attention's keys
    assert 0.8 < float(enc.embedding.weight.detach().std()) < 1.2
