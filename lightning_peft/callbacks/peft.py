"""The ``PEFT`` callback: parameter-efficient fine-tuning for an unmodified Trainer and LightningModule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightning_peft.callbacks.atomic_io import restore_checkpoint_io, use_atomic_checkpoint_io
from lightning_peft.callbacks.checkpointing import (
    check_optimizer_coverage,
    install_checkpoint_hooks,
    peft_target,
)
from lightning_peft.callbacks.distributed import check_gradients_on_first_step, check_strategy, configure_ddp
from lightning_peft.callbacks.quantized import quantize_on_device, resolve_quantization
from lightning_peft.kbit import prepare_for_kbit_training
from lightning_peft.layers import get_state
from lightning_peft.quantization import Quantization
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
        quantize: quantize the backbone with bitsandbytes in ``setup``, before injecting (adapters stay
            unquantized); works with ``accelerator="cpu"``. With Lightning's ``BitsandbytesPrecision`` plugin
            the plugin's settings are used (see :mod:`lightning_peft.callbacks.quantized`).
        gradient_checkpointing: turn on the model's gradient checkpointing (a Hugging Face model, see
            ``model_attr``), with the input embeddings' output requiring grad so the frozen backbone still
            passes gradients to the adapters (:func:`~lightning_peft.kbit.prepare_for_kbit_training`).

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
        quantize: Quantization | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        self.strategies = [strategy_from_config(s) for s in strategies]
        self.quantize = quantize
        self.gradient_checkpointing = gradient_checkpointing
        self._quantize = quantize
        self._quantize_device: Any = None
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
            target = peft_target(pl_module, self.model_attr)
            if self._quantize is not None and self._quantize_device is not None:  # quantize on the GPU, not the CPU
                quantize_on_device(target, self._quantize, self.unfreeze, self._quantize_device)
            stack = apply_peft(target, self.strategies, unfreeze=self.unfreeze, name=self.name,
                               quantize=self._quantize)
            if stack.quantization is not None or self.gradient_checkpointing:
                prepare_for_kbit_training(target, gradient_checkpointing=self.gradient_checkpointing)
        self.stack = stack
        install_checkpoint_hooks(pl_module, lambda: self.stack, self.model_attr)
        return stack

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._quantize = resolve_quantization(self.quantize, trainer.precision_plugin, self.model_attr)
        root = trainer.strategy.root_device
        self._quantize_device = root if root.type == "cuda" else None
        check_strategy(trainer, peft_target(pl_module, self.model_attr), self._quantize)  # FSDP/DeepSpeed limits
        stack = self.apply(pl_module)
        configure_ddp(trainer, stack)  # before the strategy wraps the model in DistributedDataParallel
        use_atomic_checkpoint_io(trainer)  # checkpoints never half-written, whatever /tmp is
        if stage == "fit" and trainer.is_global_zero:
            total = sum(p.numel() for p in stack.trainable_parameters())
            L.pytorch.utilities.rank_zero_info(
                f"lightning_peft: {stack.describe_short()} trains {total:,} parameters\n{stack.summary()}"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_optimizer_coverage(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        check_gradients_on_first_step(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        restore_checkpoint_io(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"stack": self.stack.describe() if self.stack is not None else None}
