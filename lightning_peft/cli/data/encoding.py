"""Tokenizer loading and dynamic padding for :class:`~lightning_peft.cli.data.text.TextDataModule`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_peft.errors import PeftConfigError

IGNORE_INDEX = -100


def load_tokenizer(name: str | None) -> Any:
    """``AutoTokenizer`` for ``name`` (``"minilm"`` is the bundled MiniLM); a missing pad token becomes EOS."""
    from transformers import AutoTokenizer

    from lightning_peft.cli.models import resolve_model_path

    if name is None:
        raise PeftConfigError(
            "TextDataModule needs a tokenizer: set data.tokenizer (the CLI links it to the model)"
        )
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def pad_batch(items: Sequence[dict[str, Any]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Stack encoded rows, padding token lists to the longest row of the batch (dynamic padding).

    ``input_ids`` pad with ``pad_id``, ``labels`` with ``IGNORE_INDEX`` (never in the loss), masks with 0;
    ``left`` pads on the left (for generation). Scalars (classification labels) are stacked as they are.
    """
    batch: dict[str, torch.Tensor] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if not isinstance(values[0], list):
            batch[key] = torch.tensor(values)
            continue
        longest = max(len(v) for v in values)  # per key: seq2seq labels differ in length from the inputs
        pad = pad_id if key == "input_ids" else (IGNORE_INDEX if key == "labels" else 0)
        rows = [
            ([pad] * (longest - len(v)) + v) if left else (v + [pad] * (longest - len(v))) for v in values
        ]
        batch[key] = torch.tensor(rows)
    return batch


__all__ = ["IGNORE_INDEX", "load_tokenizer", "pad_batch"]
