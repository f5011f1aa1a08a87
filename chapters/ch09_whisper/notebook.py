# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 9 notebook: what Whisper hears, and what it costs
#
# This notebook follows the chapter text:
#
# 1. the mel filterbank, 80 and 128 bands, against frequency;
# 2. log-mel spectrograms of signals made here (a tone, a chirp, noise,
#    silence, a short clip padded to 30 s, and speech when `espeak-ng` is
#    installed), each compared with `whisper.audio.log_mel_spectrogram`;
# 3. the convolution stem turning 3,000 frames into 1,500 positions;
# 4. the cross-attention of one decoding step, its shapes read off the real
#    modules with hooks;
# 5. the parameters of every released size, as a table and a stacked bar chart,
#    one row checked against openai-whisper's own modules;
# 6. memory and FLOPs for one 30-second window;
# 7. Whisper against GPT-2.
#
# Nothing is downloaded: every model here has random weights or lives on
# PyTorch's `meta` device (shapes without storage). The whole notebook runs in
# well under a minute on a CPU.

# %%
# `make setup` installs the project into .venv in editable mode, so `chapters`
# and `tiny_mm` import from any folder: run this with .venv's Python (`make lab` does).
import io
import shutil
import subprocess
import sys
import wave

import matplotlib

if "ipykernel" not in sys.modules:  # a plain script: draw off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import whisper.audio
import whisper.model as wm
from torch.utils.flop_counter import FlopCounterMode

import chapters.ch09_whisper.reference as ref
from tiny_mm.attention import merge_heads, split_heads
from tiny_mm.audio import whisper_features
from tiny_mm.counting import gpt2_params, whisper_flops, whisper_memory, whisper_params
from tiny_mm.counting_whisper import GPT2_SIZES, WHISPER_DIMS
from tiny_mm.whisper import Whisper, transcribe_prompt

torch.manual_seed(0)
rng = np.random.default_rng(0)
SR = ref.SAMPLE_RATE  # 16,000 Hz
MODELS = ["tiny", "base", "small", "medium", "large-v2", "large-v3"]


def relative_error(out: np.ndarray, want: np.ndarray) -> float:
    """||out - want|| / ||want||, computed in float64."""
    out, want = np.asarray(out, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(out - want) / np.linalg.norm(want))


# %% [markdown]
# ## 1. The mel filterbank
#
# The power spectrum of a 400-sample frame has 201 bins, 40 Hz apart, from 0 to
# 8 kHz. The filterbank pools them into 80 bands (128 for large-v3): triangles
# whose edges are evenly spaced on the Slaney mel scale, which is linear up to
# 1 kHz and logarithmic above. So the low bands are narrow (a few bins each)
# and the high ones wide; each triangle is scaled to unit area, so the wide
# ones are also low. `reference.mel_filterbank` computes them from the
# formula; openai-whisper ships the same matrices as a file
# (`assets/mel_filters.npz`), which is what they are compared with here.

