"""tiny_mm.video_model: raw clips -> embedders -> a fusion model (chapter 10's whole model).

- Every MODEL_NAME builds and gives the documented shapes (embed, logits,
  fused, streams, targets, the extra heads).
- The embedders against independent computations in float64: the video one
  against PyTorch's Conv3d with kernel = stride = (tubelet, patch, patch)
  holding the same weight (on frames minus their mean frame, or raw), with
  its token order and the cancelling of static content checked directly; the
  audio one against NumPy's rfft; the text one against a plain table lookup.
- Missing modalities: the replacement equals running the fusion module on
  tokens replaced here by hand; an example's outputs change only when its own
  mask changes; a missing modality's input content has no effect; targets
  ignore `present` and equal the mean of the real tokens (text: valid ones).
- Text padding has no effect; a few Adam steps lower the loss of every model;
  every parameter gets a gradient; float32 agrees with float64.
- Bad configs and bad inputs raise ValueError naming the problem.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.numerics import randomize, rel_err
from tiny_mm.data.video import NUM_CLASSES, VideoClipsDataset, VideoConfig, video_vocab
from tiny_mm.video_fusion import MODALITIES, VideoFusionConfig
from tiny_mm.video_model import MODEL_NAMES, VideoFusionModel, VideoFusionOutput, VideoModelConfig

B = 4
# Small but not square in any way that could hide a transposed axis: 3 tubelets of 2 frames,
# a 3 x 3 patch grid of 4 x 4 patches, 8 audio chunks of 300 samples.
SMALL = VideoModelConfig(
    fusion=VideoFusionConfig(width=12, heads=3, layers=1, mlp_ratio=2.0, num_classes=5, n_bottleneck=2),
    data=VideoConfig(frames=6, image_size=12, frame_seconds=0.1, sample_rate=4000),
    patch_size=4,
    tubelet=2,
    audio_chunks=8,
    text_len=7,
)


def inputs(rng, config: VideoModelConfig = SMALL, batch: int = B, dtype=torch.float64):
    """Fresh random frames, audio, text ids (padded with 0 after each length) and lengths."""
    c = config.data
    frames = torch.as_tensor(rng.random((batch, c.frames, 3, c.image_size, c.image_size)), dtype=dtype)
    audio = torch.as_tensor(rng.standard_normal((batch, c.num_samples)), dtype=dtype)
    Lt = config.text_len - 1  # not the longest allowed: positions must be sliced
    lengths = torch.as_tensor(rng.integers(1, Lt + 1, size=batch))
    lengths[0] = Lt
    lengths[1] = 1
    ids = torch.as_tensor(rng.integers(4, config.vocab_size, size=(batch, Lt)))
    ids[torch.arange(Lt)[None, :] >= lengths[:, None]] = 0  # PAD
    return frames, audio, ids, lengths


def build(name: str, rng, config: VideoModelConfig = SMALL) -> VideoFusionModel:
    model = VideoFusionModel(name, config).double()
    randomize(model, rng)
    return model.eval()


def random_present(rng, batch: int = B) -> torch.Tensor:
    present = torch.as_tensor(rng.random((batch, 3)) < 0.5)
    present[0] = True  # one complete example
    present[1] = torch.tensor([False, True, False])  # and one with only the audio
    return present


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_builds_with_documented_shapes(rng, name):
    model = build(name, rng)
    frames, audio, ids, lengths = inputs(rng)
    own = (name,) if name in MODALITIES else MODALITIES
    assert model.modalities == own
    tokens = SMALL.tokens
    assert tokens == {"video": 3 * 3 * 3, "audio": 8, "text": 7}
    with torch.no_grad():
        embedded = model.embed(frames, audio, ids, lengths)
        assert {m: tuple(x.shape) for m, x in embedded.items()} == {
            m: (B, ids.shape[1] if m == "text" else tokens[m], 12) for m in own
        }
        out = model(frames, audio, ids, lengths, random_present(rng))
    assert isinstance(out, VideoFusionOutput)
    F_dim = 12 if name in MODALITIES or name == "early" else 36
    assert model.fusion.fused_dim == F_dim
    assert out.logits.shape == (B, 5) and out.fused.shape == (B, F_dim)
    assert sorted(out.streams) == sorted(own) and sorted(out.targets) == sorted(own)
    assert all(v.shape == (B, 12) for v in [*out.streams.values(), *out.targets.values()])
    assert all(model.reconstruct[m](out.fused).shape == (B, 12) for m in own)
    assert model.order_head(out.fused).shape == (B, 1)


def test_default_config_is_the_chapters():
    config = VideoModelConfig()
    assert config.fusion.num_classes == NUM_CLASSES
    assert config.vocab_size == len(video_vocab())
    ids, _ = video_vocab().encode(["a yellow dog", "a red cat"])
    assert ids.shape[1] <= config.text_len  # the longest caption fits the positions
    assert config.data.num_samples % config.audio_chunks == 0


def test_config_round_trips_through_a_dict():
    import json

    for config in (VideoModelConfig(), SMALL):
        assert VideoModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config


# --------------------------------------------------------------------------- embedders


@pytest.mark.parametrize("subtract", [True, False])
def test_video_embedding_is_a_conv3d_over_tubelets(rng, subtract):
    config = dataclasses.replace(SMALL, subtract_mean_frame=subtract)
    model = build("video", rng, config)
    frames, audio, ids, lengths = inputs(rng)
    emb = model.embedders["video"]
    t, p, d = SMALL.tubelet, SMALL.patch_size, SMALL.fusion.width
    conv = nn.Conv3d(3, d, kernel_size=(t, p, p), stride=(t, p, p)).double()
    mean_frame = frames.numpy().mean(axis=1, keepdims=True) if subtract else 0.0  # NumPy, not torch
    seen = torch.as_tensor(frames.numpy() - mean_frame)
    with torch.no_grad():
        conv.weight.copy_(emb.proj.weight.reshape(d, 3, t, p, p))
        conv.bias.copy_(emb.proj.bias)
        ref = conv(seen.permute(0, 2, 1, 3, 4))  # (B, d, T/t, H/p, W/p)
        ref = ref.flatten(2).transpose(1, 2) + emb.positions  # (B, N, d), time, then rows, columns
        assert rel_err(model.embed(frames, audio, ids, lengths)["video"], ref) < 1e-12


def test_video_token_order_is_time_rows_columns(rng):
    """A single bright pixel lands in the token of its (tubelet, patch row, patch column)."""
    model = build("video", rng, dataclasses.replace(SMALL, subtract_mean_frame=False))
    frames, audio, ids, lengths = inputs(rng)
    t, p, grid = SMALL.tubelet, SMALL.patch_size, SMALL.data.image_size // SMALL.patch_size
    with torch.no_grad():
        base = model.embed(frames, audio, ids, lengths)["video"]
        lit = frames.clone()
        lit[0, 3, 1, 5, 9] += 1.0  # frame 3 (tubelet 1), row 5 (patch row 1), column 9 (patch col 2)
        moved = (model.embed(lit, audio, ids, lengths)["video"] - base).abs().amax(-1)  # (B, N)
    expected = (3 // t) * grid * grid + (5 // p) * grid + 9 // p
    assert moved[0].nonzero().flatten().tolist() == [expected]
    assert moved[1:].max() == 0


def test_static_content_cancels_when_subtracting_the_mean_frame(rng):
    model = build("video", rng)
    frames, audio, ids, lengths = inputs(rng)
    still = torch.as_tensor(rng.random((B, 1, 3, 12, 12)))  # the same in every frame
    with torch.no_grad():
        base = model.embed(frames, audio, ids, lengths)["video"]
        assert rel_err(model.embed(frames + still, audio, ids, lengths)["video"], base) < 1e-12


def test_audio_embedding_against_numpy_rfft(rng):
    model = build("audio", rng)
    frames, audio, ids, lengths = inputs(rng)
    emb = model.embedders["audio"]
    K = SMALL.audio_chunks
    chunks = audio.numpy().reshape(B, K, -1)  # (B, K, S/K), consecutive samples
    spectrum = np.log1p(np.abs(np.fft.rfft(chunks, axis=-1)))  # (B, K, S/(2K) + 1)
    assert spectrum.shape[-1] == SMALL.freq_bins
    W, b = emb.proj.weight.detach().numpy(), emb.proj.bias.detach().numpy()
    ref = spectrum @ W.T + b + emb.positions.detach().numpy()
    with torch.no_grad():
        assert rel_err(model.embed(frames, audio, ids, lengths)["audio"], ref) < 1e-12


def test_text_embedding_is_a_lookup_plus_positions(rng):
    model = build("text", rng)
    frames, audio, ids, lengths = inputs(rng)
    table = model.embedders["text"].token.weight.detach().numpy()
    pos = model.embedders["text"].positions.detach().numpy()
    ref = np.stack([[table[i] + pos[j] for j, i in enumerate(row)] for row in ids.tolist()])
    with torch.no_grad():
        assert rel_err(model.embed(frames, audio, ids, lengths)["text"], ref) < 1e-12


# --------------------------------------------------------------------------- missing modalities


def masked_mean(x: torch.Tensor, lengths) -> torch.Tensor:
    return torch.stack([x[b, : int(n)].mean(0) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("name", ["early", "bottleneck", "audio"])
def test_missing_modality_is_the_learned_vector(rng, name):
    model = build(name, rng)
    frames, audio, ids, lengths = inputs(rng)
    present = random_present(rng)
    with torch.no_grad():
        tokens = model.embed(frames, audio, ids, lengths)
        for i, m in enumerate(model.modalities):
            for b in range(B):
                if not present[b, MODALITIES.index(m)]:
                    tokens[m][b, :] = model.missing[i]  # every position
        args = [tokens.get(m, tokens[model.modalities[0]]) for m in MODALITIES]  # single: own everywhere
        text_lengths = lengths if "text" in model.modalities else None
        ref = model.fusion(*args, text_lengths)
        out = model(frames, audio, ids, lengths, present)
    assert rel_err(out.logits, ref) < 1e-12


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_present_acts_per_example_and_hides_the_input(rng, name):
    model = build(name, rng)
    frames, audio, ids, lengths = inputs(rng)
    present = random_present(rng)
    with torch.no_grad():
        out = model(frames, audio, ids, lengths, present)
        # Flip one entry of example 2's mask: only example 2 may change.
        own = MODALITIES.index(model.modalities[-1])
        flipped = present.clone()
        flipped[2, own] = ~flipped[2, own]
        other = model(frames, audio, ids, lengths, flipped)
        assert rel_err(other.logits[[0, 1, 3]], out.logits[[0, 1, 3]]) < 1e-12
        assert (other.logits[2] - out.logits[2]).abs().max() > 1e-6
        # Rewrite the input of every missing modality: nothing may change.
        hidden = ~present
        frames2, audio2, ids2 = frames.clone(), audio.clone(), ids.clone()
        frames2[hidden[:, 0]] = torch.as_tensor(rng.random(tuple(frames2[hidden[:, 0]].shape)))
        audio2[hidden[:, 1]] = torch.as_tensor(rng.standard_normal(tuple(audio2[hidden[:, 1]].shape)))
        ids2[hidden[:, 2]] = torch.as_tensor(rng.integers(0, 11, size=tuple(ids2[hidden[:, 2]].shape)))
        again = model(frames2, audio2, ids2, lengths, present)
        assert torch.equal(again.logits, out.logits) and torch.equal(again.fused, out.fused)


@pytest.mark.parametrize("name", ["late", "text"])
def test_targets_are_the_real_inputs_mean_tokens(rng, name):
    model = build(name, rng)
    frames, audio, ids, lengths = inputs(rng)
    with torch.no_grad():
        tokens = model.embed(frames, audio, ids, lengths)
        all_there = model(frames, audio, ids, lengths)
        none_there = model(frames, audio, ids, lengths, torch.zeros(B, 3, dtype=torch.bool))
    for m in model.modalities:
        ref = masked_mean(tokens[m], lengths) if m == "text" else tokens[m].mean(1)
        assert rel_err(all_there.targets[m], ref) < 1e-12
        assert torch.equal(none_there.targets[m], all_there.targets[m])  # present changes nothing
    model.train()
    out = model(frames, audio, ids, lengths)
    assert not any(t.requires_grad for t in out.targets.values())  # detached
    assert out.logits.requires_grad


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_text_padding_changes_nothing(rng, name):
    model = build(name, rng)
    frames, audio, ids, lengths = inputs(rng)
    pad = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
    noisy = ids.clone()
    noisy[pad] = torch.as_tensor(rng.integers(0, 11, size=int(pad.sum())))
    with torch.no_grad():
        out = model(frames, audio, ids, lengths)
        other = model(frames, audio, noisy, lengths)
    for a, b in zip(out, other):
        for x, y in (zip(a.values(), b.values()) if isinstance(a, dict) else [(a, b)]):
            assert torch.equal(x, y)


# --------------------------------------------------------------------------- training, numerics


@pytest.fixture(scope="module")
def clips():
    frames, audio, captions, labels, _ = VideoClipsDataset(8, SMALL.data, seed=3).materialize()
    ids, lengths = video_vocab().encode(captions)
    return frames, audio, ids, lengths, labels % SMALL.fusion.num_classes


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_adam_lowers_the_loss_on_a_tiny_batch(clips, one_thread, name):
    torch.manual_seed(0)
    model = VideoFusionModel(name, SMALL)
    frames, audio, ids, lengths, labels = clips
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(frames, audio, ids, lengths).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 0.09 (early) to 0.73 (audio)


@pytest.mark.parametrize("name", ["video", "text", "early", "cross", "bottleneck"])
def test_gradients_reach_every_parameter_and_float32_matches_float64(rng, name):
    model = build(name, rng)
    frames, audio, ids, lengths = inputs(rng)
    present = random_present(rng)
    with torch.no_grad():
        ref = model(frames, audio, ids, lengths, present)
    model = model.float()
    out = model(frames.float(), audio.float(), ids, lengths, present)
    assert out.logits.dtype == torch.float32
    assert rel_err(out.logits, ref.logits) < 1e-5 and rel_err(out.fused, ref.fused) < 1e-5
    loss = out.logits.square().sum() + model.order_head(out.fused).sum()
    loss = loss + sum(model.reconstruct[m](out.fused).square().sum() for m in model.modalities)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


# --------------------------------------------------------------------------- errors


def test_bad_configs_raise():
    cases = {
        "patch_size": dict(patch_size=5),
        "tubelet": dict(tubelet=3),
        "audio_chunks": dict(audio_chunks=7),  # 6400 samples
        "text_len": dict(text_len=0),
        "fusion": dict(fusion={"width": 32}),
        "subtract_mean_frame": dict(subtract_mean_frame=1),
        "data": dict(data=None),
    }
    for word, kwargs in cases.items():
        with pytest.raises(ValueError, match=word):
            VideoModelConfig(**kwargs)
    with pytest.raises(ValueError, match="model name"):
        VideoFusionModel("mid")


@pytest.mark.parametrize("name", ["early", "audio"])
def test_bad_inputs_raise(rng, name):
    model = build(name, rng)
    frames, audio, ids, lengths = inputs(rng)
    present = random_present(rng)
    bad = [  # (a word the message must contain, the arguments)
        ("frames", (frames[:, :, :, :8], audio, ids, lengths, None)),
        ("frames", (frames[:, 0], audio, ids, lengths, None)),
        ("dtype", (frames.long(), audio, ids, lengths, None)),
        ("audio", (frames, audio[:, :-1], ids, lengths, None)),
        ("dtype", (frames, audio, ids.double(), lengths, None)),
        ("text_ids", (frames, audio, torch.zeros(B, SMALL.text_len + 1, dtype=torch.long), lengths, None)),
        ("vocab_size", (frames, audio, ids + SMALL.vocab_size, lengths, None)),
        ("vocab_size", (frames, audio, ids - 1, lengths, None)),
        ("batch size", (frames, audio[:2], ids, lengths, None)),
        ("text_lengths", (frames, audio, ids, lengths[:2], None)),
        ("text_lengths", (frames, audio, ids, lengths + ids.shape[1], None)),
        ("text_lengths", (frames, audio, ids, lengths - lengths, None)),
        ("text_lengths", (frames, audio, ids, lengths.double(), None)),
        ("present", (frames, audio, ids, lengths, present[:, :2])),
        ("present", (frames, audio, ids, lengths, present[:2])),
        ("present", (frames, audio, ids, lengths, present.long())),
        ("Tensor", (frames.numpy(), audio, ids, lengths, None)),
    ]
    for word, args in bad:
        with pytest.raises(ValueError, match=word):
            model(*args)
