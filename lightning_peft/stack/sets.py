"""Many tasks, one base: named adapter sets held side by side on one frozen (possibly quantized) model.

Every adapter set is a :class:`~lightning_peft.stack.peft_stack.PeftStack` applied under its own ``name`` (by
:func:`~lightning_peft.stack.apply_peft` or :func:`~lightning_peft.export.load_adapters`). Its parameters live in
their own containers (``adapters.<set>.*`` on adapted linears, ``lightning_peft_prompts.sets.<set>.*`` for
prompts, ``lightning_peft_adapter.<set>.*`` for bottleneck adapters), and every adapted component acts only while ``AdapterState.active`` names its set. Switching is
therefore one assignment: no base weight is copied, moved or quantized again.

Parameters that a set trains *in place* in the shared base (``unfreeze=[...]``, e.g. a classification head, and
the selective strategies BitFit / LayerNormTuning / Unfreeze) are the one exception: they cannot live in a
per-set container, so :func:`activate` swaps their values (a copy of those tensors only): each set sees its own
trained values, and with no set active the base model's originals. The values not in use (the base's, inactive
sets') are kept on the CPU, as the selective strategies keep their originals.

Merging (:func:`merge_adapter_set`) folds one set into the base for serving a single task. While a set is
merged, switching to another set (or to none) raises: the base weights then hold that set, and an adapter of
another set on top of them would silently compute a model nobody trained. Call :func:`unmerge_adapter_set`
first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.core.state import AdapterState, find_state
from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.methods.base import Level

if TYPE_CHECKING:
    from lightning_peft.stack.peft_stack import PeftStack

# Kept as (tensor, value) pairs, not dicts keyed by id(), so that copy.deepcopy(model) copies them consistently.
# _BASE_VALUES: [(tensor, base value)] of every in-place trained tensor; _SET_VALUES: set name -> [(tensor, that
# set's value)] while the set is inactive.
_BASE_VALUES = "_lightning_peft_shared_base"
_SET_VALUES = "_lightning_peft_shared_sets"
_LAYERS = "_lightning_peft_adapted_layers"


# -- finding the sets ------------------------------------------------------------------------------------------
def list_adapter_sets(model: nn.Module) -> list[str]:
    """Names of the adapter sets on ``model``, in the order they were added (empty when there is none)."""
    try:
        return list(find_state(model).stacks)
    except AdapterStateError:
        return []


def active_adapters(model: nn.Module) -> list[str]:
    """The active set's name in a list (as ``peft``'s ``active_adapters``), or ``[]`` when none is active."""
    try:
        active = find_state(model).active
    except AdapterStateError:
        return []
    return [active] if active is not None else []


def get_adapter_set(model: nn.Module, name: str) -> PeftStack:
    """The stack of the set called ``name``; an unknown name raises, listing the loaded ones."""
    state = find_state(model)
    _check_name(state, name, "name")
    return state.stacks[name]


def merged_adapter_set(model: nn.Module) -> str | None:
    """The name of the set currently merged into the base weights, or ``None``."""
    try:
        state = find_state(model)
    except AdapterStateError:
        return None
    return _merged(state)


def _check_name(state: AdapterState, name: object, argument: str) -> None:
    if not isinstance(name, str) or name not in state.stacks:
        raise AdapterStateError(
            f"{argument}={name!r} is not an adapter set of this model; loaded sets: {preview(state.stacks)}"
        )


def _adapted_layers(state: AdapterState) -> list[AdaptedLinear]:
    """Every adapted layer of the model, cached until the set of stacks changes (a walk over all modules costs
    milliseconds on a model with many sets; switching should not)."""
    stacks = tuple(state.stacks.values())
    cached = state.__dict__.get(_LAYERS)
    if (
        cached is not None
        and len(cached[0]) == len(stacks)
        and all(a is b for a, b in zip(cached[0], stacks))
    ):
        return cached[1]
    layers = [m for m in stacks[0].model.modules() if isinstance(m, AdaptedLinear)] if stacks else []
    state.__dict__[_LAYERS] = (stacks, layers)
    return layers


def _merged(state: AdapterState) -> str | None:
    """The set merged into the base weights (every stack of one state shares the model), or ``None``."""
    for layer in _adapted_layers(state):
        if layer.merged:
            return next(iter(layer.merged))
    return None


# -- tensors trained in place in the shared base -----------------------------------------------------------------
def shared_tensors(stack: PeftStack) -> list[Tensor]:
    """Tensors of the base model that ``stack`` trains in place: ``unfreeze`` modules and selective strategies'."""
    seen: dict[int, Tensor] = {id(t): t for t in stack.unfrozen}
    for strategy, applied in zip(stack.strategies, stack.applied):
        if strategy.level is Level.SELECTIVE:
            for t in applied.parameters:
                seen.setdefault(id(t), t)
    return list(seen.values())


Pairs = list[tuple[Tensor, Tensor]]


def _registries(state: AdapterState) -> tuple[Pairs, dict[str, Pairs]]:
    return state.__dict__.setdefault(_BASE_VALUES, []), state.__dict__.setdefault(_SET_VALUES, {})


