"""``Gated(strategy)``: UniPELT's learned gate (Mao et al. ACL 2022) on any additive strategy.

A strategy takes a gate by declaring a ``gate: bool`` dataclass field (LoRA, AdaLoRA, Adapter, and any strategy
that adds one); :func:`Gated` returns a copy with ``gate=True``. The gate itself, ``sigmoid(W x + b)`` per token of
the adapted layer's (or sublayer's) input, lives once in :mod:`lightning_peft.core.gate`.
"""

from __future__ import annotations

import dataclasses

from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import Strategy

#: why the strategies without a ``gate`` field take none, by class name (others get a generic reason)
_NOT_ADDITIVE = {
    "IA3": "IA3 scales the layer's activations (a product with the base output), which is not additive",
    "PromptTuning": "PromptTuning prepends virtual tokens to the input, which is not an additive update",
    "PTuning": "PTuning prepends virtual tokens to the input, which is not an additive update",
    "Unfreeze": "Unfreeze trains the base model's own parameters in place, which is not an additive update",
    "BitFit": "BitFit trains the base model's own biases in place, which is not an additive update",
    "LayerNormTuning": "LayerNormTuning trains the base model's own norms in place, which is not an additive update",
}


def _gated_names() -> list[str]:
    from lightning_peft.methods.base import registered_strategies

    return sorted(cls.__name__ for cls in registered_strategies().values()
                  if dataclasses.is_dataclass(cls) and any(f.name == "gate" for f in dataclasses.fields(cls)))


def Gated(strategy: Strategy) -> Strategy:
    """A copy of ``strategy`` whose contribution is multiplied by a learned gate ``sigmoid(W x + b)`` of the
    input, per token (UniPELT): ``y + g(x) * delta(x)``.

    Works for every strategy dataclass that declares a ``gate`` field (LoRA, AdaLoRA, Adapter, ...). The gate's
    ``W`` starts ``N(0, 0.02)`` and ``b`` at 0, so each gate starts near 0.5. A gated strategy cannot be merged into
    the base weights and has no ``peft`` form (``save_adapters`` keeps it in the native files).

    Raises:
        PeftConfigError: for a strategy that is not additive (IA3, prompt tuning, selective strategies, DoRA),
            naming it and the strategies that take a gate.

    Example:
        >>> Gated(LoRA(r=8, target_modules=["q_proj", "v_proj"])).gate
        True
    """
    if not isinstance(strategy, Strategy) or not dataclasses.is_dataclass(strategy):
        raise PeftConfigError(f"Gated(strategy={strategy!r}) is not valid; expected a strategy such as LoRA(...)")
    name = type(strategy).__name__
    takes = ", ".join(_gated_names())
    if not any(f.name == "gate" for f in dataclasses.fields(strategy)):
        reason = _NOT_ADDITIVE.get(name, f"{name} declares no gate field")
        raise PeftConfigError(f"Gated({name}(...)) is not supported: {reason}; gates apply to {takes}")
    if getattr(strategy, "use_dora", False):
        raise PeftConfigError(
            f"Gated({name}(use_dora=True)) is not supported: DoRA rescales the base weight to learned norms, which "
            f"is not additive; gates apply to {takes} (without use_dora)"
        )
    return dataclasses.replace(strategy, gate=True)


__all__ = ["Gated"]
