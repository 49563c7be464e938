"""The data module under its first import path (recipes' ``class_path``): a re-export of
:mod:`lightning_peft.cli.data`."""

from lightning_peft.cli.data import (
    IGNORE_INDEX,
    DataError,
    Table,
    TextDataModule,
    demo_path,
    load_tokenizer,
    pad_batch,
    read_table,
)

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Table",
    "TextDataModule",
    "demo_path",
    "load_tokenizer",
    "pad_batch",
    "read_table",
]