def _snapshot(state: AdapterState, name: str | None) -> Pairs:
    if name is None or name not in state.stacks:
        return []
    return [(t, _copy(t)) for t in shared_tensors(state.stacks[name])]


def _copy(t: Tensor) -> Tensor:
    """A CPU copy, as the selective strategies keep theirs: accelerator memory holds only the live values."""
    return t.detach().to("cpu", copy=True)


def _restore(base: Pairs, values: Pairs) -> None:
    """Every claimed tensor to its value in ``values``, else to its base value."""
    chosen = {id(t): v for t, v in values}
    with torch.no_grad():
        for tensor, value in base:
            tensor.copy_(chosen.get(id(tensor), value))


def _switch(state: AdapterState, new: str | None) -> None:
    """Make ``new`` the active set, giving every in-place trained tensor the value ``new`` (or the base) needs."""
    base, saved = _registries(state)
    if state.active is not None and state.active in state.stacks:
        saved[state.active] = _snapshot(state, state.active)
    _restore(base, saved.get(new, []) if new is not None else [])
    state.active = new


def check_can_add_set(state: AdapterState, name: str) -> None:
    """Called by :func:`~lightning_peft.stack.apply_peft` before it changes anything: no set may be merged."""
    _refuse_while_merged(state, f"add adapter set {name!r}")
    for other in state.stacks.values():  # PiSSA, OLoRA, LoftQ: another set would sit on their residual weights
        changed = next((s for s in other.strategies if s.changes_base), None)
        if changed is not None:
            raise PeftConfigError(
                f"cannot add adapter set {name!r}: set {other.name!r} has init_weights={changed.init_weights!r}, which "
                "changed the base weights all sets share; unload it first, or use a separate copy of the model"
            )


def _refuse_while_merged(state: AdapterState, what: str, why: str = "") -> None:
    """An :class:`AdapterStateError` saying ``what`` cannot be done while a set is merged into the base."""
    merged = _merged(state)
    if merged is not None:
        raise AdapterStateError(
            f"cannot {what}: set {merged!r} is merged into the base weights; call unmerge_adapter_set(model) "
            f"(or stack.unmerge()) first{why}"
        )


def adopt_new_set(state: AdapterState, stack: PeftStack) -> None:
    """Called by :func:`~lightning_peft.stack.apply_peft` once ``stack`` is applied: make it the active set.

    The previously active set keeps its in-place trained values aside; tensors the new set trains in place start
    from the base model's values, which are recorded the first time any set claims a tensor.
    """
    base, saved = _registries(state)
    if state.active is not None and state.active in state.stacks:
        saved[state.active] = _snapshot(state, state.active)
    _restore(base, [])  # every claimed tensor back to the base before the new set claims its own
    claimed = {id(t) for t, _ in base}
    base.extend((t, _copy(t)) for t in shared_tensors(stack) if id(t) not in claimed)
    saved.pop(stack.name, None)
    state.active = stack.name


# -- switching -----------------------------------------------------------------------------------------------------
def activate(model: nn.Module, name: str) -> PeftStack:
    """Make the adapter set ``name`` the one the model computes with; the others stay loaded and inert.

    No base weight is copied or re-quantized: only which set's deltas act changes (plus the values of tensors a
    set trains in place, such as an unfrozen classification head).

    Raises:
        AdapterStateError: ``name`` is not loaded (the message lists the loaded sets), or another set is merged
            into the base (call :func:`unmerge_adapter_set` first).

    Example:
        >>> activate(model, "sentiment")
        >>> logits = model(input_ids).logits
    """
    state = find_state(model)
    _check_name(state, name, "name")
    if state.active == name:
        return state.stacks[name]
    _refuse_while_merged(state, f"activate adapter set {name!r}", " (merging is for serving one set)")
    _switch(state, name)
    return state.stacks[name]


def deactivate(model: nn.Module) -> None:
    """No set active: the model computes the base model's output (every set stays loaded).

    Raises:
        AdapterStateError: a set is merged into the base (call :func:`unmerge_adapter_set` first).
    """
    _deactivate(find_state(model), "deactivate adapters")


def _deactivate(state: AdapterState, what: str) -> None:
    _refuse_while_merged(state, what)
    _switch(state, None)


@contextlib.contextmanager
def disabled(state: AdapterState) -> Iterator[None]:
    """The one implementation behind :func:`disable_adapters` and :meth:`PeftStack.disable_adapters`.

    Tensors trained in place are swapped by copying values, which bumps their autograd version counters. On the
    way out the active set's values are copied back bit for bit, so their counters are put back too: a graph
    built before the block (the adapted forward) can still be backpropagated after it, as with ``peft`` (e.g. a
    reference pass without adapters between a policy forward and its backward). A graph built inside the block
    still fails after it if backpropagated, since the values it saw are gone.
    """
    previous = state.active
    if previous is None:  # nothing active: the base values are in place already
        yield
        return
    versions = [(t, t._version) for t, _ in _registries(state)[0]]
    _deactivate(state, "disable adapters")
    try:
        yield
    finally:
        if previous in state.stacks and _merged(state) is None:
            _switch(state, previous)
            _reset_versions(versions)


