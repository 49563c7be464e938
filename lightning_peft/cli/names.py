"""Short class names (``class_path: PEFT``, ``class_path: LoRA``) for any LightningCLI, not only ``lightning-peft``.

jsonargparse resolves a ``class_path`` without dots to the imported subclass of the annotated type with that
name (``PEFT`` where Lightning annotates ``trainer.callbacks: list[Callback]``, ``LoRA`` where ``PEFT`` annotates
``strategies: Sequence[Strategy]``), so the classes must be imported before parsing, and subclasses of the
``Strategy`` dataclass must be enabled (jsonargparse treats dataclasses as final). :func:`register_short_names`
does both; call it once before building your ``LightningCLI``.
"""

from __future__ import annotations

from jsonargparse import set_parsing_settings

import lightning_peft.methods  # noqa: F401  (imports, so registers, every built-in strategy)
from lightning_peft.lightning import export_callback, peft_callback, prediction_writer, rank_budget
from lightning_peft.methods.base import Strategy, registered_strategies

#: the callbacks a config names by short class name
CALLBACKS = (
    peft_callback.PEFT,
    export_callback.AdapterExport,
    rank_budget.RankBudgetScheduler,
    prediction_writer.PredictionWriter,
)


def register_short_names() -> dict[str, type]:
    """Make ``class_path: PEFT`` / ``AdapterExport`` / ``RankBudgetScheduler`` / ``PredictionWriter`` (callbacks)
    and ``class_path: LoRA`` / ``AdaLoRA`` / ``IA3`` / ... (every strategy, including ones added with
    :func:`~lightning_peft.register_strategy`) resolve in a ``LightningCLI`` config or command line.

    Idempotent. Importing this module already enables ``Strategy`` subclasses (through
    :mod:`lightning_peft.lightning`) and imports the classes; the call makes that one explicit, lint-clean line.

    Returns:
        Short name -> class, for every name this makes available.

    Example:
        >>> from lightning_peft.cli import register_short_names
        >>> names = register_short_names()
        >>> sorted(n for n in names if n in ("PEFT", "LoRA", "RankBudgetScheduler"))
        ['LoRA', 'PEFT', 'RankBudgetScheduler']
    """
    set_parsing_settings(subclasses_enabled=[Strategy])  # as importing lightning_peft.lightning did: idempotent
    names: dict[str, type] = {cls.__name__: cls for cls in CALLBACKS}
    for cls in registered_strategies().values():
        names.setdefault(cls.__name__, cls)
    return names


__all__ = ["CALLBACKS", "register_short_names"]
