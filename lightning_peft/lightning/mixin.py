"""``PEFTMixin``: PEFT as part of a LightningModule you write yourself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_peft.core.state import get_state
from lightning_peft.errors import PeftConfigError
from lightning_peft.lightning.checkpointing import (
    check_checkpoint,
    check_optimizer_coverage,
    peft_target,
    trim_checkpoint,
)
from lightning_peft.methods.base import Strategy, check_positive, strategy_from_config
from lightning_peft.stack.optim import loraplus_param_groups
from lightning_peft.stack.peft_stack import DEFAULT_SET, PeftStack, apply_peft


class PEFTMixin:
    """Mix into a ``LightningModule`` (before it in the bases) to fine-tune its backbone parameter-efficiently.

    The strategies are constructor arguments (typed, so LightningCLI can configure them); the stack is
    applied in ``configure_model`` (idempotent: it also runs for validate/test and ``load_from_checkpoint``);
    ``configure_optimizers`` builds ``optimizer`` (an ``OptimizerCallable``, e.g. from LightningCLI's
    ``--model.optimizer``; default AdamW with ``lr`` and ``weight_decay``) over the trainable parameters only,
    plus the optional ``scheduler``; ``loraplus_lr_ratio`` gives the B-type factors (LoRA's ``lora_B``, ...) a
    learning rate that many times ``lr`` (LoRA+, see :func:`~lightning_peft.stack.optim.loraplus_param_groups`); checkpoints hold the adapter state only. Build the backbone in
    ``__init__``, or in your own ``configure_model`` before calling ``super().configure_model()``.

    Example:
        >>> class Classifier(PEFTMixin, L.LightningModule):
        ...     def __init__(self, strategies: list[Strategy], lr: float = 1e-3):
        ...         super().__init__(strategies=strategies, unfreeze=["classifier"], lr=lr)
        ...         self.model = AutoModelForSequenceClassification.from_pretrained(path)
    """

    def __init__(
        self,
        *args: Any,
        strategies: Sequence[Strategy] = (),
        unfreeze: list[str] | str | None = None,
        model_attr: str | None = "model",
        adapter_name: str = DEFAULT_SET,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
        loraplus_lr_ratio: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.peft_strategies = [strategy_from_config(s) for s in strategies]
        self.peft_unfreeze = unfreeze
        self.peft_model_attr = model_attr
        self.peft_adapter_name = adapter_name
        self.peft_lr = lr
        self.peft_weight_decay = weight_decay
        self.peft_optimizer = optimizer
        self.peft_scheduler = scheduler
        if scheduler_interval not in ("step", "epoch"):
            raise PeftConfigError(
                f"scheduler_interval={scheduler_interval!r} is not valid; expected 'step' or 'epoch'"
            )
        self.peft_scheduler_interval = scheduler_interval
        if loraplus_lr_ratio is not None:
            check_positive(loraplus_lr_ratio, "loraplus_lr_ratio", integer=False)
        self.peft_loraplus_lr_ratio = loraplus_lr_ratio
        # adapter-only state dicts load into the full module; on_load_checkpoint checks completeness
        self.strict_loading = False

    @property
    def peft_stack(self) -> PeftStack | None:
        state = get_state(peft_target(self, self.peft_model_attr))  # type: ignore[arg-type]
        return state.stacks.get(self.peft_adapter_name) if state is not None else None

    def peft_apply_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for :func:`apply_peft` (subclasses add e.g. ``quantize``)."""
        return {}

    def configure_model(self) -> None:
        if self.peft_stack is None:
            apply_peft(peft_target(self, self.peft_model_attr), self.peft_strategies,  # type: ignore[arg-type]
                       unfreeze=self.peft_unfreeze, name=self.peft_adapter_name, **self.peft_apply_kwargs())

    def configure_optimizers(self) -> Any:
        """``optimizer`` (default AdamW with ``lr`` and ``weight_decay``) over the trainable parameters only, and
        ``scheduler`` on it, stepped every ``scheduler_interval`` (``ReduceLROnPlateau`` monitors ``val_loss``)."""
        params: Any = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        ratio = self.peft_loraplus_lr_ratio
        if ratio is not None:  # LoRA+: B-type factors at ratio x the optimizer's learning rate
            groups = loraplus_param_groups(self.peft_stack, self.peft_lr, ratio, parameters=params)
            params = [{"name": g["name"], "params": g["params"]} for g in groups]  # the optimizer's own lr
        if self.peft_optimizer is None:
            optimizer = torch.optim.AdamW(params, lr=self.peft_lr, weight_decay=self.peft_weight_decay)
        else:
            optimizer = self.peft_optimizer(params)
        if ratio is not None:
            for group in optimizer.param_groups:
                if group.get("name") == "loraplus_b":
                    group["lr"] = group["lr"] * ratio
        if self.peft_scheduler is None:
            return optimizer
        scheduler = self.peft_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.peft_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config.update(monitor="val_loss", interval="epoch")
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_fit_start(self) -> None:
        check_optimizer_coverage(self.trainer, self)  # type: ignore[attr-defined,arg-type]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stack = self.peft_stack
        if stack is not None:
            trim_checkpoint(self, stack, checkpoint, self.peft_model_attr,  # type: ignore[arg-type]
                            load_with=f"{type(self).__name__}.load_from_checkpoint(path)")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.peft_stack is None:
            self.configure_model()
        check_checkpoint(self, self.peft_stack, checkpoint)  # type: ignore[arg-type]


__all__ = ["PEFTMixin"]
