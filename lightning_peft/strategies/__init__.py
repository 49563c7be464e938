"""PEFT strategies: one file per method, all registered by name."""

from lightning_peft.strategies.adalora import AdaLoRA, AdaLoRADelta, orthogonal_regularization
from lightning_peft.strategies.adalora_allocator import RankAllocator, cubic_budget
from lightning_peft.strategies.adapter import Adapter, BottleneckAdapter
from lightning_peft.strategies.base import (
    Applied,
    ApplyContext,
    LayerStrategy,
    Strategy,
    register_strategy,
    registered_strategies,
    strategy_from_config,
)
from lightning_peft.strategies.ia3 import IA3, IA3Delta
from lightning_peft.strategies.lora import LoRA, LoRADelta
from lightning_peft.strategies.prompt_tuning import PromptStrategy, PromptTuning
from lightning_peft.strategies.ptuning import PTuning
from lightning_peft.strategies.selective import BitFit, LayerNormTuning, SelectiveStrategy, Unfreeze

__all__ = [
    "Adapter",
    "BitFit",
    "BottleneckAdapter",
    "IA3",
    "IA3Delta",
    "LayerNormTuning",
    "PTuning",
    "PromptStrategy",
    "PromptTuning",
    "SelectiveStrategy",
    "Unfreeze",
    "AdaLoRA",
    "AdaLoRADelta",
    "Applied",
    "ApplyContext",
    "LayerStrategy",
    "LoRA",
    "LoRADelta",
    "RankAllocator",
    "Strategy",
    "cubic_budget",
    "orthogonal_regularization",
    "register_strategy",
    "registered_strategies",
    "strategy_from_config",
]
