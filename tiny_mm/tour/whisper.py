"""Chapter 9's stop: Whisper's front end, model and parameter counts against openai-whisper."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict


def _test_signal(rng, seconds: float):
    """A chirp plus a tone plus a little noise, float32 at 16 kHz: (seconds * 16000,)."""
    import numpy as np

    t = np.arange(int(seconds * 16000)) / 16000
    chirp = np.sin(2 * np.pi * (200 * t + 600 * t**2))  # 200 Hz rising through ~3 kHz
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(300, 3000) * t)
    return (0.5 * chirp + tone + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _front_end(rng, quick: bool) -> bool:
    import numpy as np
    import torch
    import whisper

    from chapters.ch09_whisper import reference as ref
    from tiny_mm.audio import whisper_features

    ok = True
    seconds = 2.5 if quick else 7.3
    audio = _test_signal(rng, seconds)  # (n,)
    theirs = whisper.audio.log_mel_spectrogram(whisper.audio.pad_or_trim(torch.from_numpy(audio))).numpy()
    print(f"1. The front end: a {seconds} s chirp + tone, padded to 30 s, as 80 log-mel bands x 3,000 frames")
    limit = 1e-4  # absolute, on the (log10 + 4) / 4 scale
    for label, ours in (("NumPy reference (float64)", ref.whisper_features(audio.astype(np.float64))),
                        ("tiny_mm.audio (float32)", whisper_features(torch.from_numpy(audio)).numpy())):
        error = float(np.abs(ours - theirs).max()) if ours.shape == theirs.shape else float("inf")
        ok &= error < limit
        print(f"   {label:<26} vs whisper.audio.log_mel_spectrogram: max |difference| {error:.1e}  "
              f"limit {limit:.0e} {verdict(error, limit)}")
    return ok


def _model(rng) -> bool:
    import torch
    import whisper.model as wm

    from tiny_mm.checkpoints import load_whisper

    # A small Whisper with random weights: 100 audio positions (2 s), so it runs in a blink.
    dims = wm.ModelDimensions(n_mels=80, n_audio_ctx=100, n_audio_state=128, n_audio_head=2, n_audio_layer=2,
                              n_vocab=51865, n_text_ctx=32, n_text_state=128, n_text_head=2, n_text_layer=2)
    torch.manual_seed(int(rng.integers(2**31)))
    theirs = wm.Whisper(dims).eval()
    with torch.no_grad():  # fresh values everywhere, LayerNorm gains and biases included
        for p in theirs.parameters():
            std = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.2  # matrices: 1 / sqrt(fan-in)
            p.normal_(0.0, std)
    ours = load_whisper({"dims": vars(dims), "model_state_dict": theirs.state_dict()})
    mel = torch.from_numpy(rng.standard_normal((2, 80, 200))).float()  # (B, n_mels, 2 T)
    tokens = torch.from_numpy(rng.integers(0, 51865, size=(2, 12)))  # (B, L)
    with torch.no_grad():
        pairs = {
            "encoder output": (ours.embed_audio(mel), theirs.embed_audio(mel)),
            "decoder logits": (ours(mel, tokens), theirs(mel, tokens)),
        }
    ok = True
    limit = 1e-5
    print()
    print("2. The model: openai-whisper with random weights (2 + 2 layers, d = 128), its state dict in ours")
    for name, (out, ref) in pairs.items():
        error = relative_error(out.numpy(), ref.numpy())
        ok &= error < limit
        print(f"   {name:<15} tiny_mm vs openai-whisper, both float32: relative error {error:.1e}  "
              f"limit {limit:.0e} {verdict(error, limit)}")
    return ok


def _counts() -> bool:
    import torch
    import whisper.model as wm

    from tiny_mm.counting_whisper import WHISPER_DIMS, whisper_params

    ok = True
    print()
    print("3. Parameters by formula, against openai-whisper's encoder and decoder built on the meta device")
    print(f"   {'model':<10} {'formula':>15} {'openai-whisper':>15}")
    for name in ("tiny", "base", "small", "medium", "large-v2", "large-v3"):
        dims = wm.ModelDimensions(**vars(WHISPER_DIMS[name]))
        with torch.device("meta"):  # shapes only: no memory, no time
            built = sum(p.numel() for part in (wm.AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state,
                                                              dims.n_audio_head, dims.n_audio_layer),
                                               wm.TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state,
                                                              dims.n_text_head, dims.n_text_layer))
                        for p in part.parameters())
        formula = whisper_params(name)["total"]
        ok &= formula == built
        print(f"   {name:<10} {formula:>15,} {built:>15,} {'ok' if formula == built else 'FAIL'}")
    medium = whisper_params("medium")["total"]
    print(f"   The source's 24-layer, d = 1024 'Whisper-large' is medium: {medium:,} parameters, not 761.9M;")
    print("   large is 32 + 32 layers at d = 1280.")
    return ok


def run(quick: bool) -> bool:
    import numpy as np

    rng = np.random.default_rng()
    print("Whisper: a log-mel front end, an audio encoder and a text decoder joined by cross-attention.")
    print("Each piece here is checked against openai-whisper itself.")
    print()
    ok = _front_end(rng, quick)
    ok &= _model(rng)
    ok &= _counts()
    print()
    print(
        "What this showed: the spectrogram is computed from scratch (the mel filterbank included) and\n"
        "equals whisper's; the chapter's model loads whisper's state dicts and computes the same\n"
        "outputs; and every released model's size follows from the formulas, to the parameter."
    )
    return ok
