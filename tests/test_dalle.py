"""`tiny_mm.dalle`: the sampler against chapter 11's NumPy reference, causality, the cache, a tiny overfit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chapters.ch11_text_to_image.reference as ref
from tests.numerics import randomize, rel_err
from tiny_mm.dalle import (
    DalleConfig,
    TinyDalle,
    dalle_loss,
    generate,
    load_dalle,
    next_token_probs,
    sample_next_token,
    save_dalle,
)
from tiny_mm.data.words import shapes_vocab

SMALL = DalleConfig(text_vocab=45, text_len=6, num_codes=10, image_tokens=9, width=32, layers=2, heads=4)


def small_model(rng, dtype=torch.float64, scale: float = 0.2) -> TinyDalle:
    model = TinyDalle(SMALL).to(dtype)
    randomize(model, rng, scale)  # every weight random, so no term hides behind an initial zero
    return model.eval()


def random_batch(rng, batch: int, config: DalleConfig = SMALL) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.as_tensor(rng.integers(0, config.text_vocab, (batch, config.text_len)))
    codes = torch.as_tensor(rng.integers(0, config.num_codes, (batch, config.image_tokens)))
    return text, codes


def seeded(rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


# --------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 1, 3, 7])
def test_next_token_probs_match_reference(rng, temperature, top_k):
    logits = rng.standard_normal((4, 7)) * 2
    logits[1, [2, 5]] = logits[1].max() + 1.0  # a tie at the top
    logits[2, 4] = np.sort(logits[2])[-3]  # a tie at the 3rd place: both kept by top-3
    expected = ref.next_token_distribution(logits, temperature, top_k)
    got = next_token_probs(torch.from_numpy(logits), temperature, top_k)
    assert got.dtype == torch.float64 and rel_err(got, expected) < 1e-12
    got32 = next_token_probs(torch.from_numpy(logits).float(), temperature, top_k)
    assert rel_err(got32, expected) < 1e-5


def test_sampled_frequencies_match_the_reference_distribution(rng):
    """20 000 draws per setting: each frequency lies within 5 standard errors (+1e-3) of the exact
    probability; tokens outside the top k are never drawn."""
    logits = rng.permutation(np.linspace(-1.5, 1.5, 8)) + 0.05 * rng.standard_normal(8)  # no token dominates
    n = 20000
    for temperature, top_k in [(1.0, None), (0.6, 4), (1.7, 2)]:
        p = ref.next_token_distribution(logits, temperature, top_k)
        ids = sample_next_token(torch.from_numpy(logits).expand(n, -1), temperature, top_k, seeded(rng))
        freq = np.bincount(ids.numpy(), minlength=8) / n
        sigma = np.sqrt(p * (1 - p) / n)
        assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-3), (temperature, top_k, freq, p)
        assert np.all(freq[p == 0] == 0)
        assert (p > 0.02).sum() >= 2  # the test means something only if the draw is not one-hot


def test_top_k_1_and_temperature_0_are_greedy(rng):
    logits = torch.from_numpy(rng.standard_normal((50, 13)))
    for temperature in (0.0, 0.5, 5.0):
        ids = sample_next_token(logits, temperature, 1 if temperature else None, seeded(rng))
        assert torch.equal(ids, logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, 3.0, 1, seeded(rng)), logits.argmax(-1))


def test_sampler_refuses_bad_settings():
    logits = torch.zeros(2, 5)
    for kwargs, message in [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 6}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
    ]:
        with pytest.raises(ValueError, match=message):
            next_token_probs(logits, **kwargs)
    with pytest.raises(ValueError, match="floating-point"):
        next_token_probs(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_next_token(torch.zeros(5))


# --------------------------------------------------------------------------- the transformer


def test_shapes(rng):
    model = small_model(rng)
    text, codes = random_batch(rng, 3)
    for n in (0, 4, SMALL.image_tokens - 1):
        out = model(text, codes[:, :n])
        assert out.text.shape == (3, SMALL.text_len - 1, SMALL.text_vocab)
        assert out.image.shape == (3, n + 1, SMALL.num_codes)
    sampled = generate(model, text, generator=seeded(rng))
    assert sampled.codes.shape == (3, SMALL.image_tokens) and sampled.codes.dtype == torch.long
    assert sampled.logits.shape == (3, SMALL.image_tokens, SMALL.num_codes)
    assert int(sampled.codes.min()) >= 0 and int(sampled.codes.max()) < SMALL.num_codes


def test_the_transformer_is_causal(rng):
    """Changing token j (a word or a code) changes no logit of a position before j, and does change j's."""
    model = small_model(rng)
    text, codes = random_batch(rng, 2)
    codes = codes[:, :-1]  # (B, N - 1): the whole teacher-forced input
    T = SMALL.text_len

    def rows(t, c):  # every position's logits, text rows then image rows: (B, T + N - 1, ...)
        out = model(t, c)
        return torch.cat([out.text, torch.zeros(2, 1, SMALL.text_vocab, dtype=out.text.dtype)], 1), out.image

    base_text, base_image = rows(text, codes)
    for j in (1, 3, T - 1, T, T + 4):  # positions of words and of codes
        t, c = text.clone(), codes.clone()
        if j < T:
            t[:, j] = (t[:, j] + 1) % SMALL.text_vocab
        else:
            c[:, j - T] = (c[:, j - T] + 1) % SMALL.num_codes
        new_text, new_image = rows(t, c)
        # image row i sits at position T - 1 + i; text row t at position t
        before_text, before_image = min(j, T - 1), max(0, j - (T - 1))
        assert torch.equal(new_text[:, :before_text], base_text[:, :before_text])
        assert torch.equal(new_image[:, :before_image], base_image[:, :before_image])
        changed = new_image[:, before_image] if j >= T - 1 else new_text[:, j]
        unchanged = base_image[:, before_image] if j >= T - 1 else base_text[:, j]
        assert rel_err(changed, unchanged) > 1e-6, j


