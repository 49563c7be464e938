"""What the task modules share: loading a Hugging Face model, PEFT through the mixin, quantization, optimizer."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from lightning_peft.cli.models import resolve_model_path
from lightning_peft.errors import PeftConfigError
from lightning_peft.lightning.mixin import PEFTMixin
from lightning_peft.methods.adalora.regularizer import ORTH_REG_ADDED
from lightning_peft.methods.base import Strategy
from lightning_peft.methods.lora import LoRA
from lightning_peft.quantization import Quantization, prepare_for_kbit_training

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quantization(value: Quantization | dict[str, Any] | str | None) -> Quantization | None:
    if value is None or isinstance(value, Quantization):
        return value
    if isinstance(value, str):
        return Quantization(value)  # type: ignore[arg-type]
    if isinstance(value, dict):
        return Quantization(**value)
    raise PeftConfigError(
        f"quantization={value!r} is not valid; expected Quantization(...), a dict or a mode string"
    )


class TaskModule(PEFTMixin, L.LightningModule):
    """Base of the ready-made task modules: a Hugging Face model with a PEFT stack, trained on its own loss.

    Subclasses set ``auto_class`` (e.g. ``AutoModelForSequenceClassification``) and ``data_task`` (what
    :class:`~lightning_peft.data.TextDataModule` should produce), and implement the evaluation steps.
    The optimizer is built over the trainable parameters only (see :class:`~lightning_peft.PEFTMixin`); when
    AdaLoRA is in the stack its orthogonal regularizer is added to the training loss, unless a
    ``RankBudgetScheduler`` already adds it.
    """

    data_task = "classification"

    def __init__(
        self,
        model_name_or_path: str = "minilm",
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
        strategies = [LoRA()] if strategies is None else strategies
        super().__init__(
            strategies=strategies,
            unfreeze=unfreeze,
            model_attr="model",
            adapter_name=adapter_name,
            lr=lr,
            weight_decay=weight_decay,
            optimizer=optimizer,
            scheduler=scheduler,
            scheduler_interval=scheduler_interval,
            loraplus_lr_ratio=loraplus_lr_ratio,
        )
        self.quantization = _quantization(quantization)
        self.gradient_checkpointing = gradient_checkpointing
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        # plain values in checkpoints, so they load with torch.load(weights_only=True)
        self.hparams["quantization"] = self.quantization.config() if self.quantization is not None else None
        self.model_name_or_path = model_name_or_path
        if torch_dtype is not None and torch_dtype not in DTYPES:
            raise PeftConfigError(
                f"torch_dtype={torch_dtype!r} is not valid; expected one of {list(DTYPES)} or None"
            )
        self.model = self.load_model(
            resolve_model_path(model_name_or_path), dtype=DTYPES.get(torch_dtype or "")
        )
        self.model.train()  # from_pretrained returns eval mode; fine-tune with the model's dropout, as HF's Trainer
        if unfreeze is None:
            self.peft_unfreeze = self.default_unfreeze()

    # -- building ----------------------------------------------------------------------------------------------
    def load_model(self, path: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
        raise NotImplementedError

    def default_unfreeze(self) -> list[str] | None:
        """Modules trained fully when ``unfreeze`` is not given (e.g. a new classification head)."""
        return None

    def peft_apply_kwargs(self) -> dict[str, Any]:
        return {"quantize": self.quantization} if self.quantization is not None else {}

    def configure_model(self) -> None:
        fresh = self.peft_stack is None
        super().configure_model()
        if fresh and (self.quantization is not None or self.gradient_checkpointing):
            prepare_for_kbit_training(self.model, gradient_checkpointing=self.gradient_checkpointing)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        stack = self.peft_stack
        if stack is not None and self.trainer.is_global_zero:
            total = sum(p.numel() for p in stack.trainable_parameters())
            rank_zero_info(
                f"lightning_peft: {stack.describe_short()} trains {total:,} parameters\n{stack.summary()}"
            )

    @property
    def regularized_strategies(self) -> list[Strategy]:
        """The strategies that add a term to the loss (e.g. AdaLoRA's orthogonal regularizer)."""
        return [s for s in self.peft_strategies if s.loss_term is not None]

    # -- training ----------------------------------------------------------------------------------------------
    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(**batch).loss
        if not self.__dict__.get(ORTH_REG_ADDED):  # else a RankBudgetScheduler adds it
            for strategy in self.regularized_strategies:
                reg = strategy.regularization(self.model)
                self.log(strategy.loss_term, reg.detach(), on_step=True, on_epoch=False, batch_size=1)
                loss = loss + reg
        self.log("train_loss", loss, prog_bar=True, batch_size=_batch_size(batch))
        return loss


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0]) if "input_ids" in batch else 1


__all__ = ["TaskModule", "resolve_model_path"]
