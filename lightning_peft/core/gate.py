"""Learned gates on an additive contribution (UniPELT, Mao et al. ACL 2022): ``y + g(x) * delta(x)``.

``g(x) = sigmoid(W x + b)`` with ``W`` a (1, in_features) row and ``b`` one bias, computed **per token** from the
input ``x`` of the adapted layer (or sublayer): one gate value per row of ``x``'s last dimension. UniPELT and
AdapterHub average the gate over the sequence (``mean(dim=1)``); a per-token gate is the same map for every
position, so a cached generation (one new token at a time) computes exactly what the full-sequence forward does,
and it makes no assumption on where the sequence dimension is. ``W ~ N(0, 0.02)``, ``b = 0`` (AdapterHub's
``init_bert_weights`` for its gates), so every gate starts near 0.5.

A gated contribution depends on the input, so it has no equivalent weight: :class:`GatedDelta` refuses merging.
The gate is computed in its own parameters' dtype (the delta's) and cast to the output's, like any delta.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.layer import AdaptedLayer, Delta

#: a gate's init: weight ~ N(0, GATE_INIT_STD), bias 0 (AdapterHub's init of its LoRA and bottleneck gates)
GATE_INIT_STD = 0.02


class Gate(nn.Module):
    """``sigmoid(x @ weight.T + bias)``: one value in (0, 1) per row of ``x`` (shape ``(*x.shape[:-1], 1)``).

    Example:
        >>> g = Gate(16)
        >>> g(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 1])
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, in_features))
        self.bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.weight, std=GATE_INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(F.linear(x.to(self.weight.dtype), self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}"


class GatedDelta(Delta):
    """An additive :class:`~lightning_peft.core.layer.Delta` times a learned per-token gate of the layer input:
    ``add_to(y, x) = y + g(x) * inner(x)``.

    The wrapped delta sits under ``inner`` and the gate under ``gate``, so a gated LoRA's tensors are
    ``<layer>.adapters.<set>.lora.inner.lora_A`` ... and ``<layer>.adapters.<set>.lora.gate.weight``. Code that
    needs the wrapped delta's own features (AdaLoRA's rank allocator) reads :func:`unwrap`.

    Example:
        >>> from lightning_peft.methods.lora import LoRADelta
        >>> gated = GatedDelta(LoRADelta(16, 8, r=4, scaling=1.0, dropout=0.0), 16)
    """

    def __init__(self, inner: Delta, in_features: int) -> None:
        super().__init__()
        if inner.kind != "additive" or inner.needs_base:
            raise TypeError(f"a gate multiplies an additive delta that reads only the input; got {type(inner).__name__}")
        self.inner = inner
        self.gate = Gate(in_features)

    @property
    def dropout(self) -> float:  # type: ignore[override]
        return self.inner.dropout

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return self.gate(x).to(out.dtype) * out

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        return y + self(x).to(y.dtype)

    def merge_refusal(self) -> str | None:
        return ("a gated delta depends on the input (its gate sigmoid(W x + b) multiplies the update per token), "
                "so it cannot be folded into the weight; keep the adapters unmerged, or save them with save_adapters")

    def delta_weight(self) -> Tensor:
        raise NotImplementedError(self.merge_refusal())

    def before_load(self, layer: AdaptedLayer, state_dict: dict[str, Any], prefix: str) -> None:
        self.inner.before_load(layer, state_dict, f"{prefix}inner.")

    def extra_repr(self) -> str:
        return "gated"


def unwrap(delta: nn.Module) -> nn.Module:
    """The delta a :class:`GatedDelta` wraps, or ``delta`` itself."""
    return delta.inner if isinstance(delta, GatedDelta) else delta


def is_gated(strategy: object) -> bool:
    """Whether a strategy config gates its contribution (its ``gate`` field is true)."""
    return bool(getattr(strategy, "gate", False))


__all__ = ["GATE_INIT_STD", "Gate", "GatedDelta", "is_gated", "unwrap"]
