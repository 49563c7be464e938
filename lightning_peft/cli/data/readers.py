"""Reading text files (tsv, csv, jsonl, parquet) into rows, with errors that name
the file, the line and the column."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_peft.errors import PeftConfigError, preview

FORMATS = ("tsv", "csv", "jsonl", "parquet")
_SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
_DELIMITERS = {"tsv": "\t", "csv": ","}


class DataError(PeftConfigError):
    """A data file that cannot be used as given (missing column, unknown label, empty file, ...)."""


@dataclass
class Table:
    """Rows read from one source: ``rows[i]`` came from ``lines[i]`` (1-based line or record number)."""

    source: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    #: what a row number means in errors: "line" for text files, "record" for parquet / datasets
    unit: str = "line"
    #: class names of integer label columns (a Hugging Face ``ClassLabel``), by column; rows hold the names
    class_names: dict[str, list[str]] = field(default_factory=dict)

    def where(self, i: int, column: str | None = None) -> str:
        """``'<source>', line 5, column 'label'`` for row ``i``."""
        out = f"{self.source!r}, {self.unit} {self.lines[i]}"
        return f"{out}, column {column!r}" if column else out

    def text(self, i: int, column: str) -> str:
        """Row ``i``'s ``column`` as text; a missing value is an error naming the file, line and column."""
        value = self.rows[i].get(column)
        if value is None:
            raise DataError(f"{self.where(i, column)}: missing value")
        return str(value)

    def require(self, column: str | None, argument: str) -> None:
        """Raise if ``column`` is not in the table."""
        if column is not None and column not in self.columns:
            raise DataError(
                f"{argument}={column!r}: {self.source!r} has no column {column!r}; its columns are "
                f"{preview(self.columns)} (set data.{argument} to one of them)"
            )

    def subset(self, indices: Sequence[int]) -> Table:
        return Table(
            self.source,
            self.columns,
            [self.rows[i] for i in indices],
            [self.lines[i] for i in indices],
            self.unit,
            self.class_names,
        )


def detect_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise PeftConfigError(f"format={fmt!r} is not valid; expected 'auto' or one of {list(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise PeftConfigError(
            f"cannot tell the format of {str(path)!r} from its suffix {suffix!r}; name it .tsv, .csv, .jsonl or "
            f".parquet, or set data.format to one of {list(FORMATS)}"
        )
    return _SUFFIXES[suffix]


def read_table(path: str | os.PathLike, fmt: str = "auto", argument: str = "path") -> Table:
    """Read a local file into a :class:`Table`.

    TSV files are read without quoting (``csv.QUOTE_NONE``): SST-2 and GLUE TSVs contain bare ``"`` characters.
    CSV files use standard quoting. JSONL has one JSON object per line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{argument}={str(path)!r} does not exist or is not a file")
    fmt = detect_format(p, fmt)
    if fmt == "parquet":
        return _read_parquet(p, argument)
    if p.stat().st_size == 0:
        raise DataError(f"{argument}={str(path)!r} is empty: expected a header row and at least one data row")
    if fmt == "jsonl":
        return _read_jsonl(p, argument)
    return _read_delimited(p, fmt, argument)


def _read_delimited(p: Path, fmt: str, argument: str) -> Table:
    delimiter = _DELIMITERS[fmt]
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise DataError(
                f"{argument}={str(p)!r} is empty: its first line should be a header of column names"
            )
        header = [h.strip() for h in header]
        table = Table(str(p), header)
        if len(header) == 1:
            other = next(
                (
                    name
                    for name, d in (("tab", "\t"), ("comma", ","), ("semicolon", ";"))
                    if d != delimiter and d in header[0]
                ),
                None,
            )
            if other is not None:
                sep = "tab" if fmt == "tsv" else "comma"
                fix = "format='tsv'" if other == "tab" else "format='csv'"
                raise DataError(
                    f"{argument}={str(p)!r} is read as {fmt} ({sep}-separated) but its header {header[0]!r} has "
                    f"no {sep}: it looks {other}-separated. Save it with {sep}s or set data.format ({fix})"
                )
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != len(header):
                raise DataError(
                    f"{str(p)!r}, line {line}: expected {len(header)} {fmt} fields ({', '.join(header)}), got "
                    f"{len(row)}: {preview(row)}" + (" (tabs inside a text field?)" if fmt == "tsv" else "")
                )
            table.rows.append(dict(zip(header, row)))
            table.lines.append(line)
    if not table.rows:
        raise DataError(f"{argument}={str(p)!r} has a header ({', '.join(header)}) but no data rows")
    return table


def _read_jsonl(p: Path, argument: str) -> Table:
    table = Table(str(p), [])
    seen: dict[str, None] = {}
    with open(p, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{str(p)!r}, line {line}: not valid JSON ({err.msg}): {text[:80]!r}"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{str(p)!r}, line {line}: expected a JSON object per line, got {type(obj).__name__}"
                )
            seen.update(dict.fromkeys(obj))
            table.rows.append(obj)
            table.lines.append(line)
    if not table.rows:
        raise DataError(f"{argument}={str(p)!r} is empty: expected one JSON object per line")
    table.columns = list(seen)
    return table


def _read_parquet(p: Path, argument: str) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PeftConfigError(
            f"{argument}={str(p)!r} is a parquet file; reading it needs pyarrow: pip install pyarrow"
        ) from None
    rows = pq.read_table(p).to_pylist()
    if not rows:
        raise DataError(f"{argument}={str(p)!r} has no rows")
    return Table(str(p), list(rows[0]), rows, list(range(1, len(rows) + 1)), unit="record")


__all__ = ["FORMATS", "DataError", "Table", "detect_format", "read_table"]
