"""Selective strategies: train chosen existing parameters of the model instead of adding new ones.

- :class:`BitFit` (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
  Masked Language-models"): every bias.
- :class:`LayerNormTuning` (Zhao et al. 2024, "Tuning LayerNorm in Attention"): the norm layers' gains and biases.
- :class:`Unfreeze`: whole modules or parameters by name or regex (e.g. a new classification head).

They own existing tensors (returned in ``Applied.parameters``, hence in the adapter state dict and checkpoints).
There is no delta to fold: ``merge()`` leaves them as they are. ``disable_adapters()`` (and switching to another
adapter set) swaps their values for the base model's (see :mod:`lightning_peft.stack.sets`). ``remove()``
restores the values saved when the strategy was applied (a CPU copy of the owned tensors, small for biases and
norms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lightning_peft.core.state import ADDED
from lightning_peft.core.targets import check_patterns, name_matches, resolve_unfreeze
from lightning_peft.errors import PeftConfigError, preview
from lightning_peft.methods.base import Applied, ApplyContext, Level, Strategy, register_strategy

_NORM_CLASS = re.compile(r"(LayerNorm|RMSNorm)$")


def _under(name: str, modules: list[str] | str | None, module_names: list[str]) -> bool:
    if modules is None:
        return True
    owners = [m for m in module_names if name.startswith(m + ".")]
    return any(name_matches(m, modules) for m in owners)


@dataclass
class SelectiveStrategy(Strategy):
    """Owns existing parameters chosen by :meth:`select`; see the module docstring for merge/remove semantics."""

    level: ClassVar[Level] = Level.SELECTIVE
    mergeable: ClassVar[bool] = False

    def select(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def plan(self, model: nn.Module, ctx: ApplyContext) -> list[tuple[str, nn.Parameter]]:
        names = self.select(model)
        params = dict(model.named_parameters())
        frozen_kind = [n for n in names if not params[n].is_floating_point()]
        if frozen_kind:
            raise PeftConfigError(
                f"{type(self).__name__} selected quantized (non-float) tensors that cannot train: "
                f"{preview(frozen_kind, 6)}; narrow its selection to full-precision modules"
            )
        # tensors, not names: strategies applied earlier in the stack may rename them (e.g. ``.base_layer.``)
        return [(n, params[n]) for n in names]

    def apply(self, model: nn.Module, plan: list[tuple[str, nn.Parameter]], ctx: ApplyContext) -> Applied:
        owned = [p for _, p in plan]
        originals = [p.detach().to("cpu", copy=True) for p in owned]
        return Applied(parameters=owned, targets=[n for n, _ in plan], extra={"originals": originals})

    def remove(self, model: nn.Module, applied: Applied, ctx: ApplyContext) -> None:
        with torch.no_grad():
            for p, original in zip(applied.parameters, applied.extra.get("originals", [])):
                p.copy_(original.to(device=p.device, dtype=p.dtype))


def _check_modules(value: object, argument: str) -> list[str] | str | None:
    check_patterns(value, argument)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list) and not value:
        raise PeftConfigError(
            f"{argument}=[] is empty; name at least one module, or None for the whole model"
        )
    return value  # type: ignore[return-value]


@register_strategy
@dataclass
class BitFit(SelectiveStrategy):
    """Train every bias of the model (optionally only under ``modules``).

    Args:
        modules: names, dotted suffixes or a regex of modules whose biases train; ``None`` for all.

    Example:
        >>> BitFit()
        BitFit(modules=None)
    """

    name = "bitfit"
    prefix = "bitfit_"

    modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.modules = _check_modules(self.modules, "modules")

    def select(self, model: nn.Module) -> list[str]:
        module_names = [n for n, _ in model.named_modules() if n]
        names = [
            n
            for n, _ in model.named_parameters()
            if n.rsplit(".", 1)[-1] == "bias"
            and not ADDED.search(n)
            and _under(n, self.modules, module_names)
        ]
        if not names:
            where = f" under modules={self.modules!r}" if self.modules is not None else ""
            raise PeftConfigError(
                f"BitFit found no bias parameter{where} in {type(model).__name__} (e.g. Llama and "
                "T5 have no biases); use LayerNormTuning or a layer-level strategy instead"
            )
        return names


@register_strategy
@dataclass
class LayerNormTuning(SelectiveStrategy):
    """Train the gains and biases of every LayerNorm / RMSNorm (optionally only under ``modules``).

    Args:
        modules: names, dotted suffixes or a regex of the norm modules (or their parents) to train; ``None`` for all.

    Example:
        >>> LayerNormTuning()
        LayerNormTuning(modules=None)
    """

    name = "layernorm"
    prefix = "layernorm_"

    modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.modules = _check_modules(self.modules, "modules")

    def select(self, model: nn.Module) -> list[str]:
        names = []
        for mname, module in model.named_modules():
            is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or _NORM_CLASS.search(
                type(module).__name__
            )
            if not is_norm or ADDED.search(mname + "."):
                continue
            if self.modules is not None and not (
                name_matches(mname, self.modules)
                or any(name_matches(mname[:i], self.modules) for i in range(len(mname)) if mname[i] == ".")
            ):
                continue
            names.extend(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
        if not names:
            where = f" under modules={self.modules!r}" if self.modules is not None else ""
            raise PeftConfigError(
                f"LayerNormTuning found no LayerNorm/RMSNorm parameters{where} in {type(model).__name__}"
            )
        return names


@register_strategy
@dataclass
class Unfreeze(SelectiveStrategy):
    """Train chosen modules or parameters fully, e.g. a freshly initialized classification head.

    Args:
        modules: names (exact or dotted suffix) or a regex of modules or parameters, e.g. ``["classifier"]``.

    Example:
        >>> Unfreeze(modules=["classifier"])
        Unfreeze(modules=['classifier'])
    """

    name = "unfreeze"
    prefix = "unfreeze_"

    modules: list[str] | str = ""

    def __post_init__(self) -> None:
        if not self.modules:
            raise PeftConfigError(
                f"modules={self.modules!r} is not valid; name the modules to train, e.g. "
                "Unfreeze(modules=['classifier'])"
            )
        self.modules = _check_modules(self.modules, "modules")  # type: ignore[assignment]

    def select(self, model: nn.Module) -> list[str]:
        return resolve_unfreeze(model, self.modules, "modules", parameters=True, skip=ADDED)
