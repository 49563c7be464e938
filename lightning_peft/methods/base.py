"""The strategy protocol and registry.

A strategy is a small typed config (a dataclass) with a unique registered ``name`` and a unique parameter
``prefix``, plus the recipe that attaches it to a model. Applying happens in two phases so that a failure
never leaves a model half-adapted: :meth:`Strategy.plan` resolves and validates everything without touching
the model, then :meth:`Strategy.apply` mutates it and returns what the strategy owns.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_peft.core.backend import BaseKind
from lightning_peft.core.gate import GatedDelta, is_gated
from lightning_peft.core.layer import AdaptedLayer, Delta, adapt_layer, restore_layer
from lightning_peft.core.state import AdapterState
from lightning_peft.core.targets import resolve_targets
from lightning_peft.errors import PeftConfigError, preview
from lightning_peft.methods.peft_protocol import (
    LowRankFactors,
    PrefixTable,
    ScalingVector,
    register_peft_import,
)

_REGISTRY: dict[str, type[Strategy]] = {}


class Level(enum.Enum):
    """Where a strategy acts on a model; compared by identity (``strategy.level is Level.INPUT``)."""

    #: deltas on linear (and, for some strategies, embedding / conv) layers, composed inside an
    #: :class:`~lightning_peft.core.layer.AdaptedLayer`
    LAYER = "layer"
    #: modules inserted after (or beside) existing ones, e.g. bottleneck adapters
    MODULE = "module"
    #: virtual tokens in front of the input embeddings
    INPUT = "input"
    #: existing parameters unfrozen and trained in place
    SELECTIVE = "selective"


@dataclass
class ApplyContext:
    """What a strategy needs to know about the stack it is part of."""

    set_name: str
    state: AdapterState
    skip_modules: set[str] = field(default_factory=set)
    #: the quantization settings ``apply_peft`` applies after planning (a ``Quantization``), and the names of
    #: the layers it quantizes; empty when it quantizes nothing
    quantization: Any = None
    to_quantize: set[str] = field(default_factory=set)


@dataclass
class Applied:
    """The result of applying one strategy: owned modules / parameters and what :meth:`Strategy.remove` needs."""

    modules: list[nn.Module] = field(default_factory=list)
    parameters: list[Tensor] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Strategy:
    """Base class of every PEFT strategy; subclasses are dataclasses registered with :func:`register_strategy`."""

    name: ClassVar[str] = ""
    prefix: ClassVar[str] = ""
    #: where the strategy acts (see :class:`Level`)
    level: ClassVar[Level] = Level.LAYER
    #: whether :meth:`merge` can fold the strategy into the base weights
    mergeable: ClassVar[bool] = True
    #: the metric name under which a training loop logs :meth:`regularization`; ``None``: the strategy adds no
    #: term to the loss
    loss_term: ClassVar[str | None] = None
    #: names of the parameters that play B's role in a ``B A`` factorization (the factor that starts at zero and
    #: maps the small inner dimension back out); LoRA+ gives them a larger learning rate
    up_factors: ClassVar[tuple[str, ...]] = ()
    #: which part of ``peft``'s layout holds the strategy (:mod:`lightning_peft.methods.peft_protocol`:
    #: ``LOW_RANK_PART``, ``SCALING_PART``, ``PROMPT_PART``, ``PREFIX_PART``); ``None``: ``peft`` has no format for it
    peft_part: ClassVar[str | None] = None
    #: the ``peft_type`` values of ``adapter_config.json`` this class builds itself from (:meth:`from_peft`)
    peft_types: ClassVar[tuple[str, ...]] = ()
    #: the endings of ``peft``'s tensor keys this strategy reads per module (``"lora_A.weight"``); a key equal to
    #: one of them belongs to the model as a whole (module ``""``: a prompt's ``"prompt_embeddings"``)
    peft_suffixes: ClassVar[tuple[str, ...]] = ()

    # -- peft's layout, both directions (see :mod:`lightning_peft.methods.peft_protocol`) --------------------
    def peft_factors(self, delta: nn.Module) -> LowRankFactors | None:
        """Export (``peft_part == LOW_RANK_PART``): ``delta``'s update as ``(B * scale) @ A``; ``None`` if empty."""
        raise NotImplementedError(f"{type(self).__name__} has no low-rank form for peft's layout")

    def peft_scaling(self, delta: nn.Module) -> ScalingVector:
        """Export (``peft_part == SCALING_PART``): ``delta``'s scaling vector in ``peft``'s IA3 layout."""
        raise NotImplementedError(f"{type(self).__name__} has no scaling vector for peft's layout")

    def peft_prompt(self, provider: nn.Module) -> Tensor:
        """Export (``peft_part == PROMPT_PART``): the (num_virtual_tokens, dim) embeddings ``provider`` prepends."""
        raise NotImplementedError(f"{type(self).__name__} has no prompt embeddings for peft's layout")

    def peft_prefix(self, provider: nn.Module) -> PrefixTable:
        """Export (``peft_part == PREFIX_PART``): the key/value table ``provider`` holds, with its config fields."""
        raise NotImplementedError(f"{type(self).__name__} has no key/value prefix for peft's layout")

    def peft_config(self) -> dict[str, Any] | None:
        """Export: the ``adapter_config.json`` fields of a part holding only this strategy when its
        :meth:`peft_factors` are stored unchanged (plain LoRA: ``r``, ``lora_alpha``, patterns, ...); ``None``
        (default) folds each module's scale into ``B`` and writes ``lora_alpha = r``."""
        return None

    @classmethod
    def from_peft(cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], prefix: str = "") -> Strategy:
        """Import: the strategy a ``peft`` folder describes.

        Args:
            config: the folder's ``adapter_config.json``.
            tensors: the folder's tensors by module name (relative to the transformers model, as ``peft`` names
                them) and key ending (one of :attr:`peft_suffixes`).
            prefix: where that transformers model sits in the model the stack is applied to (``"model."`` inside a
                LightningModule); target names must carry it.

        Raises:
            PeftConfigError: naming the first option that changes the computation and is not supported.
        """
        raise NotImplementedError(f"{cls.__name__} does not import peft folders")

    def peft_state(self, module: str, base: nn.Module | None, tensors: dict[str, Tensor],
                   config: dict[str, Any]) -> dict[str, Tensor]:
        """Import: ``peft``'s tensors of ``module`` (keys: :attr:`peft_suffixes`) as the state dict of the delta
        (or prompt provider) this strategy puts there, checked against ``base`` (the module's base layer, or the
        input embedding for module ``""``); an :class:`~lightning_peft.errors.AdapterStateError` names the module
        and both shapes on a mismatch."""
        raise NotImplementedError(f"{type(self).__name__} does not import peft folders")

    def plan(self, model: nn.Module, ctx: ApplyContext) -> Any:
        """Resolve targets and check the config against ``model``; must not modify the model."""
        raise NotImplementedError

    @property
    def changes_base(self) -> bool:
        """Whether applying changes the frozen base weights (PiSSA, OLoRA, LoftQ); such a strategy reads the
        full-precision weights, so nothing may quantize the model before ``apply_peft`` does."""
        return False

    def before_quantization(self, model: nn.Module, plan: Any, ctx: ApplyContext) -> None:
        """Called once every strategy has planned, just before ``apply_peft`` quantizes ``ctx.to_quantize``: the
        last moment the full-precision weights of those layers can be read or changed (LoftQ, PiSSA)."""

    def apply(self, model: nn.Module, plan: Any, ctx: ApplyContext) -> Applied:
        raise NotImplementedError

    def remove(self, model: nn.Module, applied: Applied, ctx: ApplyContext) -> None:
        raise NotImplementedError

    def regularization(self, model: nn.Module) -> Tensor:
        """The term this strategy adds to the training loss of ``model`` (only called when ``loss_term`` is set)."""
        raise NotImplementedError(f"{type(self).__name__} adds no term to the loss (loss_term is None)")

    def config(self) -> dict[str, Any]:
        """JSON-serializable config, with the registered name under ``"name"``."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the registry; names and prefixes must be unique."""
    if not cls.name or not cls.prefix:
        raise TypeError(f"{cls.__name__} must define non-empty class attributes 'name' and 'prefix'")
    for other in _REGISTRY.values():
        if other is cls:
            return cls
        if other.name == cls.name:
            raise ValueError(f"strategy name {cls.name!r} of {cls.__name__} is already registered by {other.__name__}")
        if other.prefix == cls.prefix:
            raise ValueError(
                f"parameter prefix {cls.prefix!r} of {cls.__name__} is already used by {other.__name__}"
            )
    for peft_type in cls.peft_types:
        register_peft_import(peft_type, cls)
    _REGISTRY[cls.name] = cls
    return cls


