"""Grader of exercise 5: PatchEncoderWithCLS, a learned CLS token as the global embedding.

The token sequence is compared with the chapter's NumPy float64 reference
(chapters/ch03_vit/reference.py, `embed_image`) using the learner's own
weights; the output is compared with the given blocks run in float64 on that
reference sequence. The rest are properties that hold whatever the weights:
the CLS token is used, rows do not mix, gradients arrive, and a few training
steps solve a toy task that only a CLS token gathering from a patch can solve.

The first line of each test's docstring is its name on the scorecard.
Run it with `tinymm grade ex05` (the learner's copy) or plain pytest
(TINYMM_GRADE_TARGET picks the code; the default grades solutions/).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import chapters.ch03_vit.reference as ref
from tests.grading.conftest import Learner, check_close, describe, fail

EXERCISE = "ex05_cls_token"
CLASS = "PatchEncoderWithCLS"
# (image_size, patch_size, width, layers, heads, in_channels): small, so the checks run in seconds.
SMALL = (8, 4, 16, 1, 2, 3)
CONFIGS = [SMALL, (12, 3, 32, 2, 4, 1)]


# ---------------------------------------------------------------- helpers


def build(learner: Learner, config: tuple[int, ...] = SMALL, seed: int = 0) -> nn.Module:
    """The learner's encoder for `config`, with torch's generator seeded (reproducible init)."""
    torch.manual_seed(seed)
    model = learner.call(CLASS, *config[:5], in_channels=config[5])
    if not isinstance(model, nn.Module):
        fail(f"{CLASS}(...) must build an nn.Module, got {type(model).__name__}")
    return model


def method(learner: Learner, model: nn.Module, name: str, *args: Any) -> Any:
    """Call model.name(*args); anything it raises fails the check in one line."""
    try:
        return getattr(model, name)(*args)
    except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception, pytest.fail.Exception):
        raise
    except BaseException as exc:  # noqa: BLE001 - anything the learner's code does is graded
        reason = describe(f"{CLASS}.{name}", exc, learner.file)
    fail(reason)


def images_for(rng: np.random.Generator, config: tuple[int, ...], batch: int) -> np.ndarray:
    size, channels = config[0], config[5]
    return rng.standard_normal((batch, channels, size, size))  # (B, C, H, W), float64


def t32(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def parameter(model: nn.Module, name: str, shape: tuple[int, ...]) -> nn.Parameter:
    value = getattr(model, name, None)
    if not isinstance(value, nn.Parameter):
        fail(f"{CLASS} has no nn.Parameter named {name} (got {type(value).__name__}): "
             "wrap the tensor in nn.Parameter so the optimiser trains it")
    if tuple(value.shape) != shape:
        fail(f"{name} has shape {tuple(value.shape)}, expected {shape}")
    return value


def weights(model: nn.Module, config: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(conv weight (width, C, P, P), cls (width,), positional (N+1, width)) as float64 arrays."""
    size, patch, width, _, _, channels = config
    n = (size // patch) ** 2
    cls = parameter(model, "class_embedding", (width,))
    pos = parameter(model, "positional_embedding", (n + 1, width))
    conv = model.conv1.weight
    return (conv.detach().double().numpy(), cls.detach().double().numpy(), pos.detach().double().numpy())



def reference_output(model: nn.Module, tokens: np.ndarray) -> np.ndarray:
    """The given blocks and ln_post run in float64 on the reference tokens; the CLS row. (B, width)"""
    given = copy.deepcopy(model).double()
    x = torch.tensor(tokens, dtype=torch.float64)  # (B, N+1, width)
    with torch.no_grad():
        for block in given.transformer:
            x = block(x)
        return given.ln_post(x)[:, 0].numpy()  # (B, width)


# ---------------------------------------------------------------- checks


@pytest.mark.points(2)
def test_parameters(learner):
    """class_embedding and positional_embedding: names, shapes, init"""
    size, patch, width, _, _, channels = SMALL
    model = build(learner)
    n = (size // patch) ** 2
    for name, shape in (("class_embedding", (width,)), ("positional_embedding", (n + 1, width))):
        value = parameter(model, name, shape).detach()
        if not torch.isfinite(value).all():
            fail(f"{name} holds NaN or inf after __init__")
        std = float(value.std())
        if not 1e-3 < std < 2.0:
            fail(f"{name} has standard deviation {std:.3g} after __init__; initialise it with small "
                 "random values (e.g. width ** -0.5 * torch.randn(...)), not zeros or huge numbers")
    if tuple(model.conv1.weight.shape) != (width, channels, patch, patch) or model.conv1.bias is not None:
        fail("conv1 was changed: keep the given Conv2d(in_channels, width, kernel_size=P, stride=P, bias=False)")


@pytest.mark.points(2)
@pytest.mark.parametrize("config", CONFIGS, ids=["C3", "C1"])
def test_embed_matches_reference(learner, rng, config):
    """embed() equals the chapter's embed_image"""
    model = build(learner, config)
    conv, cls, pos = weights(model, config)
    images = images_for(rng, config, 3)
    with torch.no_grad():
        tokens = method(learner, model, "embed", t32(images))
    expected = ref.embed_image(images, conv, cls, pos, config[1])  # (B, N+1, width)
    check_close("embed(images)", tokens, expected, f"B=3, image_size={config[0]}, P={config[1]}, "
                f"C={config[5]} (CLS first, then patches row by row, then + positional_embedding)")


@pytest.mark.points(2)
@pytest.mark.parametrize("config", CONFIGS, ids=["C3", "C1"])
def test_output_is_the_cls_token(learner, rng, config):
    """forward() returns the CLS token's output, (B, width)"""
    model = build(learner, config)
    conv, cls, pos = weights(model, config)
    images = images_for(rng, config, 4)
    with torch.no_grad():
        out = method(learner, model, "forward", t32(images))
    expected = reference_output(model, ref.embed_image(images, conv, cls, pos, config[1]))
    check_close("forward(images)", out, expected, f"B=4, width={config[2]} (read out position 0 after ln_post)")


@pytest.mark.points(1)
def test_class_embedding_is_used(learner, rng):
    """changing class_embedding changes the output"""
    model = build(learner)
    images = t32(images_for(rng, SMALL, 2))
    with torch.no_grad():
        before = method(learner, model, "forward", images).clone()
        parameter(model, "class_embedding", (SMALL[2],)).add_(torch.randn(SMALL[2]))
        after = method(learner, model, "forward", images)
    if torch.allclose(before, after, rtol=1e-4, atol=1e-6):
        fail("the output did not change when class_embedding changed: put the class_embedding "
             "parameter itself (not a copy) in front of the patch tokens")


@pytest.mark.points(1)
def test_rows_are_independent(learner, rng):
    """row i of the output does not depend on other images"""
    model = build(learner)
    images = t32(images_for(rng, SMALL, 5))
    with torch.no_grad():
        batch = method(learner, model, "forward", images)
        alone = torch.cat([method(learner, model, "forward", images[i : i + 1]) for i in range(5)])
    check_close("forward of a batch of 5", batch, alone.double().numpy(),
                "the same 5 images one at a time (does one image's CLS token see another's patches?)",
                tol=1e-5)


@pytest.mark.points(1)
def test_gradients_reach_embeddings(learner, rng):
    """gradients reach class_embedding and positional_embedding"""
    size, patch, width = SMALL[:3]
    model = build(learner)
    cls = parameter(model, "class_embedding", (width,))
    pos = parameter(model, "positional_embedding", ((size // patch) ** 2 + 1, width))
    out = method(learner, model, "forward", t32(images_for(rng, SMALL, 3)))
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        fail("forward's output does not depend on the parameters through autograd (no .detach() or .data)")
    (out * torch.randn_like(out)).sum().backward()
    for name, p in (("class_embedding", cls), ("positional_embedding", pos)):
        if p.grad is None or not torch.isfinite(p.grad).all() or float(p.grad.abs().sum()) == 0.0:
            fail(f"no (finite, nonzero) gradient reached {name}: it must take part in forward")
    if float(pos.grad[0].abs().sum()) == 0.0:
        fail("positional_embedding row 0 got no gradient: row 0 belongs to the CLS token")


def toy_task(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 1, 8, 8) of noise whose label (0/1) is the sign of the bottom-right patch's mean."""
    images = torch.randn(batch, 1, 8, 8, generator=gen)  # (B, 1, 8, 8)
    labels = torch.randint(0, 2, (batch,), generator=gen)  # (B,)
    # Shift the bottom-right 4x4 patch up or down by the label: the other 3 patches carry no signal.
    images[:, :, 4:, 4:] += (2.0 * labels - 1.0).view(-1, 1, 1, 1) * 1.5
    return images, labels


@pytest.mark.points(2)
def test_cls_token_learns(learner):
    """a few training steps: the CLS token learns to read a patch"""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = build(learner, (8, 4, 16, 1, 2, 1))
    head = nn.Linear(16, 2)
    optimiser = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(50):
        images, labels = toy_task(gen, 64)
        loss = nn.functional.cross_entropy(head(method(learner, model, "forward", images)), labels)
        if not torch.isfinite(loss):
            fail("the training loss became NaN or inf")
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    images, labels = toy_task(gen, 512)
    with torch.no_grad():
        accuracy = float((head(method(learner, model, "forward", images)).argmax(1) == labels).float().mean())
    if not accuracy > 0.8:
        fail(f"after 50 Adam steps a linear head on the CLS output reaches {accuracy:.0%} on a toy task "
             "(label = sign of one patch; chance is 50%); expected > 80%")


BAD_SHAPES = [(2, 3, 12, 12), (2, 3, 8, 4), (2, 1, 8, 8), (3, 8, 8)]  # for image_size 8, 3 channels


@pytest.mark.points(2)
def test_rejects_bad_images(learner, rng):
    """ValueError on images of the wrong shape"""
    model = build(learner)
    for shape in BAD_SHAPES:
        try:
            model(t32(rng.standard_normal(shape)))
        except ValueError:
            continue
        except (KeyboardInterrupt, pytest.skip.Exception, pytest.exit.Exception, pytest.fail.Exception):
            raise
        except BaseException as exc:  # noqa: BLE001
            reason = f"{describe(CLASS, exc, learner.file)} for images of shape {shape}; expected ValueError"
        else:
            reason = (f"{CLASS} (image_size 8, 3 channels) accepted images of shape {shape}: "
                      "raise ValueError naming the shape")
        fail(reason)
