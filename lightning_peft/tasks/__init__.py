"""Ready-made LightningModules for the CLI: a Hugging Face model, a PEFT stack, the task's loss and metrics."""

from lightning_peft.tasks.base import TaskModule, resolve_model_path
from lightning_peft.tasks.causal_lm import CausalLM, Seq2SeqLM
from lightning_peft.tasks.classification import SequenceClassification

__all__ = ["CausalLM", "Seq2SeqLM", "SequenceClassification", "TaskModule", "resolve_model_path"]
