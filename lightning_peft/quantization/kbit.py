"""Training on a quantized backbone: PEFT's ``prepare_model_for_kbit_training``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import is_bnb_layer
from lightning_peft.errors import PeftConfigError
from lightning_peft.quantization.convert import keep_standard_layout


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    upcast: bool = True,
) -> list[str]:
    """Make a quantized model ready for adapter training (PEFT's ``prepare_model_for_kbit_training``).

    - with ``upcast``, half-precision (fp16/bf16) parameters outside the quantized layers go to fp32, as in
      PEFT: normalization layers are where low precision hurts stability, and once a norm computes in fp32 the
      hidden states it emits are fp32, so the other float layers (embeddings, output head) must follow;
      4-bit layers still compute in their ``compute_dtype``;
    - with ``gradient_checkpointing``, the model's checkpointing is turned on (reentrant by default, as PEFT)
      and the input embeddings' output requires grad, so that the checkpointed blocks of a frozen backbone
      still propagate gradients to the adapters inside them; the KV cache is turned off;
    - 4-bit layers keep bitsandbytes' standard weight layout on the CPU (:func:`keep_standard_layout`).

    Parameters keep their identity (only ``.data`` changes), so optimizers built earlier stay valid.

    Returns:
        The names of the parameters cast to fp32.
    """
    keep_standard_layout(model)
    cast: list[str] = []
    if upcast:
        quantized = {id(m.weight) for m in model.modules() if is_bnb_layer(m)}
        for name, p in model.named_parameters():
            if id(p) not in quantized and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
                cast.append(name)
    if gradient_checkpointing:
        # transformers >= 5.x renamed it activation_checkpointing_enable (the old name warns, goes in v6)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if not callable(enable):
            enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise PeftConfigError(
                f"gradient_checkpointing=True needs a model with gradient_checkpointing_enable() (a Hugging Face "
                f"PreTrainedModel); {type(model).__name__} has none"
            )
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        enable(kwargs)  # first positional: activation_ / gradient_checkpointing_kwargs
        enable_input_require_grads(model)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False
    return cast


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (idempotent)."""
    if "_lightning_peft_input_grad_hook" in model.__dict__:
        return
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module):
        raise PeftConfigError(
            f"gradient_checkpointing=True needs the input embeddings of {type(model).__name__} "
            "(get_input_embeddings() returned nothing)"
        )

    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        output.requires_grad_(True)

    model.__dict__["_lightning_peft_input_grad_hook"] = emb.register_forward_hook(hook)


__all__ = ["enable_input_require_grads", "prepare_for_kbit_training"]
