"""Mixed-adapter batches: one forward in which each row of the batch uses its own adapter set, or the base model.

As ``peft``'s mixed-batch inference (``model(**inputs, adapter_names=[...])``)::

    model(input_ids=ids, attention_mask=mask, adapter_names=["sentiment", "__base__", "topic", "sentiment"])
    model.generate(input_ids=ids, adapter_names=["sentiment", "__base__", "topic", "sentiment"], num_beams=2)
    with mixed_batch(model, ["sentiment", "__base__", "topic", "sentiment"]):
        model(input_ids=ids, attention_mask=mask)  # or a LightningModule around the model, or a user loop

Row ``i`` of the output equals what the model computes for row ``i`` alone with set ``adapter_names[i]`` active
(``"__base__"``: with no set active). The base layers run once on the whole batch; each set's deltas run on its
own rows only (:mod:`lightning_peft.core.routing`). Which sets can be mixed:

- layer-level deltas (LoRA, rsLoRA, DoRA, AdaLoRA, IA3, LoRA on embeddings and convs), bottleneck adapters, and
  prompt strategies (prompt tuning, P-tuning), alone or stacked in a set;
- a set that trains tensors in place in the shared base (``unfreeze=[...]``, BitFit, LayerNormTuning,
  Unfreeze) is refused, naming it: one tensor cannot hold two sets' values in one forward;
- rows with virtual tokens must all have as many: a row whose set prepends none (``"__base__"``, a LoRA set)
  next to prompt rows, or prompt sets of different lengths, is refused, since the rows' positions would differ
  from their own forwards.

Refused before anything runs, as ``peft`` refuses them: a model in training mode (call ``model.eval()``; ``peft``
raises for ``adapter_names`` in training mode too), a set merged into the base (:func:`unmerge_adapter_set`
first), unknown names (the message lists the loaded sets) and a list whose length is not the batch size.

The ``adapter_names`` keyword is taken out by a forward pre-hook that :func:`~lightning_peft.stack.apply_peft`
puts on the model the sets live on (and the last set's removal takes off), and by a ``generate`` bound to that
model instance, which runs the model's own ``generate`` inside :func:`mixed_batch`. Inside :func:`mixed_batch`
(only there), a batch ``k`` times as long as the names is ``generate()``'s expansion of every input row into ``k``
consecutive rows (``num_beams``, ``num_return_sequences``), and each keeps its row's set, as ``peft`` expands the
names for beams. A normal forward pays one dictionary
lookup for it, and ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_peft.core.routing import BASE, RowRoute
from lightning_peft.core.state import AdapterState, find_state
from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.methods.base import Level
from lightning_peft.methods.bottleneck import Adapter
from lightning_peft.methods.prompt.tuning import PromptStrategy
from lightning_peft.stack.sets import _refuse_while_merged, disabled, shared_tensors

#: the keyword a forward takes the per-row set names under (``peft``'s)
MIXED_KWARG = "adapter_names"
#: where the router's hook handles are kept, in the state's ``__dict__``
_ROUTER = "_lightning_peft_router"
#: the inputs whose leading dimension is the batch, looked up in this order when none is positional
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "x")


class _Route(RowRoute):
    """A :class:`RowRoute` plus who started it, and the base values of in-place trained tensors while it runs."""

    def __init__(self, names: Sequence[str], from_call: bool) -> None:
        super().__init__(names)
        self.from_call = from_call
        self.exit = contextlib.ExitStack()
        self.repeats = 1

    def repeat_rows(self, k: int) -> None:
        """Each row's name repeated ``k`` times in place: ``generate()`` expands every input row into ``k``
        consecutive rows (``num_beams`` / ``num_return_sequences``), which keep their row's set."""
        RowRoute.__init__(self, [n for n in self.names for _ in range(k)])
        self.repeats *= k


def _holder(state: AdapterState) -> nn.Module:
    return next(iter(state.stacks.values())).model


