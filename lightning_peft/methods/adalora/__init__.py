"""AdaLoRA: the method (adaptive-rank SVD-form deltas), its rank allocator and its orthogonal regularizer."""

from lightning_peft.methods.adalora.allocator import RankAllocator, cubic_budget
from lightning_peft.methods.adalora.method import (
    AdaLoRA,
    AdaLoRADelta,
    adalora_deltas,
    adalora_parts,
    find_adalora_stack,
    orthogonal_regularization,
)

__all__ = [
    "AdaLoRA",
    "AdaLoRADelta",
    "RankAllocator",
    "adalora_deltas",
    "adalora_parts",
    "cubic_budget",
    "find_adalora_stack",
    "orthogonal_regularization",
]