def _reset_versions(versions: list[tuple[Tensor, int]]) -> None:
    """Give tensors whose values were restored exactly their autograd version counters back (best effort)."""
    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if setter is None or not versions:
        return
    try:
        setter(tuple(t for t, _ in versions), tuple(v for _, v in versions))
    except (TypeError, RuntimeError):  # another torch signature: the counters stay bumped
        return


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes the base model's output; the previously active set comes back after.

    No adapter set is active in the block: every set's deltas (LoRA, AdaLoRA, IA3), prompts and bottleneck
    adapters are off, and the tensors a set trains in place in the base model (``unfreeze`` modules such as a new
    classification head, and the parameters of BitFit / LayerNormTuning / Unfreeze) hold the base model's values.
    This is ``peft``'s ``with model.disable_adapter():``, where ``modules_to_save`` also fall back to the original
    modules. ``stack.disable_adapters()`` is the same.

    Raises:
        AdapterStateError: a set is merged into the base weights (unmerge it first: the base weights then hold
            that set, so no switch could give the base model's output).

    Example:
        >>> with disable_adapters(model):
        ...     reference = model(input_ids).logits
    """
    with disabled(find_state(model)):
        yield


@contextlib.contextmanager
def using_adapter_set(model: nn.Module, name: str) -> Iterator[PeftStack]:
    """Inside the block ``name`` is active; the previously active set (or none) comes back after."""
    state = find_state(model)
    previous = state.active
    stack = activate(model, name)
    try:
        yield stack
    finally:
        if state.active != previous and _merged(state) is None:
            _switch(state, previous if previous in state.stacks else None)


def unload(model: nn.Module, name: str) -> None:
    """Remove the adapter set ``name`` from the model (unmerging it first if merged); the other sets stay.

    When ``name`` was active, no set is active afterwards.
    """
    state = find_state(model)
    _check_name(state, name, "name")
    stack = state.stacks[name]
    was_active = state.active == name
    if was_active:
        _switch(state, None)  # in-place trained tensors back to the base values before the set goes
    base, saved = _registries(state)
    saved.pop(name, None)
    keep = _snapshot(state, state.active)
    stack.remove()  # selective strategies restore the values they saw when applied: put the right ones back
    _restore(base, keep)
    still = {id(t) for s in state.stacks.values() for t in shared_tensors(s)}
    base[:] = [(t, v) for t, v in base if id(t) in still]


# -- merging -------------------------------------------------------------------------------------------------------
def merge_adapter_set(
    model: nn.Module, name: str | None = None, *, requantize: bool = False
) -> dict[str, float]:
    """Fold one set into the base weights (it becomes, and must stay, the active set) to serve a single task.

    Full-precision base: the deltas are added to the weights in place; :func:`unmerge_adapter_set` subtracts
    them again (exact up to float rounding). Quantized (bitsandbytes) base: each adapted layer is dequantized and
    replaced by a full-precision merged layer, with the quantized original kept aside, so unmerging restores it
    bit for bit but memory grows by a full-precision copy of those layers; with ``requantize=True`` the merged
    weight is quantized again, which is **lossy** (a fresh rounding error on top of the first quantization,
    returned per layer), though unmerging still restores the original quantized layer.
    Strategies that cannot merge (prompt tuning, bottleneck adapters) keep acting while the set is active.

    Args:
        model: the model holding the sets.
        name: the set to merge; default: the active set.
        requantize: for a quantized base, quantize the merged weights again (lossy) instead of keeping them in
            full precision.

    Returns:
        Per quantized layer, the relative weight error re-quantization added (0.0 when kept in full precision);
        empty for a full-precision base.

    Raises:
        AdapterStateError: unknown ``name``, no active set to default to, or another set already merged.
    """
    if not isinstance(requantize, bool):
        raise PeftConfigError(f"requantize={requantize!r} is not valid; expected True or False")
    state = find_state(model)
    if name is None:
        if state.active is None:
            raise AdapterStateError(
                f"name=None but no adapter set is active; name one of: {preview(state.stacks)}"
            )
        name = state.active
    _check_name(state, name, "name")
    merged = _merged(state)
    if merged is not None and merged != name:
        raise AdapterStateError(
            f"cannot merge adapter set {name!r}: set {merged!r} is already merged; unmerge_adapter_set(model) first"
        )
    if merged == name:
        return {}
    activate(model, name)
    return state.stacks[name].merge(requantize=requantize)


def unmerge_adapter_set(model: nn.Module) -> str | None:
    """Take the merged set back out of the base weights (it stays active); returns its name, or ``None``."""
    state = find_state(model)
    merged = _merged(state)
    if merged is not None:
        state.stacks[merged].unmerge()
    return merged


__all__ = [
    "activate",
    "active_adapters",
    "list_adapter_sets",
    "deactivate",
    "disable_adapters",
    "get_adapter_set",
    "merge_adapter_set",
    "merged_adapter_set",
    "shared_tensors",
    "unload",
    "unmerge_adapter_set",
    "using_adapter_set",
]