def _check(state: AdapterState, model: nn.Module, names: Any, from_call: bool) -> _Route:
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise PeftConfigError(
            f"{MIXED_KWARG}={names!r} is not valid; expected a list with one adapter set name (or {BASE!r} for "
            "the base model) per row of the batch"
        )
    if not names:
        raise PeftConfigError(f"{MIXED_KWARG}=[] is empty; give one adapter set name (or {BASE!r}) per row")
    unknown = sorted({n for n in names if n != BASE and n not in state.stacks})
    if unknown:
        raise AdapterStateError(
            f"{MIXED_KWARG} names {preview(map(repr, unknown))}, which {'is' if len(unknown) == 1 else 'are'} not "
            f"an adapter set of this model; loaded sets: {preview(state.stacks)} (or {BASE!r} for the base model)"
        )
    if model.training:
        raise AdapterStateError(
            f"{MIXED_KWARG} (a mixed-adapter batch) is for inference, but {type(model).__name__} is in training "
            "mode; call model.eval() first (peft refuses adapter_names in training mode too)"
        )
    _refuse_while_merged(state, "run a mixed-adapter batch", " (merging is for serving one set)")
    route = _Route(names, from_call)
    tokens = {}
    for name in route.groups:
        tokens[name] = _virtual_tokens(state, name) if name != BASE else 0
    if len(set(tokens.values())) > 1:
        shown = ", ".join(f"{n!r}: {k}" for n, k in tokens.items())
        raise PeftConfigError(
            f"{MIXED_KWARG}: every row of a mixed batch needs as many virtual tokens, but the rows' sets prepend "
            f"{shown}; positions would shift against each set's own forward. Batch rows of prompt sets with "
            "the same num_virtual_tokens together, and the base or non-prompt sets separately"
        )
    return route


def _virtual_tokens(state: AdapterState, name: str) -> int:
    """The number of virtual tokens set ``name`` prepends; raises for a strategy that cannot be mixed."""
    stack = state.stacks[name]
    if stack.unfreeze:
        raise PeftConfigError(
            f"adapter set {name!r} trains {preview(stack.unfreeze)} in place (unfreeze=...), so it cannot share "
            "a forward with other sets: the base model holds one value of those tensors per forward; run its rows "
            "in their own batch (activate / using_adapter_set)"
        )
    n = 0
    for strategy in stack.strategies:
        if isinstance(strategy, PromptStrategy):
            n += strategy.num_virtual_tokens
        elif strategy.level is Level.SELECTIVE or (strategy.level is Level.MODULE and not isinstance(strategy, Adapter)):
            raise PeftConfigError(
                f"adapter set {name!r} holds {type(strategy).__name__}, which cannot be mixed with other sets in one "
                "batch (it changes shared base tensors or modules for the whole forward); mixed batches take "
                "layer-level deltas (LoRA, DoRA, AdaLoRA, IA3), bottleneck adapters and prompt strategies; run its "
                "rows in their own batch (activate / using_adapter_set)"
            )
        elif strategy.level is Level.INPUT:
            raise PeftConfigError(
                f"adapter set {name!r} holds {type(strategy).__name__}, an input-level strategy that mixed batches "
                "do not know; run its rows in their own batch (activate / using_adapter_set)"
            )
    return n


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> tuple[str, int] | None:
    """(what, batch size) of the call's main input, or ``None`` when there is no tensor to read it from."""
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.dim() > 0:
            return f"positional argument {i}", a.shape[0]
    for key in _BATCH_INPUTS:
        t = kwargs.get(key)
        if isinstance(t, Tensor) and t.dim() > 0:
            return key, t.shape[0]
    return None


