"""Lightning callbacks: thin hooks over the core."""

from lightning_peft.callbacks.atomic_io import AtomicCheckpointIO
from lightning_peft.callbacks.checkpointing import load_peft_checkpoint, restore_from_checkpoint
from lightning_peft.callbacks.evaluate import evaluate_adapter_sets
from lightning_peft.callbacks.export import AdapterExport
from lightning_peft.callbacks.peft import PEFT
from lightning_peft.callbacks.rank_budget import RankBudgetScheduler

__all__ = [
    "PEFT",
    "AdapterExport",
    "AtomicCheckpointIO",
    "RankBudgetScheduler",
    "evaluate_adapter_sets",
    "load_peft_checkpoint",
    "restore_from_checkpoint",
]
