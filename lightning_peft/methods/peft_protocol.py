"""How a strategy maps itself to Hugging Face ``peft``'s adapter layout, in both directions.

``peft`` stores every adapter as one ``adapter_config.json`` (with a ``peft_type``) plus ``adapter_model.safetensors``.
A strategy says which *part* of that layout holds it (:attr:`Strategy.peft_part
<lightning_peft.methods.base.Strategy.peft_part>`), and implements, in its own module:

- export: :meth:`~lightning_peft.methods.base.Strategy.peft_factors` (a low-rank part: ``A``, ``B`` and the scale,
  ``peft``'s LoRA form), :meth:`~lightning_peft.methods.base.Strategy.peft_scaling` (an IA3 part: the vector and
  whether it scales the input) or :meth:`~lightning_peft.methods.base.Strategy.peft_prompt` (a prompt part: the
  final virtual token embeddings), and :meth:`~lightning_peft.methods.base.Strategy.peft_config` when its factors
  are stored as ``peft`` itself stores them (then the part carries its ``r`` / ``lora_alpha`` / patterns);
- import: :meth:`~lightning_peft.methods.base.Strategy.from_peft` (a classmethod building the strategy from an
  ``adapter_config.json`` dict, refusing the options it cannot honour by name) and
  :meth:`~lightning_peft.methods.base.Strategy.peft_state` (``peft``'s tensors of one module as the strategy's own
  parameters, checked against the base layer's shape).

The ``peft_type`` values a class imports are its :attr:`~lightning_peft.methods.base.Strategy.peft_types`;
:func:`register_strategy <lightning_peft.methods.base.register_strategy>` records them here, and
:func:`register_peft_import` lets a user-registered strategy take one over. Nothing here imports ``peft``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_peft.errors import AdapterStateError, PeftConfigError, preview

#: the parts of ``peft``'s layout (also the subfolder names of a multi-part export)
LOW_RANK_PART = "lora"  # peft_type LORA: ``B A`` factors per module, one scale per module
SCALING_PART = "ia3"  # peft_type IA3: one scaling vector per module
PROMPT_PART = "prompt"  # peft_type PROMPT_TUNING: the virtual token embeddings
PREFIX_PART = "prefix"  # peft_type PREFIX_TUNING: the key/value prefixes of every attention layer, as one table
PARTS = (LOW_RANK_PART, SCALING_PART, PROMPT_PART, PREFIX_PART)

#: ``adapter_config.json`` keys that describe the folder rather than the computation, or that the importer handles
#: for every type (``modules_to_save``); ``fan_in_fan_out`` is ``peft``'s own per-layer setting, which it corrects
#: from the layer's type (GPT-2's ``Conv1D``), so a folder's value changes nothing
DESCRIPTIVE_KEYS = frozenset({
    "peft_type", "modules_to_save", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "auto_mapping", "megatron_core", "qalora_group_size", "runtime_config", "loftq_config", "fan_in_fan_out",
    "layers_pattern",
})

_IMPORTERS: dict[str, type] = {}


@dataclass
class LowRankFactors:
    """One delta's update as ``(B * scale) @ A``: A (k, in, ...) and B (out, k, ...), as ``peft``'s LoRA holds it."""

    A: Tensor
    B: Tensor
    scale: float
    #: the delta's own parameter names of A and B when they are stored unchanged (the export then points at them)
    names: tuple[str, str] | None = None


@dataclass
class ScalingVector:
    """One delta's IA3 vector in ``peft``'s layout: (1, in) scaling the input when ``feedforward``, else (out, 1)."""

    vector: Tensor
    feedforward: bool
    name: str | None = None


@dataclass
class PrefixTable:
    """One prefix's key/value table in ``peft``'s ``PREFIX_TUNING`` layout: ``(num_virtual_tokens, num_layers * 2 *
    token_dim)`` (a reparameterization MLP folded in) and the ``adapter_config.json`` fields describing it; or,
    with ``refusal``, why it has no such form."""

    table: Tensor | None
    config: dict[str, Any]
    refusal: str | None = None


def register_peft_import(peft_type: str, cls: type, *, replace: bool = False) -> None:
    """Make ``cls`` (a registered strategy) the importer of ``peft`` folders with this ``peft_type``.

    A type imported by another class is refused unless ``replace=True`` (e.g. a user strategy taking ``"LORA"``).
    """
    if not isinstance(peft_type, str) or not peft_type:
        raise PeftConfigError(f"peft_type={peft_type!r} is not valid; expected a non-empty string such as 'LORA'")
    other = _IMPORTERS.get(peft_type)
    if other is not None and other is not cls and not replace:
        raise PeftConfigError(
            f"peft_type={peft_type!r} is already imported by {other.__name__}; pass replace=True to import it with "
            f"{cls.__name__} instead"
        )
    _IMPORTERS[peft_type] = cls


def peft_importers() -> dict[str, type]:
    """``peft_type`` -> the strategy class that builds itself from such a folder."""
    return dict(_IMPORTERS)


def peft_importer(peft_type: Any) -> type:
    """The class importing ``peft_type``; a :class:`PeftConfigError` naming it and the supported ones if none."""
    if peft_type not in _IMPORTERS:
        raise PeftConfigError(
            f"peft_type={peft_type!r} is not supported for import; supported: {preview(sorted(_IMPORTERS))}"
        )
    return _IMPORTERS[peft_type]


def refuse_options(config: dict[str, Any], who: str, supported: Iterable[str],
                   allowed: dict[str, tuple[Any, ...]] | None = None) -> None:
    """Refuse, naming it, the first option of a ``peft`` config that changes the computation and is not honoured.

    ``supported`` options are read by the caller; ``allowed`` maps options to the only values accepted. Every
    other key must hold an empty value (``None``, ``False``, ``[]``, ``{}``, ``0``), except the descriptive ones
    (:data:`DESCRIPTIVE_KEYS`); so an option ``peft`` adds later is refused rather than silently ignored when set.
    """
    allowed = allowed or {}
    skip = set(supported) | DESCRIPTIVE_KEYS
    for key, value in config.items():
        if key in allowed:
            if value not in allowed[key]:
                raise PeftConfigError(
                    f"{who}: {key}={value!r} is not supported for import; supported values: "
                    f"{', '.join(repr(v) for v in allowed[key])}"
                )
        elif key not in skip and value not in (None, False, [], {}, 0, ""):
            raise PeftConfigError(
                f"{who}: option {key}={value!r} is not supported for import (lightning_peft has no equivalent, "
                "and ignoring it would change the model's outputs)"
            )


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """``peft``'s ``rank_pattern`` / ``alpha_pattern`` rule: the first key ``k`` with ``name`` matching
    ``(.*\\.)?k$`` gives the value, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_shape(module: str, what: str, tensor: Tensor, expected: tuple[int, ...]) -> None:
    """Raise :class:`AdapterStateError` naming ``module`` and both shapes unless ``tensor`` has ``expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise AdapterStateError(
            f"adapter tensors do not match the model: {what} of {module!r} has shape {tuple(tensor.shape)}, "
            f"the model needs {tuple(expected)}"
        )


def take(tensors: dict[str, Tensor], module: str, *keys: str) -> list[Tensor]:
    """``tensors[k]`` for each key, or an :class:`AdapterStateError` naming the missing one and ``module``."""
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise AdapterStateError(f"the peft folder has no {missing[0]!r} for module {module!r}; it is incomplete")
    return [tensors[k] for k in keys]


__all__ = [
    "LOW_RANK_PART",
    "PARTS",
    "PREFIX_PART",
    "PROMPT_PART",
    "PrefixTable",
    "SCALING_PART",
    "LowRankFactors",
    "ScalingVector",
    "check_shape",
    "pattern_value",
    "peft_importer",
    "peft_importers",
    "refuse_options",
    "register_peft_import",
    "take",
]
