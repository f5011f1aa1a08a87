"""tiny_mm.counting_whisper against models openai-whisper and transformers build, measured by PyTorch.

Every expected value is measured, never taken from the code under test:

- Parameters: ``sum(p.numel())`` over openai-whisper's AudioEncoder / TextDecoder
  and transformers' GPT2Model / GPT2LMHeadModel, built on the meta device
  (shapes without memory). ``Whisper(dims)`` itself cannot be built on meta
  (its alignment-heads buffer calls to_sparse, which meta lacks); a small
  Whisper built on the CPU shows it holds nothing besides the two towers.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around a small random
  Whisper's encoder and around each step of cached greedy decoding.
- Memory: the key/value tensors whisper's own cache hooks allocate, and a
  dispatch mode that tracks the bytes of every storage created during the
  encoder's forward and still referenced (the live-bytes peak).
"""
from __future__ import annotations

import weakref
from dataclasses import asdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
from whisper.model import AudioEncoder, ModelDimensions, TextDecoder, Whisper, disable_sdpa

from tiny_mm.counting_whisper import (
    GPT2_SIZES,
    WHISPER_DIMS,
    WhisperDims,
    gpt2_params,
    whisper_flops,
    whisper_memory,
    whisper_params,
)

RELEASES = ["tiny", "base", "small", "medium", "large-v2", "large-v3", "large-v3-turbo"]
# The dims of the released checkpoints, as whisper's model card and checkpoints give them,
# written out here (not read from tiny_mm): (n_mels, d, heads, encoder layers, decoder layers, vocab).
PUBLISHED = {
    "tiny": (80, 384, 6, 4, 4, 51865),
    "base": (80, 512, 8, 6, 6, 51865),
    "small": (80, 768, 12, 12, 12, 51865),
    "medium": (80, 1024, 16, 24, 24, 51865),
    "large-v2": (80, 1280, 20, 32, 32, 51865),
    "large-v3": (128, 1280, 20, 32, 32, 51866),
    "large-v3-turbo": (128, 1280, 20, 32, 4, 51866),
}


def published_dims(name: str) -> ModelDimensions:
    n_mels, d, heads, enc, dec, vocab = PUBLISHED[name]
    return ModelDimensions(n_mels, 1500, d, heads, enc, vocab, 448, d, heads, dec)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_dims(rng, **fixed) -> ModelDimensions:
    """Small dimensions no released model has (odd vocabularies, unequal layer counts)."""
    heads = int(rng.integers(1, 4))
    d = heads * int(rng.choice([4, 8]))
    values = dict(
        n_mels=int(rng.integers(2, 10)), n_audio_ctx=int(rng.integers(3, 12)), n_audio_state=d,
        n_audio_head=heads, n_audio_layer=int(rng.integers(1, 4)), n_vocab=int(rng.integers(5, 60)),
        n_text_ctx=int(rng.integers(4, 12)), n_text_state=d, n_text_head=heads,
        n_text_layer=int(rng.integers(1, 4)),
    )
    values.update(fixed)
    return ModelDimensions(**values)


def towers(dims: ModelDimensions) -> tuple[AudioEncoder, TextDecoder]:
    encoder = AudioEncoder(
        dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
    )
    decoder = TextDecoder(
        dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
    )
    return encoder, decoder


# --------------------------------------------------------------------------- parameters


def test_release_table_matches_the_published_dims():
    assert set(WHISPER_DIMS) == set(PUBLISHED)
    for name in PUBLISHED:
        assert asdict(WHISPER_DIMS[name]) == asdict(published_dims(name)), name


