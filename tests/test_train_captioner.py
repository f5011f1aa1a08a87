"""`tinymm train captioner`: reading captions back, scoring them, a short run, saving, the command line.

Accuracy figures of the full recipe are reported by the command (docs/training.md),
never asserted here: these tests check that a short run lowers the loss, that a
tiny batch can be learned by heart, and that a saved model comes back unchanged.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from tiny_mm.captioning import Captioner, CaptionerConfig, generate, load_captioner, save_captioner
from tiny_mm.data import shapes
from tiny_mm.data.shapes import ShapeObject, ShapesConfig, ShapesDataset, normalize
from tiny_mm.data.words import shapes_vocab
from tiny_mm.train_captioner import TrainConfig, caption_scores, main, parse_caption, train_captioner

TINY_MODEL = CaptionerConfig(width=32, heads=2, encoder_layers=1, decoder_layers=1)


# --------------------------------------------------------------------------- reading captions back


def test_parse_caption_reads_every_canonical_caption():
    """All 540 scenes of the shapes world, written by the dataset's own caption function, read back."""
    config = ShapesConfig()
    for colour in config.colours:
        for shape in config.shapes:
            for size in config.sizes:
                for position in config.positions:
                    text = shapes.caption([ShapeObject(shape, colour, size, position, 0.5, 0.5)])
                    assert parse_caption(text) == {"colour": colour, "shape": shape, "size": size,
                                                   "position": position}, text


@pytest.mark.parametrize("text", [
    "", "a small red circle", "a small red circle on the", "a small red circle on the left and",
    "a huge red circle on the left", "a small pink circle on the left", "a small red blob on the left",
    "an small red circle on the left", "a small red circle at the top left",  # not the canonical words
    "a big red circle on the left",  # "big" is a varied synonym, not the canonical "large"
])
def test_parse_caption_rejects_what_is_not_a_canonical_caption(text):
    assert parse_caption(text) is None


def test_caption_scores_count_each_attribute():
    data = ShapesDataset(6, ShapesConfig(captions="canonical"), seed=3)
    references = [data.sample(i).caption for i in range(6)]
    labels = {k: torch.tensor([data.labels(data.sample(i))[k] for i in range(6)])
              for k in ("colour", "shape", "size", "position")}
    generated = list(references)
    o = data.sample(1).main
    other_colour = next(c for c in shapes.COLOURS if c != o.colour)
    generated[1] = shapes.caption([ShapeObject(o.shape, other_colour, o.size, o.position, 0.5, 0.5)])
    o = data.sample(2).main
    other_place = next(p for p in shapes.POSITIONS if p != o.position)
    generated[2] = shapes.caption([ShapeObject(o.shape, o.colour, o.size, other_place, 0.5, 0.5)])
    generated[3] = "a a a a"  # unreadable: every attribute wrong
    scores = caption_scores(generated, references, labels, ShapesConfig(captions="canonical"))
    assert scores["exact"] == pytest.approx(3 / 6)
    assert scores["colour"] == pytest.approx(4 / 6)
    assert scores["position"] == pytest.approx(4 / 6)
    assert scores["shape"] == scores["size"] == pytest.approx(5 / 6)
    assert scores["parsed"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="N references"):
        caption_scores(generated[:2], references, labels, ShapesConfig())


# --------------------------------------------------------------------------- training


def test_short_run_lowers_the_loss(tmp_path):
    config = TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, train_images=64, eval_images=8,
                         model=TINY_MODEL)
    result = train_captioner(config, progress=False, log_path=tmp_path / "log.jsonl")
    assert len(result.losses) == 30 and all(np.isfinite(result.losses))
    assert np.mean(result.losses[-5:]) < 0.6 * np.mean(result.losses[:5])
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == list(range(30))
    assert set(result.scores) == {"exact", "colour", "shape", "size", "position", "parsed"}
    assert all(0.0 <= v <= 1.0 for v in result.scores.values())


def test_overfits_a_tiny_batch():
    """Eight images, seen over and over: the model learns their captions by heart (greedy, exact)."""
    config = TrainConfig(steps=150, batch_size=8, lr=3e-3, warmup=10, train_images=8, model=TINY_MODEL)
    result = train_captioner(config, progress=False, evaluate_after=False)
    assert result.losses[-1] < 0.25 * result.losses[0]
    images, captions, _ = ShapesDataset(8, ShapesConfig(captions="canonical"), seed=config.seed).materialize()
    vocab = shapes_vocab()
    written = [vocab.decode(row) for row in generate(result.model, normalize(images)).tokens]
    assert written == captions


def test_train_config_refuses_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="larger than the pool"):
        TrainConfig(batch_size=64, train_images=10)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig(model=CaptionerConfig(vocab_size=50))


# --------------------------------------------------------------------------- saving


def test_save_and_load_round_trip(tmp_path, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = Captioner(TINY_MODEL).eval()
    path = tmp_path / "captioner.pt"
    save_captioner(model, path)
    loaded = load_captioner(path)
    assert loaded.config == model.config
    images = torch.from_numpy(rng.standard_normal((3, 3, 32, 32))).float()
    ids = torch.from_numpy(rng.integers(0, 45, size=(3, 7)))
    with torch.no_grad():
        assert torch.equal(loaded(images, ids), model(images, ids))


def test_load_refuses_what_is_not_a_captioner(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a captioner checkpoint"):
        load_captioner(tmp_path / "other.pt")
    state = {k: v for k, v in Captioner(TINY_MODEL).state_dict().items() if "head" not in k}
    torch.save({"config": TINY_MODEL.__dict__, "state_dict": state}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing"):
        load_captioner(tmp_path / "partial.pt")
    with open(tmp_path / "code.pt", "wb") as f:  # a pickle of an arbitrary object: weights_only refuses it
        pickle.dump({"config": Captioner, "state_dict": {}}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_captioner(tmp_path / "code.pt")


# --------------------------------------------------------------------------- the command line


def test_command_line_trains_reports_and_saves(tmp_path, capsys):
    out = tmp_path / "model.pt"
    code = main(["--steps", "4", "--batch-size", "8", "--train-images", "16", "--eval-images", "4",
                 "--examples", "2", "--quiet", "--out", str(out), "--log", str(tmp_path / "log.jsonl")])
    printed = capsys.readouterr().out
    assert code == 0
    assert "exact caption match" in printed and "per attribute: colour" in printed
    assert printed.count("(true:") + printed.count("ok  ") == 2
    assert isinstance(load_captioner(out), Captioner)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4


def test_command_line_refuses_bad_arguments(tmp_path, capsys):
    assert main(["--batch-size", "0"]) == 2
    assert main(["--out", str(tmp_path / "no" / "such" / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "no folder" in err
