"""Training a tiny CLIP (`tiny_mm.train_clip`, `tinymm train clip`).

What must hold, checked here on tiny runs (a few steps, batches of 8-16, pools of 64
images), apart from the one `slow` test that runs the whole recipe:

- a short run runs, and its loss log has one {"step", "loss", "lr", "seconds"} per step,
  with the losses it returned and the schedule of `lr_at`;
- on a fixed batch the loss goes down (the model can fit what it sees);
- the saved safetensors file reloads with `load_clip` into an equal model;
- two processes under torchrun (gloo), each holding half of every batch, log the
  same losses as one process on the whole batch: the cross-process loss and the
  averaged gradients give the single-process update;
- `shapes_zero_shot` agrees with a zero-shot classifier computed here in float64,
  prompt by prompt, from the class names;
- no caption of the shapes data is truncated by the tiny model's context length;
- bad settings raise a ValueError (a CLI error) before any work.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_mm import cli
from tiny_mm.checkpoints import load_clip
from tiny_mm.data import shapes
from tiny_mm.data.shapes import ShapesConfig, ShapesDataset, normalize, split_by_combinations
from tiny_mm.tokenizer import tokenize
from tiny_mm.train_clip import (
    BatchSampler,
    TrainConfig,
    lr_at,
    save_model,
    shapes_zero_shot,
    short_caption,
    tiny_clip_config,
    train_clip,
)

ROOT = Path(__file__).resolve().parents[1]
# A run small enough for a test: 64 pool images, batches of 16, 5 evaluation images.
TINY = dict(batch_size=16, train_images=64, eval_images=5, warmup=2, threads=1)


def _run(tmp_path: Path, **overrides):
    config = TrainConfig(**{**TINY, "steps": 4, **overrides})
    return config, train_clip(config, progress=False, log_path=tmp_path / "log.jsonl")


def test_short_run_and_its_log(tmp_path):
    config, result = _run(tmp_path)
    assert len(result.losses) == config.steps and all(np.isfinite(result.losses))
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(config.steps))
    assert all(set(r) == {"step", "loss", "lr", "seconds"} for r in rows)
    np.testing.assert_allclose([r["loss"] for r in rows], result.losses, rtol=1e-6)
    assert [r["lr"] for r in rows] == [lr_at(s, config) for s in range(config.steps)]
    assert all(a <= b for a, b in itertools.pairwise([r["seconds"] for r in rows]))
    assert not result.model.training
    held, train = split_by_combinations(ShapesConfig())[::-1]
    assert result.heldout_combinations == held and result.train_combinations == train
    assert set(result.heldout) == {"top1", "top5"} and 0 <= result.heldout["top1"] <= 1


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    # The pool is the batch and no caption is swapped for a short one: every step sees the same
    # 16 pairs (in a new order, which the loss ignores).
    _, result = _run(tmp_path, steps=40, train_images=16, distinct_scenes=False, short_captions=0.0, lr=3e-3)
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses  # ~2.8 -> ~1.8 in 40 steps


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    _, a = _run(tmp_path, steps=2)
    _, b = _run(tmp_path, steps=2)
    _, c = _run(tmp_path, steps=2, seed=1)
    assert a.losses == b.losses and a.losses != c.losses


def test_saved_file_reloads_equal(tmp_path, rng):
    model = train_clip(TrainConfig(**{**TINY, "steps": 1}), progress=False).model
    path = tmp_path / "tiny.safetensors"
    save_model(model, path)
    loaded = load_clip(path, quick_gelu=True)
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    images = torch.tensor(rng.standard_normal((3, 3, 32, 32)), dtype=torch.float32)
    tokens = tokenize(["a red circle", "there is a big blue star on the left", "a"], 20)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))
        assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))


def test_cli_trains_saves_and_reports(tmp_path, capsys):
    out, log = tmp_path / "m.safetensors", tmp_path / "log.jsonl"
    argv = ["train", "clip", "--steps", "2", "--batch-size", "8", "--train-images", "32",
            "--eval-images", "5", "--threads", "1", "--quiet", "--out", str(out), "--log", str(log)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "red star, blue square, yellow cross, purple circle, orange triangle" in text
    assert "held-out combinations: top-1" in text and "seen combinations:" in text and "steps/s" in text
    assert len(log.read_text().splitlines()) == 2
    load_clip(out)  # QuickGELU, load_clip's default


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "steps must be a positive int"),
        (["--batch-size", "1"], "batch_size must be at least 2"),
        (["--lr", "-1"], "lr must be a finite positive number"),
        (["--lr", "nan"], "lr must be a finite positive number"),
        (["--batch-size", "64", "--train-images", "32"], "larger than the pool"),
    ],
)
def test_bad_values_are_named(argv, message, capsys):
    assert cli.main(["train", "clip", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_bad_image_size():
    assert cli.main(["train", "bogus"]) == 2
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_clip_config(30)
    with pytest.raises(ValueError, match="must be a TrainConfig"):
        train_clip({"steps": 1})


def test_lr_schedule():
    config = TrainConfig(steps=100, warmup=10, lr=1e-3)
    lrs = [lr_at(s, config) for s in range(config.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))  # then never up
    assert lrs[54] == pytest.approx(5e-4, rel=0.05)  # half way down at half the decay
    assert 0 < lrs[-1] < 1e-6


def test_batches_hold_distinct_scenes_and_repeat_with_the_seed(rng):
    keys = torch.tensor(rng.integers(0, 40, size=500))
    a, b = BatchSampler(keys, 32, seed=3), BatchSampler(keys, 32, seed=3)
    for _ in range(5):
        batch = a()
        assert torch.equal(batch, b())
        assert len(set(keys[batch].tolist())) == 32  # no scene twice
    # More rows than scenes: plain draws without replacement.
    batch = BatchSampler(keys, 64, seed=3)()
    assert len(set(batch.tolist())) == 64


def test_no_caption_is_truncated():
    """Every phrasing of the varied captions fits the tiny model's context with room to spare."""
    context = tiny_clip_config().text.context_length
    words = [w for c in shapes.COLOURS for w in (c,)] + list(shapes.SHAPES)
    assert all(tokenize([w], context)[0, 2] == 49407 for w in words)  # each one token: SOT, word, EOT
    captions = [
        frame.format(phrase.format(size=size, colour="orange", shape="triangle", where=where))
        for frame in shapes.CAPTION_FRAMES
        for phrase in shapes._OBJECT_PHRASES
        for size in itertools.chain(*shapes.SIZE_WORDS.values())
        for where in itertools.chain(*shapes.WHERE_WORDS.values())
    ]
    lengths = (tokenize(captions, 77) != 0).sum(dim=1)  # SOT + words + EOT (ids > 0)
    assert int(lengths.max()) < context, captions[int(lengths.argmax())]


