"""``lightning-peft predict`` with ``PredictionWriter``: one row per input row, in input order, labels equal to the
trained model's own argmax; JSONL and CSV; causal-LM generations; generic outputs; bad arguments."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lightning_peft.callbacks import PredictionWriter
from lightning_peft.cli import run_cli
from lightning_peft.errors import PeftConfigError
from lightning_peft.lightning.prediction_writer import generic_rows, render
from tests.tiny_hf import sentiment_rows, tiny_bert_dir, tiny_llama_dir, write_tsv

QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
#: 11 rows with an id column, predicted in batches of 3 (the last one partial): the order must survive batching
TEXTS = [
    "a wonderful film", "truly awful", "i loved it", "boring and long", "great fun", "lifeless", "superb acting",
    "a dull mess", "funny and warm", "painfully bad", "what a joy",
]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-peft"])


def _common(bert: str, tmp_path: Path) -> list[str]:
    return [
        "--model=lightning_peft.tasks.SequenceClassification",
        f"--model.model_name_or_path={bert}",
        "--model.strategies=[{class_path: LoRA, init_args: {r: 4, target_modules: [query, value]}}]",
        "--data=lightning_peft.data.TextDataModule",
        "--data.text_column=sentence",
        "--data.batch_size=4",
        "--data.eval_batch_size=3",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]


def test_fit_then_predict_writes_one_row_per_input_in_order(tmp_path):
    bert = tiny_bert_dir(tmp_path)
    data = write_tsv(tmp_path / "train.tsv", sentiment_rows())
    cli = run_cli(
        ["fit", *_common(bert, tmp_path), f"--data.train_path={data}", "--trainer.max_steps=40", "--model.lr=0.01",
         "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=true"]
    )
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert ckpt
    predict = tmp_path / "new.tsv"
    predict.write_text("id\tsentence\n" + "".join(f"r{i}\t{t}\n" for i, t in enumerate(TEXTS)))
    outputs = {}
    for name in ("preds.jsonl", "preds.csv"):
        out = tmp_path / name
        cli = run_cli(
            [
                "predict",
                *_common(bert, tmp_path),
                f"--data.predict_path={predict}",
                f"--ckpt_path={ckpt}",
                "--trainer.callbacks+=PredictionWriter",
                f"--trainer.callbacks.output={out}",
            ]
        )
        (writer,) = [c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter)]
        assert writer.written == str(out)
        if name.endswith(".jsonl"):
            outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
        else:
            with open(out, newline="") as f:
                outputs[name] = list(csv.DictReader(f))

    rows = outputs["preds.jsonl"]
    assert [r["index"] for r in rows] == list(range(len(TEXTS)))
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(TEXTS))]
    assert [r["sentence"] for r in rows] == TEXTS
    assert list(rows[0]) == ["index", "id", "sentence", "label", "label_id", "prob_negative", "prob_positive"]

    # the model's own argmax, one sentence at a time (no padding), from the module predict ran with
    model = cli.model.model.eval()
    tok = cli.datamodule.tokenizer
    with torch.no_grad():
        probs = [model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0] for t in TEXTS]
    want_ids = [int(p.argmax()) for p in probs]
    assert [r["label_id"] for r in rows] == want_ids
    assert [r["label"] for r in rows] == [["negative", "positive"][i] for i in want_ids]
    for r, p in zip(rows, probs):
        assert [r["prob_negative"], r["prob_positive"]] == pytest.approx(p.tolist(), abs=1e-5)
    assert len(set(want_ids)) == 2, "the trained model should predict both classes on these sentences"

    table = outputs["preds.csv"]  # the same rows as CSV (values as text)
    assert [r["sentence"] for r in table] == TEXTS
    assert [int(r["label_id"]) for r in table] == want_ids
    assert [float(r["prob_positive"]) for r in table] == pytest.approx([r["prob_positive"] for r in rows])


def test_causal_lm_predictions_are_the_generations_in_order(tmp_path):
    llama = tiny_llama_dir(tmp_path)
    prompts = [f"count {i}" for i in range(5)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "gen.jsonl"
    cli = run_cli(
        [
            "predict",
            "--model=lightning_peft.tasks.CausalLM",
            f"--model.model_name_or_path={llama}",
            "--model.max_new_tokens=3",
            "--data=lightning_peft.data.TextDataModule",
            f"--data.predict_path={path}",
            "--data.prompt_column=prompt",
            "--data.response_column=response",
            "--data.eval_batch_size=2",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=PredictionWriter",
            f"--trainer.callbacks.output={out}",
            *QUIET,
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["prompt"]) for r in rows] == list(enumerate(prompts))
    generated = [t for batch in cli.trainer.predict_loop.predictions for t in batch]
    assert [r["generated"] for r in rows] == generated and all(isinstance(g, str) for g in generated)


def test_generic_outputs_and_bad_arguments():
    assert generic_rows(torch.tensor([[1, 2], [3, 4]])) == [{"prediction": [1, 2]}, {"prediction": [3, 4]}]
    assert generic_rows({"y": torch.tensor([0.5, 1.5]), "name": ["a", "b"]}) == [
        {"y": 0.5, "name": "a"},
        {"y": 1.5, "name": "b"},
    ]
    with pytest.raises(PeftConfigError, match=r"cannot split this predict_step output into rows: \['a', 'b'\]"):
        generic_rows({"a": [1, 2], "b": [1, 2, 3]})
    with pytest.raises(PeftConfigError, match="of type float into rows"):
        generic_rows(1.0)
    assert render([{"a": 1, "v": [1, 2]}, {"a": 2, "b": "x,y"}], "csv") == 'a,v,b\n1,"[1, 2]",\n2,,"x,y"\n'
    with pytest.raises(PeftConfigError, match=r"output='preds.txt' is not valid; expected a file ending in"):
        PredictionWriter("preds.txt")


def test_writer_with_a_plain_trainer_and_module(tmp_path):
    """Any LightningModule: rows from a dict output, in input order, the default file under default_root_dir."""
    import lightning as L
    from torch.utils.data import DataLoader

    class Doubler(L.LightningModule):
        def predict_step(self, batch, batch_idx):
            return {"x": batch, "double": batch * 2}

    writer = PredictionWriter()
    t = L.Trainer(default_root_dir=tmp_path, callbacks=[writer], logger=False, enable_progress_bar=False)
    t.predict(Doubler(), DataLoader(torch.arange(7), batch_size=3))
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert rows == [{"index": i, "x": i, "double": 2 * i} for i in range(7)]
