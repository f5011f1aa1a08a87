"""tiny_mm.counting against the modules it describes, measured by PyTorch itself.

Every expected value here is measured on an instantiated module, never taken
from tiny_mm.counting:

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around the forward, and
  around the backward (fed a random output gradient).
- Parameters: ``sum(p.numel() for p in module.parameters())``.
- Activation memory: ``torch.autograd.graph.saved_tensors_hooks`` sees every
  tensor autograd keeps for the backward; we add up the bytes of each distinct
  storage once, leaving out the module's parameters.
- Attention-score entries: a dispatch mode that adds up the size of every
  softmax output.

Sizes are drawn at random from the `rng` fixture (tiny, CPU, float32). The
textbook's numbers are recomputed by plain arithmetic written in the tests.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tiny_mm import counting
from tiny_mm.attention import MultiHeadAttention
from tiny_mm.fusion import CrossModalFusion, EarlyFusion, FusionConfig, LateFusion
from tiny_mm.layers import CrossAttentionBlock, TransformerBlock

DTYPE_BYTES = {torch.float32: 4, torch.float64: 8, torch.bfloat16: 2}


# --------------------------------------------------------------------------- measuring


def measure_flops(forward, inputs_for_grad=()) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of `forward()` as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        out = forward()
    flops_forward = counter.get_total_flops()
    grad = torch.randn_like(out)
    with FlopCounterMode(display=False) as counter:
        out.backward(grad)
    return flops_forward, flops_forward + counter.get_total_flops()


def saved_storages(module: nn.Module, forward) -> list[int]:
    """Byte sizes of the distinct storages autograd saves during `forward()`, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor  # keep it alive: no later tensor can reuse its address during the forward

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sorted(saved.values())


class SoftmaxEntries(TorchDispatchMode):
    """Adds up the number of elements of every softmax output (the attention probabilities)."""

    def __init__(self):
        super().__init__()
        self.entries = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten._softmax:
            self.entries += out.numel()
        return out


def count_softmax_entries(forward) -> int:
    mode = SoftmaxEntries()
    with mode, torch.no_grad():
        forward()
    return mode.entries


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_sizes(rng: np.random.Generator) -> dict:
    """Tiny random sizes: B, h, d = h * head_dim, N, M, L, mlp_ratio."""
    heads = int(rng.integers(1, 4))
    return dict(
        batch=int(rng.integers(1, 4)),
        heads=heads,
        width=heads * int(rng.integers(2, 7)),
        n_image=int(rng.integers(1, 10)),
        n_text=int(rng.integers(1, 10)),
        layers=int(rng.integers(1, 4)),
        mlp_ratio=float(rng.choice([1.0, 2.0, 2.5, 4.0])),
    )


def tokens(batch: int, length: int, width: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, length, width, dtype=dtype)


def assert_cost_matches(cost: counting.Cost, module: nn.Module, forward, what: str) -> None:
    """The formula's FLOPs, parameters and activation bytes against the measured ones."""
    flops_forward, flops_training = measure_flops(forward)
    assert cost.flops_forward == flops_forward, (
        f"{what}: forward FLOPs {cost.flops_forward} vs measured {flops_forward}"
    )
    assert cost.flops_training == flops_training, (
        f"{what}: training FLOPs {cost.flops_training} vs measured {flops_training}"
    )
    assert cost.params == n_params(module), f"{what}: params {cost.params} vs {n_params(module)}"
    measured = sum(saved_storages(module, forward))
    assert cost.activation_bytes == measured, (
        f"{what}: activation bytes {cost.activation_bytes} vs measured {measured}"
    )


# --------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("input_grad", [True, False])
def test_linear(rng, input_grad):
    for _ in range(3):
        rows, d_in, d_out = (int(n) for n in rng.integers(1, 20, size=3))
        bias = bool(rng.integers(0, 2))
        layer = nn.Linear(d_in, d_out, bias=bias)
        x = torch.randn(rows, d_in, requires_grad=input_grad)
        cost = counting.linear(rows, d_in, d_out, bias=bias, input_grad=input_grad)
        flops_forward, flops_training = measure_flops(lambda: layer(x))
        assert (cost.flops_forward, cost.flops_training) == (flops_forward, flops_training)
        assert cost.params == n_params(layer)
    # The arithmetic itself: 2 m n k forward; 3x (or 2x without an input gradient) for training.
    assert flops_forward == 2 * rows * d_in * d_out
    assert flops_training == (3 if input_grad else 2) * 2 * rows * d_in * d_out


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_multi_head_attention(rng, cross, input_grad):
    for _ in range(3):
        s = random_sizes(rng)
        d, h, b = s["width"], s["heads"], s["batch"]
        lq = s["n_text"]
        lk, kv_width = (s["n_image"], int(rng.integers(1, 12))) if cross else (lq, d)
        attn = MultiHeadAttention(d, h, kdim=kv_width, vdim=kv_width)
        query = tokens(b, lq, d).requires_grad_(input_grad)
        context = tokens(b, lk, kv_width).requires_grad_(input_grad)
        forward = (lambda: attn(query, context, context)) if cross else (lambda: attn(query))
        cost = counting.multi_head_attention(lq, lk, d, h, kv_width=kv_width, batch=b, input_grad=input_grad)
        flops_forward, flops_training = measure_flops(forward)
        assert (cost.flops_forward, cost.flops_training) == (flops_forward, flops_training), s
        assert cost.params == n_params(attn)
        assert cost.score_entries == count_softmax_entries(forward) == b * h * lq * lk


