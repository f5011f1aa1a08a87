"""Grader of exercise 2: zero-shot classification with a template ensemble, and a CNN baseline.

The zero-shot checks build a tiny random CLIP (tiny_mm.clip, small towers, a
16-token context) and coloured-shape images (tiny_mm.data.shapes). The text
and image embeddings come from that given model; what is graded is what the
learner does with them, compared with the chapter's NumPy float64 reference
(chapters/ch05_clip_zero_shot/reference.py): the template ensemble, cosine
logits, top-k accuracy. The baseline checks train the learner's SmallCNN on
rendered shapes and test it on images it never saw.

The first line of each test's docstring is its name on the scorecard.
Run it with `tinymm grade ex02` (the learner's copy) or plain pytest
(TINYMM_GRADE_TARGET picks the code; the default grades solutions/).
"""
from __future__ import annotations

import string
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import chapters.ch05_clip_zero_shot.reference as ref
from tests.grading.conftest import Learner, check_close, describe, fail
from tiny_mm.clip import CLIP, CLIPConfig, TextConfig
from tiny_mm.data.shapes import ZERO_SHOT_TEMPLATES, ShapesConfig, ShapesDataset, class_names, normalize
from tiny_mm.tokenizer import tokenize
from tiny_mm.vit import VisionConfig

EXERCISE = "ex02_zero_shot"
CONTEXT = 16  # the tiny text tower's context length
IMAGE = 16  # the tiny image tower's input side
# Adam steps of 32 images at learning rate 5e-3: about 0.7 s of one CPU core. Over training
# seeds 0-5 the solution reaches 92-100% on the held-out images.
BASELINE_STEPS, BASELINE_BATCH, BASELINE_LR = 150, 32, 5e-3
BASELINE_TARGET = 0.8  # held-out accuracy the CNN baseline must reach (5 shapes: chance is 20%)
# The baseline's task: which of 5 shapes, at 16 px (large shapes only, so a 16-px image shows them).
BASELINE_DATA = ShapesConfig(image_size=16, sizes=("large",))


# ---------------------------------------------------------------- helpers


def tiny_clip(seed: int = 0) -> CLIP:
    """A random CLIP small enough to run in milliseconds: E = 16, one block per tower."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=IMAGE, patch_size=8, width=32, layers=1, heads=2, output_dim=16),
        text=TextConfig(context_length=CONTEXT, width=32, heads=2, layers=1),
    )
    return CLIP(config).eval()


def tok(texts: list[str]) -> torch.Tensor:
    return tokenize(texts, context_length=CONTEXT)  # (P, 16)


def shape_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised 16-px shape images (n, 3, 16, 16) and their colour-shape class ids (n,)."""
    images, _, labels = ShapesDataset(n, ShapesConfig(image_size=IMAGE), seed=seed).materialize()
    return normalize(images), labels["combo"]


def reference_classifier(model: CLIP, classes: list[str], templates: tuple[str, ...]) -> np.ndarray:
    """The given model's prompt embeddings (C, T, E), ensembled by the float64 reference: (E, C)."""
    prompts = [template.format(name) for name in classes for template in templates]
    with torch.no_grad():
        emb = model.encode_text(tok(prompts)).double().numpy()  # (C*T, E)
    return ref.template_ensemble(emb.reshape(len(classes), len(templates), -1))  # (E, C)



def expect_value_error(learner: Learner, name: str, why: str, *args: Any, **kwargs: Any) -> None:
    """The learner's `name(*args)` must raise ValueError; say `why` it should when it does not."""
    fn = learner.function(name)
    try:
        fn(*args, **kwargs)
    except ValueError:
        return
    except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception, pytest.fail.Exception):
        raise
    except BaseException as exc:  # noqa: BLE001
        reason = f"{describe(name, exc, learner.file)} for {why}; expected ValueError"
    else:
        reason = f"{name} accepted {why}: raise ValueError naming the problem"
    fail(reason)


def random_words(rng: np.random.Generator, n: int) -> list[str]:
    return ["".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(3, 8)))) for _ in range(n)]


@pytest.fixture(scope="module")
def baseline_data() -> dict[str, torch.Tensor]:
    """800 training and 300 held-out 16-px shape images (other seeds: no image repeats)."""
    train, _, train_labels = ShapesDataset(800, BASELINE_DATA, seed=11).materialize()
    test, _, test_labels = ShapesDataset(300, BASELINE_DATA, seed=12).materialize()
    return {"train": train, "train_labels": train_labels["shape"],
            "test": test, "test_labels": test_labels["shape"]}


