"""The task modules under their first import path (recipes' ``class_path``): a re-export of
:mod:`lightning_peft.cli.tasks`."""

from lightning_peft.cli.models import resolve_model_path
from lightning_peft.cli.tasks import CausalLM, Seq2SeqLM, SequenceClassification, TaskModule

__all__ = ["CausalLM", "Seq2SeqLM", "SequenceClassification", "TaskModule", "resolve_model_path"]
