"""Label names of classification data: inferred from the training rows, read from and written to JSON."""

from __future__ import annotations

import json
import os

from lightning_peft.cli.data.readers import DataError, Table


def infer_labels(table: Table, column: str) -> list[str]:
    """The sorted distinct labels of ``column``; integer labels are their own ids (``0..max``)."""
    distinct = sorted({str(r[column]).strip() for r in table.rows})
    if all(v.lstrip("-").isdigit() for v in distinct):
        ids = sorted(int(v) for v in distinct)
        if ids[0] < 0:
            raise DataError(f"{table.source!r}: integer labels must be >= 0, found {ids[0]}")
        return [str(i) for i in range(ids[-1] + 1)]
    return distinct


def read_label_map(path: str) -> list[str]:
    """The label names in id order from a JSON file ``{"labels": [...]}`` (or a bare list)."""
    with open(path) as f:
        data = json.load(f)
    names = data["labels"] if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"label_map_path={path!r} should hold {{'labels': [names in id order]}}")
    return names


def write_labels(path: str | os.PathLike, names: list[str] | None) -> None:
    """Write the label names in id order to ``path`` (JSON: ``{"labels": [...]}``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"labels": names}, f, indent=1)


__all__ = ["infer_labels", "read_label_map", "write_labels"]