@pytest.mark.parametrize("name", RELEASES)
def test_whisper_params_equal_instantiated_towers(name):
    dims = published_dims(name)
    with torch.device("meta"):
        encoder, decoder = towers(dims)
    counts = whisper_params(dims)
    assert counts["encoder"] == n_params(encoder)
    assert counts["decoder"] == n_params(decoder)
    assert counts["total"] == n_params(encoder) + n_params(decoder)
    block = encoder.blocks[0]
    assert counts["encoder_block"] == n_params(block)
    assert counts["decoder_block"] == n_params(decoder.blocks[0])
    assert counts["conv1"] == n_params(encoder.conv1) and counts["conv2"] == n_params(encoder.conv2)
    assert counts["encoder_ln_post"] == n_params(encoder.ln_post)
    assert counts["token_embedding"] == n_params(decoder.token_embedding)
    assert counts["decoder_positions"] == decoder.positional_embedding.numel()
    assert counts["decoder_ln"] == n_params(decoder.ln)
    # The encoder's sinusoids are a buffer: present in the state dict, absent from the parameters.
    assert counts["encoder_positions"] == 0
    assert "positional_embedding" in dict(encoder.named_buffers())
    assert "positional_embedding" not in dict(encoder.named_parameters())


def test_model_card_sizes_are_rounded_up():
    """Whisper's README: tiny 39 M, base 74 M, small 244 M, medium 769 M, large 1550 M.

    Every figure is above the exact parameter count, by 0.6 % (large) to 4.9 % (tiny):
    the card's numbers are loose, not the formulas (which equal the instantiated towers).
    """
    card = {"tiny": 39, "base": 74, "small": 244, "medium": 769, "large-v2": 1550, "large-v3": 1550}
    for name, millions in card.items():
        exact = whisper_params(published_dims(name))["total"]
        assert exact < millions * 1e6 < 1.05 * exact, name


def test_whole_whisper_holds_only_its_two_towers(rng):
    dims = random_dims(rng)
    torch.manual_seed(0)
    model = Whisper(dims)
    assert whisper_params(dims)["total"] == n_params(model) == n_params(model.encoder) + n_params(model.decoder)


def test_whisper_params_on_random_dims(rng):
    for _ in range(5):
        dims = random_dims(rng)
        with torch.device("meta"):
            encoder, decoder = towers(dims)
        counts = whisper_params(dims)
        assert (counts["encoder"], counts["decoder"]) == (n_params(encoder), n_params(decoder)), dims


def test_dims_as_a_mapping_a_tiny_mm_dataclass_or_a_name():
    dims = published_dims("base")
    expected = whisper_params(dims)
    assert whisper_params(asdict(dims)) == expected
    assert whisper_params(WhisperDims(**asdict(dims))) == expected
    assert whisper_params("base") == expected


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_mels": 0}, "n_mels must be a positive int"),
        ({"n_vocab": 51865.0}, "n_vocab must be a positive int"),
        ({"n_audio_head": 7}, "n_audio_state 512 must be divisible by n_audio_head 7"),
        ({"n_text_state": 256, "n_text_head": 4}, r"n_audio_state \(512\) must equal n_text_state \(256\)"),
    ],
)
def test_bad_dims_are_named(change, message):
    dims = {**asdict(published_dims("base")), **change}
    with pytest.raises(ValueError, match=message):
        whisper_params(dims)


def test_missing_fields_and_unknown_names():
    dims = asdict(published_dims("base"))
    del dims["n_text_ctx"]
    with pytest.raises(ValueError, match="lacks n_text_ctx"):
        whisper_params(dims)
    with pytest.raises(ValueError, match="known: tiny, base"):
        whisper_params("huge")


@pytest.mark.parametrize("name", list(GPT2_SIZES))
def test_gpt2_params_equal_transformers(name):
    layers, width = GPT2_SIZES[name]
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64)
    with torch.device("meta"):
        bare, with_head = GPT2Model(config), GPT2LMHeadModel(config)
    counts = gpt2_params(layers, width)
    assert counts["total"] == n_params(bare) == n_params(with_head)  # the head is wte, counted once
    assert counts["block"] == n_params(bare.h[0])
    assert counts["token_embedding"] == n_params(bare.wte) and counts["positions"] == n_params(bare.wpe)


def test_gpt2_sizes_are_the_published_ones():
    assert GPT2_SIZES == {"small": (12, 768), "medium": (24, 1024), "large": (36, 1280), "xl": (48, 1600)}


def test_gpt2_params_on_random_sizes(rng):
    for _ in range(3):
        heads = int(rng.integers(1, 4))
        layers, width = int(rng.integers(1, 4)), 8 * heads
        vocab, ctx = int(rng.integers(10, 100)), int(rng.integers(4, 40))
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=ctx)
        with torch.device("meta"):
            model = GPT2LMHeadModel(config)
        assert gpt2_params(layers, width, vocab, ctx)["total"] == n_params(model)