@pytest.fixture
def one_thread():
    """Train on one thread: on a busy 2-core machine two threads can run ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- zero-shot checks


@pytest.mark.points(1)
def test_build_prompts(learner, rng):
    """build_prompts: one list of T prompts per class"""
    classes, templates = random_words(rng, 4), ["a photo of a {}.", "{} again", "there is a {} here"]
    got = learner.call("build_prompts", classes, templates)
    expected = [[t.replace("{}", c) for t in templates] for c in classes]
    if got != expected:
        fail(f"build_prompts({classes}, {templates}) returned {got!r}; expected a list of C lists, "
             f"prompts[c][t] = templates[t].format(classnames[c]): {expected!r}")


@pytest.mark.points(1)
def test_build_prompts_rejects_bad_templates(learner):
    """build_prompts: ValueError on empty inputs and templates without one {}"""
    expect_value_error(learner, "build_prompts", "a template without '{}'", ["cat"], ["a photo"])
    expect_value_error(learner, "build_prompts", "a template with two '{}'", ["cat"], ["{} and {}"])
    expect_value_error(learner, "build_prompts", "an empty list of classes", [], ["a {}"])
    expect_value_error(learner, "build_prompts", "an empty list of templates", ["cat"], [])


@pytest.mark.points(3)
@pytest.mark.parametrize("templates", ["ensemble", "single"])
def test_classifier_matches_reference(learner, templates):
    """zero_shot_classifier equals the reference template ensemble"""
    model = tiny_clip()
    chosen = ZERO_SHOT_TEMPLATES if templates == "ensemble" else ZERO_SHOT_TEMPLATES[:1]
    classes = class_names(ShapesConfig().combinations[:7])
    W = learner.call("zero_shot_classifier", model, classes, chosen, tok)
    expected = reference_classifier(model, classes, chosen)
    check_close("zero_shot_classifier(...)", W, expected,
                f"C={len(classes)} classes, T={len(chosen)} template(s), E=16 (normalise each prompt's "
                "embedding, average over the templates, normalise again; shape (E, C))")


@pytest.mark.points(2)
def test_logits_match_reference(learner, rng):
    """zero_shot_logits equals the reference cosine logits"""
    model = tiny_clip(seed=1)
    images, _ = shape_images(6, seed=int(rng.integers(1000)))
    classes = class_names(ShapesConfig().combinations)
    W = reference_classifier(model, classes, ZERO_SHOT_TEMPLATES)  # (E, C), unit columns
    with torch.no_grad():
        features = model.encode_image(images).double().numpy()  # (B, E)
    expected = ref.cosine_logits(features, W)  # (B, C)
    got = learner.call("zero_shot_logits", model, images, torch.tensor(W, dtype=torch.float32))
    check_close("zero_shot_logits(...)", got, expected,
                "6 shape images and 30 classes (normalise the image embeddings; no logit scale)")


@pytest.mark.points(1)
def test_logits_reject_a_classifier_of_another_size(learner):
    """zero_shot_logits: ValueError when E differs"""
    images, _ = shape_images(2, seed=3)
    expect_value_error(learner, "zero_shot_logits", "a (32, 5) classifier for a model with E = 16",
                       tiny_clip(), images, torch.randn(32, 5))


@pytest.mark.points(1)
def test_predict_matches_reference(learner, rng):
    """predict: the argmax of each row, the lower index on ties"""
    logits = rng.normal(size=(20, 7))
    logits[:5] = rng.integers(0, 2, size=(5, 7))  # rows with ties
    got = learner.call("predict", torch.tensor(logits, dtype=torch.float32))
    expected = ref.predict(logits)
    if not isinstance(got, torch.Tensor) or got.shape != (20,) or got.tolist() != expected.tolist():
        fail(f"predict returned {got!r} for 20 rows of 7 logits; expected {expected.tolist()} "
             "(the column of each row's largest logit, the first one on ties)")


@pytest.mark.points(2)
@pytest.mark.parametrize("C", [5, 30])
def test_topk_accuracy_matches_reference(learner, rng, C):
    """topk_accuracy equals the reference on random logits"""
    logits = rng.normal(size=(64, C))
    labels = rng.integers(0, C, size=64)
    for k in sorted({1, 2, 5, C}):
        got = learner.call("topk_accuracy", torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), k)
        expected = ref.topk_accuracy(logits, labels, k)
        if not isinstance(got, float) or not abs(got - expected) < 1e-6:
            fail(f"topk_accuracy(k={k}) returned {got!r} for 64 random rows of {C} classes; "
                 f"expected {expected:.6g} (the fraction of labels among the k highest logits)")


@pytest.mark.points(1)
def test_topk_accuracy_ties(learner, rng):
    """topk_accuracy: ties rank the lower class index first"""
    logits = rng.integers(0, 3, size=(200, 6)).astype(np.float64)  # small integers: many ties
    labels = rng.integers(0, 6, size=200)
    for k in (1, 2, 4):
        got = learner.call("topk_accuracy", torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), k)
        expected = ref.topk_accuracy(logits, labels, k)
        if not isinstance(got, float) or not abs(got - expected) < 1e-6:
            fail(f"topk_accuracy(k={k}) returned {got!r} on logits with ties; expected {expected:.6g} "
                 "(ties go to the lower class index: torch.argsort(..., descending=True, stable=True), "
                 "not torch.topk)")


@pytest.mark.points(1)
def test_topk_accuracy_rejects_bad_k(learner, rng):
    """topk_accuracy: ValueError for k outside 1..C and for mismatched labels"""
    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    expect_value_error(learner, "topk_accuracy", "k=0", logits, labels, 0)
    expect_value_error(learner, "topk_accuracy", "k=5 with 4 classes", logits, labels, 5)
    expect_value_error(learner, "topk_accuracy", "7 labels for 8 rows", logits, labels[:7], 1)


# ---------------------------------------------------------------- the supervised baseline


def build_cnn(learner: Learner, *args: Any, **kwargs: Any) -> nn.Module:
    model = learner.call("SmallCNN", *args, **kwargs)
    if not isinstance(model, nn.Module):
        fail(f"SmallCNN(...) must build an nn.Module, got {type(model).__name__}")
    return model


def run(learner: Learner, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """model(images); anything it raises fails the check in one line."""
    try:
        return model(images)
    except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception, pytest.fail.Exception):
        raise
    except BaseException as exc:  # noqa: BLE001 - anything the learner's code does is graded
        reason = describe("SmallCNN.forward", exc, learner.file)
    fail(reason)


@pytest.mark.points(1)
@pytest.mark.parametrize("size", [16, 24])
def test_cnn_shapes(learner, rng, size):
    """SmallCNN: logits (B, num_classes), gradients reach every layer"""
    model = build_cnn(learner, 7, in_channels=3, width=8)
    names = {name for name, _ in model.named_parameters()}
    missing = {"conv1.weight", "conv2.weight", "conv3.weight", "head.weight"} - names
    if missing:
        fail(f"SmallCNN has no parameters {sorted(missing)}: keep the layer names of the docstring")
    images = torch.tensor(rng.uniform(size=(3, 3, size, size)), dtype=torch.float32)
    out = run(learner, model, images)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, 7):
        fail(f"SmallCNN(7)(images (3, 3, {size}, {size})) returned "
             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}; expected (3, 7)")
    out.square().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is None or not torch.isfinite(p.grad).all():
            fail(f"no finite gradient reached SmallCNN.{name}: every layer must take part in forward")


@pytest.mark.points(3)
def test_baseline_learns_shapes(learner, baseline_data, one_thread):
    """train_baseline: >= 80% on held-out shape images in 150 steps"""
    model = learner.call("train_baseline", baseline_data["train"], baseline_data["train_labels"], 5,
                         steps=BASELINE_STEPS, batch_size=BASELINE_BATCH, lr=BASELINE_LR)
    if not isinstance(model, nn.Module):
        fail(f"train_baseline must return the trained SmallCNN, got {type(model).__name__}")
    if model.training:
        fail("train_baseline returned the model in training mode: return model.eval()")
    with torch.no_grad():
        logits = run(learner, model, baseline_data["test"])
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (300, 5):
        fail(f"the trained model returned {getattr(logits, 'shape', type(logits).__name__)} for 300 images; "
             "expected (300, 5)")
    accuracy = ref.topk_accuracy(logits.double().numpy(), baseline_data["test_labels"].numpy(), 1)
    if not accuracy >= BASELINE_TARGET:
        fail(f"after train_baseline(steps={BASELINE_STEPS}) the CNN classifies {accuracy:.0%} of 300 held-out "
             f"16-px shape images (5 shapes: chance is 20%); expected >= {BASELINE_TARGET:.0%}. Is each step "
             "a fresh random batch, with zero_grad, backward and an Adam step?")


@pytest.mark.points(1)
def test_baseline_rejects_bad_input(learner, baseline_data):
    """train_baseline: ValueError on bad images, labels or steps"""
    images, labels = baseline_data["train"][:32], baseline_data["train_labels"][:32]
    expect_value_error(learner, "train_baseline", "31 labels for 32 images", images, labels[:31], 5)
    expect_value_error(learner, "train_baseline", "a label of 5 with num_classes=5", images,
                       torch.full((32,), 5), 5)
    expect_value_error(learner, "train_baseline", "3-D images", images[:, 0], labels, 5)
    expect_value_error(learner, "train_baseline", "steps=0", images, labels, 5, steps=0)
