"""TextDataModule: formats, labels, tokenization, causal-LM masking, and errors that name file, line and column."""

from __future__ import annotations

import filecmp
import json
import runpy
from pathlib import Path

import pytest
import torch

from lightning_peft.data import IGNORE_INDEX, DataError, TextDataModule, demo_path, read_table
from lightning_peft.errors import PeftConfigError
from tests.tiny_hf import module, sentiment_rows, write_tsv

ROOT = Path(__file__).resolve().parents[1]


def batches(dm: TextDataModule, split: str = "train") -> list[dict[str, torch.Tensor]]:
    return list(getattr(dm, f"{split}_dataloader")())


def test_tsv_is_read_without_quoting(tmp_path):
    path = tmp_path / "quotes.tsv"
    path.write_text('sentence\tlabel\n"the film " is fun\t1\nit \'s a "classic\t0\n')
    table = read_table(path)
    assert [r["sentence"] for r in table.rows] == ['"the film " is fun', "it 's a \"classic"]
    assert table.lines == [2, 3]


def test_all_formats_give_the_same_batches(tokenizer, tmp_path):
    rows = sentiment_rows()
    tsv = write_tsv(tmp_path / "d.tsv", rows)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": t, "label": lab}) + "\n" for t, lab in rows))
    parquet = tmp_path / "d.parquet"
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"sentence": [t for t, _ in rows], "label": [lab for _, lab in rows]}), parquet)
    results = []
    for path in (tsv, csv_path, jsonl, parquet):
        dm = module(tokenizer, train_path=str(path), batch_size=4, seed=0)
        dm.setup("fit")
        results.append(torch.cat([b["input_ids"].flatten() for b in batches(dm)]))
        assert dm.label_names == ["negative", "positive"]
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_labels_map_to_ids_and_dynamic_padding(tokenizer, tmp_path):
    data = write_tsv(tmp_path / "d.tsv", [("good", "yes"), ("a much longer bad sentence here", "no")])
    dm = module(tokenizer, train_path=data, batch_size=2)
    dm.setup("fit")
    (batch,) = list(dm._loader("train", False, 2))
    assert dm.label2id == {"no": 0, "yes": 1}
    assert batch["labels"].tolist() == [1, 0]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert batch["input_ids"].shape[1] == max(lengths) == 8  # padded to the longest in the batch only
    assert batch["input_ids"][0, lengths[0] :].eq(tokenizer.pad_token_id).all()


def test_integer_labels_are_their_own_ids(tokenizer, tmp_path):
    data = write_tsv(tmp_path / "d.tsv", [("good", "1"), ("bad", "0"), ("fine", "2")])
    dm = module(tokenizer, train_path=data)
    dm.setup("fit")
    assert dm.label_names == ["0", "1", "2"]
    assert sorted(x["labels"] for x in dm._encode(dm.tables["train"], "train", "classification")) == [0, 1, 2]


def test_label_map_saved_and_reused_for_test(tokenizer, tmp_path):
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows())
    label_map = tmp_path / "labels.json"
    dm = module(tokenizer, train_path=train, label_map_path=str(label_map))
    dm.setup("fit")
    assert json.loads(label_map.read_text()) == {"labels": ["negative", "positive"]}
    test = write_tsv(tmp_path / "test.tsv", [("great", "positive"), ("awful", "negative")])
    dm2 = module(tokenizer, test_path=test, label_map_path=str(label_map))
    dm2.setup("test")
    (batch,) = batches(dm2, "test")
    assert batch["labels"].tolist() == [1, 0]
    # and from a checkpoint's datamodule state
    dm3 = module(tokenizer, test_path=test)
    dm3.setup("test")
    dm3.load_state_dict(dm.state_dict())
    assert batches(dm3, "test")[0]["labels"].tolist() == [1, 0]


def test_unknown_label_at_test_time_names_file_line_and_column(tokenizer, tmp_path):
    train = write_tsv(tmp_path / "train.tsv", sentiment_rows())
    test = write_tsv(tmp_path / "test.tsv", [("great", "positive"), ("so-so", "neutral")])
    dm = module(tokenizer, train_path=train, test_path=test)
    dm.setup("fit")
    dm.setup("test")
    with pytest.raises(
        DataError,
        match=r"test.tsv', line 3, column 'label': label 'neutral' is not one of the "
        r"training labels negative, positive",
    ):
        dm.test_dataloader()


def test_missing_column_names_the_file_and_columns(tokenizer, tmp_path):
    data = write_tsv(tmp_path / "d.tsv", [("good", "1")], header="text\tlabel")
    dm = module(tokenizer, train_path=data)
    with pytest.raises(
        DataError,
        match=r"text_column='sentence': '.*d.tsv' has no column 'sentence'; its columns "
        r"are text, label \(set data.text_column",
    ):
        dm.setup("fit")