def registered_strategies() -> dict[str, type[Strategy]]:
    return dict(_REGISTRY)


def strategy_from_config(config: dict[str, Any] | Strategy) -> Strategy:
    """Build a strategy from ``{"name": ..., **fields}``, as written by :meth:`Strategy.config`."""
    if isinstance(config, Strategy):
        return config
    if not isinstance(config, dict) or "name" not in config:
        raise PeftConfigError(f"strategy config {config!r} must be a dict with a 'name' key")
    kwargs = dict(config)
    name = kwargs.pop("name")
    if name not in _REGISTRY:
        raise PeftConfigError(f"unknown strategy name={name!r}; registered strategies: {preview(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise PeftConfigError(f"strategy {name!r} got unknown arguments {unknown}; valid arguments: {sorted(valid)}")
    return cls(**kwargs)


def check_layer_plans(strategies: list[Strategy], plans: list[Any]) -> None:
    """Refuse, before the model is touched, a weight-decomposed delta (DoRA) on a layer another strategy of the
    stack scales (IA3): DoRA rescales the base weight's rows to its learned norms, which the scaling would change."""
    decomposed: dict[str, Strategy] = {}
    scaled: dict[str, Strategy] = {}
    for strategy, plan in zip(strategies, plans):
        if isinstance(strategy, LayerStrategy) and strategy.delta_kind() in ("decomposed", "scale"):
            (decomposed if strategy.delta_kind() == "decomposed" else scaled).update(dict.fromkeys(plan, strategy))
    both = [name for name in decomposed if name in scaled]
    if both:
        d, s = decomposed[both[0]], scaled[both[0]]
        raise PeftConfigError(
            f"{type(d).__name__} with DoRA and {type(s).__name__} both adapt {preview(both)}: DoRA normalizes the "
            f"base weight, which {type(s).__name__}'s scaling changes, so they cannot share a layer; leave these "
            f"layers out of one of them (exclude_modules) or set use_dora=False"
        )


def check_positive(value: Any, argument: str, *, integer: bool = True, allow_zero: bool = False) -> None:
    """Raise :class:`PeftConfigError` naming ``argument`` unless ``value`` is a positive (or, with ``allow_zero``,
    non-negative) integer, or any real number when ``integer=False``; ``bool`` is never accepted."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise PeftConfigError(f"{argument}={value!r} is not valid; expected {what} {bound}")


def check_probability(value: Any, argument: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise PeftConfigError(f"{argument}={value!r} is not valid; expected a probability in [0, 1)")


@dataclass
class LayerStrategy(Strategy):
    """Shared recipe for strategies that add a :class:`~lightning_peft.core.layer.Delta` to chosen layers.

    ``base_kinds`` lists the kinds of base layer (:func:`~lightning_peft.core.backend.base_kind`) the strategy's
    deltas can sit on: linears only unless a strategy says more (LoRA also adapts named embeddings and convs).
    A named target of another kind is refused in :meth:`plan`, before the model is touched.

    A strategy whose config has ``gate=True`` (:class:`~lightning_peft.methods.gate.Gated`) gets each delta
    wrapped in a :class:`~lightning_peft.core.gate.GatedDelta`: ``y + sigmoid(W x + b) * delta(x)``.
    """

    base_kinds: ClassVar[tuple[BaseKind, ...]] = ("linear",)

    def target_spec(self) -> tuple[Any, Any]:
        """(target_modules, exclude_modules) as the user gave them."""
        return self.target_modules, getattr(self, "exclude_modules", None)  # type: ignore[attr-defined]

    def new_applied(self, plan: Any) -> Applied:
        """The record one application fills: its targets, and in ``extra`` any state its deltas share."""
        return Applied(targets=list(plan))

    def make_delta(self, layer: AdaptedLayer, name: str, applied: Applied) -> Delta:
        raise NotImplementedError

    def delta_kind(self) -> str:
        """What :meth:`make_delta` puts on each layer: ``"additive"``, ``"scale"`` (IA3), or ``"decomposed"`` (a
        delta that reads the base weight: DoRA); see :func:`check_layer_plans`."""
        return "additive"

    def plan(self, model: nn.Module, ctx: ApplyContext) -> list[str]:
        targets, exclude = self.target_spec()
        return resolve_targets(model, targets, exclude, skip=ctx.skip_modules, kinds=self.base_kinds,
                               who=self.variant_name())

    def variant_name(self) -> str:
        """How errors name this strategy (a variant names its option, e.g. ``LoRA(use_dora=True)``)."""
        return type(self).__name__

    def apply(self, model: nn.Module, plan: list[str], ctx: ApplyContext) -> Applied:
        applied = self.new_applied(plan)
        for name in applied.targets:
            layer = adapt_layer(model, name, ctx.state)
            base = layer.base_layer
            delta = self.make_delta(layer, name, applied)
            if is_gated(self):  # UniPELT's gate on the layer input, per token (lightning_peft.core.gate)
                delta = GatedDelta(delta, layer.in_features)
            device = next((p.device for p in base.parameters()), None)
            if device is not None and device.type != "meta":
                delta.to(device)
            layer.add_delta(ctx.set_name, self.name, delta)
            applied.modules.append(delta)
        return applied

    def remove(self, model: nn.Module, applied: Applied, ctx: ApplyContext) -> None:
        for name in applied.targets:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(layer, AdaptedLayer):
                layer.remove_deltas(ctx.set_name, self.name)
                restore_layer(model, name)
