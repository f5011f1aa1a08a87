"""Flamingo's adapter against chapter 8's NumPy reference, and the properties the chapter claims.

- the media mask equals the reference's (a backward walk per token) on random
  interleaved sequences, edge cases included;
- the resampler, the gated layer and the whole FlamingoLM match the float64
  reference with random weights and open gates (float32, relative error < 1e-5);
- at initialisation FlamingoLM's logits equal the frozen LM's bit for bit;
- tokens never see an image that comes after their latest marker;
- an optimiser step moves only the adapter.
"""
import numpy as np
import pytest
import torch

import chapters.ch08_vlm_adapters.reference as ref
from tests.numerics import float64_weights, randomize, rel_err
from tiny_mm.adapters.flamingo import FlamingoLM, GatedCrossAttentionDense, PerceiverResampler, media_index, media_mask
from tiny_mm.language_model import LMConfig, TinyLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits
SMALL = LMConfig(vocab_size=45, context_length=16, width=16, layers=3, heads=2)




def random_locations(rng, B: int, L: int, T: int) -> np.ndarray:
    """(B, L) bool with between 0 and T markers per row, at random positions."""
    locations = np.zeros((B, L), dtype=bool)
    for b in range(B):
        k = rng.integers(0, T + 1)
        locations[b, rng.choice(L, size=k, replace=False)] = True
    return locations


@pytest.mark.parametrize("B, L, T, R", [(3, 12, 3, 2), (4, 7, 1, 3), (2, 20, 5, 1), (1, 1, 1, 4)])
def test_media_mask_equals_reference(rng, B, L, T, R):
    for _ in range(5):
        locations = random_locations(rng, B, L, T)
        out = media_mask(torch.from_numpy(locations), T, R)  # (B, 1, L, T * R)
        assert out.shape == (B, 1, L, T * R) and out.dtype == torch.bool
        assert np.array_equal(out[:, 0].numpy(), ref.media_mask_reference(locations, T, R))


def test_media_mask_edge_cases():
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert not media_mask(none, 2, 3).any()  # no image anywhere: nobody reads anything
    every = torch.ones(1, 4, dtype=torch.bool)  # each token is a marker: token l reads image l
    expected = np.kron(np.eye(4, dtype=bool), np.ones((1, 2), dtype=bool))  # (4, 8)
    assert np.array_equal(media_mask(every, 4, 2)[0, 0].numpy(), expected)
    assert media_index(torch.tensor([[False, True, False, True]])).tolist() == [[0, 1, 1, 2]]


def test_media_mask_bad_input():
    with pytest.raises(ValueError, match="bool"):
        media_mask(torch.zeros(2, 3, dtype=torch.long), 1, 1)
    with pytest.raises(ValueError, match="markers"):
        media_mask(torch.ones(1, 3, dtype=torch.bool), 2, 1)


def test_resampler_matches_reference(rng):
    resampler = PerceiverResampler(12, num_latents=5, layers=2, heads=3)
    randomize(resampler, rng)
    features = rng.standard_normal((3, 9, 12))
    out = resampler(torch.from_numpy(features).float())  # (3, 5, 12)
    assert rel_err(out, ref.perceiver_resampler(features, float64_weights(resampler), layers=2, heads=3)) < 1e-5
    # Any number of patches gives the same number of outputs.
    assert resampler(torch.randn(2, 30, 12)).shape == (2, 5, 12)
    with pytest.raises(ValueError, match="shape"):
        resampler(torch.randn(2, 9, 11))


def test_gated_layer_matches_reference(rng):
    layer = GatedCrossAttentionDense(16, context_width=10, heads=4)
    randomize(layer, rng, scale=0.5)  # gates open: tanh of random alphas
    B, L, T, R = 3, 8, 2, 3
    x, media = rng.standard_normal((B, L, 16)), rng.standard_normal((B, T * R, 10))
    locations = random_locations(rng, B, L, T)
    locations[0] = False  # one row with no image: only the dense branch acts on it
    mask = media_mask(torch.from_numpy(locations), T, R)
    out = layer(torch.from_numpy(x).float(), torch.from_numpy(media).float(), mask)
    expected = ref.gated_xattn_dense(x, media, float64_weights(layer), 4, mask[:, 0].numpy())
    assert rel_err(out, expected) < 1e-5