# %%
bin_hz = np.arange(ref.N_FFT // 2 + 1) * SR / ref.N_FFT  # (201,) centre of each frequency bin
filters = {n: ref.mel_filterbank(n) for n in (80, 128)}  # n -> (n, 201)
for n, fb in filters.items():
    shipped = whisper.audio.mel_filters("cpu", n).double().numpy()  # (n, 201) from openai-whisper's file
    peaks = bin_hz[fb.argmax(axis=1)]  # (n,) the bin where each triangle peaks
    print(f"{n:>3} bands: max |ours - whisper's file| {np.abs(fb - shipped).max():.1e}; "
          f"first band peaks at {peaks[0]:.0f} Hz, last at {peaks[-1]:.0f} Hz; "
          f"bands peaking below 1 kHz: {int((peaks < 1000).sum())}")

fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
for ax, (n, fb) in zip(axes, filters.items()):
    ax.plot(bin_hz, fb.T, lw=0.7)
    ax.axvline(1000, color="grey", ls="--", lw=0.8)
    ax.set(ylabel="weight", title=f"{n} Slaney mel filters (dashed: 1 kHz, where the scale turns logarithmic)")
axes[-1].set(xlabel="frequency (Hz)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Log-mel spectrograms of signals made here
#
# Each signal below is made in this cell, padded or cut to 30 s, and turned
# into an (80, 3000) log-mel spectrogram three ways: the NumPy reference
# (float64), `tiny_mm.audio` (float32), and openai-whisper's
# `log_mel_spectrogram` (float32). The table prints the largest absolute
# difference from whisper for 80 and 128 bands. Whisper's float32 arithmetic
# rounds most near the 8-decade floor, so differences of a few 1e-5 are
# expected there; the tests allow 1e-4.
#
# Speech comes from `espeak-ng`, a small speech synthesiser, if it is on the
# machine (`make setup` installs it where it can). It writes a 22,050 Hz WAV
# file, which is brought to 16 kHz by linear interpolation: crude, but both
# implementations get the same samples.

# %%
def speak(text: str, speed: int = 150) -> np.ndarray | None:
    """Speech from espeak-ng as a float32 waveform at 16 kHz, or None when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        return None
    wav = subprocess.run(["espeak-ng", "--stdout", "-s", str(speed), text],
                         capture_output=True, check=True, timeout=30).stdout
    with wave.open(io.BytesIO(wav)) as f:  # 16-bit mono at espeak's own rate
        rate, pcm = f.getframerate(), np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    x = pcm.astype(np.float64) / 32768.0
    t_out = np.arange(int(len(x) * SR / rate)) / SR
    return np.interp(t_out, np.arange(len(x)) / rate, x).astype(np.float32)


t = np.arange(ref.N_SAMPLES) / SR  # (480000,) 30 s of sample times
short = np.arange(int(7.5 * SR)) / SR  # 7.5 s
signals = {
    "tone, 1 kHz": 0.5 * np.sin(2 * np.pi * 1000 * t),
    "chirp, 0 to 8 kHz": 0.5 * np.sin(2 * np.pi * (8000 / 60) * t**2),  # frequency 8000 t / 30 Hz
    "white noise": 0.1 * rng.standard_normal(t.size),
    "silence": np.zeros(t.size),
    "7.5 s clip (tone + chirp), padded": 0.3 * np.sin(2 * np.pi * 440 * short)
    + 0.3 * np.sin(2 * np.pi * (4000 / 15) * short**2),  # a chirp from 0 to 4 kHz
}
speech = speak("three one four one five nine, the quick brown fox jumps over the lazy dog")
if speech is None:
    print("espeak-ng is not installed: no speech here (Debian/Ubuntu: apt-get install espeak-ng)")
else:
    signals["speech (espeak-ng)"] = speech
signals = {name: x.astype(np.float32) for name, x in signals.items()}  # what a WAV file would give

features = {}
print(f"{'signal':<44} {'seconds':>7}  {'reference vs whisper':>21}  {'tiny_mm vs whisper':>19}")
for name, x in signals.items():
    for n_mels in (80, 128):
        theirs = whisper.audio.log_mel_spectrogram(
            whisper.audio.pad_or_trim(torch.from_numpy(x)), n_mels).numpy()  # (n_mels, 3000)
        ours = ref.whisper_features(x.astype(np.float64), n_mels)  # (n_mels, 3000)
        torch_ours = whisper_features(torch.from_numpy(x), n_mels).numpy()  # (n_mels, 3000)
        assert ours.shape == theirs.shape == (n_mels, ref.N_FRAMES)
        error, torch_error = np.abs(ours - theirs).max(), np.abs(torch_ours - theirs).max()
        assert error < 1e-4 and torch_error < 1e-4
        print(f"{name + f', {n_mels} bands':<44} {len(x) / SR:>7.1f}  {error:>21.1e}  {torch_error:>19.1e}")
        if n_mels == 80:
            features[name] = ours

# %% [markdown]
# What to look for: the tone is one bright band; the chirp, which rises
# linearly in Hz, curves on the mel axis (fast through the narrow low bands,
# slowly through the wide high ones); white noise, whose power per hertz is
# flat, comes out nearly flat across bands, because each triangle has unit
# area and so averages rather than sums the bins it covers. Silence is $-1.5$
# everywhere: $\log_{10}$ of the $10^{-10}$ clamp, then $(x+4)/4$. The short
# clip ends at 7.5 s, and the padding after it sits at the floor, exactly 2
# below the clip's maximum (8 decades, divided by 4).

# %%
fig, axes = plt.subplots(len(features), 1, figsize=(10, 1.9 * len(features)), sharex=True, layout="constrained")
for ax, (name, spec) in zip(axes, features.items()):
    im = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=-1.5, vmax=1.5,
                   extent=(0, ref.CHUNK_LENGTH, 0, spec.shape[0]))
    ax.set(ylabel="mel band", title=name)
axes[-1].set(xlabel="seconds")
fig.colorbar(im, ax=axes, fraction=0.02, label="(log10 + 4) / 4")
plt.show()

tone_band = int(features["tone, 1 kHz"].mean(axis=1).argmax())
centres = bin_hz @ filters[80].T / filters[80].sum(axis=1)  # (80,) each band's centre of mass in Hz
print(f"tone: brightest band {tone_band}, whose filter is centred at {centres[tone_band]:.0f} Hz")
assert np.all(features["silence"] == -1.5)
clip = features["7.5 s clip (tone + chirp), padded"]
padding = clip[:, int(7.5 * 100) + 2 :]  # frames well after the clip (100 frames per second)
print(f"padded clip: maximum {clip.max():.3f}; the padding is {padding.min():.3f} to {padding.max():.3f}, "
      f"the maximum minus 2 = {clip.max() - 2:.3f}")
assert np.allclose(padding, clip.max() - 2.0)

# %% [markdown]
# ## 3. The stem: 3,000 frames in, 1,500 positions out
#
# The encoder starts with two 1-D convolutions over time, each with kernel 3
# and padding 1 (one zero frame at each end), each followed by GELU. A
# convolution of kernel $k$, padding $p$ and stride $s$ turns $L$ frames into
# $\lfloor (L + 2p - k)/s \rfloor + 1$. The first has stride 1, so
# $3000 + 2 - 3 + 1 = 3000$ frames come out, now $d$ channels each instead of
# 80 mel bands. The second has stride 2: it computes its window at every other
# frame, $\lfloor 2999 / 2 \rfloor + 1 = 1500$ outputs. The padding is what
# makes the counts round; without it the two would give 2998 and then 1498.
#
# So 100 frames per second become 50 positions per second: each position
# stands for 20 ms of audio and, through the two kernels, sees 5 mel frames
# (50 ms). Halving here quarters the cost of every attention score matrix in
# the encoder. Below, a Whisper with the *tiny* model's dimensions (random
# weights) encodes two of the spectrograms, with hooks printing the shape that
# leaves each stage.

# %%
dims = WHISPER_DIMS["tiny"]
model = Whisper(dims).eval()  # random weights: shapes and costs are what matter here
pair = ["speech (espeak-ng)" if "speech (espeak-ng)" in features else "chirp, 0 to 8 kHz", "tone, 1 kHz"]
mel = torch.from_numpy(np.stack([features[name] for name in pair])).float()  # (2, 80, 3000)

seen = []
hooks = [module.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, tuple(out.shape))))
         for name, module in [("conv1", model.encoder.conv1), ("conv2", model.encoder.conv2),
                              ("blocks[0]", model.encoder.blocks[0]), ("ln_post", model.encoder.ln_post)]]
with torch.no_grad():
    audio_features = model.embed_audio(mel)  # (2, 1500, 384)
for hook in hooks:
    hook.remove()

print(f"input mel {tuple(mel.shape)}   (B, n_mels, frames): {', '.join(pair)}")
for name, shape in seen:
    print(f"after {name:<10} {shape}")


def conv_length(length: int, kernel: int = 3, padding: int = 1, stride: int = 1) -> int:
    return (length + 2 * padding - kernel) // stride + 1


assert seen[0][1] == (2, dims.n_audio_state, conv_length(3000))
assert seen[1][1] == (2, dims.n_audio_state, conv_length(3000, stride=2)) == (2, 384, 1500)
assert tuple(audio_features.shape) == (2, dims.n_audio_ctx, dims.n_audio_state)
print("the encoder's positions:", tuple(model.encoder.positional_embedding.shape),
      "fixed sinusoids, one row per position")
try:  # one frame too many: the positions table has exactly 1,500 rows, so whisper pads every clip to 30 s
    model.embed_audio(torch.zeros(1, 80, 3001))
except ValueError as error:
    print("3,001 frames:", error)

# %% [markdown]
# ## 4. One decoding step, and where cross-attention gets its keys
#
# The decoder reads the prompt `<|startoftranscript|><|en|><|transcribe|>
# <|notimestamps|>`, then one new token per step. In every decoder block,
# self-attention mixes the text positions (causally) and cross-attention
# lets each text position read the audio: **queries come from the text**,
# $(B, L, d)$, **keys and values from the encoder output**, $(B, 1500, d)$.
# The scores are $(B, H, L, 1500)$, so the output has the text's length again.
#
# Hooks on the first decoder block's linear layers record what each one
# computes in two calls with a key/value cache: the 4-token prompt, then one
# token. In the second call the cross-attention's key and value projections
# do not run at all: the audio does not change, so its keys and values were
# computed once and cached. The self-attention's key projection sees only the
# new token, and the cache grows by one position.

# %%
block = model.decoder.blocks[0]
calls = []
watched = {f"{part}.{proj}": getattr(getattr(block, part), proj)
           for part in ("attn", "cross_attn") for proj in ("query", "key", "value", "out")}
watched["cross_attn"] = block.cross_attn
captured = {}


def record(module, args, out, name):
    """Keep what one hooked module read and wrote (cross_attn reads the text and the audio)."""
    inputs = " and ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
    calls.append((name, inputs, tuple(out.shape)))
    captured[name] = (args[0].detach(), out.detach())


hooks = [module.register_forward_hook(lambda m, a, o, name=name: record(m, a, o, name))
         for name, module in watched.items()]
cache = model.new_cache()
prompt = torch.tensor([transcribe_prompt(dims.n_vocab)] * 2)  # (2, 4) the same prompt for both clips
next_token = torch.tensor([[1045], [1045]])  # (2, 1): " three" in Whisper's multilingual vocabulary
steps = {"prompt, 4 tokens": prompt, "next token": next_token}
for step, tokens in steps.items():
    calls.clear()
    with torch.no_grad():
        logits = model.logits(tokens, audio_features, cache)  # (2, L, 51865)
    print(f"--- {step}: tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)}")
    for name, shape_in, shape_out in calls:
        print(f"  {name:<17} {shape_in:<32} -> {shape_out}")
    print(f"  cache of block 0: self-attention keys {tuple(cache.self_attn[0].k.shape)}, "
          f"cross-attention keys {tuple(cache.cross_attn[0].k.shape)}")
for hook in hooks:
    hook.remove()
assert "cross_attn.key" not in {name for name, _, _ in calls}  # the cached step never re-projects the audio

# %% [markdown]
# The hooked tensors are enough to redo the last cross-attention by hand, in
# float64: split the $(B, 1, d)$ query and the cached $(B, 1500, d)$ keys and
# values into heads, take the softmax of the scaled scores, weigh the values,
# merge the heads and apply the output projection. It must give what the
# module gave.

# %%
q = captured["cross_attn.query"][1].double()  # (2, 1, 384) from the newest text position
k, v = cache.cross_attn[0].k.double(), cache.cross_attn[0].v.double()  # (2, 1500, 384) from the audio
H = block.cross_attn.n_head
qh, kh, vh = (split_heads(x, H) for x in (q, k, v))  # (2, 6, 1, 64), (2, 6, 1500, 64), (2, 6, 1500, 64)
weights = torch.softmax(qh @ kh.transpose(-2, -1) / qh.shape[-1] ** 0.5, dim=-1)  # (2, 6, 1, 1500)
w_out, b_out = block.cross_attn.out.weight.detach().double(), block.cross_attn.out.bias.detach().double()
out = merge_heads(weights @ vh) @ w_out.T + b_out  # (2, 1, 384)
print(f"scores and weights {tuple(weights.shape)} (B, H, L, audio positions); output {tuple(out.shape)}")
error = relative_error(out.numpy(), captured["cross_attn"][1].numpy())
print(f"by hand (float64) vs the module (float32): relative error {error:.1e}")
assert error < 1e-5

# %% [markdown]
# ## 5. Parameters of every released size
#
# `tiny_mm.counting.whisper_params` counts each piece from the dimensions
# alone. The chart groups them: the stem (two convolutions), the decoder's
# learned positions (the encoder's sinusoids are a buffer, not a parameter),
# all encoder blocks, all decoder blocks, the token embedding (also the output
# layer: the weights are tied), and the two final LayerNorms (the blocks'
# own LayerNorms are inside the blocks).

# %%
def breakdown(name: str) -> dict[str, int]:
    """Whisper's parameters in the chart's six groups, from the formulas."""
    p, d = whisper_params(name), WHISPER_DIMS[name]
    groups = {
        "stem": p["stem"],
        "positions": p["encoder_positions"] + p["decoder_positions"],
        "encoder blocks": d.n_audio_layer * p["encoder_block"],
        "decoder blocks": d.n_text_layer * p["decoder_block"],
        "token embedding": p["token_embedding"],
        "final layer norms": p["encoder_ln_post"] + p["decoder_ln"],
    }
    assert sum(groups.values()) == p["total"]
    return groups


table = {name: breakdown(name) for name in MODELS}
groups = list(table["tiny"])
print(f"{'model':<9}" + "".join(f"{g:>18}" for g in groups) + f"{'total':>15}")
for name, parts in table.items():
    print(f"{name:<9}" + "".join(f"{v:>18,}" for v in parts.values()) + f"{sum(parts.values()):>15,}")

fig, (ax_abs, ax_share) = plt.subplots(1, 2, figsize=(12, 4.2))
bottom_abs, bottom_share = np.zeros(len(MODELS)), np.zeros(len(MODELS))
totals = np.array([sum(table[m].values()) for m in MODELS], dtype=float)
for g in groups:
    values = np.array([table[m][g] for m in MODELS], dtype=float)
    ax_abs.bar(MODELS, values / 1e6, bottom=bottom_abs, label=g)
    ax_share.bar(MODELS, 100 * values / totals, bottom=bottom_share, label=g)
    bottom_abs += values / 1e6
    bottom_share += 100 * values / totals
ax_abs.set(ylabel="parameters (millions)", title="Whisper's parameters, exact", ylim=(0, 1.05 * totals.max() / 1e6))
ax_share.set(ylabel="% of the model", title="the same, as shares", ylim=(0, 100))
fig.legend(*ax_abs.get_legend_handles_labels(), loc="center right", fontsize=8)
fig.tight_layout(rect=(0, 0, 0.86, 1))  # room on the right for the legend
plt.show()
share = {m: table[m]["token embedding"] / sum(table[m].values()) for m in MODELS}
print(f"token embedding: {share['tiny']:.0%} of tiny, {share['large-v3']:.0%} of large-v3")

# %% [markdown]
# One row checked against openai-whisper itself: its `AudioEncoder` and
# `TextDecoder` built on the `meta` device (no memory is allocated, so even
# large-v3 takes no time), their parameters grouped by name in the same six
# groups. (`whisper.model.Whisper` as a whole cannot be built on `meta`: its
# alignment-heads buffer calls `to_sparse`, which that device lacks. The two
# towers are all its parameters; the tests check that on a small model.)

# %%
def measured_groups(dims) -> dict[str, int]:
    """openai-whisper's parameters, built on meta and grouped by parameter name."""
    with torch.device("meta"):
        encoder = wm.AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                  dims.n_audio_layer)
        decoder = wm.TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                 dims.n_text_layer)
    assert "positional_embedding" in dict(encoder.named_buffers())  # the sinusoids: a buffer
    named = [("encoder." + n, p) for n, p in encoder.named_parameters()]
    named += [("decoder." + n, p) for n, p in decoder.named_parameters()]
    prefix = {"encoder.conv": "stem", "decoder.positional": "positions", "encoder.blocks": "encoder blocks",
              "decoder.blocks": "decoder blocks", "decoder.token": "token embedding",
              "encoder.ln_post": "final layer norms", "decoder.ln": "final layer norms"}
    counts = dict.fromkeys(groups, 0)
    for name, p in named:
        counts[next(g for start, g in prefix.items() if name.startswith(start))] += p.numel()
    return counts


