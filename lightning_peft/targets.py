"""Which modules of a model a strategy adapts: PEFT's matching rules, written once for every strategy."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_peft.errors import PeftConfigError, preview

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("score", "classifier")

try:  # GPT-2 style layers: a linear with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    Conv1D = None  # type: ignore[assignment,misc]


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def conv1d_class(module: nn.Module) -> type[nn.Module] | None:
    """The GPT-2 ``Conv1D`` class ``module`` is, or was before bitsandbytes replaced it; else ``None``.

    ``Conv1D`` stores its weight (in, out), transposed against ``nn.Linear``. A bitsandbytes layer quantized
    from one holds the weight (out, in) and keeps the original class in ``source_cls`` (set by
    :func:`~lightning_peft.quantization.quantized_linear`, and by transformers when it quantizes on load), so
    whatever writes the layer back as a full-precision checkpoint must transpose it again.
    """
    if is_conv1d(module):
        return type(module)
    source = getattr(module, "source_cls", None)
    if Conv1D is not None and isinstance(source, type) and issubclass(source, Conv1D):
        return source
    return None


def is_linear(module: nn.Module) -> bool:
    """A plain, bitsandbytes (subclasses of nn.Linear) or GPT-2 Conv1D linear layer."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable linear by qualified name; an already adapted layer counts once, under its own name."""
    from lightning_peft.layers import AdaptedLinear

    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, AdaptedLinear):
            found[name] = module
            inside.append(name + ".")
        elif is_linear(module):
            found[name] = module
    return found


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
) -> list[str]:
    """Qualified names of the linear layers a strategy adapts; an error lists the linears that exist when none match."""
    linears = linear_modules(model)
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
        names = [n for n in linears if name_matches(n, target_modules)]
        if not names:
            others = [n for n, _ in model.named_modules() if n and name_matches(n, target_modules)]
            hint = f" (it matched non-linear modules: {preview(others, 4)})" if others else ""
            raise PeftConfigError(
                f"{argument}={target_modules!r} matched no linear layer of {type(model).__name__}{hint}; "
                f"linear layers include: {preview(linears)}"
            )
    if exclude_modules:
        check_patterns(exclude_modules, "exclude_modules")
        names = [n for n in names if not name_matches(n, exclude_modules)]
    names = [n for n in names if n not in skip]
    if not names:
        raise PeftConfigError(
            f"{argument}={target_modules!r} with exclude_modules={exclude_modules!r} leaves no layer to adapt "
            f"in {type(model).__name__}"
        )
    return names


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
