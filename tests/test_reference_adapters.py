"""Chapter 8's NumPy reference against torch's own functions (float64) and hand-worked cases.

The reference checks tiny_mm, so it is checked first against code it shares nothing with:
torch.nn.functional's layer_norm, gelu and scaled_dot_product_attention, in float64.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import chapters.ch08_vlm_adapters.reference as ref


def test_layer_norm_and_gelu_match_torch(rng):
    x, gain, bias = rng.standard_normal((3, 5, 7)), rng.standard_normal(7), rng.standard_normal(7)
    expected = F.layer_norm(torch.from_numpy(x), (7,), torch.from_numpy(gain), torch.from_numpy(bias)).numpy()
    assert np.allclose(ref.layer_norm(x, gain, bias), expected, rtol=1e-12, atol=1e-12)
    z = 3 * rng.standard_normal((4, 6))
    assert np.allclose(ref.gelu(z), F.gelu(torch.from_numpy(z)).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_sdpa(rng, causal):
    B, Lq, Lk, d, dk, heads = 2, 5, 5 if causal else 7, 12, 9, 3
    p = {}
    for name, fan_in in (("q_proj", d), ("k_proj", dk), ("v_proj", dk), ("out_proj", d)):
        p[f"a.{name}.weight"], p[f"a.{name}.bias"] = rng.standard_normal((d, fan_in)), rng.standard_normal(d)
    query, context = rng.standard_normal((B, Lq, d)), rng.standard_normal((B, Lk, dk))
    mask = rng.random((B, Lq, Lk)) < 0.6
    mask[0, 1] = False  # a row that sees nothing: zeros before the output projection
    out = ref.attention(query, context, p, "a", heads, mask=mask, causal=causal)

    t = {k: torch.from_numpy(v) for k, v in p.items()}
    def project(x, name):
        y = torch.from_numpy(x) @ t[f"a.{name}.weight"].T + t[f"a.{name}.bias"]
        return y.view(B, -1, heads, d // heads).transpose(1, 2)  # (B, H, L, D)
    visible = torch.from_numpy(mask)[:, None]  # (B, 1, Lq, Lk)
    if causal:
        visible = visible & torch.ones(Lq, Lk, dtype=torch.bool).tril()
    empty = ~visible.any(-1, keepdim=True)  # rows with nothing to see
    heads_out = F.scaled_dot_product_attention(project(query, "q_proj"), project(context, "k_proj"),
                                               project(context, "v_proj"), attn_mask=visible | empty)
    heads_out = torch.where(empty, 0.0, heads_out).transpose(1, 2).reshape(B, Lq, d)
    expected = (heads_out @ t["a.out_proj.weight"].T + t["a.out_proj.bias"]).numpy()
    assert np.allclose(out, expected, rtol=1e-10, atol=1e-10)
    assert np.allclose(out[0, 1], p["a.out_proj.bias"])  # the empty row: only the output bias


def test_media_mask_reference_by_hand():
    #   position:  0     1     2     3     4     5
    #   marker:    -   img0    -     -   img1    -
    locations = np.array([[False, True, False, False, True, False]])
    mask = ref.media_mask_reference(locations, num_images=2, latents_per_image=2)[0]  # (6, 4)
    expected = np.array([
        [0, 0, 0, 0],  # before any image: nothing
        [1, 1, 0, 0],  # the marker of image 0 reads image 0
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],  # from image 1's marker on: image 1 only, never image 0 again
        [0, 0, 1, 1],
    ], dtype=bool)
    assert np.array_equal(mask, expected)
    with pytest.raises(ValueError, match="markers"):
        ref.media_mask_reference(locations, num_images=1, latents_per_image=2)
