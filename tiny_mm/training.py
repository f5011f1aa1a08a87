"""What the book's trainers share, written once.

    warmup_cosine         the learning-rate schedule every recipe uses
    save_sized_model      a model built from one config dataclass, written as {"config", "state_dict"}
    load_sized_model      ... and rebuilt from such a file, without running code from it
    import_kernels_first  import `kernels` before anything imports Triton
    comma_names           "late, cross" -> ("late", "cross"), for command-line lists
    out_folder_problem    what is wrong with an --out folder, if anything
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

__all__ = ["warmup_cosine", "save_sized_model", "load_sized_model", "import_kernels_first", "comma_names",
           "out_folder_problem"]


# ANCHOR: warmup_cosine
def warmup_cosine(step: int, steps: int, lr: float, warmup: int) -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``: linear warm-up to lr over ``warmup``
    steps, then a cosine decay to 0 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)  # 0 -> 1
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
# ANCHOR_END: warmup_cosine


def save_sized_model(model, path: str | Path) -> None:
    """Write {"config": asdict(model.config), "state_dict": weights on the CPU}."""
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state_dict": state}, str(path))


def load_sized_model(path: str | Path, model_class: type, config_class: type, what: str):
    """Rebuild ``model_class(config_class(**config))`` from a file `save_sized_model` wrote, in eval mode.

    weights_only=True: the file may hold tensors and plain containers, nothing a
    pickle could execute. A file of another kind, or missing or unexpected
    weights, is an error that says so (``what`` names the kind, "a TinyDalle").
    """
    import torch

    saved = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or set(saved) != {"config", "state_dict"}:
        raise ValueError(f"{path} is not {what} checkpoint (expected keys 'config' and 'state_dict')")
    model = model_class(config_class(**saved["config"]))
    missing, unexpected = model.load_state_dict(saved["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def import_kernels_first() -> None:
    """Import `kernels` before torch imports Triton (building an AdamW and FlopCounterMode both
    make it): on a CPU the book's kernels need Triton in interpreter mode, which `kernels`
    arranges only if it comes first. If Triton came earlier, `kernels` refuses to load; a
    trainer that runs no kernel leaves that for whoever does."""
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass


def comma_names(text: str) -> tuple[str, ...]:
    """"late, cross" -> ("late", "cross"): empty parts dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def out_folder_problem(path: Path | None) -> str | None:
    """None when ``path`` can be an output folder (None, missing, or a folder), else why not."""
    if path is not None and path.exists() and not path.is_dir():
        return f"--out must be a folder, and {path} is a file"
    return None
