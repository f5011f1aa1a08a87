"""tiny_mm.whisper and load_whisper against openai-whisper (random weights, nothing downloaded).

openai-whisper's ``whisper.model.Whisper`` is an independent implementation of
the same model. It is built with random weights for the tiny dimensions (all of
them real: 30 s of audio, 51865 tokens), for base (the audio context shortened to 100 positions:
whisper only asserts that the mel length fits its positional table) and for a
very small model; its state dict goes through `load_whisper`, and our float32
encoder output and logits are compared with whisper's run in float64. Whisper's
LayerNorm casts its input to float32 (a guard for fp16 inference), which would
make a float64 run round to float32 at every norm: the tests swap in the plain
``nn.LayerNorm.forward`` for whisper's, nothing else is changed. Its decoder
returns logits cast to float32, a rounding of 6e-8, far below the 1e-5 tested.
"""
import os
import pickle

import numpy as np
import pytest
import torch
import whisper.model as wm
from torch import nn
from whisper.tokenizer import get_tokenizer

from tiny_mm.checkpoints import load_whisper
from tests.numerics import rel_err
from tiny_mm.whisper import (
    KVCache, Whisper, WhisperDims, greedy_decode, sinusoids, special_tokens, transcribe_prompt,
)

torch.set_num_threads(2)

TINY = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
            n_vocab=51865, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
# base, with 100 audio positions (2 s of mel) instead of 1500 to keep the test fast.
BASE_SHORT = dict(TINY, n_audio_ctx=100, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                  n_text_state=512, n_text_head=8, n_text_layer=6)
SMALL = dict(n_mels=16, n_audio_ctx=24, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
             n_vocab=51865, n_text_ctx=16, n_text_state=32, n_text_head=4, n_text_layer=2)


def openai_whisper(dims: dict, rng) -> wm.Whisper:
    """openai-whisper's model with fresh random weights: matrices std 1/sqrt(fan-in), so every
    layer keeps activations near unit scale and logits near N(0, 1); norms' gains near 1."""
    model = wm.Whisper(wm.ModelDimensions(**dims)).eval()
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)  # a row of (out, in[, k]): the fan-in
            elif "ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.1, generator=gen)
    return model


def float64_reference(model: wm.Whisper, monkeypatch) -> wm.Whisper:
    """The same model in float64, with whisper's float32 cast in LayerNorm removed (see the top)."""
    monkeypatch.setattr(wm.LayerNorm, "forward", nn.LayerNorm.forward)
    return model.double()


def checkpoint(model: wm.Whisper) -> dict:
    """What openai-whisper's released files hold (there in float16)."""
    return {"dims": vars(model.dims).copy(), "model_state_dict": model.state_dict()}


# --------------------------------------------------------------------------- dimensions


def test_dims_from_mapping_and_validation():
    dims = WhisperDims.from_mapping(vars(wm.ModelDimensions(**TINY)))
    assert dims == WhisperDims()  # the defaults are tiny's
    with pytest.raises(ValueError, match=r"missing \['n_mels'\]"):
        WhisperDims.from_mapping({k: v for k, v in TINY.items() if k != "n_mels"})
    with pytest.raises(ValueError, match=r"unexpected \['n_layers'\]"):
        WhisperDims.from_mapping(dict(TINY, n_layers=4))
    with pytest.raises(ValueError, match="mapping"):
        WhisperDims.from_mapping([1, 2, 3])
    for bad, match in [(dict(n_text_layer=0), "n_text_layer must be a positive int"),
                       (dict(n_vocab=51865.0), "n_vocab must be a positive int"),
                       (dict(n_audio_head=5), "divisible by n_audio_head"),
                       (dict(n_audio_state=385, n_text_state=385, n_audio_head=5, n_text_head=5), "even"),
                       (dict(n_text_state=768, n_text_head=12), "must equal n_text_state")]:
        with pytest.raises(ValueError, match=match):
            WhisperDims(**dict(TINY, **bad))
    with pytest.raises(ValueError, match="WhisperDims"):
        Whisper(TINY)


