"""Ready-made LightningModules for the CLI: a Hugging Face model, a PEFT stack, the task's loss and metrics."""

from lightning_peft.cli.models import resolve_model_path
from lightning_peft.cli.tasks.base import TaskModule
from lightning_peft.cli.tasks.causal_lm import CausalLM, Seq2SeqLM
from lightning_peft.cli.tasks.classification import SequenceClassification

__all__ = ["CausalLM", "Seq2SeqLM", "SequenceClassification", "TaskModule", "resolve_model_path"]
