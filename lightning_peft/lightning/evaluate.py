"""Evaluate every adapter set of one model with one Trainer: each set's metrics under its own name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning as L

from lightning_peft.core.state import find_state
from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.stack.sets import _switch, activate

STAGES = ("validate", "test")


def evaluate_adapter_sets(
    trainer: L.Trainer,
    module: L.LightningModule,
    names: Sequence[str] | None = None,
    dataloaders: Any = None,
    datamodule: L.LightningDataModule | None = None,
    stage: Literal["validate", "test"] = "validate",
) -> dict[str, float]:
    """Run ``trainer.validate`` (or ``trainer.test``) once per adapter set and gather the metrics by set name.

    Each run activates one set (no base weight is copied or re-quantized), so the module's own
    ``validation_step`` / ``test_step`` are used unchanged. The metrics each run returns are renamed
    ``<set>/<metric>`` (e.g. ``sentiment/val_loss``), logged to the trainer's loggers at the current global step,
    and returned. The set active before the call is active again afterwards.

    Args:
        trainer: the Trainer to run (its callbacks, e.g. :class:`~lightning_peft.callbacks.PEFT`, still run).
        module: the LightningModule holding the model with the adapter sets (on itself or a submodule).
        names: the sets to evaluate, in order; default: every set of the model.
        dataloaders: passed to ``trainer.validate`` / ``trainer.test``.
        datamodule: passed to ``trainer.validate`` / ``trainer.test``.
        stage: ``"validate"`` or ``"test"``.

    Returns:
        ``{"<set>/<metric>": value}`` for every set and every metric the run logged.

    Example:
        >>> metrics = evaluate_adapter_sets(trainer, module, ["sentiment", "topic"], val_loader)
        >>> metrics["sentiment/val_loss"]
    """
    if stage not in STAGES:
        raise PeftConfigError(f"stage={stage!r} is not valid; expected one of {list(STAGES)}")
    state = find_state(module)
    names = list(state.stacks) if names is None else list(names)
    if not names:
        raise PeftConfigError(
            f"names=[] is empty; give at least one of the loaded sets: {preview(state.stacks)}"
        )
    unknown = [n for n in names if n not in state.stacks]
    if unknown:
        raise AdapterStateError(
            f"names={names!r}: {unknown} are not adapter sets of this model; loaded sets: {preview(state.stacks)}"
        )
    run = trainer.validate if stage == "validate" else trainer.test
    previous = state.active
    results: dict[str, float] = {}
    try:
        for name in names:
            activate(module, name)
            outputs = run(module, dataloaders=dataloaders, datamodule=datamodule, verbose=False)
            metrics = {f"{name}/{key}": float(value) for out in outputs for key, value in out.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            results.update(metrics)
    finally:
        if state.active != previous:
            _switch(state, previous if previous in state.stacks else None)
    return results


__all__ = ["evaluate_adapter_sets"]
