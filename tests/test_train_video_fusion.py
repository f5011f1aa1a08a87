"""`tinymm train video-fusion` (chapter 10's experiment), in runs of seconds.

Accuracy figures of the full run are reported by the command (docs/training.md),
never asserted here. These tests check the machinery:

- a run of two models returns every documented field with sane values: accuracies
  in [0, 1], parameters equal to sum(numel) of a freshly built model, FLOPs equal
  to a separate FlopCounterMode count and to the chapter's formula plus the
  embedders' two projections, ceilings as the dataset's factors give them;
- a short run lowers the loss, and the loss with every auxiliary objective is the
  weighted sum of its terms;
- a missing modality is really missing at test time: whatever that input holds,
  the logits do not change;
- results.json round-trips; bad settings raise ValueError (and exit 2 from the
  command); `--help` works through `tinymm train`.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tiny_mm import cli
from tiny_mm.counting_video import fusion_flops
from tiny_mm.data.video import video_vocab
from tiny_mm.train_video_fusion import (
    ClipData,
    ExperimentResult,
    FusionSettings,
    ceiling,
    make_data,
    main,
    new_model,
    predict_logits,
    run_experiment,
    train_model,
    training_loss,
)
from tiny_mm.video_model import VideoFusionModel
from tiny_mm.video_objectives import ObjectiveWeights, action_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits

TINY = dict(steps=6, batch_size=8, warmup=2, train_clips=24, test_clips=12, threads=1)


@pytest.fixture(scope="module")
def quick_result():
    settings = FusionSettings.quick(models=("video", "late"), **TINY)
    return run_experiment(settings, progress=False)


def _flop_count(model, data: ClipData) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(data.frames[:1], data.audio[:1], data.text_ids[:1], data.text_lengths[:1])
    return int(counter.get_total_flops())


def test_quick_run_reports_every_field(quick_result):
    result = quick_result
    assert [r.label for r in result.rows] == ["video", "late", "late + dropout"]
    assert [r.dropout for r in result.rows] == [0.0, 0.0, 0.3]
    test = make_data(TINY["test_clips"], 1)  # seed 0: test clips come from seed 2 * 0 + 1
    config = FusionSettings().model
    for r in result.rows:
        assert 0.0 <= r.accuracy <= 1.0 and r.seconds > 0
        assert len(r.losses) == TINY["steps"] and all(math.isfinite(x) for x in r.losses)
        fresh = VideoFusionModel(r.name)
        assert r.params == sum(p.numel() for p in fresh.parameters())
        assert r.flops == _flop_count(fresh, test)
        model = result.models[r.label]
        assert not model.training
        right = predict_logits(model, test).argmax(-1) == test.labels  # (N,)
        assert r.accuracy == pytest.approx(float(right.float().mean()))
    video, late, late_dropout = result.rows
    assert video.ceiling == pytest.approx(1 / 8) and late.ceiling == 1.0  # video sees 1 of 4 label factors
    assert video.missing == {} and set(late.missing) == set(late_dropout.missing) == {"video", "audio", "text"}
    assert all(0.0 <= a <= 1.0 for a in [*late.missing.values(), *late_dropout.missing.values()])
    # FLOPs, independently: the fusion formula of tiny_mm.counting_video plus the embedders' two
    # projections, 2 N_v (3 t p^2) d for the tubelets and 2 K (S / 2K + 1) d for the spectra
    d, tokens = config.fusion.width, test.text_ids.shape[1]
    embed = 2 * 16 * (3 * 2 * 8 * 8) * d + 2 * 16 * (6400 // 32 + 1) * d
    assert late.flops == fusion_flops("late", config.fusion, 16, 16, tokens)["total"] + embed
    assert video.flops < late.flops


def test_results_json_round_trips(quick_result, tmp_path):
    path = quick_result.save(tmp_path / "run")
    assert path == tmp_path / "run" / "results.json"
    again = ExperimentResult.load(tmp_path / "run")
    assert again == quick_result  # every field but the trained models
    found = json.loads(path.read_text())
    assert found["rows"][1]["label"] == "late" and found["settings"]["models"] == ["video", "late"]
    assert found["missing_ceilings"] == {"video": 0.25, "audio": 0.25, "text": 0.5}


def test_ceilings_by_hand():
    # 32 classes = 4 directions (video) x 2 pitches x 2 rhythms (audio) x 2 kinds (caption)
    assert ceiling(["video"]) == pytest.approx(1 / 8)
    assert ceiling(["audio"]) == pytest.approx(1 / 8)
    assert ceiling(["text"]) == pytest.approx(1 / 16)
    assert ceiling(["text", "video"]) == pytest.approx(1 / 4)
    assert ceiling(["video", "audio"]) == pytest.approx(1 / 2)
    assert ceiling(["video", "audio", "text"]) == 1.0
    with pytest.raises(ValueError, match="subset"):
        ceiling(["smell"])


def test_short_run_lowers_the_loss():
    data = make_data(16, 5)  # a tiny set to learn by heart
    settings = FusionSettings(models=("late",), steps=40, batch_size=16, warmup=5, lr=3e-3,
                              train_clips=16, test_clips=16, threads=1)
    model, losses, _ = train_model("late", data, settings)
    start = new_model("late", settings).eval()  # the model as train_model built it
    with torch.no_grad():
        first, last = (float(action_loss(predict_logits(m, data), data.labels)) for m in (start, model))
    assert last < 0.7 * first, f"loss on the training clips {first:.3f} -> {last:.3f}"
    assert len(losses) == 40


def test_every_objective_is_the_weighted_sum_of_its_terms():
    data = make_data(8, 6)
    model = VideoFusionModel("bottleneck")
    weights = ObjectiveWeights(contrastive=0.3, masked=0.2, temporal=0.7)  # not the defaults: each one shows
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    total, terms = training_loss(model, data, ("action", "contrastive", "masked", "temporal"), weights,
                                 0.3, torch.Generator().manual_seed(0), log_scale)
    assert set(terms) == {"action", "contrastive", "masked", "temporal"}
    assert all(math.isfinite(v) and v >= 0 for v in terms.values())
    expected = terms["action"] + 0.3 * terms["contrastive"] + 0.2 * terms["masked"] + 0.7 * terms["temporal"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert log_scale.grad is not None and model.order_head.weight.grad is not None
    assert all(model.reconstruct[m].weight.grad is not None for m in ("video", "audio", "text"))
    only, parts = training_loss(model, data, ("action",), weights, 0.0, torch.Generator().manual_seed(0))
    assert set(parts) == {"action"} and float(only.detach()) == pytest.approx(parts["action"])


def _changed(data: ClipData, modality: str, seed: int) -> ClipData:
    """The same clips with one modality's input replaced by something else entirely."""
    g = torch.Generator().manual_seed(seed)
    if modality == "video":
        return data._replace(frames=torch.rand(data.frames.shape, generator=g))
    if modality == "audio":
        return data._replace(audio=torch.randn(data.audio.shape, generator=g))
    ids, lengths = video_vocab().encode(["a blue dog"] * data.clips)  # another colour, another kind
    return data._replace(text_ids=ids, text_lengths=lengths)


