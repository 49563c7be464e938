"""PEFT strategies: one file per method, all registered by name."""

from lightning_peft.strategies.base import (
    Applied,
    ApplyContext,
    LayerStrategy,
    Strategy,
    register_strategy,
    registered_strategies,
    strategy_from_config,
)
from lightning_peft.strategies.lora import LoRA, LoRADelta

__all__ = [
    "Applied",
    "ApplyContext",
    "LayerStrategy",
    "LoRA",
    "LoRADelta",
    "Strategy",
    "register_strategy",
    "registered_strategies",
    "strategy_from_config",
]