def test_empty_and_header_only_files(tokenizer, tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match=r"train_path='.*empty.tsv' is empty"):
        module(tokenizer, train_path=str(empty)).setup("fit")
    header = tmp_path / "header.tsv"
    header.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match=r"header.tsv' has a header \(sentence, label\) but no data rows"):
        module(tokenizer, train_path=str(header)).setup("fit")
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("\n\n")
    with pytest.raises(DataError, match="is empty: expected one JSON object per line"):
        module(tokenizer, train_path=str(jsonl)).setup("fit")


def test_wrong_delimiter_is_named(tokenizer, tmp_path):
    path = tmp_path / "commas.tsv"
    path.write_text("sentence,label\ngood,1\n")
    with pytest.raises(
        DataError,
        match=r"read as tsv \(tab-separated\) but its header 'sentence,label' has no tab: "
        r"it looks comma-separated.*format='csv'",
    ):
        module(tokenizer, train_path=str(path)).setup("fit")


def test_wrong_field_count_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(
        DataError, match=r"bad.tsv', line 3: expected 2 tsv fields \(sentence, label\), got 3"
    ):
        module(tokenizer, train_path=str(path)).setup("fit")


def test_bad_json_line_and_missing_file(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "good", "label": 1}\n{"sentence": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl', line 2: not valid JSON"):
        module(tokenizer, train_path=str(path)).setup("fit")
    with pytest.raises(DataError, match=r"train_path='nope.tsv' does not exist"):
        module(tokenizer, train_path="nope.tsv").setup("fit")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(PeftConfigError, match="max_length=0 is not valid"):
        TextDataModule("minilm", max_length=0)
    with pytest.raises(PeftConfigError, match="val_split=1.5 is not valid"):
        TextDataModule("minilm", val_split=1.5)
    unknown = tmp_path / "x.txt"
    unknown.write_text("sentence\tlabel\n")
    with pytest.raises(PeftConfigError, match=r"cannot tell the format of '.*x.txt' from its suffix '.txt'"):
        read_table(unknown)


def test_limit_and_val_split(tokenizer, tmp_path):
    rows = [(f"sentence {i}", "positive" if i % 2 else "negative") for i in range(40)]
    data = write_tsv(tmp_path / "d.tsv", rows)
    dm = module(tokenizer, train_path=data, limit_train_samples=20, val_split=0.25)
    dm.setup("fit")
    train = {r["sentence"] for r in dm.tables["train"].rows}
    val = {r["sentence"] for r in dm.tables["val"].rows}
    assert len(train) == 15 and len(val) == 5 and not train & val


def test_causal_lm_loss_only_on_the_response(tokenizer, tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text(
        json.dumps({"prompt": "say hi", "response": "hello there"})
        + "\n"
        + json.dumps({"prompt": "a much longer prompt than the other", "response": "ok"})
        + "\n"
    )
    dm = module(
        tokenizer,
        train_path=str(path),
        task="causal_lm",
        prompt_column="prompt",
        response_column="response",
        prompt_template="Q: {prompt}\nA: ",
        batch_size=2,
    )
    dm.setup("fit")
    (batch,) = list(dm._loader("train", False, 2))
    prompt_len = len(tokenizer("Q: say hi\nA: ")["input_ids"])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    assert labels[:prompt_len].eq(IGNORE_INDEX).all()
    response = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    assert (
        labels[prompt_len : prompt_len + len(response)].tolist()
        == response
        == ids[prompt_len:][: len(response)].tolist()
    )
    assert labels[batch["attention_mask"][0] == 0].eq(IGNORE_INDEX).all()  # padding never counts
    full = module(
        tokenizer,
        train_path=str(path),
        task="causal_lm",
        prompt_column="prompt",
        response_column="response",
        loss_on_response_only=False,
        batch_size=2,
    )
    full.setup("fit")
    (batch,) = list(full._loader("train", False, 2))
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])


def test_demo_data_is_shipped_and_reproducible(tmp_path):
    for split in ("train", "validation"):
        table = read_table(demo_path(split))
        assert {r["label"] for r in table.rows} == {"negative", "positive"}
    namespace = runpy.run_path(str(ROOT / "scripts" / "make_sentiment_demo.py"))
    written = namespace["write"](tmp_path)
    for path in written:
        assert filecmp.cmp(path, Path(demo_path("train")).parent / path.name, shallow=False)
    train = {r["sentence"] for r in read_table(demo_path("train")).rows}
    val = read_table(demo_path("validation")).rows
    assert len(train) == 400 and len(val) == 160 and not train & {r["sentence"] for r in val}
