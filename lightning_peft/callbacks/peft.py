"""The ``PEFT`` callback: parameter-efficient fine-tuning for an unmodified Trainer and LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_peft.callbacks.checkpointing import (
    check_optimizer_coverage,
    install_checkpoint_hooks,
    peft_target,
)
from lightning_peft.layers import get_state
from lightning_peft.stack import DEFAULT_SET, PeftStack, apply_peft
from lightning_peft.strategies.base import Strategy, strategy_from_config


class PEFT(Callback):
    """Freeze the backbone, apply a stack of PEFT strategies in ``setup``, and keep checkpoints adapter-only.

    The stack is applied before ``configure_optimizers`` runs, so an optimizer built there over
    ``requires_grad`` parameters sees exactly the adapters. At fit start the callback checks that every
    trainable parameter is in an optimizer. Every checkpoint Lightning writes holds the adapter weights,
    buffers (e.g. AdaLoRA masks) and the stack's description, not the frozen backbone;
    ``trainer.fit(ckpt_path=...)`` resumes from it.

    Args:
        strategies: the strategies to stack, applied in order (e.g. ``[LoRA(r=8)]``).
        unfreeze: modules or parameters trained fully (names, dotted suffixes or a regex), e.g. a new head.
        model_attr: apply to this (dotted) attribute of the LightningModule, e.g. ``"model"``; ``None`` for
            the module itself.
        name: the adapter set's name.

    Example:
        >>> trainer = L.Trainer(callbacks=[PEFT([LoRA(r=8, target_modules=["query", "value"])],
        ...                                     unfreeze=["classifier"])])
    """

    def __init__(
        self,
        strategies: Sequence[Strategy],
        unfreeze: list[str] | str | None = None,
        model_attr: str | None = None,
        name: str = DEFAULT_SET,
    ) -> None:
        self.strategies = [strategy_from_config(s) for s in strategies]
        self.unfreeze = unfreeze
        self.model_attr = model_attr
        self.name = name
        self.stack: PeftStack | None = None

    def _existing(self, pl_module: L.LightningModule) -> PeftStack | None:
        state = get_state(peft_target(pl_module, self.model_attr))
        return state.stacks.get(self.name) if state is not None else None

    def apply(self, pl_module: L.LightningModule) -> PeftStack:
        """Apply the stack to ``pl_module`` now (idempotent); ``setup`` calls this."""
        stack = self._existing(pl_module)
        if stack is None:
            stack = apply_peft(peft_target(pl_module, self.model_attr), self.strategies, unfreeze=self.unfreeze,
                               name=self.name)
        self.stack = stack
        install_checkpoint_hooks(pl_module, lambda: self.stack, self.model_attr)
        return stack

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stack = self.apply(pl_module)
        if stage == "fit" and trainer.is_global_zero:
            total = sum(p.numel() for p in stack.trainable_parameters())
            L.pytorch.utilities.rank_zero_info(
                f"lightning_peft: {stack.describe_short()} trains {total:,} parameters\n{stack.summary()}"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_optimizer_coverage(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"stack": self.stack.describe() if self.stack is not None else None}
