"""``TextDataModule``: local text files or Hugging Face datasets, tokenized for classification or causal LM."""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft.cli.data.demo import demo_path, resolve_data_path
from lightning_peft.cli.data.encoding import encode_lm, load_tokenizer, pad_batch
from lightning_peft.cli.data.hf import load_splits, split_table
from lightning_peft.cli.data.labels import infer_labels, read_label_map, write_labels
from lightning_peft.cli.data.readers import DataError, Table, read_table
from lightning_peft.cli.data.resumable import ResumableDataLoader, restore_rng, rng_state, unloaded_state
from lightning_peft.errors import PeftConfigError, preview

LABELS_FILE = "labels.json"
SPLITS = ("train", "val", "test", "predict")
class TextDataModule(L.LightningDataModule):
    """Text data from tsv / csv / jsonl / parquet files or a Hugging Face dataset, tokenized with the model's
    tokenizer and padded per batch. The training loader is a :class:`ResumableDataLoader`: a run resumed from a
    mid-epoch checkpoint continues with the batches an uninterrupted run would have seen.

    For classification, string labels become ids (sorted, or in the order of ``labels``); the mapping is saved in
    checkpoints, in ``<log_dir>/labels.json`` and in ``label_map_path`` when given, and reused for validation,
    test and prediction, where a label the training data did not have is an error naming file, line and column.
    For causal LM, a row is ``prompt_template`` + ``response`` + EOS (or just the text column), and with
    ``loss_on_response_only`` the loss covers the response tokens only.

    Args:
        tokenizer: tokenizer path or hub name (LightningCLI links it to the model's ``model_name_or_path``;
            ``"minilm"`` is the bundled MiniLM).
        train_path: training file (``demo:train`` is the shipped sentiment demo).
        val_path: validation file (``demo:validation``); without it, ``val_split`` of train is held out.
        test_path: test file.
        predict_path: file to predict on (labels optional).
        format: ``"auto"`` (from the suffix), ``"tsv"`` (read with no quoting, as GLUE/SST-2), ``"csv"``,
            ``"jsonl"`` or ``"parquet"``.
        dataset: a Hugging Face ``datasets.Dataset`` (the training split) or ``DatasetDict``, or a dict of
            ``datasets.load_dataset`` arguments (YAML: ``{path: csv, data_files: {train: a.csv, validation:
            b.csv}}``); a ``*_path`` given too wins for its split. Needs ``pip install 'lightning-peft[datasets]'``.
        dataset_name: a Hugging Face hub dataset (``dataset: {path: NAME, name: CONFIG}``; downloads).
        dataset_config: its configuration name.
        dataset_splits: the dataset's split names for train / val / test / predict (default ``train``,
            ``validation``, ``test``, ``test``).
        task: ``"classification"``, ``"causal_lm"`` or ``"seq2seq"``; ``None`` asks the attached task module.
        text_column: the text (classification), or the whole text for causal LM without a response column.
        text_pair_column: optional second text for sentence-pair classification.
        label_column: the label column (classification).
        labels: label names in id order; ``None`` infers them from the training data (integers are kept as ids).
        label_map_path: JSON file of label names to read (if it exists) or write.
        prompt_column: the prompt column (causal LM).
        response_column: the response column (causal LM).
        prompt_template: how the prompt is written before the response, with ``{prompt}``.
        loss_on_response_only: mask the prompt tokens out of the causal-LM loss.
        max_length: truncate to this many tokens.
        batch_size: training batch size.
        eval_batch_size: batch size for validation / test / predict (default ``batch_size``).
        limit_train_samples: use a random subset of this many training rows (quick runs).
        limit_val_samples: use a random subset of this many validation rows.
        val_split: fraction of the training rows held out for validation when no ``val_path`` is given.
        num_workers: DataLoader workers.
        seed: seed for the subsets, the held-out split and shuffling (epoch ``e`` is shuffled with ``seed + e``).

    Example:
        >>> dm = TextDataModule("minilm", train_path="demo:train", val_path="demo:validation",
        ...                     text_column="sentence", batch_size=16)
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        format: Literal["auto", "tsv", "csv", "jsonl", "parquet"] = "auto",
        dataset: Any = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        dataset_splits: dict[str, str] | None = None,
        task: Literal["classification", "causal_lm", "seq2seq"] | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str | None = "label",
        labels: list[str] | None = None,
        label_map_path: str | None = None,
        prompt_column: str | None = None,
        response_column: str | None = None,
        prompt_template: str = "{prompt}\n",
        loss_on_response_only: bool = True,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        limit_train_samples: int | None = None,
        limit_val_samples: int | None = None,
        val_split: float = 0.0,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        for arg, value in (("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise PeftConfigError(f"{arg}={value!r} is not valid; expected an integer > 0")
        for arg, value in (
            ("limit_train_samples", limit_train_samples),
            ("limit_val_samples", limit_val_samples),
            ("eval_batch_size", eval_batch_size),
        ):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PeftConfigError(f"{arg}={value!r} is not valid; expected an integer > 0 or None")
        if not 0.0 <= val_split < 1.0:
            raise PeftConfigError(f"val_split={val_split!r} is not valid; expected a fraction in [0, 1)")
        if "{prompt}" not in prompt_template:
            raise PeftConfigError(f"prompt_template={prompt_template!r} must contain '{{prompt}}'")
        if task not in (None, "classification", "causal_lm", "seq2seq"):
            raise PeftConfigError(
                f"task={task!r} is not valid; expected 'classification', 'causal_lm', 'seq2seq' or None"
            )
        if labels is not None and len(set(labels)) != len(labels):
            raise PeftConfigError(f"labels={labels!r} has duplicates")
        self.tokenizer_name = tokenizer
        self.paths = {
            "train": resolve_data_path(train_path),
            "val": resolve_data_path(val_path),
            "test": resolve_data_path(test_path),
            "predict": resolve_data_path(predict_path),
        }
        self.format = format
        self.dataset, self.dataset_name, self.dataset_config = dataset, dataset_name, dataset_config
        if dataset_splits is not None and not set(dataset_splits) <= set(SPLITS):
            raise PeftConfigError(f"dataset_splits={dataset_splits!r} has keys other than {list(SPLITS)}")
        self.explicit_splits = set(dataset_splits or {})
        defaults = {"train": "train", "val": "validation", "test": "test", "predict": "test"}
        self.dataset_splits = {**defaults, **(dataset_splits or {})}
        self.hf_splits: dict[str, Any] | None = None  # loaded in setup
        self.task = task
        self.text_column, self.text_pair_column, self.label_column = (
            text_column,
            text_pair_column,
            label_column,
        )
        self.label_names: list[str] | None = list(labels) if labels is not None else None
        self.label_map_path = label_map_path
        self.prompt_column, self.response_column = prompt_column, response_column
        self.prompt_template, self.loss_on_response_only = prompt_template, loss_on_response_only
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.limit_train_samples, self.limit_val_samples = limit_train_samples, limit_val_samples
        self.val_split, self.num_workers, self.seed = val_split, num_workers, seed
        self.tokenizer: Any = None
        self.tables: dict[str, Table] = {}
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    # -- labels ------------------------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names is not None else None

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names or [])}

    def state_dict(self) -> dict[str, Any]:
        """The label names, and torch's random state (every rank's under DDP): restored with the checkpoint,
        dropout after a resume draws the masks an uninterrupted run would (the train loader's position is saved
        by Lightning itself)."""
        return {"labels": self.label_names, "rng": rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("labels") is not None:
            self.label_names = list(state_dict["labels"])
        restore_rng(state_dict.get("rng") or {})

    def save_labels(self, path: str | os.PathLike) -> None:
        """Write the label names in id order to ``path`` (JSON: ``{"labels": [...]}``)."""
        write_labels(path, self.label_names)

    # -- reading -----------------------------------------------------------------------------------------------
    def resolved_task(self) -> str:
        if self.task is not None:
            return self.task
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return getattr(module, "data_task", "classification")

    def _read(self, split: str) -> Table | None:
        path = self.paths[split]
        if path is not None:
            return read_table(path, self.format, argument=f"{split}_path")
        if self.dataset is None and self.dataset_name is None:
            return None
        if self.hf_splits is None:
            self.hf_splits = load_splits(self.dataset, self.dataset_name, self.dataset_config)
        source = self.dataset_name or type(self.dataset).__name__
        name, explicit = self.dataset_splits[split], split in self.explicit_splits
        return split_table(self.hf_splits, split, name, source, explicit)

    def _limit(self, table: Table, limit: int | None, salt: int) -> Table:
        if limit is None or limit >= len(table.rows):
            return table
        indices = sorted(random.Random(self.seed + salt).sample(range(len(table.rows)), limit))
        return table.subset(indices)

    def setup(self, stage: str | None = None) -> None:
        task = self.resolved_task()
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        splits = wanted.get(stage or "fit", list(SPLITS)) if stage is not None else ["train", "val", "test"]
        read = {split: self._read(split) for split in splits}
        if stage in (None, "fit") and read.get("train") is None:
            raise PeftConfigError("fit needs training data: set data.train_path (or data.dataset)")
        for split in splits:
            table = read[split]
            if table is None:
                continue
            if split == "train":
                table = self._limit(table, self.limit_train_samples, 0)
                if read.get("val") is None and self.val_split > 0:
                    order = list(range(len(table.rows)))
                    random.Random(self.seed).shuffle(order)
                    n_val = max(1, round(self.val_split * len(order)))
                    self.tables["val"] = table.subset(sorted(order[:n_val]))
                    table = table.subset(sorted(order[n_val:]))
            elif split == "val":
                table = self._limit(table, self.limit_val_samples, 1)
            self.tables[split] = table
        if task == "classification":
            self._setup_labels(stage)
        for split in splits:  # check the columns now; encode in the loaders, after a checkpoint's labels load
            if split in self.tables:
                self._check_columns(self.tables[split], split, task)
                self.datasets.pop(split, None)

    def _setup_labels(self, stage: str | None) -> None:
        if self.label_names is None and self.label_map_path and os.path.isfile(self.label_map_path):
            self.label_names = read_label_map(self.label_map_path)
        train = self.tables.get("train")
        if train is not None and self.label_column is not None:
            train.require(self.label_column, "label_column")
            if self.label_names is None:
                names = train.class_names.get(self.label_column)  # a ClassLabel's names keep its ids
                self.label_names = list(names) if names else infer_labels(train, self.label_column)
        if self.label_names is None:
            return  # test / predict: they may come from a checkpoint (load_state_dict), checked in the loaders
        trainer = self.trainer
        log_dir = (
            trainer.log_dir if trainer is not None and stage in (None, "fit") else None
        )  # all ranks call it
        if trainer is not None and not trainer.is_global_zero:
            return
        if self.label_map_path and not os.path.isfile(self.label_map_path):
            self.save_labels(self.label_map_path)
        if log_dir:
            self.save_labels(os.path.join(log_dir, LABELS_FILE))

    # -- encoding ----------------------------------------------------------------------------------------------
    def _label_id(self, table: Table, i: int) -> int:
        value = str(table.rows[i][self.label_column]).strip()  # type: ignore[index]
        ids = self.label2id
        if value not in ids:
            raise DataError(
                f"{table.where(i, self.label_column)}: label {value!r} is not one of the training labels "
                f"{preview(self.label_names or [])}"
            )
        return ids[value]

    def _check_columns(self, table: Table, split: str, task: str) -> None:
        if task == "seq2seq" and self.response_column is None:
            raise PeftConfigError(
                "task='seq2seq' needs data.response_column (the target text) and prompt_column"
            )
        if task in ("causal_lm", "seq2seq"):
            if self.response_column is None:
                table.require(self.text_column, "text_column")
                return
            table.require(self.prompt_column or "prompt", "prompt_column")
            if split != "predict":
                table.require(self.response_column, "response_column")
            return
        table.require(self.text_column, "text_column")
        table.require(self.text_pair_column, "text_pair_column")
        if split != "predict":
            table.require(self.label_column, "label_column")

    def _encode(self, table: Table, split: str, task: str) -> list[dict[str, Any]]:
        self._check_columns(table, split, task)
        if task in ("causal_lm", "seq2seq"):
            return encode_lm(
                table,
                self.tokenizer,
                text_column=self.text_column,
                prompt_column=self.prompt_column or "prompt",
                response_column=self.response_column,
                prompt_template=self.prompt_template,
                loss_on_response_only=self.loss_on_response_only,
                max_length=self.max_length,
                predicting=split == "predict",
                seq2seq=task == "seq2seq",
            )
        with_labels = self.label_column is not None and self.label_column in table.columns
        if with_labels and self.label_names is None:
            raise DataError(
                f"{split} data {table.source!r} has labels but the label names are unknown (no training data): "
                "give data.labels, data.label_map_path (the labels.json a fit run wrote) or --ckpt_path"
            )
        texts = [table.text(i, self.text_column) for i in range(len(table.rows))]
        pairs = (
            [table.text(i, self.text_pair_column) for i in range(len(table.rows))]
            if self.text_pair_column
            else None
        )
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        out = []
        for i in range(len(texts)):
            item = {k: v[i] for k, v in enc.items()}
            if with_labels:
                item["labels"] = self._label_id(table, i)
            out.append(item)
        return out

    def prediction_inputs(self, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The predict rows' input columns, in input order, for a prediction writer to copy: ``columns``, by
        default an ``id`` (or ``idx``) column if there is one and the text column(s) (the prompt for an LM)."""
        table = self.tables.get("predict")
        if table is None:
            return []
        if columns is None:
            task = self.resolved_task()
            texts = [self.text_column, self.text_pair_column] if task == "classification" else [self.text_column]
            if task != "classification" and self.response_column is not None:
                texts = [self.prompt_column or "prompt"]
            columns = [c for c in ("id", "idx") if c in table.columns][:1] + [c for c in texts if c]
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise PeftConfigError(
                f"input_columns={list(columns)!r}: {table.source!r} has no column {missing[0]!r}; its columns are "
                f"{preview(table.columns)}"
            )
        return [{c: row.get(c) for c in columns} for row in table.rows]

    # -- loaders -----------------------------------------------------------------------------------------------
    def collate(self, items: Sequence[dict[str, Any]], left: bool = False) -> dict[str, torch.Tensor]:
        """Pad a list of encoded rows to the longest one (dynamic padding)."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return pad_batch(items, pad_id, left)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.tables:
            raise PeftConfigError(f"no {split} data: set data.{split}_path (or a {split} split in data.dataset)")
        if split not in self.datasets:
            self.datasets[split] = self._encode(self.tables[split], split, self.resolved_task())
        left = split == "predict" and self.resolved_task() == "causal_lm"  # generation continues on the right
        kwargs: dict[str, Any] = dict(
            batch_size=batch_size,
            collate_fn=functools.partial(self.collate, left=left),
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),  # base seeds of workers: not the global RNG
        )
        if split != "train":
            return DataLoader(self.datasets[split], shuffle=shuffle, **kwargs)  # type: ignore[arg-type]
        trainer = self.trainer  # under DDP, this rank's share (Lightning keeps a DistributedSampler as it is)
        distributed = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
        loader = ResumableDataLoader(self.datasets[split], shuffle=shuffle, seed=self.seed, **distributed, **kwargs)
        loader.pending_state = functools.partial(unloaded_state, trainer)
        return loader

    def train_dataloader(self) -> DataLoader:
        """A :class:`ResumableDataLoader`: shuffled with ``seed + epoch``, its position saved in checkpoints."""
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.eval_batch_size)


__all__ = ["TextDataModule", "demo_path", "resolve_data_path"]
