"""Tokenizer loading, causal-LM encoding and dynamic padding for :class:`~lightning_peft.cli.data.text.TextDataModule`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_peft.cli.data.readers import Table
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


def encode_lm(
    table: Table,
    tok: Any,
    *,
    text_column: str,
    prompt_column: str,
    response_column: str | None,
    prompt_template: str,
    loss_on_response_only: bool,
    max_length: int,
    predicting: bool,
    seq2seq: bool,
) -> list[dict[str, Any]]:
    """Token ids (and labels) of a causal-LM / seq2seq table: ``prompt_template`` + response + EOS, the loss on
    the response only with ``loss_on_response_only``; without a response column, the text column is the whole
    row. Predicting gives the prompt only; seq2seq gives the prompt as input, the response as target."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = []
    if response_column is None:
        for i in range(len(table.rows)):
            text = table.text(i, text_column)
            ids = tok(text, truncation=True, max_length=max_length - len(eos))["input_ids"] + eos
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
        return out
    for i in range(len(table.rows)):
        prompt = prompt_template.format(prompt=table.text(i, prompt_column))
        prompt_ids = tok(prompt, truncation=True, max_length=max_length)["input_ids"]
        if predicting or seq2seq:  # seq2seq: the prompt is the encoder input, the response the target
            item = {"input_ids": prompt_ids, "attention_mask": [1] * len(prompt_ids)}
            if not predicting:
                target = table.text(i, response_column)
                item["labels"] = tok(text_target=target, truncation=True, max_length=max_length)["input_ids"]
            out.append(item)
            continue
        response_ids = tok(table.text(i, response_column), add_special_tokens=False)["input_ids"] + eos
        ids = (prompt_ids + response_ids)[:max_length]
        labels = [IGNORE_INDEX] * len(prompt_ids) if loss_on_response_only else list(prompt_ids)
        labels = (labels + response_ids)[:max_length]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


__all__ = ["IGNORE_INDEX", "encode_lm", "load_tokenizer", "pad_batch"]