def test_attention_core_is_four_lq_lk_d(rng):
    # Scores and weighted sum: 2 Lq Lk d each per example, whatever the number of heads.
    for heads in (1, 2, 4):
        lq, lk, b = (int(n) for n in rng.integers(1, 30, size=3))
        cost = counting.attention_core(lq, lk, 8 * heads, heads, batch=b)
        assert cost.flops_forward == 4 * b * lq * lk * 8 * heads
        assert cost.score_entries == b * heads * lq * lk


# --------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_transformer_block(rng, dtype):
    for _ in range(3):
        s = random_sizes(rng)
        b, n, d, h, r = s["batch"], s["n_image"], s["width"], s["heads"], s["mlp_ratio"]
        block = TransformerBlock(d, h, r).to(dtype)
        x = tokens(b, n, d, dtype)
        cost = counting.transformer_block(n, d, h, r, batch=b, dtype_bytes=DTYPE_BYTES[dtype])
        assert_cost_matches(cost, block, lambda: block(x), f"TransformerBlock {s} {dtype}")
        # Not only the total: the formula lists exactly the tensors autograd keeps.
        inventory = counting.saved_transformer_block(n, d, h, r, batch=b, dtype_bytes=DTYPE_BYTES[dtype])
        if dtype is not torch.bfloat16:  # there P is two tensors (float32 softmax + bf16 copy)
            assert Counter(inventory.values()) == Counter(saved_storages(block, lambda: block(x)))
        assert cost.score_entries == count_softmax_entries(lambda: block(x))


def test_cross_attention_block(rng):
    for _ in range(4):
        s = random_sizes(rng)
        b, m, n, d, h, r = s["batch"], s["n_text"], s["n_image"], s["width"], s["heads"], s["mlp_ratio"]
        context_width = int(rng.integers(2, 12))
        block = CrossAttentionBlock(d, h, context_width, r)
        x, context = tokens(b, m, d), tokens(b, n, context_width)
        cost = counting.cross_attention_block(m, n, d, h, r, context_width=context_width, batch=b)
        assert_cost_matches(cost, block, lambda: block(x, context), f"CrossAttentionBlock {s}")
        inventory = counting.saved_cross_attention_block(m, n, d, h, r, context_width=context_width, batch=b)
        assert Counter(inventory.values()) == Counter(saved_storages(block, lambda: block(x, context)))
        assert cost.score_entries == count_softmax_entries(lambda: block(x, context)) == b * h * m * n


# --------------------------------------------------------------------------- the three strategies


MODELS = {
    "early": (EarlyFusion, counting.early_fusion),
    "late": (LateFusion, counting.late_fusion),
    "cross": (CrossModalFusion, counting.cross_modal_fusion),
}


@pytest.mark.parametrize("strategy", list(MODELS))
@pytest.mark.parametrize("with_head", [False, True])
def test_fusion_models(rng, strategy, with_head):
    model_class, formula = MODELS[strategy]
    for _ in range(2):
        s = random_sizes(rng)
        num_classes = int(rng.integers(2, 6)) if with_head else None
        config = FusionConfig(s["layers"], s["width"], s["heads"], s["mlp_ratio"], num_classes)
        model = model_class(config)
        image, text = tokens(s["batch"], s["n_image"], s["width"]), tokens(s["batch"], s["n_text"], s["width"])
        cost = formula(
            s["layers"], s["width"], s["heads"], s["n_image"], s["n_text"], s["mlp_ratio"],
            batch=s["batch"], num_classes=num_classes,
        )
        assert_cost_matches(cost, model, lambda: model(image, text), f"{strategy} {s}")
        assert cost.score_entries == count_softmax_entries(lambda: model(image, text))
        # Padding masks change which scores count, not how many products run.
        lengths = torch.from_numpy(rng.integers(1, s["n_text"] + 1, size=s["batch"]))
        masked = measure_flops(lambda: model(image, text, lengths))
        assert masked == (cost.flops_forward, cost.flops_training), f"{strategy} {s} with text_lengths"