def test_flamingo_lm_matches_reference(rng):
    lm = TinyLM(SMALL)
    randomize(lm, rng)
    model = FlamingoLM(lm, 10, num_latents=3, resampler_layers=1, every=2, heads=2)
    randomize(model.resampler, rng)
    randomize(model.gated, rng, scale=0.5)
    B, L, T, N = 2, 9, 2, 5
    ids = rng.integers(0, 45, size=(B, L))
    features = rng.standard_normal((B, T, N, 10))
    locations = random_locations(rng, B, L, T)
    out = model(torch.from_numpy(ids), torch.from_numpy(features).float(), torch.from_numpy(locations))

    resampled = np.stack([ref.perceiver_resampler(features[:, t], float64_weights(model.resampler), 1, 2) for t in range(T)], 1)
    media = resampled.reshape(B, T * 3, 10)  # (B, T * R, d_img), image by image
    mask = ref.media_mask_reference(locations, T, 3)
    gated = {i: (float64_weights(model.gated[str(i)]), media, mask, 2) for i in (0, 2)}  # every=2 over 3 blocks
    expected = ref.lm_logits(ids, float64_weights(lm), SMALL.layers, SMALL.heads, gated=gated)
    assert rel_err(out, expected) < 1e-5


def test_at_initialisation_flamingo_is_the_frozen_lm_exactly(rng):
    lm = TinyLM(SMALL)
    randomize(lm, rng)
    model = FlamingoLM(lm, 10, num_latents=4, every=1)
    ids = torch.from_numpy(rng.integers(0, 45, size=(3, 11)))
    features = torch.from_numpy(rng.standard_normal((3, 2, 6, 10))).float()
    locations = torch.from_numpy(random_locations(rng, 3, 11, 2))
    with torch.no_grad():
        assert torch.equal(model(ids, features, locations), lm(ids))
        # The equality is the gates' doing: opening one changes the output.
        model.gated["1"].attn_gate.fill_(0.5)
        assert not torch.equal(model(ids, features, locations), lm(ids))


def test_tokens_never_see_a_later_image(rng):
    lm = TinyLM(SMALL)
    randomize(lm, rng)
    model = FlamingoLM(lm, 8, num_latents=2, every=1)
    randomize(model.gated, rng, scale=0.5)
    locations = torch.zeros(1, 12, dtype=torch.bool)
    locations[0, [2, 7]] = True  # image 0 at position 2, image 1 at position 7
    ids = torch.from_numpy(rng.integers(0, 45, size=(1, 12)))
    features = torch.from_numpy(rng.standard_normal((1, 2, 5, 8))).float()
    changed = features.clone()
    # A different second image: a random change, not a constant shift (the resampler's
    # LayerNorm over the features would remove a constant, and the test with it).
    changed[:, 1] += torch.from_numpy(rng.standard_normal((1, 5, 8))).float()
    with torch.no_grad():
        before, after = model(ids, features, locations), model(ids, changed, locations)
    assert torch.equal(before[:, :7], after[:, :7])  # nothing before the second marker moves
    assert not torch.allclose(before[:, 7:], after[:, 7:])  # the tokens after it read the new image


def test_optimiser_steps_move_only_the_adapter(rng):
    lm = TinyLM(SMALL)
    frozen = {k: v.clone() for k, v in lm.state_dict().items()}
    model = FlamingoLM(lm, 8, num_latents=2, every=1)
    assert all(not p.requires_grad for p in lm.parameters())
    start = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("lm.")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.from_numpy(rng.integers(0, 45, size=(2, 6)))
    locations = torch.zeros(2, 6, dtype=torch.bool)
    locations[:, 0] = True
    features = torch.randn(2, 1, 4, 8)

    def step() -> list[str]:
        optimizer.zero_grad()
        logits = model(ids, features, locations)
        torch.nn.functional.cross_entropy(logits.reshape(-1, 45), ids.reshape(-1)).backward()
        assert all(p.grad is None for p in lm.parameters())
        optimizer.step()
        return [k for k, v in model.state_dict().items() if k in start and not torch.equal(v, start[k])]

    # Step 1: with both gates at 0, everything behind a gate gets a zero gradient; only the gates move.
    assert sorted(step()) == sorted(k for k in start if k.endswith("_gate"))
    # Step 2: the gates are open a little, and the resampler and the new layers learn too.
    moved = step()
    assert any(k.startswith("resampler.") for k in moved) and any("cross_attn" in k for k in moved)
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in frozen.items())


def test_flamingo_bad_input():
    model = FlamingoLM(TinyLM(SMALL), 8)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="features"):
        model(ids, torch.randn(2, 4, 8), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="media_locations"):
        model(ids, torch.randn(2, 1, 4, 8), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="every"):
        FlamingoLM(TinyLM(SMALL), 8, every=0)
