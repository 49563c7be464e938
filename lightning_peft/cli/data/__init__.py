"""Text data for the task modules and the CLI, and the shipped sentiment demo data."""

from lightning_peft.cli.data.encoding import IGNORE_INDEX, load_tokenizer, pad_batch
from lightning_peft.cli.data.readers import DataError, Table, read_table
from lightning_peft.cli.data.resumable import ResumableDataLoader, ResumableSampler
from lightning_peft.cli.data.text import TextDataModule, demo_path

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "ResumableDataLoader",
    "ResumableSampler",
    "Table",
    "TextDataModule",
    "demo_path",
    "load_tokenizer",
    "pad_batch",
    "read_table",
]
