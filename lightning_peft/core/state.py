"""What the package attaches to a model: the per-model adapter state, the names of its containers, and the one
way to find an applied stack.

Every strategy that must recognise another's parameters (e.g. ``Unfreeze`` skipping adapter weights, the
bottleneck adapter's target filter) reads the container names here, never a spelled-out string.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_peft.errors import AdapterStateError, preview

if TYPE_CHECKING:
    from lightning_peft.stack.peft_stack import PeftStack

#: the per-set deltas of an adapted linear: ``<layer>.adapters.<set>.<strategy>.*``
DELTAS = "adapters"
#: bottleneck adapters, on the module they follow: ``<module>.lightning_peft_adapter.<set>.*``
ADAPTER_CONTAINER = "lightning_peft_adapter"
#: prompt providers, on the prompted model: ``lightning_peft_prompts.sets.<set>.*``
PROMPT_HOST = "lightning_peft_prompts"
#: prefix-tuning encoders, on the prefixed model: ``lightning_peft_prefixes.sets.<set>.*``
PREFIX_HOST = "lightning_peft_prefixes"
#: the frozen base layer inside an adapted linear
BASE_LAYER = "base_layer"

#: a parameter or module name inside something a strategy added (not the user's model)
ADDED = re.compile(rf"(^|\.)({DELTAS}|{ADAPTER_CONTAINER}|{PROMPT_HOST}|{PREFIX_HOST})\.")

#: the attribute (in the model's ``__dict__``, so not a submodule) holding its :class:`AdapterState`
STATE_ATTR = "_lightning_peft_state"


class AdapterState:
    """Per-model bookkeeping shared by every adapted component: which adapter set is active, and the stacks."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.stacks: dict[str, Any] = {}
        #: a :class:`~lightning_peft.core.routing.RowRoute` during a mixed-adapter forward, else ``None``
        self.route: Any = None


class StackHandle:
    """Base class of :class:`~lightning_peft.stack.peft_stack.PeftStack`, so that the core recognises a stack
    without importing the layer above it."""


def get_state(model: nn.Module, create: bool = False) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = AdapterState()
        model.__dict__[STATE_ATTR] = state
    return state


def _states(model: nn.Module) -> Iterator[AdapterState]:
    """The adapter states holding stacks on ``model`` and its submodules, outermost first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module or a PeftStack, got {type(model).__name__}")
    for module in model.modules():
        state = get_state(module)
        if state is not None and state.stacks:
            yield state


def find_state(model: nn.Module) -> AdapterState:
    """The adapter state of ``model`` or of the first submodule holding adapter sets (e.g. inside a LightningModule).

    Raises:
        AdapterStateError: when no adapter set has been applied anywhere under ``model``.
    """
    for state in _states(model):
        return state
    raise AdapterStateError(
        f"{type(model).__name__} has no adapter sets; add one with apply_peft(model, ..., name=...) or "
        "load_adapters(model, dirpath, name=...)"
    )


def get_stack(
    model: nn.Module | PeftStack,
    name: str | None = None,
    *,
    where: Callable[[PeftStack], bool] | None = None,
    required: bool = False,
) -> PeftStack | None:
    """The stack applied to ``model`` (or to a submodule, e.g. the HF model inside a LightningModule), or ``None``.

    Args:
        model: a model, a module containing it, or a stack (returned as it is).
        name: the adapter set; by default the active one (or the only one).
        where: with no ``name``, the first stack (the active set's first, then any) for which this is true,
            e.g. one holding an AdaLoRA strategy.
        required: raise :class:`~lightning_peft.errors.AdapterStateError` instead of returning ``None``.

    Example:
        >>> stack = get_stack(model)
    """
    if isinstance(model, StackHandle):
        return model if where is None or where(model) else None  # type: ignore[return-value]
    found: list[str] = []
    for state in _states(model):
        found.extend(state.stacks)
        if where is not None and name is None:
            stacks = [state.stacks[state.active]] if state.active in state.stacks else list(state.stacks.values())
            hit = next((s for s in stacks if where(s)), None)
            if hit is not None:
                return hit
            continue
        key = name if name is not None else state.active
        if key is None and len(state.stacks) == 1:
            key = next(iter(state.stacks))
        if key in state.stacks:
            return state.stacks[key]
    if not required:
        return None
    if found:
        raise AdapterStateError(
            f"name={name!r} is not an adapter set of {type(model).__name__}; its sets are: {preview(found)}"
        )
    raise AdapterStateError(f"{type(model).__name__} has no lightning_peft adapters; apply_peft() first")