@pytest.mark.parametrize("modality", ["video", "audio", "text"])
@pytest.mark.parametrize("name", ["early", "cross"])
def test_a_missing_modality_is_not_read(name, modality):
    data = make_data(6, 7)
    other = _changed(data, modality, seed=1)
    torch.manual_seed(2)
    model = VideoFusionModel(name)
    present = torch.tensor([m != modality for m in ("video", "audio", "text")])
    assert torch.equal(predict_logits(model, data, present), predict_logits(model, other, present))
    # and the change is visible when the modality is there (else the test above proves nothing)
    assert not torch.allclose(predict_logits(model, data), predict_logits(model, other), atol=1e-6)


def test_command_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["--quick", "--models", "text,early", "--steps", "3", "--train-clips", "16", "--test-clips", "8",
                 "--batch-size", "8", "--threads", "1", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MFLOPs/clip" in printed and "no video" in printed and "early + dropout" in printed
    found = ExperimentResult.load(out / "results.json")
    assert [r.label for r in found.rows] == ["text", "early", "early + dropout"]
    assert found.settings["steps"] == 3 and found.settings["train_clips"] == 16


@pytest.mark.parametrize("changes, match", [
    ({"models": ("vision",)}, "models"),
    ({"models": ()}, "models"),
    ({"models": ("late", "late")}, "repeat"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"objectives": ("contrastive",)}, "action"),
    ({"objectives": ("action", "telepathy")}, "objectives"),
    ({"steps": 0}, "steps"),
    ({"lr": float("nan")}, "lr"),
    ({"threads": 0}, "threads"),
    ({"batch_size": 100, "train_clips": 50}, "batch_size"),
])
def test_bad_settings_raise(changes, match):
    with pytest.raises(ValueError, match=match):
        FusionSettings(**changes)


def test_bad_arguments_exit_2(capsys):
    assert main(["--models", "late,vision", "--quick"]) == 2
    assert main(["--objectives", "masked", "--quick"]) == 2
    assert main(["--dropout", "1.5", "--quick"]) == 2
    assert "error:" in capsys.readouterr().err


def test_help_through_tinymm_train(capsys):
    assert cli.TRAINERS.get("video-fusion") == "tiny_mm.train_video_fusion"
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "video-fusion", "--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "tinymm train video-fusion" in printed and "--objectives" in printed and "--quick" in printed
