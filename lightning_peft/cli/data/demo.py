"""The shipped sentiment demo data (``demo:train`` / ``demo:validation`` in a recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning_peft.errors import PeftConfigError

DEMO_DIR = Path(__file__).resolve().parent


def demo_path(split: Literal["train", "validation"]) -> str:
    """Path of the shipped sentiment demo data (``sentence`` and ``label`` columns, labels negative/positive)."""
    return str(DEMO_DIR / f"sentiment_{split}.tsv")


def resolve_data_path(path: str | None) -> str | None:
    """``demo:train`` / ``demo:validation`` name the shipped demo files; anything else is a path."""
    if path is not None and path.startswith("demo:"):
        split = path.removeprefix("demo:")
        if split not in ("train", "validation"):
            raise PeftConfigError(f"{path!r} is not a demo file; use 'demo:train' or 'demo:validation'")
        return demo_path(split)  # type: ignore[arg-type]
    return path


__all__ = ["demo_path", "resolve_data_path"]