measured = measured_groups(WHISPER_DIMS["large-v3"])
for g in groups:
    print(f"large-v3 {g:<18} formula {table['large-v3'][g]:>15,}   openai-whisper {measured[g]:>15,}")
assert measured == table["large-v3"]

# %% [markdown]
# ## 6. Memory and FLOPs for one 30-second window
#
# `whisper_memory` counts the bytes of inference with batch 1 (its docstring
# states every assumption; the chapter text repeats them): the weights at
# 4, 2 or 1 bytes per parameter; the encoder's activations, of which only one
# block's live at a time, with the $(h, 1500, 1500)$ scores and their softmax
# materialised (as openai-whisper's plain path does) or not (a fused attention
# kernel); and the decoder's key/value cache, self-attention for 448 tokens
# and cross-attention for the 1,500 audio positions. MB here are $10^6$
# bytes, GB $10^9$.

# %%
MB = 1e6
print(f"{'':<9} {'weights':^26}   {'activations and cache, fp32':^42}")
print(f"{'model':<9} {'fp32':>8} {'fp16':>8} {'int8':>8}   {'encoder peak':>12} {'(fused)':>8} "
      f"{'KV self':>9} {'KV cross':>9}   (MB)")
for name in MODELS:
    fp32, fp16, int8 = (whisper_memory(name, dtype_bytes=b) for b in (4, 2, 1))
    fused = whisper_memory(name, dtype_bytes=4, materialise_scores=False)
    print(f"{name:<9} {fp32['weights'] / MB:>8,.0f} {fp16['weights'] / MB:>8,.0f} {int8['weights'] / MB:>8,.0f}   "
          f"{fp32['encoder_layer_peak'] / MB:>12,.0f} {fused['encoder_layer_peak'] / MB:>8,.0f} "
          f"{fp32['kv_self'] / MB:>9,.0f} {fp32['kv_cross'] / MB:>9,.0f}")
    assert all(fp16[key] * 2 == fp32[key] for key in fp32)  # every term is proportional to the element size