def test_sinusoids_match_whisper_and_the_formula():
    for length, channels in [(1500, 384), (1500, 512), (7, 6)]:
        ours = sinusoids(length, channels)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, wm.sinusoids(length, channels)), (length, channels)
        # The formula in float64: sin/cos(t * 10000^(-k / (C/2 - 1))). float32 rounds the angle
        # t * w (t up to 1499) by up to 1499 * 2^-24 ~ 1e-4, hence the tolerance.
        t = np.arange(length)[:, None]
        w = 10000.0 ** (-np.arange(channels // 2) / (channels // 2 - 1))[None, :]
        ref = np.concatenate([np.sin(t * w), np.cos(t * w)], axis=1)
        np.testing.assert_allclose(ours.numpy(), ref, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="even"):
        sinusoids(10, 7)


def test_parameter_names_and_shapes_match_whisper():
    theirs = wm.Whisper(wm.ModelDimensions(**TINY))
    ours = Whisper(WhisperDims(**TINY))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert "decoder.blocks.0.attn.key.bias" not in shapes  # whisper's keys have no bias


# --------------------------------------------------------------------------- equal to openai-whisper


@pytest.mark.parametrize("dims, batch", [(SMALL, 3), (TINY, 1), (BASE_SHORT, 1)], ids=["small", "tiny", "base"])
def test_encoder_and_logits_match_openai_whisper(dims, batch, rng, monkeypatch):
    theirs = openai_whisper(dims, rng)
    ours = load_whisper(checkpoint(theirs))  # before .double(): a float32 state dict
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    mel = torch.rand(batch, dims["n_mels"], 2 * dims["n_audio_ctx"], generator=gen) * 2 - 1  # log-mel's range
    prompt = transcribe_prompt(dims["n_vocab"])
    text = torch.randint(0, 50257, (batch, 9), generator=gen)  # ordinary byte-pair tokens
    tokens = torch.cat([torch.tensor(prompt).expand(batch, -1), text], dim=1)  # (B, 13)

    with torch.no_grad():
        audio = ours.embed_audio(mel)  # (B, T, d)
        logits = ours.logits(tokens, audio)  # (B, 13, V)
        both = ours(mel, tokens)
        reference = float64_reference(theirs, monkeypatch)
        audio_ref = reference.embed_audio(mel.double())
        logits_ref = reference.logits(tokens, audio_ref)

    assert audio.shape == (batch, dims["n_audio_ctx"], dims["n_audio_state"])
    assert logits.shape == (batch, 13, dims["n_vocab"])
    assert audio.dtype == logits.dtype == torch.float32
    assert 0.3 < float(audio_ref.std()) < 3 and 0.3 < float(logits_ref.std()) < 3  # sane activations
    assert rel_err(audio, audio_ref) < 1e-5
    assert rel_err(logits, logits_ref) < 1e-5
    assert rel_err(both, logits_ref) < 1e-5


# --------------------------------------------------------------------------- load_whisper


def test_load_whisper_reads_a_float16_file(tmp_path, rng, monkeypatch):
    theirs = openai_whisper(SMALL, rng)
    half = {k: v.half() for k, v in theirs.state_dict().items()}
    path = tmp_path / "small.pt"
    torch.save({"dims": vars(theirs.dims).copy(), "model_state_dict": half}, path)
    ours = load_whisper(str(path))
    assert ours.dims == WhisperDims(**SMALL) and not ours.training
    for name, value in ours.state_dict().items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, half[name].float()), name
    # The model computes what whisper computes with the rounded weights.
    theirs.load_state_dict({k: v.float() for k, v in half.items()})
    gen = torch.Generator().manual_seed(1)
    mel = torch.rand(2, 16, 48, generator=gen)
    tokens = torch.tensor([transcribe_prompt(51865)] * 2)
    with torch.no_grad():
        ref = float64_reference(theirs, monkeypatch)(mel.double(), tokens)
        assert rel_err(ours(mel, tokens), ref) < 1e-5


def test_load_whisper_names_missing_and_unexpected_keys(rng):
    good = checkpoint(openai_whisper(SMALL, rng))
    state = dict(good["model_state_dict"])
    state["decoder.extra.weight"] = state.pop("decoder.ln.bias")
    with pytest.raises(ValueError, match=r"missing keys \['decoder.ln.bias'\], unexpected keys \['decoder.extra"):
        load_whisper({"dims": good["dims"], "model_state_dict": state})
    with pytest.raises(ValueError, match="'dims' and 'model_state_dict'"):
        load_whisper(good["model_state_dict"])
    with pytest.raises(ValueError, match="missing"):
        load_whisper({"dims": {"n_mels": 80}, "model_state_dict": good["model_state_dict"]})
    wrong = dict(good["dims"], n_text_ctx=17)  # positional table of 16 rows does not fit 17
    with pytest.raises(RuntimeError, match="positional_embedding"):
        load_whisper({"dims": wrong, "model_state_dict": good["model_state_dict"]})
    with pytest.raises(ValueError, match="path or a checkpoint"):
        load_whisper(42)
    with pytest.raises(FileNotFoundError):
        load_whisper("/nonexistent/whisper.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"dims": dict(SMALL), "model_state_dict": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_whisper(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is real: plain unpickling runs it
    assert marker.exists()


# --------------------------------------------------------------------------- special tokens


@pytest.mark.parametrize("multilingual, num_languages, n_vocab", [(True, 99, 51865), (True, 100, 51866),
                                                                 (False, 99, 51864)])
def test_special_tokens_match_whisper_tokenizer(multilingual, num_languages, n_vocab):
    tok = get_tokenizer(multilingual, num_languages=num_languages)  # reads the shipped .tiktoken file
    assert tok.encoding.n_vocab == n_vocab
    ours = special_tokens(n_vocab)
    assert ours.num_languages == num_languages
    assert (ours.eot, ours.sot, ours.translate, ours.transcribe, ours.no_speech, ours.no_timestamps,
            ours.timestamp_begin) == (tok.eot, tok.sot, tok.translate, tok.transcribe, tok.no_speech,
                                      tok.no_timestamps, tok.timestamp_begin)
    assert ours.en == tok.encoding.encode_single_token("<|en|>")
    prompt = transcribe_prompt(n_vocab)
    assert tuple(prompt) == tok.sot_sequence_including_notimestamps
    if multilingual:
        assert tok.encoding.decode(prompt) == "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>"
    with pytest.raises(ValueError, match="too small"):
        special_tokens(50000)


# --------------------------------------------------------------------------- decoding with a cache


def small_model(rng) -> tuple[Whisper, wm.Whisper, torch.Tensor]:
    theirs = openai_whisper(SMALL, rng)
    ours = load_whisper(checkpoint(theirs))
    gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
    audio = torch.randn(2, SMALL["n_audio_ctx"], SMALL["n_audio_state"], generator=gen)  # (B, T, d)
    return ours, theirs, audio


def test_cache_fed_in_chunks_equals_the_full_prefix(rng, monkeypatch):
    """Prompt, then 3 tokens at once, then 1: the new queries sit after the cached positions."""
    ours, theirs, audio = small_model(rng)
    tokens = torch.tensor(rng.integers(0, 51865, size=(2, 8)))
    cache = KVCache(SMALL["n_text_layer"])
    with torch.no_grad():
        chunks = [ours.logits(tokens[:, a:b], audio, cache) for a, b in [(0, 4), (4, 7), (7, 8)]]
        assert cache.length == 8 and cache.cross_attn[0].k.shape == (2, SMALL["n_audio_ctx"], 32)
        ref = float64_reference(theirs, monkeypatch).logits(tokens, audio.double())  # (B, 8, V)
    assert rel_err(torch.cat(chunks, dim=1), ref) < 1e-5
    with pytest.raises(ValueError, match="8 cached \\+ 9 new tokens exceed the decoder's 16 positions"):
        ours.logits(torch.zeros(2, 9, dtype=torch.long), audio, cache)


def test_greedy_with_cache_equals_without(rng, monkeypatch):
    ours, theirs, audio = small_model(rng)
    prompt = transcribe_prompt(51865)
    cached = greedy_decode(ours, audio, prompt, max_new_tokens=10)
    plain = greedy_decode(ours, audio, prompt, max_new_tokens=10, use_cache=False)
    assert cached.tokens.shape == (2, 14) and cached.logits.shape == (2, 10, 51865)
    assert torch.equal(cached.tokens, plain.tokens)
    assert rel_err(cached.logits, plain.logits) < 1e-5
    # Independent reference: whisper in float64, the whole prefix every step, argmax.
    reference = float64_reference(theirs, monkeypatch)
    tokens = torch.tensor([prompt] * 2)
    with torch.no_grad():
        for step in range(10):
            logits = reference.logits(tokens, audio.double())[:, -1]  # (B, V)
            assert rel_err(cached.logits[:, step], logits) < 1e-5
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached.tokens, tokens)
    assert len(set(cached.tokens[:, 4:].flatten().tolist())) > 3  # a real sequence, not one token repeated


def test_greedy_stops_at_eot_and_at_max_length(rng):
    ours, _, audio = small_model(rng)
    audio = audio[:1]
    prompt = transcribe_prompt(51865)
    free = greedy_decode(ours, audio, prompt, max_new_tokens=12, use_cache=False).tokens[0, 4:].tolist()
    # Declare the token of a step that has not appeared before the end token: decoding stops right there.
    step = next(i for i in range(1, 12) if free[i] not in free[:i])
    stopped = greedy_decode(ours, audio, prompt, max_new_tokens=12, eot=free[step])
    assert stopped.tokens[0].tolist() == prompt + free[: step + 1]
    assert stopped.logits.shape == (1, step + 1, 51865)
    # A token never produced: max_new_tokens, then the 16 positions of the decoder, bound the length.
    never = next(t for t in range(51865) if t not in free)
    assert greedy_decode(ours, audio, prompt, max_new_tokens=5, eot=never).tokens.shape == (1, 9)
    assert greedy_decode(ours, audio, prompt, max_new_tokens=100, eot=never).tokens.shape == (1, 16)
    # The real <|endoftext|>: make it every position's answer (ln outputs b, eot's embedding 10 b).
    with torch.no_grad():
        ours.decoder.ln.weight.zero_()
        ours.decoder.ln.bias.copy_(torch.randn(32))
        ours.decoder.token_embedding.weight[special_tokens(51865).eot] = 10 * ours.decoder.ln.bias
    done = greedy_decode(ours, audio, prompt)
    assert done.tokens[0].tolist() == prompt + [50257]


def test_finished_sequences_pad_with_eot(rng):
    ours, _, audio = small_model(rng)
    prompt = transcribe_prompt(51865)
    free = greedy_decode(ours, audio, prompt, max_new_tokens=8, use_cache=False).tokens[:, 4:]
    first = free[0].tolist()
    step = next(i for i in range(1, 8) if first[i] not in first[:i] and first[i] not in free[1].tolist())
    out = greedy_decode(ours, audio, prompt, max_new_tokens=8, eot=first[step]).tokens[:, 4:]  # (2, 8)
    assert out[0].tolist() == first[: step + 1] + [first[step]] * (7 - step)
    assert torch.equal(out[1], free[1])


def test_bad_inputs_raise_value_error(rng):
    ours, _, audio = small_model(rng)
    with pytest.raises(ValueError, match=r"mel must have shape \(B, 16, 48\)"):
        ours.embed_audio(torch.zeros(1, 16, 50))
    with pytest.raises(ValueError, match="floating-point"):
        ours.embed_audio(torch.zeros(1, 16, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie in"):
        ours.logits(torch.tensor([[51865]]), audio[:1])
    with pytest.raises(ValueError, match="int64 or int32"):
        ours.logits(torch.zeros(1, 3), audio[:1])
    with pytest.raises(ValueError, match="batch size"):
        ours.logits(torch.zeros(3, 2, dtype=torch.long), audio)
    with pytest.raises(ValueError, match=r"audio features must have shape \(B, T, 32\)"):
        ours.logits(torch.zeros(2, 2, dtype=torch.long), audio[..., :16])
    with pytest.raises(ValueError, match="exceed"):
        ours.logits(torch.zeros(1, 17, dtype=torch.long), audio[:1])
    with pytest.raises(ValueError, match="leaves none"):
        greedy_decode(ours, audio, list(range(16)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(ours, audio, [1, 2], max_new_tokens=0)
