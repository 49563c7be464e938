"""lightning-peft: parameter-efficient fine-tuning as composable PyTorch Lightning callbacks."""

__version__ = "0.1.0"

from lightning_peft.adapter_sets import (
    activate,
    active_adapters,
    deactivate,
    disable_adapters,
    list_adapter_sets,
    merge_adapter_set,
    unload,
    unmerge_adapter_set,
)
from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.export import load_adapters, save_adapters
from lightning_peft.kbit import prepare_for_kbit_training
from lightning_peft.layers import AdaptedLinear, Delta
from lightning_peft.merge import merge_and_export
from lightning_peft.mixin import PEFTMixin
from lightning_peft.quantization import Quantization, bnb_config, quantize_model
from lightning_peft.stack import PeftStack, apply_peft, get_stack
from lightning_peft.strategies import (
    LoRA,
    Strategy,
    register_strategy,
    registered_strategies,
    strategy_from_config,
)
from lightning_peft.strategies.adalora import AdaLoRA, orthogonal_regularization
from lightning_peft.strategies.adalora_allocator import RankAllocator
from lightning_peft.strategies.adapter import Adapter
from lightning_peft.strategies.ia3 import IA3
from lightning_peft.strategies.prompt_tuning import PromptTuning
from lightning_peft.strategies.ptuning import PTuning
from lightning_peft.strategies.selective import BitFit, LayerNormTuning, Unfreeze

__all__ = [
    "Adapter",
    "BitFit",
    "IA3",
    "LayerNormTuning",
    "PTuning",
    "PromptTuning",
    "Unfreeze",
    "AdaLoRA",
    "AdaptedLinear",
    "AdapterStateError",
    "Delta",
    "LoRA",
    "PEFTMixin",
    "PeftConfigError",
    "PeftStack",
    "Quantization",
    "RankAllocator",
    "Strategy",
    "__version__",
    "activate",
    "active_adapters",
    "list_adapter_sets",
    "deactivate",
    "disable_adapters",
    "merge_adapter_set",
    "unload",
    "unmerge_adapter_set",
    "apply_peft",
    "bnb_config",
    "prepare_for_kbit_training",
    "quantize_model",
    "load_adapters",
    "merge_and_export",
    "save_adapters",
    "get_stack",
    "orthogonal_regularization",
    "register_strategy",
    "registered_strategies",
    "strategy_from_config",
]


def _enable_strategy_subclasses_in_cli() -> None:
    """Let LightningCLI / jsonargparse take any strategy where ``Strategy`` is annotated.

    jsonargparse treats dataclasses as final types, so ``strategies: list[Strategy]`` would refuse
    ``class_path: lightning_peft.LoRA``; enabling subclasses for ``Strategy`` makes YAML like
    ``- class_path: LoRA`` + ``init_args: {r: 8}`` work for the task modules, the mixin and the PEFT callback.
    """
    try:
        from jsonargparse import set_parsing_settings
    except ImportError:  # jsonargparse is only needed for the CLI
        return
    set_parsing_settings(subclasses_enabled=[Strategy])


_enable_strategy_subclasses_in_cli()