def _check_batch(route: RowRoute, args: tuple, kwargs: dict[str, Any]) -> None:
    found = _batch_size(args, kwargs)
    if found is None or found[1] == route.batch:
        return
    if isinstance(route, _Route) and not route.from_call and route.repeats == 1 and found[1] % route.batch == 0:
        # inside mixed_batch (and generate(adapter_names=...)): generate() repeats each row k times in place
        route.repeat_rows(found[1] // route.batch)
        return
    raise PeftConfigError(
        f"{MIXED_KWARG} has {route.batch} entries but the batch has {found[1]} rows ({found[0]}); give one "
        f"name per row"
    )


def _begin(state: AdapterState, route: _Route) -> None:
    """Route the next forward(s); the active set's in-place trained tensors (if any) hold the base values."""
    active = state.active
    if active is not None and active in state.stacks and shared_tensors(state.stacks[active]):
        route.exit.enter_context(disabled(state))
    state.route = route


def _end(state: AdapterState) -> None:
    route, state.route = state.route, None
    if isinstance(route, _Route):
        route.exit.close()


class _Router:
    """The forward hooks that take ``adapter_names`` out of a call on the model holding the sets."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state

    def pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        route = self.state.route
        if MIXED_KWARG not in kwargs:
            if route is not None:
                _check_batch(route, args, kwargs)
            return None
        kwargs = dict(kwargs)
        names = kwargs.pop(MIXED_KWARG)
        if names is None:
            return args, kwargs
        if route is not None:
            raise AdapterStateError(
                f"{MIXED_KWARG} given to a forward that is already a mixed-adapter batch (inside mixed_batch(...)); "
                "give the names once"
            )
        route = _check(self.state, module, names, from_call=True)
        _check_batch(route, args, kwargs)
        _begin(self.state, route)
        return args, kwargs

    def post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        route = self.state.route
        if isinstance(route, _Route) and route.from_call:
            _end(self.state)


def generate(self: nn.Module, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """The model's own ``generate``, taking ``adapter_names`` as ``peft``'s does: each input row generates with
    its set (its beams and returned sequences too). Bound to a model by :func:`install_router`."""
    own = type(self).generate
    if adapter_names is None:
        return own(self, *args, **kwargs)
    with mixed_batch(self, adapter_names):
        return own(self, *args, **kwargs)


def install_router(model: nn.Module, state: AdapterState) -> None:
    """Let ``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` run a mixed-adapter
    batch (once per model; called by ``apply_peft``)."""
    if _ROUTER in state.__dict__:
        return
    router = _Router(state)
    state.__dict__[_ROUTER] = (
        model,
        model.register_forward_pre_hook(router.pre, with_kwargs=True, prepend=True),  # before the prompt host's
        model.register_forward_hook(router.post, with_kwargs=True, always_call=True),
    )
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = types.MethodType(generate, model)  # the instance's, copied with it


def uninstall_router(state: AdapterState, force: bool = False) -> None:
    """Take the hooks (and the ``generate`` wrapper) off once the model holds no adapter set (``force``: even if
    it does; called by :meth:`PeftStack.remove <lightning_peft.stack.PeftStack.remove>`)."""
    if state.stacks and not force:
        return
    router = state.__dict__.pop(_ROUTER, None)
    if router is None:
        return
    model, *handles = router
    for handle in handles:
        handle.remove()
    bound = model.__dict__.get("generate")
    if isinstance(bound, types.MethodType) and bound.__func__ is generate:
        del model.__dict__["generate"]


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Inside the block, every forward of ``model`` is a mixed-adapter batch: row ``i`` uses ``adapter_names[i]``.

    The same as passing ``adapter_names=...`` to each call, for calls that cannot take the keyword: a
    LightningModule's ``forward``, ``model.generate(...)`` (each step's rows keep their sets), a user loop.

    Args:
        model: the model holding the sets, or a module containing it (e.g. a LightningModule).
        adapter_names: one adapter set name per row of the batch, ``"__base__"`` for the base model.

    Raises:
        AdapterStateError: an unknown name (the message lists the loaded sets), a set merged into the base, the
            model in training mode, or a block inside another mixed batch.
        PeftConfigError: a set that cannot be mixed, rows with different numbers of virtual tokens, or (at the
            forward) a batch whose size is not ``len(adapter_names)``.

    Example:
        >>> with mixed_batch(model, ["sentiment", "__base__", "topic"]):
        ...     logits = model(input_ids=ids).logits
    """
    state = find_state(model)
    if state.route is not None:
        raise AdapterStateError("mixed_batch(...) inside another mixed-adapter batch; give the names once")
    route = _check(state, _holder(state), adapter_names, from_call=False)
    _begin(state, route)
    try:
        yield
    finally:
        if state.route is route:
            _end(state)


__all__ = [
    "BASE",
    "MIXED_KWARG",
    "install_router",
    "mixed_batch",
    "uninstall_router",
]
