"""`tiny_mm.denoiser`: the denoiser against chapter 11's NumPy reference, what it reads, guidance's empty prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch11_text_to_image.reference as ref
from tests.numerics import float64_weights, randomize, rel_err
from tiny_mm.data.words import BOS, EOS, PAD
from tiny_mm.denoiser import (
    Caption,
    DenoiserConfig,
    TextDenoiser,
    TokenScaler,
    caption_dropout,
    empty_captions,
    load_denoiser,
    save_denoiser,
    timestep_embedding,
)

SMALL = DenoiserConfig(text_vocab=20, text_len=7, token_dim=5, num_tokens=9, width=16, layers=2, heads=4,
                       text_width=12, text_layers=1)


def small_model(rng, dtype=torch.float64) -> TextDenoiser:
    model = TextDenoiser(SMALL).to(dtype)
    randomize(model, rng, 0.3)  # every weight random: the zero-initialised output layer too
    return model.eval()


def random_inputs(rng, batch: int, config: DenoiserConfig = SMALL, dtype=torch.float64):
    z = torch.as_tensor(rng.standard_normal((batch, config.num_tokens, config.token_dim)), dtype=dtype)
    t = torch.as_tensor(rng.integers(0, 1000, batch))
    lengths = torch.as_tensor(rng.integers(2, config.text_len + 1, batch))
    ids = torch.as_tensor(rng.integers(4, config.text_vocab, (batch, config.text_len)))
    ids[:, 0] = BOS
    for b, n in enumerate(lengths.tolist()):
        ids[b, n - 1] = EOS
        ids[b, n:] = PAD
    return z, t, Caption(ids, lengths)


def test_timestep_embedding_matches_reference(rng):
    t = torch.as_tensor(rng.integers(0, 1000, 11))
    for dim in (2, 16, 30):
        out = timestep_embedding(t, dim)
        assert out.shape == (11, dim) and out.dtype == torch.float32
        assert rel_err(out, ref.timestep_embedding(t.numpy(), dim)) < 1e-5
    with pytest.raises(ValueError, match="even"):
        timestep_embedding(t, 7)


def test_block_matches_numpy_reference(rng):
    model = small_model(rng)
    block = model.blocks[0]
    x = torch.as_tensor(rng.standard_normal((3, SMALL.num_tokens, SMALL.width)))
    text = torch.as_tensor(rng.standard_normal((3, SMALL.text_len, SMALL.text_width)))
    lengths = torch.tensor([2, SMALL.text_len, 4])
    with torch.no_grad():
        out = block(x, text, lengths)
    expected = ref.denoiser_block(x.numpy(), text.numpy(), lengths.numpy(), float64_weights(block), SMALL.heads)
    assert rel_err(out, expected) < 1e-10


def test_whole_denoiser_matches_reference_composition(rng):
    # The model's forward composed from the reference's pieces and the module's float64 weights.
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 4)
    with torch.no_grad():
        out = model(z, t, caption)
        text = model.text_encoder(caption).numpy()  # the text tower: TransformerBlock, tested in chapter 2
    w = float64_weights(model)
    time = ref.timestep_embedding(t.numpy(), SMALL.width) @ w["time_mlp.0.weight"].T + w["time_mlp.0.bias"]
    time = time / (1 + np.exp(-time))  # SiLU
    time = time @ w["time_mlp.2.weight"].T + w["time_mlp.2.bias"]  # (B, d)
    x = z.numpy() @ w["input_proj.weight"].T + w["input_proj.bias"] + w["positional_embedding"] + time[:, None]
    for i in range(SMALL.layers):
        prefix = f"blocks.{i}."
        params = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
        x = ref.denoiser_block(x, text, caption.lengths.numpy(), params, SMALL.heads)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mean) / np.sqrt(var + 1e-5) * w["ln_final.weight"] + w["ln_final.bias"]
    expected = x @ w["output_proj.weight"].T + w["output_proj.bias"]
    assert rel_err(out, expected) < 1e-10


def test_float32_matches_float64(rng):
    model64 = small_model(rng)
    model32 = TextDenoiser(SMALL)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    z, t, caption = random_inputs(rng, 3)
    with torch.no_grad():
        assert rel_err(model32.eval()(z.float(), t, caption), model64(z, t, caption)) < 1e-5


def test_the_denoiser_reads_the_words_and_never_the_padding(rng):
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 2)
    caption = Caption(caption.ids, torch.tensor([3, 5]))
    with torch.no_grad():
        base = model(z, t, caption)
        padded = caption.ids.clone()
        padded[:, 5:] = torch.as_tensor(rng.integers(4, SMALL.text_len, (2, 2)))  # past both lengths
        assert torch.equal(model(z, t, Caption(padded, caption.lengths)), base)
        changed = caption.ids.clone()
        changed[0, 1] = 4 if changed[0, 1] != 4 else 5  # a real word of caption 0
        moved = model(z, t, Caption(changed, caption.lengths))
    assert not torch.allclose(moved[0], base[0])
    assert torch.equal(moved[1], base[1])  # the other caption's image is untouched


def test_every_latent_token_reads_every_other(rng):
    # Not causal, not local: a change in the last token reaches the first.
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 1)
    nudged = z.clone()
    nudged[0, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(nudged, t, caption)[0, 0], model(z, t, caption)[0, 0])


def test_the_step_matters(rng):
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 2)
    with torch.no_grad():
        assert not torch.allclose(model(z, t, caption), model(z, t + 1, caption))


def test_none_is_the_empty_prompt(rng):
    model = small_model(rng)
    z, t, _ = random_inputs(rng, 3)
    empty = empty_captions(3, SMALL.text_len)
    assert empty.ids[:, :2].tolist() == [[BOS, EOS]] * 3 and (empty.ids[:, 2:] == PAD).all()
    assert empty.lengths.tolist() == [2, 2, 2]
    with torch.no_grad():
        assert torch.equal(model(z, t, None), model(z, t, empty))


def test_a_fresh_denoiser_predicts_zero_noise(rng):
    # The output layer starts at zero (the first sampling steps then change nothing wildly).
    z, t, caption = random_inputs(rng, 2, dtype=torch.float32)
    assert torch.equal(TextDenoiser(SMALL)(z, t, caption), torch.zeros_like(z))


def test_caption_dropout(rng):
    _, _, caption = random_inputs(rng, 400)
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    assert caption_dropout(caption, 0.0, g).ids.equal(caption.ids)
    all_empty = caption_dropout(caption, 1.0, g)
    assert all_empty.ids.equal(empty_captions(400, SMALL.text_len).ids) and (all_empty.lengths == 2).all()
    some = caption_dropout(caption, 0.25, g)
    dropped = (some.lengths == 2) & (caption.lengths != 2)
    kept = ~(some.ids == empty_captions(400, SMALL.text_len).ids).all(dim=1)
    assert torch.equal(some.ids[kept], caption.ids[kept]) and torch.equal(some.lengths[kept], caption.lengths[kept])
    rate = float(dropped.sum()) / float((caption.lengths != 2).sum())
    assert 0.17 < rate < 0.33  # 0.25 +- about 3.5 standard errors
    with pytest.raises(ValueError, match="p must"):
        caption_dropout(caption, 1.5, g)


def test_latent_scaler(rng):
    latents = torch.as_tensor(rng.standard_normal((50, 9, 5)) * rng.uniform(0.1, 3, 5) + rng.uniform(-2, 2, 5))
    scaler = TokenScaler(5).double().fit(latents)
    flat = latents.numpy().reshape(-1, 5)
    assert rel_err(scaler.mean, flat.mean(0)) < 1e-12
    assert rel_err(scaler.std, flat.std(0, ddof=1)) < 1e-12
    scaled = scaler.scale(latents)
    assert rel_err(scaled.reshape(-1, 5).std(0), np.ones(5)) < 1e-12
    assert rel_err(scaler.unscale(scaled), latents) < 1e-12
    with pytest.raises(ValueError, match="latents must have shape"):
        scaler.fit(latents[..., :4])


def test_a_few_steps_learn_to_denoise_a_tiny_batch(rng, one_thread):
    torch.manual_seed(int(rng.integers(2**31)))
    model = TextDenoiser(SMALL)
    z, t, caption = random_inputs(rng, 8, dtype=torch.float32)
    noise = torch.randn_like(z)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(z, t, caption), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_save_and_load_round_trip(rng, tmp_path):
    model = small_model(rng, torch.float32)
    model.scaler.fit(torch.as_tensor(rng.standard_normal((4, 9, 5)), dtype=torch.float32) * 3 + 1)
    save_denoiser(model, tmp_path / "denoiser.pt")
    again = load_denoiser(tmp_path / "denoiser.pt")
    z, t, caption = random_inputs(rng, 2, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(z, t, caption), model(z, t, caption))
    assert torch.equal(again.scaler.std, model.scaler.std)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a TextDenoiser checkpoint"):
        load_denoiser(tmp_path / "other.pt")


def test_refuses_bad_input(rng):
    model = small_model(rng)
    z, t, caption = random_inputs(rng, 2)
    with pytest.raises(ValueError, match="z_t must have shape"):
        model(z[:, :-1], t, caption)
    with pytest.raises(ValueError, match="t must have shape"):
        model(z, t[:1], caption)
    with pytest.raises(ValueError, match="caption ids"):
        model(z, t, Caption(caption.ids[:, :-1], caption.lengths))
    with pytest.raises(ValueError, match="word ids"):
        model(z, t, Caption(caption.ids + SMALL.text_vocab, caption.lengths))
    with pytest.raises(ValueError, match="caption lengths"):
        model(z, t, Caption(caption.ids, caption.lengths * 0))


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 15}, "divisible"),
    ({"text_len": 1}, "bos"),
    ({"layers": 0}, "layers must be a positive int"),
    ({"mlp_ratio": 0}, "mlp_ratio"),
])
def test_config_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenoiserConfig(**kwargs)


def test_v_and_eps_prediction_give_sample_the_noise(rng):
    from tiny_mm.diffusion import NoiseSchedule

    schedule = NoiseSchedule(1000, "cosine")
    z, t, caption = random_inputs(rng, 3)  # t in [0, 1000)
    x0 = torch.as_tensor(rng.standard_normal(z.shape))
    v_model = small_model(rng)
    assert v_model.config.prediction == "v"  # the chapter's choice is the default
    with torch.no_grad():
        out = v_model(z, t, caption)
        a = schedule.alphas_cumprod[t].view(-1, 1, 1)
        assert rel_err(v_model.eps(schedule)(z, t, caption), (1 - a).sqrt() * z + a.sqrt() * out) < 1e-12
    assert rel_err(v_model.target(schedule, x0, t, z), a.sqrt() * z - (1 - a).sqrt() * x0) < 1e-12
    eps_model = TextDenoiser(DenoiserConfig(**{**SMALL.__dict__, "prediction": "eps"}))
    assert eps_model.eps(schedule) is eps_model
    assert torch.equal(eps_model.target(schedule, x0, t, z), z)
    with pytest.raises(ValueError, match="prediction"):
        DenoiserConfig(prediction="x0")


def test_patchify_cuts_row_major_4x4_patches(rng):
    from tiny_mm.denoiser import patchify, unpatchify

    images = torch.as_tensor(rng.uniform(0, 1, (2, 3, 12, 12)))
    tokens = patchify(images, 4)
    assert tokens.shape == (2, 9, 48)
    for row in range(3):
        for col in range(3):  # token row * 3 + col is the patch at (row, col), channel-first
            patch = images[:, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].reshape(2, 48)
            assert torch.equal(tokens[:, 3 * row + col], patch)
    assert torch.equal(unpatchify(tokens, 4), images)
    with pytest.raises(ValueError, match="multiple of 4"):
        patchify(images[:, :, :10, :10], 4)
    with pytest.raises(ValueError, match="square N"):
        unpatchify(tokens[:, :8], 4)


def test_token_scaler_set_maps_pixels_to_plus_minus_one():
    scaler = TokenScaler(48).set(0.5, 0.5)
    pixels = torch.tensor([0.0, 0.25, 1.0]).view(1, 3, 1).expand(1, 3, 48)
    assert torch.equal(scaler.scale(pixels)[0, :, 0], torch.tensor([-1.0, -0.5, 1.0]))
    assert torch.equal(scaler.unscale(scaler.scale(pixels)), pixels)
    with pytest.raises(ValueError, match="std must be positive"):
        scaler.set(0.0, 0.0)
