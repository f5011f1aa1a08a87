"""Training a tiny Whisper on spoken digits (`tiny_mm.train_whisper_digits`, `tinymm train whisper-digits`).

What must hold, on tiny runs:

- the teacher-forcing loss equals a cross-entropy computed here in float64, position by
  position, over the real tokens only (padding never counts, however long it is);
- a short run on a fixed batch lowers the loss, and its log has one line per step;
- greedy decoding with the key/value cache gives the same transcripts (and the same
  logits) as decoding without it;
- the saved file reloads (weights_only=True, also through `tiny_mm.load_whisper`) into an
  equal model;
- the command line: --help, bad values named before any work, espeak-ng missing named
  with how to install it; with espeak-ng, a whole tiny run prints the WER of held-out strings.

Apart from that last one, nothing here needs espeak-ng: the loop and decoding run on
random features of the right shape.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.numerics import rel_err
from tiny_mm.checkpoints import load_whisper
from tiny_mm.data import spoken_digits as sd
from tiny_mm.data.spoken_digits import EOT, PAD, SOT, DigitTokenizer, SpokenDigits
from tiny_mm.train_whisper_digits import (
    DigitsConfig, evaluate, load_model, main, save_model, teacher_forcing_loss, tiny_digits_dims,
    train_whisper_digits, transcribe,
)
from tiny_mm.whisper import Whisper, greedy_decode

SECONDS = 0.4  # 40 mel frames, 20 encoder positions: fast, and the code does not care
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits


def random_clips(rng, n: int) -> SpokenDigits:
    """Random features of the right shape with random transcripts of 3-6 digits."""
    texts = [" ".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(3, 7)))) for _ in range(n)]
    tokens, lengths = DigitTokenizer().encode_batch(texts, 8)
    mel = torch.tensor(rng.standard_normal((n, 80, round(100 * SECONDS))), dtype=torch.float32)
    return SpokenDigits(mel, tokens, lengths, texts, ["en"] * n, [170] * n, [50] * n, SECONDS, SECONDS)


def random_model(rng) -> Whisper:
    torch.manual_seed(int(rng.integers(2**31)))
    return Whisper(tiny_digits_dims(SECONDS)).eval()


def test_loss_is_the_cross_entropy_of_the_real_tokens(rng):
    model, data = random_model(rng), random_clips(rng, 5)
    loss = teacher_forcing_loss(model, data.mel, data.tokens)
    with torch.no_grad():
        logits = model(data.mel, data.tokens[:, :-1]).double()  # (5, 7, 13)
    terms = []
    for b in range(5):
        n = int(data.lengths[b])  # SOT, digits, EOT: n - 1 predictions
        for i in range(n - 1):
            target = int(data.tokens[b, i + 1])
            terms.append(-torch.log_softmax(logits[b, i], dim=0)[target])
    reference = torch.stack(terms).mean()
    assert rel_err(loss.detach().double(), reference) < 1e-5
    # More padding after EOT changes nothing: the decoder is causal and PAD targets are ignored.
    longer = torch.cat([data.tokens, torch.full((5, 3), PAD)], dim=1)  # (5, 11)
    assert rel_err(teacher_forcing_loss(model, data.mel, longer).detach().double(), reference) < 1e-5


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """30 steps on one fixed batch of 8 random clips: (clips, result, log path)."""
    rng = np.random.default_rng(2024)
    clips = random_clips(rng, 8)
    config = DigitsConfig(steps=30, batch_size=8, train_clips=8, eval_clips=1, warmup=3, lr=3e-3,
                          seconds=SECONDS, threads=1)
    log = tmp_path_factory.mktemp("run") / "log.jsonl"
    result = train_whisper_digits(config, data={"train": clips}, progress=False, log_path=log, evaluate_sets=False)
    return clips, result, log


def test_short_run_on_a_fixed_batch_lowers_the_loss(short_run):
    _, result, log = short_run
    assert len(result.losses) == 30 and np.all(np.isfinite(result.losses))
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(30)) and [r["loss"] for r in rows] == result.losses
    assert not result.model.training


def test_cached_and_uncached_decoding_agree(rng, short_run):
    # The briefly trained model: a fresh one only repeats <|startoftranscript|> (its output layer
    # is its input table), which would test little.
    model, data = short_run[1].model, random_clips(rng, 12)
    data.mel[:8] = short_run[0].mel  # (12, 80, 40): the 8 clips it has seen, then 4 new ones
    data.texts[:8] = short_run[0].texts
    cached, plain = transcribe(model, data.mel), transcribe(model, data.mel, use_cache=False)
    assert cached == plain
    assert len(set(cached)) > 1 and any(len(h.split()) > 1 for h in cached), cached
    features = model.embed_audio(data.mel)
    a = greedy_decode(model, features, [SOT], eot=EOT, use_cache=True)
    b = greedy_decode(model, features, [SOT], eot=EOT, use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and rel_err(a.logits, b.logits) < 1e-5
    assert a.tokens.shape[1] <= model.dims.n_text_ctx  # stops at EOT, or when the positions are full
    scores = evaluate(model, data)
    assert scores["hypotheses"] == cached
    assert scores["wer"] == sd.word_error_rate(data.texts, cached)
    assert scores["accuracy"] == np.mean([h == r for h, r in zip(cached, data.texts)])
    # On the clips it was trained on, it has learnt something.
    assert sd.word_error_rate(data.texts[:8], cached[:8]) < 1.0


def test_saved_file_reloads_equal(rng, tmp_path):
    model, data = random_model(rng), random_clips(rng, 3)
    path = tmp_path / "digits.pt"
    save_model(model, path)
    for loaded in (load_model(path), load_whisper(path)):
        assert loaded.dims == model.dims
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        with torch.no_grad():
            assert torch.equal(model(data.mel, data.tokens), loaded(data.mel, data.tokens))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["vocab"] = ["a", "b"]
    torch.save(checkpoint, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a spoken-digits model"):
        load_model(tmp_path / "other.pt")


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "tinymm train whisper-digits" in out and "--train-clips" in out and "espeak-ng" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "steps must be a positive int"),
        (["--lr", "nan"], "lr must be a finite positive number"),
        (["--batch-size", "64", "--train-clips", "32"], "larger than the 32 train_clips"),
        (["--eval-clips", "-1"], "eval_clips must be a positive int"),
    ],
)
def test_bad_values_are_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_not_a_number_and_missing_espeak(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        main(["--steps", "many"])
    assert exit_.value.code == 2 and "invalid int value" in capsys.readouterr().err
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    assert main(["--steps", "1"]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be a DigitsConfig"):
        train_whisper_digits({"steps": 1})
    with pytest.raises(ValueError, match="data must be a dict with the sets"):
        train_whisper_digits(DigitsConfig(steps=1, batch_size=1, train_clips=1), data={"train": None})
    with pytest.raises(ValueError, match="multiple of 0.02"):
        tiny_digits_dims(1.001)


@pytest.mark.skipif(shutil.which("espeak-ng") is None,
                    reason="espeak-ng is not on PATH (Debian/Ubuntu: apt-get install espeak-ng)")
def test_tiny_run_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "m.pt"
    argv = ["--steps", "3", "--batch-size", "4", "--train-clips", "8", "--eval-clips", "3", "--threads", "1",
            "--quiet", "--out", str(out), "--cache", str(tmp_path / "clips")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "held-out strings, training voices: WER" in text and "held-out voices" in text
    assert "synthesised 14 clips" in text
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == ["heldout.pt", "heldout_voices.pt", "train.pt"]
    assert load_model(out).dims == tiny_digits_dims()
