"""Which modules of a model a strategy adapts, excludes or unfreezes: PEFT's matching rules, written once."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence

from torch import nn

from lightning_peft.core.backend import BaseKind, base_kind
from lightning_peft.core.layer import AdaptedLayer
from lightning_peft.core.state import ADAPTER_CONTAINER, PREFIX_HOST, PROMPT_HOST
from lightning_peft.errors import PeftConfigError, preview

ALL_LINEAR = "all-linear"
#: the containers strategies add modules in (their layers are not the model's); an adapted layer's own deltas are
#: skipped as part of the adapted layer
_CONTAINERS = re.compile(rf"(^|\.)({ADAPTER_CONTAINER}|{PROMPT_HOST}|{PREFIX_HOST})(\.|$)")
HEAD_NAMES = ("score", "classifier")

def adaptable_modules(model: nn.Module) -> dict[str, BaseKind]:
    """Every layer an adapted layer can hold (linears, embeddings, convs), by qualified name, with its kind; an
    already adapted layer counts once, under its own name, with its base's kind. Layers a strategy added (a prefix
    encoder's MLP, a bottleneck adapter's projections) are not the model's: left out."""
    found: dict[str, BaseKind] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside) or _CONTAINERS.search(name):
            continue
        if isinstance(module, AdaptedLayer):
            inside.append(name + ".")
            kind = module.kind
        else:
            kind = base_kind(module)
        if kind is not None:
            found[name] = kind
    return found


def _type_name(module: nn.Module) -> str:
    return type(module.base_layer if isinstance(module, AdaptedLayer) else module).__name__


def output_head_names(model: nn.Module) -> set[str]:
    """The output head(s) that ``"all-linear"`` leaves out, as PEFT does: the LM head, else the classifier."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    candidates = [out_emb] if out_emb is not None else [getattr(model, n, None) for n in HEAD_NAMES]
    for cand in candidates:
        if isinstance(cand, nn.Module):
            heads.update(name for name, m in model.named_modules() if m is cand)
            break
    return heads


def name_matches(name: str, patterns: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches exact names or dotted suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def check_patterns(value: object, argument: str) -> None:
    """Reject values that are neither a regex string nor a list of names, naming the argument."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise PeftConfigError(f"{argument}={value!r} is not a valid regular expression: {err}") from None
        return
    if not isinstance(value, Iterable) or not all(isinstance(v, str) and v for v in value):
        raise PeftConfigError(
            f"{argument}={value!r} is not valid; give a list of module names (exact or dotted suffix, "
            f"e.g. ['query', 'value']), a regular expression string, or '{ALL_LINEAR}'"
        )


def resolve_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    *,
    argument: str = "target_modules",
    skip: Iterable[str] = (),
    kinds: Collection[BaseKind] = ("linear",),
    who: str = "this strategy",
) -> list[str]:
    """Qualified names of the layers a strategy adapts; an error lists the linears that exist when none match.

    ``"all-linear"`` selects linears only, whatever ``kinds``. Named targets (names, suffixes, a regex) select
    the matching layers of the kinds the strategy supports (``kinds``, see
    :func:`~lightning_peft.core.backend.base_kind`); a matched layer of another adaptable kind (e.g. an
    embedding named for a strategy that adapts linears only) is refused, naming it, unless excluded.
    """
    adaptable = adaptable_modules(model)
    linears = [n for n, kind in adaptable.items() if kind == "linear"]
    skip = set(skip)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        names = [n for n in linears if n not in heads]
    else:
        if target_modules is None:  # check_patterns accepts None (an optional exclude); a target is required here
            raise PeftConfigError(f"{argument}=None is not valid; name the modules to adapt, e.g. ['query', "
                                  f"'value'], give a regular expression, or use '{ALL_LINEAR}'")
        check_patterns(target_modules, argument)
        if not isinstance(target_modules, str):
            target_modules = list(target_modules)
            if not target_modules:
                raise PeftConfigError(f"{argument}=[] is empty; name at least one module or use '{ALL_LINEAR}'")
        names = [n for n in adaptable if name_matches(n, target_modules)]
        if not names:
            others = [n for n, _ in model.named_modules() if n and name_matches(n, target_modules)]
            hint = f" (it matched non-linear modules: {preview(others, 4)})" if others else ""
            other_kinds = "/".join(k for k in kinds if k != "linear")
            also = f" (nor any {other_kinds} layer, which {who} adapts when named)" if other_kinds else ""
            raise PeftConfigError(
                f"{argument}={target_modules!r} matched no linear layer of {type(model).__name__}{hint}; "
                f"linear layers include: {preview(linears)}{also}"
            )
    if exclude_modules:
        check_patterns(exclude_modules, "exclude_modules")
        names = [n for n in names if not name_matches(n, exclude_modules)]
    names = [n for n in names if n not in skip]
    refused = [n for n in names if adaptable[n] not in kinds]
    if refused:
        found = ", ".join(f"{n!r} ({_type_name(model.get_submodule(n))})" for n in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise PeftConfigError(
            f"{argument}={target_modules!r} matches {found}{more}, which {who} cannot adapt: it adapts "
            f"{'/'.join(kinds)} layers only; name only those, or leave these out with exclude_modules"
        )
    if not names:
        raise PeftConfigError(
            f"{argument}={target_modules!r} with exclude_modules={exclude_modules!r} leaves no layer to adapt "
            f"in {type(model).__name__}"
        )
    return names


def resolve_unfreeze(
    model: nn.Module,
    unfreeze: Sequence[str] | str | None,
    argument: str = "unfreeze",
    *,
    parameters: bool = False,
    skip: re.Pattern[str] | None = None,
) -> list[str]:
    """Qualified names of the modules (or parameters) that ``unfreeze`` names; an error when one matches nothing.

    Each pattern (a list entry, or the whole regex string) matches module names first, else parameter names.
    By default the outermost matched names are returned (unfreezing ``"classifier"`` covers
    ``"classifier.dense"``); with ``parameters=True``, the names of the parameters under the matched modules
    (or matched by name), leaving out those ``skip`` finds (e.g. parameters another strategy added).
    """
    if not unfreeze:
        return []
    check_patterns(unfreeze, argument)
    patterns = [unfreeze] if isinstance(unfreeze, str) else list(unfreeze)
    modules = [n for n, _ in model.named_modules() if n]
    params = [n for n, _ in model.named_parameters() if skip is None or not skip.search(n)]
    found: list[str] = []
    for pattern in patterns:
        spec: str | list[str] = pattern if isinstance(unfreeze, str) else [pattern]
        hits = [n for n in modules if name_matches(n, spec)]
        if parameters:
            hits = [p for p in params if any(p.startswith(m + ".") for m in hits)]
        hits = hits or [n for n in params if name_matches(n, spec)]
        if not hits:
            tops = [n for n in modules if "." not in n]
            raise PeftConfigError(
                f"{argument}={pattern!r} matched no module or parameter of {type(model).__name__}; "
                f"top-level modules: {preview(tops)}"
            )
        found.extend(h for h in hits if h not in found)
    if parameters:
        return found
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
