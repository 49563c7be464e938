"""What every part of Hugging Face PEFT's adapter layout shares: file names, the part records, the
transformers model a stack adapts and PEFT's ``task_type`` for it (see :mod:`lightning_peft.io.peft_layout`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.stack.peft_stack import PeftStack

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class PeftPart:
    """One PEFT adapter: its ``adapter_config.json`` content and tensors under PEFT's key names."""

    name: str
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    #: PEFT key -> native key, for tensors stored unchanged (the native files then point at them)
    verbatim: dict[str, str] = field(default_factory=dict)
    strategies: list[str] = field(default_factory=list)


@dataclass
class PeftExport:
    parts: list[PeftPart]
    #: strategy name (or ``"unfreeze"``) -> why PEFT's format cannot hold it
    skipped: dict[str, str] = field(default_factory=dict)


def hf_root(stack: PeftStack) -> tuple[nn.Module, str]:
    """The transformers model the stack adapts (``stack.model`` or the model inside a LightningModule) + its prefix."""
    return hf_model_root(stack.model)


def hf_model_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The transformers model ``model`` is or holds (e.g. inside a LightningModule) + its prefix (``"model."``)."""
    if hasattr(model, "config") and hasattr(model, "save_pretrained"):
        return model, ""
    for name, module in model.named_modules():
        if name and hasattr(module, "config") and hasattr(module, "save_pretrained"):
            return module, name + "."
    return model, ""


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (``None`` when it has no PEFT task)."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    for suffix, task in (
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
    ):
        if cls.endswith(suffix):
            return task
    if getattr(config, "is_encoder_decoder", False) and (
        cls.endswith("ForConditionalGeneration") or "Seq2SeqLM" in cls
    ):
        return "SEQ_2_SEQ_LM"
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("Model") and config is not None:
        return "FEATURE_EXTRACTION"
    return None


def base_name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    value = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return str(value) if value else None


def common_config(stack: PeftStack, root: nn.Module) -> dict[str, Any]:
    return {
        "task_type": task_type(root),
        "base_model_name_or_path": base_name_or_path(root),
        "inference_mode": True,
    }


def adapted_layers(stack: PeftStack) -> dict[str, AdaptedLinear]:
    return {
        n: m
        for n, m in stack.model.named_modules()
        if isinstance(m, AdaptedLinear) and stack.name in m.adapters
    }


__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "PeftExport",
    "PeftPart",
    "adapted_layers",
    "base_name_or_path",
    "common_config",
    "hf_model_root",
    "hf_root",
    "task_type",
]
