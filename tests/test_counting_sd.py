"""Stable Diffusion v1's parameters (tiny_mm.counting_sd) against the book's own formula and the chapter's text."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers", reason="diffusers is in the dev extra: `make setup` installs it")

from tiny_mm.counting import clip_text_params  # noqa: E402
from tiny_mm.counting_sd import TEXT_ENCODER_V1, stable_diffusion_params  # noqa: E402
from tiny_mm.notebooks import REPO_ROOT  # noqa: E402


@pytest.fixture(scope="module")
def parts():
    return stable_diffusion_params()


def test_text_encoder_is_clip_vit_l14_text_tower_without_its_projection(parts):
    # Chapter 5's formula for CLIP's text tower, built independently of transformers' module:
    # Stable Diffusion reads the tokens before the projection, so the (768, 768) matrix is not there.
    c = TEXT_ENCODER_V1
    width = c["hidden_size"]
    tower = clip_text_params(c["max_position_embeddings"], c["vocab_size"], width, c["num_hidden_layers"], width)
    assert parts["text encoder"] == tower - width * width


def test_the_u_net_is_the_860m_and_the_rest_is_not_nothing(parts):
    assert 855e6 < parts["U-Net"] < 865e6  # the textbook's "about 860M" is the U-Net
    assert sum(parts.values()) > 1.05e9  # the three together


def test_the_chapter_quotes_the_counts(parts):
    text = (REPO_ROOT / "chapters" / "ch11_text_to_image" / "README.md").read_text()
    quoted = {int(n.replace(",", "")) for n in re.findall(r"\d{1,3}(?:,\d{3}){2,}", text)}
    for name, n in parts.items():
        assert n in quoted, f"the chapter does not quote the {name}'s {n:,} parameters"
    assert sum(parts.values()) in quoted, "the chapter does not quote the total"
