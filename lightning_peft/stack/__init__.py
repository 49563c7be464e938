"""The stack: an ordered list of strategies applied to one model as one adapter set, the named sets that
live side by side on one base, and their arithmetic."""

from lightning_peft.stack.arithmetic import combine_adapter_sets
from lightning_peft.stack.mixed import BASE, mixed_batch
from lightning_peft.stack.peft_stack import DEFAULT_SET, PeftStack, apply_peft
from lightning_peft.stack.sets import (
    activate,
    active_adapters,
    deactivate,
    disable_adapters,
    get_adapter_set,
    list_adapter_sets,
    merge_adapter_set,
    merged_adapter_set,
    unload,
    unmerge_adapter_set,
    using_adapter_set,
)

__all__ = [
    "BASE",
    "DEFAULT_SET",
    "PeftStack",
    "activate",
    "active_adapters",
    "apply_peft",
    "combine_adapter_sets",
    "deactivate",
    "disable_adapters",
    "get_adapter_set",
    "list_adapter_sets",
    "merge_adapter_set",
    "merged_adapter_set",
    "mixed_batch",
    "unload",
    "unmerge_adapter_set",
    "using_adapter_set",
]