medium = {b: whisper_memory("medium", dtype_bytes=b) for b in (4, 2, 1)}
print(f"\nmedium, all in: {medium[4]['total'] / 1e9:.2f} GB fp32, {medium[2]['total'] / 1e9:.2f} GB fp16, "
      f"{medium[1]['total'] / 1e9:.2f} GB int8 (the source says 4.1 GB fp16 and 2.1 GB int8)")
print(f"medium, decoding state for 448 tokens (audio features, KV self, KV cross): "
      f"{medium[4]['decoding'] / MB:.0f} MB fp32 (the source: about 500 MB)")
print(f"medium, one encoder layer's peak: {medium[1]['encoder_layer_peak'] / 1e6:.2f}M values, "
      f"{medium[4]['encoder_layer_peak'] / MB:.0f} MB fp32 (the source: 159M values, 636 MB)")

# %% [markdown]
# FLOPs, counted as `torch.utils.flop_counter` counts them (2 per multiply-add
# of every matrix product and convolution; softmax, norms and GELU left out):
# one encoder pass over the window, the cross-attention keys and values
# computed once, the 448th decoded token (the most expensive one: it attends
# to 448 cached positions and 1,500 audio positions), and all 448 tokens.

# %%
G = 1e9
print(f"{'model':<9} {'encoder':>10} {'cross K,V':>10} {'token 448':>10} {'448 tokens':>11} {'total':>10} "
      f"{'encoder share':>14}   (GFLOP)")
