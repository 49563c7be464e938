"""The composition: an ordered list of strategies applied to one model, and one handle back."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import float_dtype, is_quantized
from lightning_peft.core.layer import AdaptedLinear, merge_refusals
from lightning_peft.core.state import StackHandle, get_state
from lightning_peft.core.targets import resolve_unfreeze
from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.methods.base import (
    Applied,
    ApplyContext,
    Level,
    Strategy,
    check_layer_plans,
    strategy_from_config,
)
from lightning_peft.quantization.config import Quantization
from lightning_peft.quantization.convert import (
    detect_quantization,
    keep_standard_layout,
    plan_quantization,
    quantize_model,
)
from lightning_peft.quantization.memory import logical_numel, memory_report
from lightning_peft.quantization.merge import merge_quantized_layer, unmerge_quantized_layer
from lightning_peft.stack.mixed import install_router, uninstall_router
from lightning_peft.version import __version__

DEFAULT_SET = "default"
FORMAT_VERSION = 1


class PeftStack(StackHandle):
    """Handle on the strategies applied to a model by :func:`apply_peft`.

    Example:
        >>> stack = apply_peft(model, [LoRA(r=8, target_modules=["query", "value"])], unfreeze=["classifier"])
        >>> print(stack.summary())
    """

    def __init__(self, model: nn.Module, strategies: list[Strategy], unfreeze: list[str], name: str,
                 ctx: ApplyContext) -> None:
        self.model = model
        self.strategies = strategies
        self.unfreeze = unfreeze
        self.name = name
        self.ctx = ctx
        self.applied: list[Applied] = []
        self.unfrozen: list[Tensor] = []
        self.quantization: Quantization | None = None
        self._saved_requires_grad: dict[int, tuple[Tensor, bool]] = {}

    # -- ownership -----------------------------------------------------------------------------------------
    def owned_tensors(self) -> list[Tensor]:
        """Every parameter and buffer the stack owns: strategies' modules and parameters, plus unfrozen ones."""
        seen: dict[int, Tensor] = {}
        for applied in self.applied:
            for module in applied.modules:
                for t in [*module.parameters(), *module.buffers()]:
                    seen.setdefault(id(t), t)
            for t in applied.parameters:
                seen.setdefault(id(t), t)
        for t in self.unfrozen:
            seen.setdefault(id(t), t)
        return list(seen.values())

    def _owned_keys(self, root: nn.Module | None = None) -> dict[str, Tensor]:
        ids = {id(t) for t in self.owned_tensors()}
        root = self.model if root is None else root
        return {k: v for k, v in root.state_dict(keep_vars=True).items() if id(v) in ids}

    def named_trainable_parameters(self, root: nn.Module | None = None) -> list[tuple[str, nn.Parameter]]:
        root = self.model if root is None else root
        return [(n, p) for n, p in root.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def adapter_state_dict(self, root: nn.Module | None = None) -> dict[str, Tensor]:
        """What training changed: owned parameters and buffers, keyed as in ``root.state_dict()``."""
        return {k: v.detach() for k, v in self._owned_keys(root).items()}

    def adapter_keys(self, root: nn.Module | None = None) -> list[str]:
        return list(self._owned_keys(root))

    def check_adapter_state_dict(self, state_dict: dict[str, Any], root: nn.Module | None = None,
                                 strict: bool = True) -> None:
        """Raise :class:`AdapterStateError` listing missing, unexpected or misshapen adapter keys."""
        expected = self._owned_keys(root)
        missing = [k for k in expected if k not in state_dict]
        bad_shape = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
        ]
        problems = []
        if missing:
            problems.append(f"missing adapter keys: {preview(missing)}")
        if bad_shape:
            problems.append(f"wrong shapes: {preview(bad_shape, 6)}")
        if strict:
            root_keys = set((self.model if root is None else root).state_dict().keys())
            unexpected = [k for k in state_dict if k not in expected and k not in root_keys]
            if unexpected:
                problems.append(f"unexpected keys: {preview(unexpected)}")
        if problems:
            raise AdapterStateError(
                f"adapter state does not match the stack {self.describe_short()}: " + "; ".join(problems)
            )

    def load_adapter_state_dict(self, state_dict: dict[str, Tensor], root: nn.Module | None = None,
                                strict: bool = True) -> None:
        """Load adapter weights; missing, unexpected or misshapen keys raise :class:`AdapterStateError`."""
        self.check_adapter_state_dict(state_dict, root, strict=strict)
        expected = self._owned_keys(root)
        for layer_name, layer in (self.model if root is None else root).named_modules():
            if isinstance(layer, AdaptedLinear) and self.name in layer.adapters:
                layer.prepare_load(state_dict, layer_name + ".")  # e.g. PiSSA's residual base follows its A0, B0
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(state_dict[key].to(device=target.device, dtype=target.dtype))

    # -- switching and merging -------------------------------------------------------------------------------
    def adapted_layers(self) -> list[AdaptedLinear]:
        return [m for m in self.model.modules() if isinstance(m, AdaptedLinear) and self.name in m.adapters]

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside the block the model computes the base model's output; the active set comes back after.

        The same as :func:`lightning_peft.disable_adapters` on this stack's model: no adapter set is active, and
        tensors trained in place (``unfreeze`` modules such as a new head, selective strategies' parameters) hold
        the base model's values, as ``peft``'s ``disable_adapter()`` routes ``modules_to_save`` to the original
        modules. Raises :class:`~lightning_peft.errors.AdapterStateError` while a set is merged (``unmerge()``
        first).
        """
        from lightning_peft.stack.sets import disabled

        with disabled(self.ctx.state):
            yield

    def merge(self, requantize: bool = False) -> dict[str, float]:
        """Fold every mergeable delta into the base weights; the model's output is unchanged.

        A quantized (bitsandbytes) base is dequantized and the deltas added; the merged layer stays in full
        precision (an ``nn.Linear`` in the model's float dtype), or with ``requantize=True`` is quantized
        again with the same settings, which adds rounding error (see
        :func:`~lightning_peft.quantization.merge.merge_quantized_layer`). ``unmerge`` restores the quantized base.

        Returns:
            Per quantized layer name, the relative weight error re-quantization added (0.0 in full precision).
        """
        errors: dict[str, float] = {}
        names = {id(m): n for n, m in self.model.named_modules()}
        dtype = float_dtype(self.model)
        for name, reason in merge_refusals(self.model, self.name).items():  # refuse before anything is merged
            raise PeftConfigError(f"cannot merge adapter set {self.name!r}: {name!r}: {reason}")
        for layer in self.adapted_layers():
            if is_quantized(layer.base_layer):
                errors[names[id(layer)]] = merge_quantized_layer(layer, self.name, requantize, dtype)
            else:
                layer.merge(self.name)
        return errors

    def unmerge(self) -> None:
        for layer in self.adapted_layers():
            if not unmerge_quantized_layer(layer, self.name):
                layer.unmerge(self.name)

    @property
    def merged(self) -> bool:
        layers = self.adapted_layers()
        return bool(layers) and all(self.name in layer.merged for layer in layers)

    # -- description -----------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-serializable description from which :func:`apply_peft` rebuilds the same stack."""
        return {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "name": self.name,
            "strategies": [s.config() for s in self.strategies],
            "unfreeze": list(self.unfreeze),
            "quantization": self.quantization.config() if self.quantization is not None else None,
        }

    def describe_short(self) -> str:
        return f"{self.name!r} [{', '.join(s.name for s in self.strategies)}]"

    def summary_rows(self) -> dict[str, list[tuple[str, int, int]]]:
        """Trainable parameters per strategy and per adapted module type: (label, modules, parameters)."""
        by_strategy = []
        for strategy, applied in zip(self.strategies, self.applied):
            n = sum(t.numel() for m in applied.modules for t in m.parameters())
            n += sum(t.numel() for t in applied.parameters)
            by_strategy.append((strategy.name, len(applied.targets) or len(applied.modules), n))
        if self.unfrozen:
            by_strategy.append(("unfreeze", len(self.unfreeze), sum(t.numel() for t in self.unfrozen)))
        host: dict[int, str] = {}
        for layer in self.adapted_layers():
            for delta in layer.deltas(self.name):
                host[id(delta)] = type(layer.base_layer).__name__
        by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for module in self.model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            label = host.get(id(module), type(module).__name__)
            by_type[label][0] += 1
            by_type[label][1] += sum(p.numel() for p in own)
        return {"strategy": by_strategy, "module_type": [(k, v[0], v[1]) for k, v in sorted(by_type.items())]}

    def summary(self) -> str:
        """A table of trainable parameters per strategy and per module type against the model's total."""
        total = sum(logical_numel(p) for p in self.model.parameters())  # packed 4-bit: 2+ per element
        trainable = sum(p.numel() for p in self.trainable_parameters())
        rows = self.summary_rows()
        lines = [f"{'strategy':<22}{'modules':>9}{'trainable':>14}{'% of total':>12}"]
        for label, count, n in rows["strategy"]:
            lines.append(f"{label:<22}{count:>9}{n:>14,}{100 * n / max(total, 1):>11.3f}%")
        lines.append(f"{'module type':<22}{'modules':>9}{'trainable':>14}{'% of total':>12}")
        for label, count, n in rows["module_type"]:
            lines.append(f"{label:<22}{count:>9}{n:>14,}{100 * n / max(total, 1):>11.3f}%")
        lines.append(f"{'trainable / total':<22}{'':>9}{trainable:>14,}{100 * trainable / max(total, 1):>11.3f}%"
                     f"  of {total:,}")
        memory = memory_report(self.model)
        lines.append(f"{'weights':<22}{'':>9}{'parameters':>14}{'MiB':>12}{'bits/param':>12}")
        for label, (nbytes, n) in memory.items():
            if n:
                lines.append(f"{label:<22}{'':>9}{n:>14,}{nbytes / 2**20:>12.3f}{8 * nbytes / n:>12.3f}")
        return "\n".join(lines)

    # -- removal -------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Take the stack off the model, restoring the original layers and ``requires_grad`` flags."""
        self.unmerge()
        for strategy, applied in reversed(list(zip(self.strategies, self.applied))):
            strategy.remove(self.model, applied, self.ctx)
        self.applied = []
        for t, flag in self._saved_requires_grad.values():
            t.requires_grad_(flag)
        state = self.ctx.state
        state.stacks.pop(self.name, None)
        if state.active == self.name:
            state.active = None
        uninstall_router(state)  # with the last set gone, the adapter_names hooks go too

    def __repr__(self) -> str:
        return f"PeftStack({self.describe_short()} on {type(self.model).__name__})"


def apply_peft(
    model: nn.Module,
    strategies: Sequence[Strategy | dict[str, Any]],
    *,
    unfreeze: Sequence[str] | str | None = None,
    name: str = DEFAULT_SET,
    quantize: Quantization | None = None,
) -> PeftStack:
    """Apply ``strategies`` in order to ``model`` and freeze everything they do not own.

    After this, exactly the strategies' parameters plus the ``unfreeze`` modules require grad. If anything
    fails, the model is left as it was.

    Args:
        model: any ``torch.nn.Module`` (e.g. a Hugging Face model).
        strategies: strategy configs (or their ``config()`` dicts), applied in order.
        unfreeze: names (exact or dotted suffix) or a regex of modules or parameters to train fully, e.g. a new
            classification head.
        name: adapter set name; several sets can live on one model.
        quantize: quantize the backbone with bitsandbytes first (never the ``unfreeze`` modules nor the output
            head), then inject, so adapters stay unquantized. Quantization is not undone if a later step fails.

    Example:
        >>> stack = apply_peft(model, [LoRA(r=8, target_modules=["q_proj", "v_proj"])])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(strategies, (Strategy, dict)):
        strategies = [strategies]
    strategies = [strategy_from_config(s) for s in strategies]
    if not strategies and not unfreeze:
        raise PeftConfigError("strategies=[] and unfreeze=None: nothing would be trained; give at least one strategy")
    if not isinstance(name, str) or not name.isidentifier():
        raise PeftConfigError(f"name={name!r} is not valid; use a Python identifier such as 'default' or 'sentiment'")
    prefixes: dict[str, str] = {}
    for s in strategies:
        if s.prefix in prefixes:
            raise PeftConfigError(
                f"strategies {prefixes[s.prefix]!r} and {s.name!r} both claim the parameter prefix {s.prefix!r}; "
                "use one strategy of each kind per stack (combine their target_modules instead)"
            )
        prefixes[s.prefix] = s.name
    state = get_state(model, create=True)
    if name in state.stacks:
        raise PeftConfigError(
            f"{type(model).__name__} already has an adapter set named {name!r} "
            f"({state.stacks[name].describe_short()}); apply under another name=, or remove() that stack first"
        )

    if state.stacks:  # another adapter set is there: none may be merged into the base
        from lightning_peft.stack.sets import check_can_add_set

        check_can_add_set(state, name)
    unfreeze_names = resolve_unfreeze(model, unfreeze)
    to_quantize = plan_quantization(model, quantize, unfreeze_names) if quantize is not None else []
    ctx = ApplyContext(set_name=name, state=state, skip_modules=set(unfreeze_names),
                       quantization=quantize if to_quantize else None, to_quantize=set(to_quantize))
    plans = [s.plan(model, ctx) for s in strategies]  # validation only: nothing is modified yet
    check_layer_plans(strategies, plans)
    if to_quantize:  # quantize first, inject after: adapters are never quantized
        plans = _selective_plans_check(strategies, plans, set(to_quantize))
        for strategy, plan in zip(strategies, plans):  # e.g. LoftQ reads the weights before they are quantized
            strategy.before_quantization(model, plan, ctx)
        quantize_model(model, quantize, unfreeze_names)  # type: ignore[arg-type]
        # selective plans hold (name, tensor); quantization rebuilt those layers' parameters (e.g. biases)
        plans = [[(n, model.get_parameter(n)) for n, _ in p] if s.level is Level.SELECTIVE else p
                 for s, p in zip(strategies, plans)]
    keep_standard_layout(model)

    stack = PeftStack(model, strategies, unfreeze_names, name, ctx)
    stack.quantization = quantize or detect_quantization(model)
    for p in model.parameters():
        stack._saved_requires_grad[id(p)] = (p, p.requires_grad)
    try:
        for strategy, plan in zip(strategies, plans):
            applied = strategy.apply(model, plan, ctx)
            for module in applied.modules:  # new modules follow the model: an eval-mode model gets no dropout
                module.train(model.training)
            stack.applied.append(applied)
        for p in model.parameters():
            p.requires_grad_(False)
        for t in stack.owned_tensors():
            if isinstance(t, nn.Parameter) and t.is_floating_point():
                t.requires_grad_(True)
        for uname in unfreeze_names:
            target = _module_or_param(model, uname)
            params = list(target.parameters()) if isinstance(target, nn.Module) else [target]
            for p in params:
                if not p.is_floating_point():
                    raise PeftConfigError(f"unfreeze={uname!r} holds non-float (quantized) weights that cannot train")
                p.requires_grad_(True)
                stack.unfrozen.append(p)
    except BaseException:
        for strategy, applied in reversed(list(zip(strategies, stack.applied))):
            strategy.remove(model, applied, ctx)
        for t, flag in stack._saved_requires_grad.values():
            t.requires_grad_(flag)
        raise
    state.stacks[name] = stack
    from lightning_peft.stack.sets import adopt_new_set

    adopt_new_set(state, stack)  # the new set becomes active; in-place trained tensors start from the base
    install_router(model, state)  # model(..., adapter_names=[...]): a mixed-adapter batch (stack/mixed.py)
    return stack


def _selective_plans_check(strategies: list[Strategy], plans: list[Any], quantized: set[str]) -> list[Any]:
    """Refuse, before quantizing, selective strategies that would train weights ``quantize=`` makes 4/8-bit."""
    for strategy, plan in zip(strategies, plans):
        if strategy.level is not Level.SELECTIVE:
            continue
        hit = [n for n, _ in plan if n.endswith(".weight") and n[: -len(".weight")] in quantized]
        if hit:
            raise PeftConfigError(
                f"{type(strategy).__name__} selects weights that quantization turns into 4/8-bit tensors, which "
                f"cannot train: {preview(hit, 6)}; pass those modules in unfreeze= (never quantized) or narrow "
                "the strategy's selection"
            )
    return plans


def apply_kwargs(desc: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`apply_peft` recorded in a stack description (:meth:`PeftStack.describe`)
    beyond the strategies, ``unfreeze`` and ``name``."""
    extras: dict[str, Any] = {}
    if desc.get("quantization"):
        extras["quantize"] = Quantization(**desc["quantization"])
    return extras


def _module_or_param(model: nn.Module, name: str) -> nn.Module | nn.Parameter:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)


__all__ = ["DEFAULT_SET", "PeftStack", "apply_kwargs", "apply_peft"]
