"""tiny_mm.video_fusion and tiny_mm.counting_video: four fusion strategies for video, audio, text.

- Each model against a float64 reference built here from PyTorch's own
  ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` (same weights,
  an independent attention and masking implementation), with text padding:
  the logits, and `features` (fused, streams), whose fused vector through the
  head is exactly `forward`.
- Late fusion's streams never see the other modalities; `SingleModality` reads
  only its own stream and its parameter count follows from `block_params`.
- Masking: a padded batch gives each example what it gives alone with its text
  cut to its length, and the padding's content changes nothing.
- Bottleneck fusion's wiring: with n_bottleneck = 0 the streams are independent
  (and the model equals late fusion); with n_bottleneck > 0 the audio reaches
  the video tokens one layer late, and only through the bottleneck (pin the
  bottleneck the video blocks read and the audio no longer matters).
- fusion_params: equal to sum(p.numel()) of the instantiated models, total and
  parts, on random configurations.
- float32 against float64, gradients, and ValueErrors on bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.numerics import randomize, rel_err, torch_encoder_layer
from tiny_mm.counting_video import block_params, fusion_params
from tiny_mm.layers import CrossAttentionBlock, TransformerBlock
from tiny_mm.video_fusion import (
    MODALITIES,
    STRATEGIES,
    BottleneckFusion,
    CrossModalFusion,
    EarlyFusion,
    LateFusion,
    SingleModality,
    VideoFusionConfig,
)

TV, TA, TT = 5, 4, 6  # tokens per stream: deliberately all different


def seed_from(rng: np.random.Generator) -> None:
    torch.manual_seed(int(rng.integers(2**31)))


def inputs(rng, batch: int, d: int, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    """Fresh random (video, audio, text) and text_lengths with some padding (at least one full row)."""
    draw = lambda t: torch.as_tensor(rng.standard_normal((batch, t, d)), dtype=dtype)  # noqa: E731
    lengths = torch.as_tensor(rng.integers(1, TT + 1, size=batch))
    lengths[0] = TT
    if batch > 1:
        lengths[1] = 1  # the edge case: one valid text token
    return draw(TV), draw(TA), draw(TT), lengths


def build(strategy: str, rng, **sizes) -> nn.Module:
    """A float64 model with every parameter random (no term hides behind a 0 or 1)."""
    defaults = {"width": 12, "heads": 3, "layers": 2, "mlp_ratio": 2.0, "num_classes": 5}
    config = VideoFusionConfig(**{**defaults, **sizes})
    model = STRATEGIES[strategy](config).double()
    randomize(model, rng)
    return model.eval()


# --------------------------------------------------------------------------- references




def torch_cross(block: CrossAttentionBlock, x, context, pad):
    """x + MHA(ln_q(x), ln_kv(ctx)), then + MLP(ln_2(.)), with nn.MultiheadAttention (float64)."""
    d, h = block.width, block.heads
    mha = nn.MultiheadAttention(d, h, batch_first=True).double()
    a = block.cross_attn
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        mha.out_proj.load_state_dict(a.out_proj.state_dict())
    kv = block.ln_kv(context)
    x = x + mha(block.ln_q(x), kv, kv, key_padding_mask=pad, need_weights=False)[0]
    return x + block.mlp(block.ln_2(x))


def padding(lengths, total: int, offset: int = 0) -> torch.Tensor:
    """(B, offset + total) bool, True = a padding key (PyTorch's convention)."""
    pad = torch.arange(total)[None, :] >= lengths[:, None]  # (B, total)
    return torch.cat([torch.zeros(len(lengths), offset, dtype=torch.bool), pad], dim=1)


def masked_mean(x, lengths=None):
    if lengths is None:
        return x.mean(1)
    keep = (~padding(lengths, x.shape[1])).double()[..., None]
    return (x * keep).sum(1) / keep.sum(1)


def reference(model: nn.Module, video, audio, text, lengths) -> torch.Tensor:
    """The model's logits recomputed with PyTorch's layers, from the description in its docstring."""
    fused, _ = reference_features(model, video, audio, text, lengths)
    return model.head(fused)


def reference_features(model: nn.Module, video, audio, text, lengths):
    """(fused (B, F), streams {m: (B, d)}) recomputed with PyTorch's layers."""
    x = {"video": video, "audio": audio, "text": text}
    if isinstance(model, SingleModality):
        m = model.modality
        pad = padding(lengths, TT) if m == "text" else None
        y = x[m]
        for block in model.encoder:
            y = torch_encoder_layer(block)(y, src_key_padding_mask=pad)
        pooled = masked_mean(model.norm(y), lengths if m == "text" else None)
        return pooled, {m: pooled}
    if isinstance(model, EarlyFusion):
        typed = [x[m] + model.modality[i] for i, m in enumerate(MODALITIES)]
        seq = torch.cat([model.cls.expand(len(video), 1, -1), *typed], 1)
        pad = padding(lengths, TT, offset=1 + TV + TA)
        for block in model.blocks:
            seq = torch_encoder_layer(block)(seq, src_key_padding_mask=pad)
        out = model.ln_final(seq)
        ends = {"video": (1, 1 + TV), "audio": (1 + TV, 1 + TV + TA), "text": (1 + TV + TA, None)}
        parts = {m: out[:, a:b] for m, (a, b) in ends.items()}
        streams = {m: masked_mean(parts[m], lengths if m == "text" else None) for m in MODALITIES}
        return out[:, 0], streams
    nb = model.bottleneck.shape[0] if isinstance(model, BottleneckFusion) else 0
    pads = {m: padding(lengths, TT, offset=nb) if m == "text" else None for m in MODALITIES}
    if isinstance(model, BottleneckFusion):
        z = model.bottleneck.expand(len(video), -1, -1)
        for layer in range(model.config.layers):
            copies = []
            for m in MODALITIES:
                layer_m = torch_encoder_layer(model.encoders[m][layer])
                y = layer_m(torch.cat([z, x[m]], 1), src_key_padding_mask=pads[m])
                copies.append(y[:, :nb])
                x[m] = y[:, nb:]
            z = sum(copies) / 3
    else:
        for m in MODALITIES:
            for block in model.encoders[m]:
                x[m] = torch_encoder_layer(block)(x[m], src_key_padding_mask=pads[m])
    if isinstance(model, CrossModalFusion):
        no_pad = torch.zeros(len(video), TV + TA, dtype=torch.bool)
        contexts = {  # (context, its padding): video reads [audio; text], audio [video; text], ...
            "video": (torch.cat([x["audio"], x["text"]], 1), padding(lengths, TT, offset=TA)),
            "audio": (torch.cat([x["video"], x["text"]], 1), padding(lengths, TT, offset=TV)),
            "text": (torch.cat([x["video"], x["audio"]], 1), no_pad),
        }
        x = {m: torch_cross(model.cross[m], x[m], *contexts[m]) for m in MODALITIES}
    pooled = {m: masked_mean(model.norms[m](x[m]), lengths if m == "text" else None) for m in MODALITIES}
    return torch.cat([pooled[m] for m in MODALITIES], -1), pooled


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_models_match_torch_reference(rng, strategy):
    model = build(strategy, rng)
    video, audio, text, lengths = inputs(rng, 3, 12)
    with torch.no_grad():
        out = model(video, audio, text, lengths)
        assert out.shape == (3, 5)
        assert rel_err(out, reference(model, video, audio, text, lengths)) < 1e-12
        full = torch.full_like(lengths, TT)  # no padding at all: the mask-free path
        assert rel_err(model(video, audio, text), reference(model, video, audio, text, full)) < 1e-12


def build_single(modality: str, rng, **sizes) -> SingleModality:
    defaults = {"width": 12, "heads": 3, "layers": 2, "mlp_ratio": 2.0, "num_classes": 5}
    model = SingleModality(VideoFusionConfig(**{**defaults, **sizes}), modality).double()
    randomize(model, rng)
    return model.eval()


ALL_MODELS = [*sorted(STRATEGIES), *(f"single-{m}" for m in MODALITIES)]


def build_any(name: str, rng) -> nn.Module:
    return build_single(name.removeprefix("single-"), rng) if name.startswith("single-") else build(name, rng)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_features_match_reference_and_head_of_fused_is_forward(rng, name):
    model = build_any(name, rng)
    video, audio, text, lengths = inputs(rng, 3, 12)
    with torch.no_grad():
        features = model.features(video, audio, text, lengths)
        fused_ref, streams_ref = reference_features(model, video, audio, text, lengths)
        assert features.fused.shape == (3, model.fused_dim)
        assert model.fused_dim == (12 if name == "early" or name.startswith("single-") else 36)
        assert rel_err(features.fused, fused_ref) < 1e-12
        assert sorted(features.streams) == sorted(streams_ref)
        for m, ref in streams_ref.items():
            assert features.streams[m].shape == (3, 12)
            assert rel_err(features.streams[m], ref) < 1e-12, m
        assert torch.equal(model.head(features.fused), model(video, audio, text, lengths))
        # The reference for single modalities is new here: check its logits too.
        ref = reference(model, video, audio, text, lengths)
        assert rel_err(model(video, audio, text, lengths), ref) < 1e-12


@pytest.mark.parametrize("strategy", ["late", "cross"])
def test_late_fusion_stream_sees_only_its_modality(rng, strategy):
    model = build(strategy, rng)
    video, audio, text, lengths = inputs(rng, 3, 12)
    with torch.no_grad():
        before = model.features(video, audio, text, lengths).streams
        after = model.features(video, _perturb(audio, rng), text, lengths).streams
    assert not torch.allclose(after["audio"], before["audio"])  # the perturbation arrived
    for m in ("video", "text"):
        moved = (after[m] - before[m]).abs().max().item()
        if strategy == "late":
            assert moved == 0.0, f"late fusion's {m} stream moved by {moved} when the audio changed"
        else:
            assert moved > 1e-6, f"cross-modal {m} stream ignored the audio"


@pytest.mark.parametrize("modality", MODALITIES)
def test_single_modality_ignores_the_other_streams(rng, modality):
    model = build_single(modality, rng)
    video, audio, text, lengths = inputs(rng, 3, 12)
    x = {"video": video, "audio": audio, "text": text}
    with torch.no_grad():
        out = model(video, audio, text, lengths)
        others = {m: (v if m == modality else _perturb(v, rng)) for m, v in x.items()}
        assert torch.equal(model(others["video"], others["audio"], others["text"], lengths), out)
        own = {m: (_perturb(v, rng) if m == modality else v) for m, v in x.items()}
        moved = model(own["video"], own["audio"], own["text"], lengths) - out
    assert moved.abs().max() > 1e-6  # its own stream does matter


def test_single_modality_params_by_formula(rng):
    for _ in range(6):
        config = random_config(rng)
        d, C = config.width, config.num_classes
        for m in MODALITIES:
            model = SingleModality(config, m)
            expected = config.layers * block_params(config) + 2 * d + d * C + C  # blocks, LN, head
            assert numel(model) == expected, f"{m}, {config}"
            assert numel(model.encoder) == config.layers * block_params(config)


def test_single_modality_rejects_unknown_modality():
    with pytest.raises(ValueError, match="modality"):
        SingleModality(VideoFusionConfig(), "smell")


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("strategy", ALL_MODELS)
def test_padded_text_changes_nothing(rng, strategy):
    model = build_any(strategy, rng)
    video, audio, text, lengths = inputs(rng, 4, 12)
    with torch.no_grad():
        out = model(video, audio, text, lengths)
        noisy = text.clone()
        noisy[padding(lengths, TT)] = torch.as_tensor(
            100 * rng.standard_normal((int(padding(lengths, TT).sum()), 12))
        )
        assert torch.equal(model(video, audio, noisy, lengths), out)  # padding content never read
        for b in range(4):  # each example alone, its text cut to its length: no padding at all
            n = int(lengths[b])
            alone = model(video[b : b + 1], audio[b : b + 1], text[b : b + 1, :n])
            assert rel_err(out[b : b + 1], alone) < 1e-12


# --------------------------------------------------------------------------- bottleneck wiring


def _perturb(x, rng):
    return x + torch.as_tensor(rng.standard_normal(tuple(x.shape)))


def test_no_bottleneck_means_independent_streams(rng):
    model = build("bottleneck", rng, n_bottleneck=0, layers=3)
    video, audio, text, lengths = inputs(rng, 2, 12)
    with torch.no_grad():
        before, _ = model.encode(video, audio, text, lengths)
        after, _ = model.encode(video, _perturb(audio, rng), text, lengths)
    assert torch.equal(after["video"], before["video"]) and torch.equal(after["text"], before["text"])
    assert not torch.allclose(after["audio"], before["audio"])  # the perturbation did arrive


def test_no_bottleneck_equals_late_fusion(rng):
    bottleneck = build("bottleneck", rng, n_bottleneck=0)
    late = LateFusion(bottleneck.config).double().eval()
    late.load_state_dict({k: v for k, v in bottleneck.state_dict().items() if k != "bottleneck"})
    video, audio, text, lengths = inputs(rng, 3, 12)
    with torch.no_grad():
        assert rel_err(bottleneck(video, audio, text, lengths), late(video, audio, text, lengths)) < 1e-14


@pytest.mark.parametrize("layers", [1, 2])
def test_audio_reaches_video_one_layer_late(rng, layers):
    # Layer 1's bottleneck is the learned init: it carries no audio yet. From layer 2 on it does.
    model = build("bottleneck", rng, n_bottleneck=3, layers=layers)
    video, audio, text, lengths = inputs(rng, 2, 12)
    with torch.no_grad():
        before, _ = model.encode(video, audio, text, lengths)
        after, _ = model.encode(video, _perturb(audio, rng), text, lengths)
    changed = (after["video"] - before["video"]).abs().max().item()
    assert (changed > 1e-6) == (layers > 1), f"layers={layers}: video tokens moved by {changed}"


def test_audio_reaches_video_only_through_the_bottleneck(rng):
    """Record the bottleneck each video block reads for audio A; rerun with audio A' but force those
    same bottleneck tokens into the video blocks: the video tokens must come out exactly as for A."""
    model = build("bottleneck", rng, n_bottleneck=3, layers=3)
    nb = 3
    video, audio, text, lengths = inputs(rng, 2, 12)
    seen: list[torch.Tensor] = []
    pinned: list[torch.Tensor] = []

    def record(module, args, kwargs):
        assert args[0].shape[1] == nb + TV  # the video block's keys: bottleneck and video only
        seen.append(args[0][:, :nb].clone())

    def pin(module, args, kwargs):
        x = args[0].clone()
        x[:, :nb] = pinned.pop(0)
        return (x,), kwargs

    blocks = model.encoders["video"]
    with torch.no_grad():
        handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
        first, _ = model.encode(video, audio, text, lengths)
        for h in handles:
            h.remove()
        other_audio = _perturb(audio, rng)
        free, _ = model.encode(video, other_audio, text, lengths)
        pinned.extend(seen)
        handles = [b.register_forward_pre_hook(pin, with_kwargs=True) for b in blocks]
        pinned_out, _ = model.encode(video, other_audio, text, lengths)
        for h in handles:
            h.remove()
    assert not torch.allclose(free["video"], first["video"])  # the audio matters to the video ...
    assert torch.equal(pinned_out["video"], first["video"])  # ... only through the bottleneck


def test_late_fusion_streams_never_meet_cross_modal_ones_do(rng):
    late, cross = build("late", rng), build("cross", rng)
    video, audio, text, lengths = inputs(rng, 2, 12)
    other = _perturb(audio, rng)
    with torch.no_grad():
        late_same = late.encode(video, audio, text, lengths)["video"]
        assert torch.equal(late.encode(video, other, text, lengths)["video"], late_same)
        cross_same = cross.encode(video, audio, text, lengths)["video"]
        moved = cross.encode(video, other, text, lengths)["video"] - cross_same
    assert moved.abs().max() > 1e-6


# --------------------------------------------------------------------------- parameter counts


def random_config(rng) -> VideoFusionConfig:
    heads = int(rng.integers(1, 5))
    return VideoFusionConfig(
        width=heads * int(rng.integers(1, 9)),
        heads=heads,
        layers=int(rng.integers(1, 4)),
        mlp_ratio=float(rng.choice([1.0, 1.3, 2.0, 2.7, 4.0])),  # 1.3, 2.7: int() truncates
        num_classes=int(rng.integers(1, 12)),
        n_bottleneck=int(rng.integers(0, 6)),
    )


def numel(*modules) -> int:
    return sum(p.numel() for m in modules for p in (m.parameters() if isinstance(m, nn.Module) else [m]))


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_fusion_params_match_instantiated_models(rng, strategy):
    for _ in range(6):
        config = random_config(rng)
        model = STRATEGIES[strategy](config)
        counts = fusion_params(strategy, config)
        where = f"{strategy}, {config}"
        assert counts["total"] == numel(model), where
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total"), where
        assert counts["head"] == numel(model.head), where
        encoders = model.blocks if strategy == "early" else model.encoders
        assert counts["encoders"] == numel(encoders), where
        assert counts["cross"] == (numel(model.cross) if strategy == "cross" else 0), where


# --------------------------------------------------------------------------- numerics, training, errors


@pytest.mark.parametrize("strategy", ALL_MODELS)
def test_float32_matches_float64_and_gradients_reach_every_parameter(rng, strategy):
    model = build_any(strategy, rng)
    video, audio, text, lengths = inputs(rng, 3, 12)
    with torch.no_grad():
        ref = model(video, audio, text, lengths)
    model32 = model.float()
    out = model32(video.float(), audio.float(), text.float(), lengths)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5
    out.square().sum().backward()
    for name, p in model32.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("strategy", ALL_MODELS)
def test_bad_input_raises(rng, strategy):
    model = build_any(strategy, rng)
    video, audio, text, lengths = inputs(rng, 2, 12)
    bad = {
        "width": (video[..., :8], audio, text, lengths),
        "batch": (video, audio[:1], text, lengths),
        "2-D": (video, audio[0], text, lengths),
        "dtype": (video, audio, text.long(), lengths),
        "dtype-mix": (video.float(), audio, text, lengths),
        "no tokens": (video[:, :0], audio, text, lengths),
        "lengths shape": (video, audio, text, lengths[:1]),
        "lengths dtype": (video, audio, text, lengths.double()),
        "lengths 0": (video, audio, text, torch.tensor([0, 2])),
        "lengths > Tt": (video, audio, text, torch.tensor([TT + 1, 2])),
    }
    for case, args in bad.items():
        try:
            model(*args)
        except ValueError:
            continue
        pytest.fail(f"{strategy}: no ValueError for bad input ({case})")


def test_bad_configs_and_strategy_raise():
    for sizes in ({"width": 10, "heads": 3}, {"layers": 0}, {"num_classes": 0}, {"n_bottleneck": -1},
                  {"mlp_ratio": 0.0}, {"width": 8.0}):
        with pytest.raises(ValueError):
            VideoFusionConfig(**sizes)
    with pytest.raises(ValueError, match="strategy"):
        fusion_params("mid", VideoFusionConfig())
    with pytest.raises(ValueError, match="VideoFusionConfig"):
        fusion_params("late", {"width": 8})
