"""The Lightning callbacks under their first import path: a thin re-export of :mod:`lightning_peft.lightning`."""

from lightning_peft.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_peft.lightning.checkpointing import restore_from_checkpoint
from lightning_peft.lightning.evaluate import evaluate_adapter_sets
from lightning_peft.lightning.export_callback import AdapterExport
from lightning_peft.lightning.loading import load_peft_checkpoint
from lightning_peft.lightning.peft_callback import PEFT
from lightning_peft.lightning.prediction_writer import PredictionWriter
from lightning_peft.lightning.rank_budget import RankBudgetScheduler

__all__ = [
    "PEFT",
    "AdapterExport",
    "AtomicCheckpointIO",
    "PredictionWriter",
    "RankBudgetScheduler",
    "evaluate_adapter_sets",
    "load_peft_checkpoint",
    "restore_from_checkpoint",
]