def test_fusion_layer_matches_one_layer_models(rng):
    # One layer of each strategy = the L = 1 model minus what is not a layer (norms, heads, pooling).
    s = random_sizes(rng)
    args = (s["width"], s["heads"], s["n_image"], s["n_text"], s["mlp_ratio"])
    for strategy, (model_class, _) in MODELS.items():
        model = model_class(FusionConfig(1, s["width"], s["heads"], s["mlp_ratio"]))
        image, text = tokens(s["batch"], s["n_image"], s["width"]), tokens(s["batch"], s["n_text"], s["width"])
        extra = 0
        if strategy == "late":  # the fusion head Linear(2d, d) runs once per example
            extra = 2 * s["batch"] * 2 * s["width"] * s["width"]
        flops_forward, _ = measure_flops(lambda: model(image, text))
        layer = counting.fusion_layer(strategy, *args, batch=s["batch"])
        assert layer.flops_forward + extra == flops_forward, strategy
    with pytest.raises(ValueError, match="strategy"):
        counting.fusion_layer("middle", *args)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="divisible"):
        counting.transformer_block(4, 10, 3)
    with pytest.raises(ValueError, match="n_text"):
        counting.early_fusion(2, 8, 2, 4, 0)
    with pytest.raises(ValueError, match="layers"):
        counting.cross_modal_fusion(0, 8, 2, 4, 4)


# --------------------------------------------------------------------------- the textbook's numbers


def test_textbook_score_counts():
    # "196 x 128 = 25,088 per head for cross-attention versus 324^2 = 104,976 for early fusion"
    assert counting.attention_scores(128, 196) == 196 * 128 == 25_088
    assert counting.attention_scores(196 + 128, 196 + 128) == 324**2 == 104_976
    # The "4x": 104,976 / 25,088 = 4.18, but only for the score matrix of the cross-attention alone.
    ratio = counting.attention_scores(324, 324) / counting.attention_scores(128, 196)
    assert ratio == pytest.approx(104_976 / 25_088) and 4.1 < ratio < 4.2
    # Against all the attention a cross-modal layer does (N^2 + M^2 + N M), the joint matrix is 1.31x.
    cross_layer = counting.fusion_layer("cross", 768, 12, 196, 128)
    assert cross_layer.score_entries == 12 * (196**2 + 128**2 + 196 * 128)
    early_layer = counting.fusion_layer("early", 768, 12, 196, 128)
    assert early_layer.score_entries == 12 * 324**2


@pytest.mark.parametrize("d, heads", [(768, 12), (512, 8)])
def test_textbook_whole_layer(d, heads):
    n, m, f = 196, 128, 4 * d
    # Written out by hand: a self-attention block over T tokens is 8 T d^2 (projections)
    # + 4 T^2 d (scores and weighted sum) + 4 T d f (MLP) forward FLOPs per example.
    def block(t):
        return 8 * t * d * d + 4 * t * t * d + 4 * t * d * f

    early = block(n + m)
    cross_block = 4 * m * d * d + 4 * n * d * d + 4 * m * n * d + 4 * m * d * f
    cross = block(n) + block(m) + cross_block
    assert counting.fusion_layer("early", d, heads, n, m).flops_forward == early
    assert counting.fusion_layer("cross", d, heads, n, m).flops_forward == cross
    assert counting.fusion_layer("late", d, heads, n, m).flops_forward == block(n) + block(m)
    # The "4x reduction" does not hold for a layer: a cross-modal layer costs *more*
    # than an early-fusion layer over all 324 tokens, because it adds a whole block.
    assert cross > early
    print(
        f"\nd={d}: one layer, forward GFLOPs per example: early {early / 1e9:.3f}, "
        f"late {(block(n) + block(m)) / 1e9:.3f}, cross {cross / 1e9:.3f}; "
        f"early/cross = {early / cross:.3f}; scores early/cross-attention only = {(n + m) ** 2 / (n * m):.3f}"
    )


def test_when_a_cross_modal_layer_is_cheaper_than_early_fusion(rng):
    # By hand: cross - early = 4 d (5 M d + N d - N M) with f = 4d, so a cross-modal layer
    # is cheaper only when N M > d (5 M + N): never while M < d, whatever N is.
    for _ in range(50):
        d = 8 * int(rng.integers(1, 130))
        n, m = (int(x) for x in rng.integers(1, 6000, size=2))
        early = counting.fusion_layer("early", d, 8, n, m).flops_forward
        cross = counting.fusion_layer("cross", d, 8, n, m).flops_forward
        assert cross - early == 4 * d * (5 * m * d + n * d - n * m)
        assert (cross < early) == (n * m > d * (5 * m + n))
        if m < d:
            assert cross > early
