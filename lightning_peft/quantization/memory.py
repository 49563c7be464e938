"""The memory a (partly quantized) model holds: packed weights with their constants, frozen and trainable."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import is_bnb_layer, quantized_kind


def logical_numel(p: Tensor) -> int:
    """Number of parameters a tensor stands for: a packed 4-bit weight holds two (or more) per element."""
    state = getattr(p, "quant_state", None)
    if quantized_kind(p) == "4bit" and state is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()


def _quant_state_tensors(state: Any) -> list[Tensor]:
    out = []
    for attr in ("absmax", "code", "offset"):
        t = getattr(state, attr, None)
        if isinstance(t, Tensor):
            out.append(t)
    nested = getattr(state, "state2", None)
    if nested is not None:
        out.extend(_quant_state_tensors(nested))
    return out


def quantized_weight_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) held by one bitsandbytes layer's weight: packed data plus its quantization constants."""
    weight = module.weight
    tensors = [weight.data]
    if quantized_kind(weight) == "4bit":
        tensors += _quant_state_tensors(weight.quant_state)
    else:
        scb = getattr(weight, "SCB", None)
        tensors.append(scb if scb is not None else module.state.SCB)
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen[t.data_ptr() or id(t)] = t.numel() * t.element_size()
    return sum(seen.values()), logical_numel(weight)


def memory_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Bytes and parameters held by quantized weights, other frozen parameters and trainable parameters."""
    quantized = [0, 0]
    qids: set[int] = set()
    for module in model.modules():
        if is_bnb_layer(module):
            b, n = quantized_weight_bytes(module)
            quantized[0] += b
            quantized[1] += n
            qids.add(id(module.weight))
    frozen = [0, 0]
    trainable = [0, 0]
    for p in model.parameters():
        if id(p) in qids:
            continue
        bucket = trainable if p.requires_grad else frozen
        bucket[0] += p.numel() * p.element_size()
        bucket[1] += p.numel()
    return {"quantized": tuple(quantized), "frozen": tuple(frozen), "trainable": tuple(trainable)}  # type: ignore[dict-item]


__all__ = ["logical_numel", "memory_report", "quantized_weight_bytes"]
