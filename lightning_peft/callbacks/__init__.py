"""Lightning callbacks: thin hooks over the core."""

from lightning_peft.callbacks.checkpointing import restore_from_checkpoint
from lightning_peft.callbacks.peft import PEFT

__all__ = ["PEFT", "restore_from_checkpoint"]
