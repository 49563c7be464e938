"""TextDataModule over Hugging Face ``datasets``: Dataset / DatasetDict objects, ``load_dataset`` on local files
(Python and the command line), ClassLabel names, split mapping, and the error without ``datasets`` installed.
Everything is built in the test; nothing is downloaded."""

from __future__ import annotations

import builtins
import csv
import sys

import pytest
import torch

from lightning_peft.data import DataError, TextDataModule
from lightning_peft.errors import PeftConfigError
from tests.tiny_hf import module, sentiment_rows, tiny_bert_dir, write_tsv

datasets = pytest.importorskip("datasets")


def rows_of(split: list[tuple[str, str]]) -> dict[str, list[str]]:
    return {"sentence": [t for t, _ in split], "label": [lab for _, lab in split]}


def ids(dm: TextDataModule, split: str) -> list[list[int]]:
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    return [row for batch in loader for row in batch["input_ids"].tolist()]


def test_dataset_dict_gives_the_same_batches_as_the_files(tokenizer, tmp_path):
    rows = sentiment_rows()
    train, val = rows[:12], rows[12:]
    files = module(
        tokenizer,
        train_path=write_tsv(tmp_path / "train.tsv", train),
        val_path=write_tsv(tmp_path / "val.tsv", val),
        batch_size=4,
    )
    files.setup("fit")
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows_of(train)), validation=datasets.Dataset.from_dict(rows_of(val))
    )
    hf = module(tokenizer, dataset=dd, batch_size=4)
    hf.setup("fit")
    assert hf.label_names == files.label_names == ["negative", "positive"]
    assert ids(hf, "val") == ids(files, "val")
    for a, b in zip(hf.train_dataloader(), files.train_dataloader(), strict=True):  # same seed, same order
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert hf.tables["train"].where(3, "label") == "'DatasetDict[train]', record 4, column 'label'"


def test_class_label_names_keep_the_dataset_ids(tokenizer):
    features = datasets.Features(
        sentence=datasets.Value("string"), label=datasets.ClassLabel(names=["pos", "neg", "neutral"])
    )
    ds = datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine", "great"], "label": [0, 1, 2, 0]}, features)
    dm = module(tokenizer, dataset=ds, val_split=0.25)  # a single Dataset is the training split
    dm.setup("fit")
    assert dm.label_names == ["pos", "neg", "neutral"]  # the ClassLabel's order, not sorted
    labels = sorted(int(v) for b in dm.train_dataloader() for v in b["labels"]) + [
        int(v) for b in dm.val_dataloader() for v in b["labels"]
    ]
    assert sorted(labels) == [0, 0, 1, 2]


def test_split_mapping_and_missing_splits(tokenizer):
    rows = rows_of(sentiment_rows())
    dd = datasets.DatasetDict(
        {"tr": datasets.Dataset.from_dict(rows), "dev": datasets.Dataset.from_dict(rows)}
    )
    dm = module(tokenizer, dataset=dd, dataset_splits={"train": "tr", "val": "dev"})
    dm.setup("fit")
    assert len(dm.tables["train"].rows) == len(dm.tables["val"].rows) == 16
    with pytest.raises(DataError, match=r"dataset_splits\['val'\]='dev2': the dataset \(DatasetDict\) has no split 'dev2'; its splits are dev, tr"):
        module(tokenizer, dataset=dd, dataset_splits={"train": "tr", "val": "dev2"}).setup("fit")
    with pytest.raises(PeftConfigError, match="fit needs training data"):
        module(tokenizer, dataset=dd).setup("fit")  # no 'train' split and none named
    with pytest.raises(PeftConfigError, match=r"dataset_splits=\{'training': 'tr'\} has keys other than"):
        TextDataModule("minilm", dataset=dd, dataset_splits={"training": "tr"})
    with pytest.raises(PeftConfigError, match=r"dataset=\[1, 2\] is not valid; expected a datasets.Dataset"):
        module(tokenizer, dataset=[1, 2]).setup("fit")


def test_a_path_wins_over_the_dataset_for_its_split(tokenizer, tmp_path):
    rows = sentiment_rows()
    dd = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows_of(rows)))
    predict = tmp_path / "new.tsv"
    predict.write_text("sentence\nwhat a film\n")
    dm = module(tokenizer, dataset=dd, predict_path=str(predict), labels=["negative", "positive"])
    dm.setup("predict")
    assert [r["sentence"] for r in dm.tables["predict"].rows] == ["what a film"]


def _csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        w.writerows(rows)
    return str(path)


def test_load_dataset_arguments_read_local_csv(tokenizer, tmp_path):
    rows = sentiment_rows()
    spec = {
        "path": "csv",
        "data_files": {"train": _csv(tmp_path / "a.csv", rows[:12]), "validation": _csv(tmp_path / "b.csv", rows[12:])},
        "cache_dir": str(tmp_path / "cache"),
    }
    dm = module(tokenizer, dataset=spec, batch_size=4)
    dm.setup("fit")
    assert [r["sentence"] for r in dm.tables["val"].rows] == [t for t, _ in rows[12:]]
    assert dm.label_names == ["negative", "positive"]
    with pytest.raises(DataError, match=r"dataset=\{'path': 'csv'.*load_dataset failed"):
        module(tokenizer, dataset={"path": "csv", "data_files": str(tmp_path / "nope.csv")}).setup("fit")


def test_cli_fit_with_load_dataset_from_the_command_line(tmp_path, monkeypatch):
    from lightning_peft.cli import run_cli

    monkeypatch.setattr("sys.argv", ["lightning-peft"])
    rows = sentiment_rows()
    train, val = _csv(tmp_path / "train.csv", rows[:12]), _csv(tmp_path / "val.csv", rows[12:])
    cache = tmp_path / "cache"
    cli = run_cli(
        [
            "fit",
            "--model=lightning_peft.tasks.SequenceClassification",
            f"--model.model_name_or_path={tiny_bert_dir(tmp_path)}",
            "--model.strategies=[{class_path: LoRA, init_args: {r: 2, target_modules: [query]}}]",
            "--data=lightning_peft.data.TextDataModule",
            f"--data.dataset={{path: csv, data_files: {{train: {train}, validation: {val}}}, cache_dir: {cache}}}",
            "--data.text_column=sentence",
            "--data.batch_size=4",
            "--trainer.max_steps=2",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
        ]
    )
    dm = cli.datamodule
    assert cli.trainer.global_step == 2
    assert len(dm.tables["train"].rows) == 12 and len(dm.tables["val"].rows) == 4
    assert "train.csv" in str(cli.config["fit"]["data"]["init_args"]["dataset"]["data_files"]["train"])


def test_without_datasets_installed_the_error_names_the_extra(tokenizer, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "datasets", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    dm = module(tokenizer, dataset={"path": "csv", "data_files": "x.csv"})
    with pytest.raises(PeftConfigError, match=r"needs the Hugging Face datasets package.*lightning-peft\[datasets\]"):
        dm.setup("fit")
    files = module(tokenizer, train_path="demo:train")  # files still work without it
    files.setup("fit")
    assert files.label_names == ["negative", "positive"]
