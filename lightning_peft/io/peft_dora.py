"""DoRA in Hugging Face PEFT's LoRA layout: ``use_dora: true`` plus one magnitude vector per adapted module.

peft 0.21 saves the magnitude of module ``M`` as ``base_model.model.M.lora_magnitude_vector`` (one value per
output feature): ``LoraModel._get_adapter_state_dict`` drops the ``.weight`` of the ``DoraLinearLayer`` that
holds it, and appends it again when loading. DoRA cannot be folded with AdaLoRA into one PEFT LoRA adapter
(:func:`fold_refusal`), so such a stack keeps its low-rank part in the native files only.
"""

from __future__ import annotations

from torch import Tensor

from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.io.peft_common import PeftPart
from lightning_peft.methods.base import Strategy
from lightning_peft.stack.peft_stack import PeftStack

MAGNITUDE_KEY = "lora_magnitude_vector"


def _uses_dora(strategies: list[Strategy]) -> bool:
    return any(getattr(s, "use_dora", False) for s in strategies)


def fold_refusal(low_rank: list[Strategy]) -> str | None:
    """Why the stack's low-rank strategies (LoRA, AdaLoRA) cannot become one PEFT LoRA adapter, else ``None``:
    DoRA folded with AdaLoRA."""
    if _uses_dora(low_rank) and len(low_rank) > 1:
        return ("LoRA(use_dora=True) and AdaLoRA cannot be folded into one PEFT LoRA adapter: its use_dora flag "
                "covers every module, and where both adapt a module PEFT's DoRA would normalize the sum of both "
                "updates (kept in the native files only)")
    return None


def add_magnitudes(part: PeftPart | None, stack: PeftStack, prefix: str, native: dict[str, Tensor]) -> None:
    """Mark the LoRA ``part`` ``use_dora`` and add each DoRA delta's magnitude under PEFT's key."""
    if part is None or not _uses_dora(stack.strategies):
        return
    part.config["use_dora"] = True
    for name, layer in stack.model.named_modules():
        if not isinstance(layer, AdaptedLinear) or stack.name not in layer.adapters:
            continue
        for key, delta in layer.adapters[stack.name].items():
            if delta.needs_base:
                peft_key = f"base_model.model.{name.removeprefix(prefix)}.{MAGNITUDE_KEY}"
                part.tensors[peft_key] = delta.lora_magnitude.detach()
                native_key = f"{name}.adapters.{stack.name}.{key}.lora_magnitude"
                if native_key in native:
                    part.verbatim[peft_key] = native_key


__all__ = ["MAGNITUDE_KEY", "add_magnitudes", "fold_refusal"]