def test_short_captions_name_colour_and_shape_and_drop_something(rng):
    data = ShapesDataset(40, ShapesConfig(), seed=int(rng.integers(1000)))
    for i in range(len(data)):
        obj = data.sample(i).main
        text = short_caption(obj, rng)
        assert f"{obj.colour} {obj.shape}" in text, text
        names_size = any(w in text.split() for w in shapes.SIZE_WORDS[obj.size])
        names_where = any(w in text for w in shapes.WHERE_WORDS[obj.position])
        assert not (names_size and names_where), text
        assert " a orange" not in text and not text.startswith("a orange"), text


# --------------------------------------------------------------------------- zero-shot


def test_shapes_zero_shot_against_float64(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = train_clip(TrainConfig(**{**TINY, "steps": 1, "seed": int(rng.integers(100))}), progress=False).model
    held = [("red", "star"), ("blue", "square")]
    classes = [("blue", "square"), ("green", "circle"), ("red", "star"), ("red", "circle"), ("yellow", "cross"),
               ("purple", "star")]
    seed = int(rng.integers(1000))
    templates = ("a {}", "a picture of a {}")
    got = shapes_zero_shot(model, held, n_images=12, seed=seed, classes=classes, templates=templates)

    # Independently: render the same images, embed every prompt on its own, average in float64.
    data = ShapesDataset(12, ShapesConfig(), seed=seed, combinations=held)
    names = [f"{c} {s}" for c, s in classes]
    labels = [names.index(f"{data.sample(i).main.colour} {data.sample(i).main.shape}") for i in range(12)]
    images = torch.stack([data[i][0] for i in range(12)])  # (12, 3, 32, 32)
    with torch.no_grad():
        columns = []
        for name in names:
            prompts = [model.encode_text(tokenize([t.format(name)], 20)).double() for t in templates]
            unit = [p[0] / p[0].norm() for p in prompts]  # (E,) each
            mean = sum(unit) / len(unit)
            columns.append(mean / mean.norm())
        classifier = torch.stack(columns, dim=1)  # (E, C)
        feats = model.encode_image(normalize(images)).double()  # (12, E)
    logits = (feats / feats.norm(dim=1, keepdim=True)) @ classifier  # (12, C)
    order = logits.argsort(dim=1, descending=True)
    assert got["classes"] == names
    assert got["labels"].tolist() == labels
    assert got["pred"].tolist() == order[:, 0].tolist()
    assert got["top1"] == pytest.approx(np.mean([o[0] == y for o, y in zip(order.tolist(), labels)]))
    assert got["top5"] == pytest.approx(np.mean([y in o[:5] for o, y in zip(order.tolist(), labels)]))
    assert torch.equal(got["images"], images)
    with pytest.raises(ValueError, match="not among the classes"):
        shapes_zero_shot(model, [("green", "star")], classes=classes)


# --------------------------------------------------------------------------- two processes


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """2 gloo ranks, each with half of every batch, log the single-process losses of the whole batch."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    args = ["--steps", "3", "--batch-size", "16", "--train-images", "48", "--eval-images", "5",
            "--threads", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2",
           "-m", "tiny_mm.train_clip", *args, "--loss-log", str(tmp_path / "two.jsonl")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("held-out combinations:") == 1  # rank 0 alone reports
    two = [json.loads(line)["loss"] for line in (tmp_path / "two.jsonl").read_text().splitlines()]

    config = TrainConfig(steps=3, batch_size=16, train_images=48, eval_images=5, threads=1)
    one = train_clip(config, progress=False).losses
    # Step 0 is the same loss summed in another order; later steps also carry the
    # all_reduce's rounding of the gradients through the updates.
    np.testing.assert_allclose(two[0], one[0], rtol=1e-6)
    np.testing.assert_allclose(two, one, rtol=1e-4)


# --------------------------------------------------------------------------- GPU and the full recipe


@pytest.mark.requires_cuda
def test_short_run_on_cuda_uses_the_kernel(tmp_path):
    from tiny_mm.clip import CLIP
    from tiny_mm.train_clip import _make_loss

    assert _make_loss(CLIP(tiny_clip_config())).backend == "triton"
    _, result = _run(tmp_path, steps=3)
    assert all(np.isfinite(result.losses))


@pytest.mark.slow
def test_default_recipe_reaches_90_percent_on_heldout_combinations():
    result = train_clip(TrainConfig(), progress=False)
    assert result.heldout["top1"] >= 0.90, (result.heldout, result.seen, result.seconds)
