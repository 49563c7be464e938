"""PEFT methods: one strategy per module, all registered by name (see :mod:`lightning_peft.methods.base`)."""

from lightning_peft.methods.adalora import (
    AdaLoRA,
    AdaLoRADelta,
    RankAllocator,
    cubic_budget,
    orthogonal_regularization,
)
from lightning_peft.methods.base import (
    Applied,
    ApplyContext,
    LayerStrategy,
    Level,
    Strategy,
    register_strategy,
    registered_strategies,
    strategy_from_config,
)
from lightning_peft.methods.bottleneck import Adapter, BottleneckAdapter
from lightning_peft.methods.gate import Gated
from lightning_peft.methods.ia3 import IA3, IA3Delta
from lightning_peft.methods.lora import LoRA, LoRADelta
from lightning_peft.methods.presets import MAM, UniPELT
from lightning_peft.methods.prompt import PrefixTuning, PromptStrategy, PromptTuning, PTuning
from lightning_peft.methods.selective import BitFit, LayerNormTuning, SelectiveStrategy, Unfreeze

__all__ = [
    "AdaLoRA",
    "AdaLoRADelta",
    "Adapter",
    "Applied",
    "ApplyContext",
    "BitFit",
    "BottleneckAdapter",
    "Gated",
    "IA3",
    "IA3Delta",
    "LayerNormTuning",
    "LayerStrategy",
    "Level",
    "LoRA",
    "LoRADelta",
    "MAM",
    "PTuning",
    "PrefixTuning",
    "PromptStrategy",
    "PromptTuning",
    "RankAllocator",
    "SelectiveStrategy",
    "Strategy",
    "Unfreeze",
    "UniPELT",
    "cubic_budget",
    "orthogonal_regularization",
    "register_strategy",
    "registered_strategies",
    "strategy_from_config",
]