for name in MODELS:
    f = whisper_flops(name)
    print(f"{name:<9} {f['encoder'] / G:>10,.0f} {f['cross_kv'] / G:>10,.0f} {f['decoder_token'] / G:>10.2f} "
          f"{f['decoder'] / G:>11,.0f} {f['total'] / G:>10,.0f} {f['encoder'] / f['total']:>14.0%}")

# The encoder's count measured: openai-whisper's medium encoder on the meta device, under FlopCounterMode.
d = WHISPER_DIMS["medium"]
with torch.device("meta"):
    encoder = wm.AudioEncoder(d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer)
    with FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, d.n_mels, 2 * d.n_audio_ctx))
print(f"\nmedium encoder: formula {whisper_flops('medium')['encoder']:,} FLOPs, "
      f"FlopCounterMode on openai-whisper {counter.get_total_flops():,}")
assert counter.get_total_flops() == whisper_flops("medium")["encoder"]

# %% [markdown]
# ## 7. Whisper against GPT-2
#
# GPT-2 is a decoder without cross-attention: a block has $12d^2 + 13d$
# parameters (its key projection has a bias, Whisper's does not), a Whisper
# decoder block $16d^2 + 17d$: the cross-attention and its LayerNorm add
# $4d^2 + 4d$. GPT-2 small and medium have exactly the widths and depths of
# Whisper small's and medium's decoders; GPT-2's vocabulary (50,257) and its
# 1,024 positions are a little different from Whisper's 51,865 and 448.
#
# The GPT-2 counts come from `gpt2_params`; the XL row is checked below
# against transformers' `GPT2LMHeadModel` built on `meta`, which is also run
# under `FlopCounterMode` for one forward pass over its full 1,024-token
# context, to compare with Whisper's encoder pass.

