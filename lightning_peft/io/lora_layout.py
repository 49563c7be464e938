"""LoRA factors in ``peft``'s layout, per kind of adapted layer: their full key names and their zero-padding to
one rank. The key endings per layer kind are LoRA's own (:func:`~lightning_peft.methods.lora.peft_format.
factor_suffixes`, which the import reads too); a conv's factors keep the conv shapes: A (r, in, *kernel),
B (out, r / groups, 1, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.lora.peft_format import factor_suffixes


def peft_lora_key(module: str, which: str, layer: nn.Module) -> str:
    """PEFT's key of factor ``which`` (``"A"`` or ``"B"``) of the LoRA on ``module`` (an adapted layer)."""
    return f"base_model.model.{module}.{factor_suffixes(layer.kind)[which == 'B']}"


def pad_rank(A: Tensor, B: Tensor, r: int, layer: nn.Module, module: str) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of rank ``k`` zero-padded to rank ``r`` (the same update): A (k, in, ...) -> (r, in, ...),
    B (out, k, ...) -> (out, r, ...). A grouped conv's B holds ``k / groups`` rank channels per group, so each
    group's rank block is padded, which needs ``r`` divisible by ``groups``."""
    k = A.shape[0]
    groups = layer.base_layer.groups if layer.kind == "conv" else 1
    if r % groups:
        raise PeftConfigError(
            f"uniform_rank=True pads every LoRA to rank {r}, but {module!r} is a conv with groups={groups}, "
            f"which needs a rank divisible by {groups}; export with uniform_rank=False"
        )
    A = A.reshape(groups, k // groups, *A.shape[1:])
    A = torch.cat([A, A.new_zeros(groups, (r - k) // groups, *A.shape[2:])], 1).reshape(r, *A.shape[2:])
    B = torch.cat([B, B.new_zeros(B.shape[0], (r - k) // groups, *B.shape[2:])], 1)
    return A, B


__all__ = ["pad_rank", "peft_lora_key"]
