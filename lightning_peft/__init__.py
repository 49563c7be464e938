"""lightning-peft: parameter-efficient fine-tuning as composable PyTorch Lightning callbacks."""

__version__ = "0.1.0"

from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.layers import AdaptedLinear, Delta
from lightning_peft.stack import PeftStack, apply_peft, get_stack
from lightning_peft.strategies import LoRA, Strategy, register_strategy, registered_strategies, strategy_from_config

__all__ = [
    "AdaptedLinear",
    "AdapterStateError",
    "Delta",
    "LoRA",
    "PeftConfigError",
    "PeftStack",
    "Strategy",
    "__version__",
    "apply_peft",
    "get_stack",
    "register_strategy",
    "registered_strategies",
    "strategy_from_config",
]
