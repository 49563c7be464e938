"""Adapter arithmetic: a new adapter set combined from weighted LoRA (or IA3) sets, as ``peft``'s
``add_weighted_adapter`` computes it.

:func:`combine_adapter_sets` reads the input sets' tensors layer by layer, computes the new set's tensors
(:mod:`lightning_peft.stack.arithmetic_lora` for LoRA, with the merges of :mod:`lightning_peft.ops.merging`),
and only then adds the result as an ordinary set (:func:`~lightning_peft.stack.apply_peft` with the new
tensors copied in): it activates, merges, saves, exports to ``peft`` and loads like any other.

Every argument is checked before the model is touched: unknown sets, empty or non-finite weights, an unknown
method, a density outside (0, 1], options the method does not use, a taken name (unless ``replace=True``), a set
merged into the base, and input sets that are not one plain LoRA (or one IA3) strategy each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_peft.core.layer import AdaptedLayer
from lightning_peft.core.state import AdapterState, find_state
from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.methods.ia3 import IA3
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.lora.layers import LoRAConvDelta
from lightning_peft.ops.merging import SIGN_METHODS
from lightning_peft.stack.arithmetic_lora import LoRAPart, combined_rank, lora_factors
from lightning_peft.stack.peft_stack import PeftStack, apply_peft
from lightning_peft.stack.sets import check_can_add_set, unload

#: every combination method, ``peft``'s ``combination_type`` names
METHODS = (
    "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
#: the methods that prune (they need ``density``)
PRUNING = tuple(m for m in METHODS if m.startswith(("ties", "dare", "magnitude")))
#: the methods that elect a sign per entry (``majority_sign_method``)
SIGNED = ("ties", "ties_svd", "dare_ties", "dare_ties_svd")
#: the methods that end in a truncated SVD of the combined update (``svd_rank``, ``svd_clamp``)
SVD = tuple(m for m in METHODS if m == "svd" or m.endswith("_svd"))


def combine_adapter_sets(
    model: nn.Module,
    weights: Mapping[str, float],
    *,
    name: str,
    method: str = "svd",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    generator: torch.Generator | None = None,
    replace: bool = False,
) -> PeftStack:
    """Add the adapter set ``name`` combined from the weighted sets ``weights``, as ``peft``'s
    ``add_weighted_adapter(list(weights), list(weights.values()), name, combination_type=method, ...)``.

    Each input set must hold one plain LoRA strategy (rsLoRA allowed; ranks, alphas and target modules may differ
    where the method allows), or, all of them, one IA3 strategy (``method="linear"``, a weighted sum of the
    scaling vectors, as ``peft``'s IA3 ``add_weighted_adapter``). The new set is a LoRA with
    ``r == alpha`` (scaling 1: each input's own scaling is folded into the new tensors) on the union of the
    inputs' layers; it becomes the active set, as after :func:`~lightning_peft.stack.apply_peft`.

    Methods, per adapted layer, with ``w_i`` the weight and ``s_i`` the scaling of set ``i`` present there:

    - ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: every set of one rank
      ``r`` (the new rank); ``A`` and ``B`` are merged separately, ``A_i`` weighted by
      ``sign(w_i s_i) sqrt(|w_i s_i|)`` and ``B_i`` by ``sqrt(|w_i s_i|)``. Only ``"linear"`` with a single set
      (or sets that share their ``A`` or ``B``) reproduces ``sum_i w_i s_i B_i A_i`` exactly: ``peft`` calls it
      a rough approximation.
    - ``"cat"``: exact, of rank ``sum r_i``: ``A`` the stacked ``w_i s_i A_i``, ``B`` the stacked ``B_i``
      (zero rows where a set does not adapt the layer).
    - ``"svd"`` and the ``*_svd`` methods: the update ``sum_i w_i s_i B_i A_i`` (merged by the method's prefix:
      ``"ties_svd"`` prunes and elects signs on the full updates), truncated to rank ``svd_rank`` (default the
      largest input rank) by SVD: ``B = U S``, ``A = V^T``; ``svd_clamp`` clamps both to that quantile of their
      entries. A rank above a layer's smaller dimension is padded with zeros.

    With a single set every method is ``"linear"`` (as in ``peft``): ``w`` times that set.

    Args:
        model: the model holding the sets (or a module around it).
        weights: set name -> weight (negative weights subtract a set).
        name: the new set's name (a Python identifier).
        method: one of :data:`METHODS`; ``peft``'s default, ``"svd"``.
        density: the fraction of entries the pruning methods keep, in (0, 1]; required by them, refused by the
            others.
        majority_sign_method: how TIES elects signs, ``"total"`` (sum of values) or ``"frequency"`` (of signs).
        svd_rank: the new rank for the SVD methods (default: the largest input rank).
        svd_clamp: for the SVD methods, a quantile in [0, 1] of the new factors' entries to clamp them to.
        generator: DARE's random masks come from this generator (default torch's global one, drawn layer by
            layer in module order, ``A``'s then ``B``'s, as ``peft`` draws them).
        replace: replace an existing set called ``name`` instead of refusing (it may be one of the inputs).

    Returns:
        The new set's stack.

    Raises:
        AdapterStateError: an input set is not loaded (the message lists the loaded sets), or a set is merged
            into the base.
        PeftConfigError: any other argument that cannot be honoured; nothing on the model has changed then.

    Example:
        >>> combine_adapter_sets(model, {"sentiment": 0.7, "topic": 0.3}, name="mixed", method="cat")
        >>> activate(model, "mixed")
    """
    state = find_state(model)
    weights = _check_weights(state, weights)
    _check_options(method, density, majority_sign_method, svd_rank, svd_clamp, generator)
    _check_new_name(state, name, replace)
    check_can_add_set(state, name)  # no set merged, no set whose init changed the base weights
    stacks = {n: state.stacks[n] for n in weights}
    effective = "linear" if len(weights) == 1 else method
    kinds = {n: _kind(s) for n, s in stacks.items()}
    if set(kinds.values()) == {"ia3"}:
        if method != "linear":
            raise PeftConfigError(
                f"method={method!r} does not apply to IA3 sets ({preview(weights)}); IA3 sets combine as a weighted "
                "sum of their scaling vectors only (as peft's IA3 add_weighted_adapter): pass method='linear'"
            )
        strategy, tensors = _ia3_combined(stacks, weights)
    elif set(kinds.values()) == {"lora"}:
        parts = _lora_parts(stacks, weights)
        # a set's rank as peft counts it: its largest (its r, or a larger per-module one)
        ranks = {n: max(d.lora_A.shape[0] for d in s.applied[0].modules) for n, s in stacks.items()}
        rank = combined_rank(effective, ranks, svd_rank)
        first = stacks[next(iter(weights))].strategies[0]
        tensors = {
            layer: lora_factors(effective, layer_parts, rank, density, majority_sign_method, svd_clamp, generator)
            for layer, layer_parts in parts.items()
        }
        strategy = LoRA(r=rank, alpha=rank, dropout=first.dropout, target_modules=list(tensors))
    else:
        raise PeftConfigError(
            f"weights={dict(weights)!r} mixes LoRA and IA3 sets ({', '.join(f'{n}: {k}' for n, k in kinds.items())});"
            " combine sets of one kind"
        )
    root = next(iter(stacks.values())).model
    if name in state.stacks:  # replace=True (checked): the inputs are read, the old set can go
        unload(root, name)
    stack = apply_peft(root, [strategy], name=name)
    with torch.no_grad():
        for layer_name, delta in zip(stack.applied[0].targets, stack.applied[0].modules):
            for attr, value in zip(("lora_A", "lora_B") if isinstance(strategy, LoRA) else ("ia3_l",),
                                   tensors[layer_name]):
                getattr(delta, attr).copy_(value)
    return stack


# -- checks --------------------------------------------------------------------------------------------------------
def _check_weights(state: AdapterState, weights: object) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise PeftConfigError(
            f"weights={weights!r} is not valid; expected a non-empty mapping of set name -> weight, e.g. "
            f"{{'a': 0.7, 'b': 0.3}}; loaded sets: {preview(state.stacks)}"
        )
    unknown = [n for n in weights if n not in state.stacks]
    if unknown:
        raise AdapterStateError(
            f"weights names {preview(map(repr, unknown))}, which are not adapter sets of this model; loaded sets: "
            f"{preview(state.stacks)}"
        )
    out = {}
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise PeftConfigError(f"weights[{n!r}]={w!r} is not valid; expected a finite number (negative subtracts)")
        out[n] = float(w)
    return out


def _check_options(method: object, density: object, sign_method: object, svd_rank: object, svd_clamp: object,
                   generator: object) -> None:
    if method not in METHODS:
        raise PeftConfigError(f"method={method!r} is not valid; expected one of {', '.join(METHODS)}")
    if method in PRUNING:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise PeftConfigError(
                f"density={density!r} is not valid for method={method!r}; expected the fraction of entries to keep, "
                "a number in (0, 1]"
            )
    elif density is not None:
        raise PeftConfigError(
            f"density={density!r} is not used by method={method!r}; it applies to {', '.join(PRUNING)}"
        )
    if sign_method not in SIGN_METHODS:
        raise PeftConfigError(
            f"majority_sign_method={sign_method!r} is not valid; expected one of {', '.join(SIGN_METHODS)}"
        )
    if sign_method != "total" and method not in SIGNED:
        raise PeftConfigError(
            f"majority_sign_method={sign_method!r} is not used by method={method!r}; it applies to {', '.join(SIGNED)}"
        )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise PeftConfigError(f"svd_rank={svd_rank!r} is not valid; expected a positive integer or None")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise PeftConfigError(f"svd_clamp={svd_clamp!r} is not valid; expected a quantile in [0, 1] or None")
    if (svd_rank is not None or svd_clamp is not None) and method not in SVD:
        option = "svd_rank" if svd_rank is not None else "svd_clamp"
        raise PeftConfigError(f"{option} is not used by method={method!r}; it applies to {', '.join(SVD)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise PeftConfigError(f"generator={generator!r} is not valid; expected a torch.Generator or None")


def _check_new_name(state: AdapterState, name: object, replace: object) -> None:
    if not isinstance(replace, bool):
        raise PeftConfigError(f"replace={replace!r} is not valid; expected True or False")
    if not isinstance(name, str) or not name.isidentifier():
        raise PeftConfigError(f"name={name!r} is not valid; use a Python identifier such as 'combined'")
    if name in state.stacks and not replace:
        raise PeftConfigError(
            f"name={name!r} is already an adapter set of this model ({state.stacks[name].describe_short()}); "
            "choose another name, or pass replace=True to replace it"
        )


def _kind(stack: PeftStack) -> str:
    """``"lora"`` or ``"ia3"`` for a set arithmetic can combine; otherwise the refusal, naming the set."""
    strategies = stack.strategies
    if stack.unfreeze:
        raise PeftConfigError(
            f"set {stack.name!r} trains modules in place (unfreeze={stack.unfreeze!r}), which a combined set cannot "
            "hold; combine sets that hold one LoRA (or one IA3) strategy only"
        )
    if len(strategies) == 1 and type(strategies[0]) is LoRA:
        lora = strategies[0]
        if lora.use_dora:
            raise PeftConfigError(
                f"set {stack.name!r} holds LoRA(use_dora=True): DoRA's magnitudes have no weighted combination "
                "(peft's add_weighted_adapter keeps the new set's magnitude from the base weights, silently wrong); "
                "combine plain LoRA sets"
            )
        if lora.gate:
            raise PeftConfigError(
                f"set {stack.name!r} holds LoRA(gate=True): a gated update depends on the input (sigmoid(W x + b) "
                "per token), so it has no weighted combination of factors; combine plain LoRA sets"
            )
        return "lora"
    if len(strategies) == 1 and type(strategies[0]) is IA3:
        return "ia3"
    what = ", ".join(s.variant_name() if hasattr(s, "variant_name") else type(s).__name__ for s in strategies)
    raise PeftConfigError(
        f"set {stack.name!r} holds [{what}]: adapter arithmetic combines sets of one plain LoRA strategy (rsLoRA "
        "allowed), or sets of one IA3 strategy, as peft's add_weighted_adapter (AdaLoRA, prompt and other sets "
        "have none)"
    )


# -- the inputs, layer by layer ----------------------------------------------------------------------------------
def _per_layer(stacks: dict[str, PeftStack]) -> tuple[dict[str, dict[str, nn.Module]], nn.Module, list[str]]:
    """Per set, layer name -> its delta; the model; and every layer some set adapts, in module order (the order
    ``peft`` visits them in)."""
    per_set = {n: dict(zip(s.applied[0].targets, s.applied[0].modules)) for n, s in stacks.items()}
    root = next(iter(stacks.values())).model
    wanted = {layer for deltas in per_set.values() for layer in deltas}
    return per_set, root, [n for n, m in root.named_modules() if isinstance(m, AdaptedLayer) and n in wanted]


def _lora_parts(stacks: dict[str, PeftStack], weights: dict[str, float]) -> dict[str, list[LoRAPart]]:
    """Layer name -> the weighted LoRA deltas of the sets that adapt it, in the order of ``weights``."""
    per_set, root, layers = _per_layer(stacks)
    for n, deltas in per_set.items():
        grouped = next((layer for layer, d in deltas.items() if isinstance(d, LoRAConvDelta) and d.groups > 1),
                       None)
        if grouped is not None:
            raise PeftConfigError(
                f"set {n!r} has LoRA on the grouped conv {grouped!r}, whose factors have no combined form; leave it "
                "out of the sets to combine"
            )
    return {
        layer: [LoRAPart(weights[n], per_set[n][layer], root.get_submodule(layer).base_layer)
                for n in weights if layer in per_set[n]]
        for layer in layers
    }


def _ia3_combined(stacks: dict[str, PeftStack], weights: dict[str, float]) -> tuple[IA3, dict[str, tuple[Tensor]]]:
    """peft's IA3 combination: per layer, ``sum_i w_i l_i`` over the sets that scale it (from zero)."""
    per_set, _, layers = _per_layer(stacks)
    tensors: dict[str, tuple[Tensor]] = {}
    feedforward = []
    for layer in layers:
        present = [(n, per_set[n][layer]) for n in weights if layer in per_set[n]]
        kinds = {n: d.feedforward for n, d in present}
        if len(set(kinds.values())) > 1:
            raise PeftConfigError(
                f"layer {layer!r} is a feed-forward module (input scaled) in sets "
                f"{[n for n, f in kinds.items() if f]} but not in {[n for n, f in kinds.items() if not f]}; "
                "their scaling vectors cannot be added"
            )
        total = torch.zeros_like(present[0][1].ia3_l.detach())
        for n, delta in present:
            total += delta.ia3_l.detach() * weights[n]
        tensors[layer] = (total,)
        if present[0][1].feedforward:
            feedforward.append(layer)
    return IA3(target_modules=list(tensors), feedforward_modules=feedforward or None), tensors


__all__ = ["METHODS", "PRUNING", "SIGNED", "SVD", "combine_adapter_sets"]