# %%
whisper_decoder = {"small": "small", "medium": "medium", "large": "large-v2"}  # the same width d
print(f"{'GPT-2':<7} {'layers':>6} {'d':>5} {'parameters':>14} {'block':>12}  | Whisper decoder of the same width")
for name, (layers, width) in GPT2_SIZES.items():
    g = gpt2_params(layers, width)
    line = f"{name:<7} {layers:>6} {width:>5} {g['total']:>14,} {g['block']:>12,}  | "
    if name in whisper_decoder:
        w, wd = whisper_params(whisper_decoder[name]), WHISPER_DIMS[whisper_decoder[name]]
        line += (f"{whisper_decoder[name]:<9} {wd.n_text_layer:>3} layers {w['decoder']:>13,}, "
                 f"block {w['decoder_block']:>12,} (+{w['decoder_block'] - g['block']:,} = 4d^2 + 4d)")
        assert w["decoder_block"] - g["block"] == 4 * width**2 + 4 * width
    else:
        line += f"no Whisper model is {width} wide"
    print(line)

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402  (a slow import, needed only here)

layers, width = GPT2_SIZES["xl"]
with torch.device("meta"):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64))
    with FlopCounterMode(display=False) as counter:
        gpt2(torch.zeros(1, 1024, dtype=torch.long))
