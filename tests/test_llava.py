"""LLaVA's projection and the prefix plumbing against chapter 8's NumPy reference.

- the linear and the MLP (LLaVA-1.5) projections match the float64 reference;
- PrefixLM's logits are the reference LM's over [<bos> ; projected features ; words], prefix positions dropped;
- the image reaches the words only through the prefix, and only the projection learns.
"""
import numpy as np
import pytest
import torch

import chapters.ch08_vlm_adapters.reference as ref
from tests.numerics import float64_weights, randomize, rel_err
from tiny_mm.adapters.llava import LlavaProjector, PrefixLM
from tiny_mm.language_model import LMConfig, TinyLM

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits
SMALL = LMConfig(vocab_size=45, context_length=24, width=16, layers=2, heads=2)




@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projection_matches_reference(rng, kind):
    projector = LlavaProjector(10, 16, kind)
    randomize(projector, rng)
    features = rng.standard_normal((3, 7, 10))
    out = projector(torch.from_numpy(features).float())
    assert rel_err(out, ref.llava_prefix(features, float64_weights(projector), kind)) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_prefix_lm_matches_reference(rng, kind):
    lm = TinyLM(SMALL)
    randomize(lm, rng)
    model = PrefixLM(lm, LlavaProjector(10, 16, kind))
    randomize(model.adapter, rng)
    ids, features = rng.integers(0, 45, size=(2, 6)), rng.standard_normal((2, 5, 10))
    out = model(torch.from_numpy(ids), torch.from_numpy(features).float())  # (2, 6, 45)
    prefix = ref.llava_prefix(features, float64_weights(model.adapter), kind)  # (2, 5, 16)
    # <bos>, the 5 image vectors, the other words; the image positions' logits are dropped.
    full = ref.lm_logits(ids, float64_weights(lm), SMALL.layers, SMALL.heads, prefix=prefix, prefix_position=1)
    expected = np.concatenate([full[:, :1], full[:, 6:]], axis=1)  # (2, 6, 45)
    assert rel_err(out, expected) < 1e-5


def test_only_the_projection_learns(rng):
    lm = TinyLM(SMALL)
    frozen = {k: v.clone() for k, v in lm.state_dict().items()}
    model = PrefixLM(lm, LlavaProjector(10, 16))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.adapter.parameters()}
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.from_numpy(rng.integers(0, 45, size=(2, 6)))
    logits = model(ids, torch.randn(2, 5, 10))
    torch.nn.functional.cross_entropy(logits.reshape(-1, 45), ids.reshape(-1)).backward()
    optimizer.step()
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in frozen.items())
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))
    model.train()
    assert not model.lm.training  # the frozen model stays in eval mode


def test_bad_input():
    with pytest.raises(ValueError, match="kind"):
        LlavaProjector(10, 16, "conv")
    with pytest.raises(ValueError, match="features"):
        LlavaProjector(10, 16)(torch.randn(2, 5, 9))
    model = PrefixLM(TinyLM(SMALL), LlavaProjector(10, 16))
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 10, dtype=torch.long), torch.randn(1, 20, 10))  # 20 + 10 > 24 positions
