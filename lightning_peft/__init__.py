"""lightning-peft: parameter-efficient fine-tuning as composable PyTorch Lightning callbacks.

Importing the package loads neither Lightning nor jsonargparse: the names that need Lightning (``PEFTMixin``)
are imported when first used.
"""

from typing import Any

from lightning_peft.core.layer import (
    AdaptedLayer,
    AdaptedLinear,  # noqa: F401  (AdaptedLayer's former name, still importable)
    Delta,
)
from lightning_peft.core.state import get_stack
from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.io.adapters import load_adapters, save_adapters
from lightning_peft.io.merged import merge_and_export
from lightning_peft.methods.adalora import AdaLoRA, RankAllocator, orthogonal_regularization
from lightning_peft.methods.base import (
    Strategy,
    register_strategy,
    registered_strategies,
    strategy_from_config,
)
from lightning_peft.methods.bottleneck import Adapter
from lightning_peft.methods.gate import Gated
from lightning_peft.methods.ia3 import IA3
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.peft_protocol import register_peft_import
from lightning_peft.methods.presets import MAM, UniPELT
from lightning_peft.methods.prompt import PrefixTuning, PromptTuning, PTuning
from lightning_peft.methods.selective import BitFit, LayerNormTuning, Unfreeze
from lightning_peft.quantization.config import Quantization, bnb_config
from lightning_peft.quantization.convert import quantize_model
from lightning_peft.quantization.kbit import prepare_for_kbit_training
from lightning_peft.stack.arithmetic import combine_adapter_sets
from lightning_peft.stack.estimate import MemoryEstimate, estimate_memory
from lightning_peft.stack.mixed import mixed_batch
from lightning_peft.stack.optim import create_loraplus_optimizer, loraplus_param_groups
from lightning_peft.stack.peft_stack import PeftStack, apply_peft
from lightning_peft.stack.sets import (
    activate,
    active_adapters,
    deactivate,
    disable_adapters,
    list_adapter_sets,
    merge_adapter_set,
    unload,
    unmerge_adapter_set,
)
from lightning_peft.version import __version__

#: public names that need Lightning, by the module that defines them (imported on first access)
_LAZY = {"PEFTMixin": "lightning_peft.lightning.mixin"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Adapter",
    "BitFit",
    "Gated",
    "IA3",
    "LayerNormTuning",
    "MAM",
    "PTuning",
    "PrefixTuning",
    "PromptTuning",
    "Unfreeze",
    "UniPELT",
    "AdaLoRA",
    "AdaptedLayer",
    "AdapterStateError",
    "Delta",
    "LoRA",
    "MemoryEstimate",
    "PEFTMixin",
    "PeftConfigError",
    "PeftStack",
    "Quantization",
    "RankAllocator",
    "Strategy",
    "__version__",
    "activate",
    "active_adapters",
    "combine_adapter_sets",
    "estimate_memory",
    "list_adapter_sets",
    "deactivate",
    "disable_adapters",
    "merge_adapter_set",
    "mixed_batch",
    "unload",
    "unmerge_adapter_set",
    "apply_peft",
    "create_loraplus_optimizer",
    "loraplus_param_groups",
    "bnb_config",
    "prepare_for_kbit_training",
    "quantize_model",
    "load_adapters",
    "merge_and_export",
    "save_adapters",
    "get_stack",
    "orthogonal_regularization",
    "register_peft_import",
    "register_strategy",
    "registered_strategies",
    "strategy_from_config",
]