gpt2_forward = counter.get_total_flops()
built = sum(p.numel() for p in gpt2.parameters())
print(f"\nGPT-2 XL: gpt2_params {gpt2_params(layers, width)['total']:,}, transformers {built:,}")
assert built == gpt2_params(layers, width)["total"]
gpt2_weights = 4 * gpt2_params(layers, width)["total"]  # bytes in fp32
gpt2_cache = 4 * 2 * layers * 1024 * width  # fp32 keys and values of 1,024 tokens in every layer
large = whisper_memory("large-v2", dtype_bytes=4)
print(f"fp32: GPT-2 XL weights {gpt2_weights / 1e9:.2f} GB + a 1,024-token KV cache {gpt2_cache / 1e9:.2f} GB; "
      f"Whisper large-v2 weights {large['weights'] / 1e9:.2f} GB + one window {large['decoding'] / 1e9:.2f} GB")
for name in ("medium", "large-v2"):
    encoder_pass = whisper_flops(name)["encoder"]
    print(f"Whisper {name} encoder pass {encoder_pass / G:,.0f} GFLOP; GPT-2 XL over 1,024 tokens "
          f"{gpt2_forward / G:,.0f} GFLOP: ratio {encoder_pass / gpt2_forward:.2f}")

# %% [markdown]
# The source compares "Whisper-large" with GPT-2 XL and calls Whisper's encoder
# about 9 times as expensive, from $O(T^2 d)$ with $T = 3000$ against $n = 1024$.
# But the encoder attends over 1,500 positions, not 3,000 frames, and the
# $T^2$ term is not the whole cost: the projections and MLPs ($24Td^2$ per
# layer) weigh as much. Measured, one encoder pass of Whisper medium (the
# model the source actually counts) is about a third of a GPT-2 XL forward
# pass over 1,024 tokens, and large-v2's about two thirds. The attention-score
# term alone, per layer and at equal width, grows by $(1500/1024)^2 = 2.15$,
# not $(3000/1024)^2 = 8.6$.
#
# ## Where next
#
# - `tinymm tour --only whisper` runs this chapter's checks against
#   openai-whisper from the command line.
# - Exercise 3 (`tinymm grade ex03`) asks you to write the parameter and memory
#   formulas of sections 5 and 6 yourself; the grader builds modules to check them.
# - Try the stem with a 10 s clip without padding: what breaks, and why would
#   shorter positional tables not be enough to fix it for a trained model?