def test_loss_is_the_cross_entropy_of_the_codes_and_words(rng):
    """dalle_loss against log-softmax and gather written out, with the padded words left out of the text term."""
    model = small_model(rng)
    text, codes = random_batch(rng, 3)
    text[0, 4:] = 0  # padding
    out = model(text, codes[:, :-1])
    logp = out.image.log_softmax(-1)  # (B, N, K)
    image_nll = -logp.gather(-1, codes[..., None]).mean()
    logp_t = out.text.log_softmax(-1)  # (B, T-1, V)
    nll_t = -logp_t.gather(-1, text[:, 1:, None])[..., 0]  # (B, T-1)
    keep = text[:, 1:] != 0
    text_nll = nll_t[keep].sum() / keep.sum()
    assert rel_err(dalle_loss(model, text, codes), image_nll) < 1e-12
    assert rel_err(dalle_loss(model, text, codes, text_weight=0.125), image_nll + 0.125 * text_nll) < 1e-12


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.3, None), (0.8, 4)])
def test_cached_generation_equals_uncached(rng, temperature, top_k):
    """Same random numbers in, same codes out: float64 keeps the two paths' logits 1e-12 apart."""
    model = small_model(rng)
    text, _ = random_batch(rng, 5)
    seed = int(rng.integers(2**31))
    runs = [generate(model, text, temperature=temperature, top_k=top_k,
                     generator=torch.Generator().manual_seed(seed), use_cache=c) for c in (True, False)]
    assert torch.equal(runs[0].codes, runs[1].codes)
    assert rel_err(runs[0].logits, runs[1].logits) < 1e-12
    # the recorded logits are the teacher-forced ones of the codes that were drawn
    forced = model(text, runs[0].codes[:, :-1]).image
    assert rel_err(runs[0].logits, forced) < 1e-12
    if temperature == 0:
        assert torch.equal(runs[0].codes, forced.argmax(-1))


def test_float32_cache_matches_float32_forward(rng):
    model = small_model(rng, torch.float32)
    text, _ = random_batch(rng, 4)
    fast = generate(model, text, temperature=0.0)
    slow = generate(model, text, temperature=0.0, use_cache=False)
    assert torch.equal(fast.codes, slow.codes)
    assert rel_err(fast.logits, slow.logits) < 1e-5


def test_a_few_steps_overfit_a_tiny_batch(rng, one_thread):
    """Four shapes captions, each with its own row of codes: after 150 steps greedy generation writes them back."""
    torch.manual_seed(int(rng.integers(2**31)))
    config = DalleConfig(text_len=11, num_codes=10, image_tokens=9, width=32, layers=2, heads=4)
    model = TinyDalle(config)
    captions = ["a small red circle on the left", "a big blue square at the top",
                "a green star in the middle", "a small red circle on the right"]
    text, _ = shapes_vocab().encode(captions, max_len=11)
    codes = torch.as_tensor(rng.integers(0, 10, (4, 9)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = dalle_loss(model, text, codes, text_weight=0.125)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    assert torch.equal(generate(model.eval(), text, temperature=0.0).codes, codes)


def test_save_and_load_round_trip(rng, tmp_path):
    model = small_model(rng, torch.float32)
    save_dalle(model, tmp_path / "dalle.pt")
    loaded = load_dalle(tmp_path / "dalle.pt")
    assert loaded.config == SMALL
    text, codes = random_batch(rng, 2)
    assert torch.equal(loaded(text, codes[:, :-1]).image, model(text, codes[:, :-1]).image)
    torch.save({"state_dict": {}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a TinyDalle checkpoint"):
        load_dalle(tmp_path / "bad.pt")


def test_refuses_bad_input(rng):
    model = small_model(rng)
    text, codes = random_batch(rng, 2)
    with pytest.raises(ValueError, match=r"text must be an int64 tensor \(B, T=6\)"):
        model(text[:, :5], codes[:, :2])
    with pytest.raises(ValueError, match="text must be an int64"):
        model(text.int(), codes[:, :2])
    with pytest.raises(ValueError, match="word ids"):
        model(text + 45, codes[:, :2])
    with pytest.raises(ValueError, match="codes must lie"):
        model(text, codes[:, :2] + 10)
    with pytest.raises(ValueError, match="at most N - 1 = 8"):
        model(text, codes)
    with pytest.raises(ValueError, match="one batch size"):
        model(text, codes[:1, :2])
    with pytest.raises(ValueError, match=r"\(B, N=9\)"):
        dalle_loss(model, text, codes[:, :-1])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, text, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, text, top_k=11)
    with pytest.raises(ValueError, match="text must be"):
        generate(model, text[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"width": 30, "heads": 4}, "divisible"), ({"text_len": 1}, "text_len"), ({"num_codes": 0}, "num_codes"),
     ({"mlp_ratio": 0}, "mlp_ratio")],
)
def test_config_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DalleConfig(**kwargs)
