"""``PredictionWriter``: ``trainer.predict`` (or ``lightning-peft predict``) outputs to a JSONL or CSV file, one
row per input row, in input order."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_peft.errors import PeftConfigError
from lightning_peft.io.atomic import atomic_write_text

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}
DEFAULT_NAME = "predictions.jsonl"


class PredictionWriter(BasePredictionWriter):
    """Write what ``predict_step`` returns to ``output``, one row per input row, in input order.

    A row is ``index`` (the input row's 0-based position), the input columns the data module gives
    (``TextDataModule.prediction_inputs``: an ``id`` / ``idx`` column if there is one and the text column(s),
    or ``input_columns``), then the prediction: the module's ``prediction_rows(output)`` when it has one (the
    task modules: ``label``, ``label_id`` and ``prob_<label>`` per class for classification, ``generated`` for
    ``CausalLM`` / ``Seq2SeqLM``), else each key of a dict output (a tensor row becomes a list), or
    ``prediction`` for a list or tensor output. The rows are collected over the epoch (sorted by the indices
    Lightning tracks for a predict ``DataLoader``; gathered from every rank under DDP) and written once, atomically.

    Args:
        output: ``.jsonl`` (or ``.json``: JSON lines) or ``.csv`` file; default
            ``<trainer.default_root_dir>/predictions.jsonl``.
        input_columns: the input columns to copy into each row (``[]``: none; ``None``: the data module's
            default).

    Example:
        >>> writer = PredictionWriter("preds.csv")  # trainer.predict(model, datamodule=dm) then writes preds.csv
    """

    def __init__(self, output: str | None = None, input_columns: list[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        if output is not None and Path(output).suffix.lower() not in FORMATS:
            raise PeftConfigError(
                f"output={output!r} is not valid; expected a file ending in {', '.join(FORMATS)} "
                "(JSON lines or CSV)"
            )
        self.output, self.input_columns = output, input_columns
        self.written: str | None = None  # the path of the last file written
        self._rows: list[tuple[int, int, dict[str, Any]]] = []
        self._count = 0

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._count = [], 0

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        convert = getattr(pl_module, "prediction_rows", None)
        rows = convert(prediction) if callable(convert) else generic_rows(prediction)
        indices = list(batch_indices or [])
        if len(indices) != len(rows):  # no indices tracked (not a DataLoader): the order they come in
            indices = list(range(self._count, self._count + len(rows)))
        self._count += len(rows)
        self._rows.extend((dataloader_idx, int(i), row) for i, row in zip(indices, rows))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        unique = {(dl, i): row for dl, i, row in rows}  # a DistributedSampler repeats rows to even out the ranks
        inputs_of = getattr(trainer.datamodule, "prediction_inputs", None) if trainer.datamodule else None
        inputs = inputs_of(self.input_columns) if callable(inputs_of) and self.input_columns != [] else []
        out = []
        for (dl, i), row in sorted(unique.items()):
            record: dict[str, Any] = {"index": i} if dl == 0 else {"dataloader": dl, "index": i}
            if dl == 0 and i < len(inputs):
                record.update(inputs[i])
            out.append({**record, **row})
        path = self.output or os.path.join(trainer.default_root_dir, DEFAULT_NAME)
        atomic_write_text(path, render(out, FORMATS[Path(path).suffix.lower()]))
        self.written = path


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def generic_rows(prediction: Any) -> list[dict[str, Any]]:
    """Rows of a ``predict_step`` output without a ``prediction_rows``: a dict's keys become columns (each value
    has one entry per row), a list or a tensor becomes ``prediction``."""
    if isinstance(prediction, dict):
        columns = {k: _plain(v) for k, v in prediction.items()}
        n = {len(v) for v in columns.values() if isinstance(v, list)}
        if len(n) != 1:
            raise PeftConfigError(
                f"PredictionWriter cannot split this predict_step output into rows: {sorted(prediction)} do not "
                "hold one value per row each; give the module a prediction_rows(output) -> list of dicts"
            )
        return [{k: v[i] for k, v in columns.items()} for i in range(n.pop())]
    values = _plain(prediction)
    if not isinstance(values, list):
        raise PeftConfigError(
            f"PredictionWriter cannot split a predict_step output of type {type(prediction).__name__} into rows; "
            "return a dict, a list or a tensor with one entry per row, or give the module prediction_rows(output)"
        )
    return [{"prediction": v} for v in values]


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """JSON lines, or CSV with the union of the rows' keys as header (list values as JSON)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    header = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()


__all__ = ["PredictionWriter", "generic_rows", "render"]
