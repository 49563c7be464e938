"""Hugging Face ``datasets`` as a source of :class:`~lightning_peft.cli.data.text.TextDataModule` rows: a
``Dataset`` / ``DatasetDict`` object (Python), or ``load_dataset`` arguments (YAML / command line), e.g.
``{path: csv, data_files: {train: train.csv, validation: val.csv}}``.

``datasets`` is optional: it is imported only when one of these is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_peft.cli.data.readers import DataError, Table
from lightning_peft.errors import PeftConfigError, preview

INSTALL = "pip install 'lightning-peft[datasets]' (or pip install datasets)"


def import_datasets(argument: str, value: Any) -> Any:
    """The ``datasets`` module, or an error naming the argument that asked for it and how to install it."""
    try:
        import datasets
    except ImportError:
        raise PeftConfigError(
            f"{argument}={_short(value)} needs the Hugging Face datasets package, which is not installed: "
            f"{INSTALL}; or give local files with data.train_path / data.val_path"
        ) from None
    return datasets


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def is_hf_dataset(value: Any) -> bool:
    """Whether ``value`` is a ``datasets.Dataset`` (without importing ``datasets``)."""
    kind = type(value)
    return kind.__module__.split(".")[0] == "datasets" and kind.__name__ == "Dataset"


def load_splits(dataset: Any, name: str | None = None, config: str | None = None) -> dict[str, Any]:
    """The splits of ``dataset`` by name: a ``DatasetDict`` (or a dict of ``Dataset``) as it is, a single
    ``Dataset`` as ``{"train": ...}``, a dict of ``load_dataset`` arguments (with ``path``) loaded; else
    ``dataset_name`` / ``dataset_config`` loaded from the hub."""
    if dataset is None:
        if name is None:
            return {}
        dataset, argument = {"path": name, "name": config}, "dataset_name"
    else:
        argument = "dataset"
    if isinstance(dataset, Mapping) and dataset and all(is_hf_dataset(v) for v in dataset.values()):
        return dict(dataset)  # a DatasetDict is a dict of Dataset
    if is_hf_dataset(dataset):
        return {"train": dataset}
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("path"), str):
        raise PeftConfigError(
            f"{argument}={_short(dataset)} is not valid; expected a datasets.Dataset, a DatasetDict (or a dict "
            "of Dataset by split), or a dict of datasets.load_dataset arguments with 'path', e.g. {path: csv, "
            "data_files: {train: train.csv, validation: val.csv}}"
        )
    datasets = import_datasets(argument, dataset)
    kwargs = {k: v for k, v in dict(dataset).items() if v is not None}
    try:
        loaded = datasets.load_dataset(**kwargs)
    except (FileNotFoundError, ValueError, TypeError) as err:
        raise DataError(f"{argument}={_short(dataset)}: datasets.load_dataset failed: {err}") from err
    return load_splits(loaded if not is_hf_dataset(loaded) else {kwargs.get("split", "train"): loaded})


def dataset_table(ds: Any, source: str) -> Table:
    """The rows of a ``datasets.Dataset``; a ``ClassLabel`` column's integers become its class names (kept in
    ``Table.class_names``, so the ids stay the dataset's)."""
    from datasets import ClassLabel

    class_names = {c: list(f.names) for c, f in ds.features.items() if isinstance(f, ClassLabel)}
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{source!r} has no rows")
    for column, names in class_names.items():
        for row in rows:
            value = row[column]
            if isinstance(value, int) and 0 <= value < len(names):
                row[column] = names[value]  # -1 (GLUE's unlabeled test rows) stays -1
    return Table(source, list(ds.column_names), rows, list(range(1, len(rows) + 1)), "record", class_names)


def split_table(splits: dict[str, Any], split: str, split_name: str, source: str, explicit: bool) -> Table | None:
    """The table of ``splits[split_name]`` (our ``split``: train / val / test / predict); a missing split is
    ``None``, or an error if the user named it in ``dataset_splits``."""
    if split_name not in splits:
        if explicit:
            raise DataError(
                f"dataset_splits[{split!r}]={split_name!r}: the dataset ({source}) has no split {split_name!r}; "
                f"its splits are {preview(sorted(splits))}"
            )
        return None
    return dataset_table(splits[split_name], f"{source}[{split_name}]")


__all__ = ["INSTALL", "dataset_table", "import_datasets", "is_hf_dataset", "load_splits", "split_table"]