def test_gpt2_bad_sizes():
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        gpt2_params(12, 0)


# --------------------------------------------------------------------------- FLOPs


def flops_of(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def test_encoder_flops_equal_flop_counter(rng):
    """Through whisper's disable_sdpa() path: on a CPU, FlopCounterMode has no formula for
    the CPU flash-attention op SDPA picks, and would leave out the 4 B T^2 d of attention."""
    dims = random_dims(rng)
    torch.manual_seed(0)
    encoder, _ = towers(dims)
    batch = int(rng.integers(1, 3))
    mel = torch.randn(batch, dims.n_mels, 2 * dims.n_audio_ctx)  # a full window: 2T frames
    with torch.no_grad(), disable_sdpa():
        measured = flops_of(lambda: encoder(mel))
    counted = whisper_flops(dims, text_tokens=1, batch=batch)
    assert counted["encoder"] == measured
    # Layers cost the same each: removing one removes encoder_layer.
    assert counted["encoder"] == counted["stem"] + dims.n_audio_layer * counted["encoder_layer"]


def test_decoder_flops_per_cached_token_equal_flop_counter(rng):
    dims = random_dims(rng)
    torch.manual_seed(0)
    model = Whisper(dims).eval()
    batch = int(rng.integers(1, 3))
    audio = torch.randn(batch, dims.n_audio_ctx, dims.n_audio_state)
    cache, hooks = model.install_kv_cache_hooks()
    measured = []
    with torch.no_grad(), disable_sdpa():
        for _ in range(dims.n_text_ctx):
            tokens = torch.from_numpy(rng.integers(0, dims.n_vocab, (batch, 1)))
            measured.append(flops_of(lambda: model.decoder(tokens, audio, kv_cache=cache)))
    for hook in hooks:
        hook.remove()
    # The first step also projects the audio into the cross-attention's K and V.
    first = whisper_flops(dims, text_tokens=1, batch=batch)
    assert measured[0] == first["cross_kv"] + first["decoder_token"]
    for n in range(2, dims.n_text_ctx + 1):
        assert measured[n - 1] == whisper_flops(dims, text_tokens=n, batch=batch)["decoder_token"], n
    assert sum(measured) == whisper_flops(dims, text_tokens=dims.n_text_ctx, batch=batch)["decoder"]


# --------------------------------------------------------------------------- memory


def test_kv_cache_bytes_equal_the_tensors_whisper_allocates(rng):
    dims = random_dims(rng)
    torch.manual_seed(0)
    model = Whisper(dims).eval()
    batch, steps = int(rng.integers(1, 3)), int(rng.integers(1, dims.n_text_ctx + 1))
    audio = torch.randn(batch, dims.n_audio_ctx, dims.n_audio_state)
    cache, hooks = model.install_kv_cache_hooks()
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.from_numpy(rng.integers(0, dims.n_vocab, (batch, 1)))
            model.decoder(tokens, audio, kv_cache=cache)
    for hook in hooks:
        hook.remove()
    self_modules = {m for block in model.decoder.blocks for m in (block.attn.key, block.attn.value)}
    cross_modules = {m for block in model.decoder.blocks for m in (block.cross_attn.key, block.cross_attn.value)}
    assert set(cache) == self_modules | cross_modules
    measured_self = sum(t.untyped_storage().nbytes() for m, t in cache.items() if m in self_modules)
    measured_cross = sum(t.untyped_storage().nbytes() for m, t in cache.items() if m in cross_modules)
    memory = whisper_memory(dims, dtype_bytes=4, text_tokens=steps, batch=batch)
    assert (memory["kv_self"], memory["kv_cross"]) == (measured_self, measured_cross)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created under the mode and still referenced by some tensor.

    Every op output is attributed to its storage; a storage stops counting when
    the last tensor seen on it is freed (weakref finalizers run at once in
    CPython). Storages that exist before (weights, inputs) are left out.
    """

    def __init__(self, external: set[int]):
        super().__init__()
        self.external = external
        self.live: dict[int, list[int]] = {}  # data_ptr -> [bytes, tensors alive]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self.external or storage.nbytes() == 0:
                continue
            if key not in self.live:
                self.live[key] = [storage.nbytes(), 0]
                self.now += storage.nbytes()
            self.live[key][1] += 1
            weakref.finalize(tensor, self._release, key)
        self.peak = max(self.peak, self.now)
        return out


def encoder_peak_bytes(encoder: AudioEncoder, mel: torch.Tensor) -> int:
    external = {t.untyped_storage().data_ptr() for t in [*encoder.parameters(), *encoder.buffers(), mel]}
    mode = LiveBytes(external)
    with torch.no_grad(), mode:
        encoder(mel)
    return mode.peak


@pytest.mark.parametrize("materialise", [True, False])
def test_encoder_peak_equals_live_bytes(rng, materialise):
    """Scores materialised: whisper's disable_sdpa() path; fused: its SDPA path."""
    for n_audio_ctx in (3, 24):  # short windows: the MLP phase peaks; long ones: the scores
        dims = random_dims(rng, n_audio_ctx=n_audio_ctx)
        torch.manual_seed(0)
        encoder, _ = towers(dims)
        batch = int(rng.integers(1, 3))
        mel = torch.randn(batch, dims.n_mels, 2 * dims.n_audio_ctx)
        if materialise:
            with disable_sdpa():
                measured = encoder_peak_bytes(encoder, mel)
        else:
            measured = encoder_peak_bytes(encoder, mel)
        memory = whisper_memory(dims, dtype_bytes=4, text_tokens=1, batch=batch, materialise_scores=materialise)
        assert memory["encoder_peak"] == measured, (dims, batch)


def test_memory_weights_and_totals():
    dims = published_dims("medium")
    with torch.device("meta"):
        params = sum(n_params(tower) for tower in towers(dims))
    for dtype_bytes in (4, 2, 1):
        memory = whisper_memory(dims, dtype_bytes=dtype_bytes)
        assert memory["weights"] == params * dtype_bytes
        assert memory["total"] == memory["weights"] + max(memory["encoder_peak"], memory["decoding"])
        # 24 layers x (K, V) x 448 tokens x 1024 wide, and x 1500 audio positions.
        assert memory["kv_self"] == 24 * 2 * 448 * 1024 * dtype_bytes
        assert memory["kv_cross"] == 24 * 2 * 1500 * 1024 * dtype_bytes
        # Materialised scores: 16 heads x 1500^2, scores and probabilities, in one layer.
        assert memory["encoder_attention_phase"] == (7 * 1500 * 1024 + 2 * 16 * 1500**2) * dtype_bytes


def test_text_tokens_beyond_the_context_are_refused():
    with pytest.raises(ValueError, match="text_tokens 449 exceeds"):
        whisper_memory("tiny", dtype_bytes=2, text_tokens=449)
    with pytest.raises(ValueError, match="text_tokens 449 exceeds"):
        whisper_flops("tiny", text_tokens=449)
    with pytest.raises(ValueError, match="dtype_bytes must be a positive int"):
        whisper_memory("tiny", dtype_bytes=0)


def test_stem_peak_equals_live_bytes_of_an_encoder_without_blocks(rng):
    """Every block holds more than the stem (11 B T d > 4 B T d), so the stem is measured alone."""
    dims = random_dims(rng)
    torch.manual_seed(0)
    bare = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, 0)
    batch = int(rng.integers(1, 3))
    mel = torch.randn(batch, dims.n_mels, 2 * dims.n_audio_ctx)
    memory = whisper_memory(dims, dtype_bytes=4, text_tokens=1, batch=batch)
    assert memory["stem_peak"] == encoder_peak_bytes(bare, mel)
    assert memory["mel_input"] == mel.untyped_storage().nbytes()


def test_counting_module_serves_the_whisper_formulas():
    from tiny_mm import counting, counting_whisper

    assert counting.whisper_params is counting_whisper.whisper_params
    assert counting.gpt2_params is counting_whisper.gpt2_params
    with pytest.raises(AttributeError):
        counting.no_such_formula
