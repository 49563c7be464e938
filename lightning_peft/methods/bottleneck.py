"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"), sequential or
parallel and scaled (He et al. ICLR 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

A module-level strategy. ``placement="sequential"``: after each chosen module, ``h + s * up(act(down(h)))``.
``placement="parallel"``: beside each chosen sublayer, reading its input ``x``: ``M(x) + s * up(act(down(x)))``
(a forward hook that sees the input and the output). A post-LN BERT-style output block
(``BertSelfOutput`` / ``BertOutput``: ``forward(hidden_states, input_tensor)`` computes
``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``) is detected by its ``input_tensor`` parameter: its
sublayer's input is that residual, so the parallel adapter adds ``s * A(input_tensor)`` to the sum before the
LayerNorm, as He et al.'s and AdapterHub's parallel adapter (a forward pre-hook that replaces ``input_tensor`` by
``input_tensor + s * A(input_tensor)``). ``s`` is a fixed factor or one learned scalar per adapter (starting at
1.0); with ``gate=True`` the contribution is also multiplied by UniPELT's per-token gate
(:mod:`lightning_peft.core.gate`) of the adapter's input. The adapter is a forward hook on
the chosen module (on the :class:`~lightning_peft.core.layer.AdaptedLinear` when the module is a linear, so that
LoRA/IA3 on the same layer, merged or not, sit under the adapter whatever the order of the strategies). Each
adapter's weights live on the module it follows (``<module>.lightning_peft_adapter.<set>``) so they are in the
model's ``state_dict``; they are raw parameters, not ``nn.Linear``, so ``"all-linear"`` never adapts them.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.backend import base_shape, is_linear
from lightning_peft.core.gate import Gate
from lightning_peft.core.layer import AdaptedLinear, adapt_linear, restore_linear
from lightning_peft.core.state import ADAPTER_CONTAINER as CONTAINER
from lightning_peft.core.state import BASE_LAYER, DELTAS, PROMPT_HOST, AdapterState
from lightning_peft.core.targets import check_patterns, name_matches
from lightning_peft.errors import PeftConfigError, preview
from lightning_peft.methods.base import (
    Applied,
    ApplyContext,
    Level,
    Strategy,
    check_positive,
    check_probability,
    register_strategy,
)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
#: after the attention output projection and after the feed-forward output, per block (Section 2.1, Figure 2)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["attention.output.dense", "output.dense"],
    "roberta": ["attention.output.dense", "output.dense"],
    "llama": ["o_proj", "down_proj"],
    "mistral": ["o_proj", "down_proj"],
    "qwen2": ["o_proj", "down_proj"],
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "t5": ["SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo"],
}
#: beside the attention and feed-forward sublayers, per block (He et al., Section 3): for post-LN BERT the output
#: blocks that add the residual (``layer.N.attention.output``, ``layer.N.output``: an exact regex, since the
#: suffix ``output`` alone also names ``attention.output``), elsewhere the sublayers themselves
_BERT_OUTPUTS = r"(.*\.)?layer\.\d+\.(attention\.)?output"
PARALLEL_TARGETS: dict[str, list[str] | str] = {
    "bert": _BERT_OUTPUTS,
    "roberta": _BERT_OUTPUTS,
    "llama": ["self_attn", "mlp"],
    "mistral": ["self_attn", "mlp"],
    "qwen2": ["self_attn", "mlp"],
    "gpt2": ["attn", "mlp"],
    "t5": ["SelfAttention", "EncDecAttention", "DenseReluDense"],
}
PLACEMENTS = ("sequential", "parallel")
#: the parameter that marks a post-LN output block's residual input (BertSelfOutput, BertOutput, ...)
RESIDUAL_INPUT = "input_tensor"


class Site(NamedTuple):
    """One planned adapter: the module, the adapter's width, and how it attaches (``"sequential"``, ``"parallel"``
    reading the module's first input, or ``"residual"`` for a post-LN block's ``input_tensor``)."""

    name: str
    dim: int
    mode: str = "sequential"


def _input_position(module: nn.Module, name: str | None) -> tuple[int, str]:
    """(position, name) of ``module.forward``'s parameter ``name`` (default: its first one)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise PeftConfigError(f"{type(module).__name__}.forward takes no positional input a parallel adapter can read")
    names = [p.name for p in params]
    index = names.index(name) if name is not None else 0
    return index, names[index]


def _widths(module: nn.Module) -> tuple[int, int] | None:
    """(input, output) width of a module from its first and last linear layer, or ``None`` without linears."""
    if isinstance(module, AdaptedLinear):
        return module.in_features, module.out_features
    if is_linear(module):
        return base_shape(module)
    linears = [m for n, m in module.named_modules() if is_linear(m) and CONTAINER not in n.split(".")]
    if not linears:
        return None
    return base_shape(linears[0])[0], base_shape(linears[-1])[1]


class BottleneckAdapter(nn.Module):
    """``s * up(act(down(dropout(x))))`` (times ``gate(x)`` when gated), added to the module output (``h`` itself
    for a sequential adapter); ``up`` starts at zero, so the model starts unchanged.

    ``scaling`` is a number, or ``"learned"``: one trained scalar ``adapter_scale``, starting at 1.0 (as
    AdapterHub's ``scaling="learned"``). ``mode`` is ``"sequential"``, ``"parallel"`` (reads the module's input
    ``input_name``) or ``"residual"`` (rewrites a post-LN block's ``input_tensor`` before the module runs).
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        nonlinearity: str,
        dropout: float,
        set_name: str,
        state: AdapterState,
        init_weights: bool = True,
        scaling: float | str = 1.0,
        gate: bool = False,
        mode: str = "sequential",
    ) -> None:
        super().__init__()
        self.adapter_down = nn.Parameter(torch.empty(bottleneck, dim))
        self.adapter_down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.adapter_up = nn.Parameter(torch.zeros(dim, bottleneck))
        self.adapter_up_bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))
        if not init_weights:  # non-zero up-projection: for tests that need an effect from step 0
            nn.init.kaiming_uniform_(self.adapter_up, a=math.sqrt(5))
        self.scaling = scaling
        if scaling == "learned":  # one scalar per adapter, starting at 1.0 (AdapterHub: torch.ones(1))
            self.adapter_scale = nn.Parameter(torch.ones(1))
        self.gate = Gate(dim) if gate else None
        self.nonlinearity = nonlinearity
        self.dropout = dropout
        self.set_name = set_name
        self.mode = mode
        self.input_index, self.input_name = 0, None
        self._state = state

    def residual(self, x: Tensor) -> Tensor:
        """The adapter's contribution for its input ``x``, in the adapter's dtype."""
        h = F.dropout(x.to(self.adapter_down.dtype), self.dropout, self.training)
        z = ACTIVATIONS[self.nonlinearity](F.linear(h, self.adapter_down, self.adapter_down_bias))
        out = F.linear(z, self.adapter_up, self.adapter_up_bias)
        if self.scaling == "learned":
            out = out * self.adapter_scale
        elif self.scaling != 1.0:
            out = out * self.scaling
        if self.gate is not None:
            out = out * self.gate(x)
        return out

    def adapt(self, h: Tensor) -> Tensor:
        return h + self.residual(h).to(h.dtype)

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Sequential: a forward hook changing the module's output ``h`` to ``h + residual(h)``."""
        if self._state.route is not None:  # a mixed-adapter batch: this set's rows only
            return self._state.route.module_output(self.set_name, output, self.adapt)
        if self._state.active != self.set_name:
            return None
        if isinstance(output, Tensor):
            return self.adapt(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (self.adapt(output[0]), *output[1:])
        raise TypeError(
            f"Adapter cannot follow {type(module).__name__}: its output is {type(output).__name__}, "
            "not a tensor"
        )

    def _read_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        x = args[self.input_index] if len(args) > self.input_index else kwargs.get(self.input_name)
        if not isinstance(x, Tensor):
            raise TypeError(f"a parallel Adapter on {type(module).__name__} needs its input {self.input_name!r} "
                            f"as a tensor; got {type(x).__name__}")
        return x

    def parallel_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        """Parallel: a forward hook (with kwargs) changing the output ``y`` to ``y + residual(x)``, ``x`` the
        module's input (for a tuple output: its first element)."""
        route = self._state.route
        if route is None and self._state.active != self.set_name:
            return None
        x = self._read_input(module, args, kwargs)

        def add(y: Tensor, xr: Tensor) -> Tensor:
            return y + self.residual(xr).to(y.dtype)

        if route is not None:  # a mixed-adapter batch: this set's rows only
            return route.module_output(self.set_name, output, add, source=x)
        if isinstance(output, Tensor):
            return add(output, x)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (add(output[0], x), *output[1:])
        raise TypeError(
            f"a parallel Adapter cannot sit beside {type(module).__name__}: its output is {type(output).__name__}, "
            "not a tensor"
        )

    def residual_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Parallel on a post-LN output block: a forward pre-hook replacing its ``input_tensor`` ``r`` by
        ``r + residual(r)``, so the block computes ``LayerNorm(dropout(dense(h)) + r + residual(r))``."""
        route = self._state.route
        if route is None and self._state.active != self.set_name:
            return None
        r = self._read_input(module, args, kwargs)
        new = route.module_output(self.set_name, r, self.adapt) if route is not None else self.adapt(r)
        if new is None:
            return None
        if len(args) > self.input_index:
            args = (*args[: self.input_index], new, *args[self.input_index + 1:])
        else:
            kwargs = {**kwargs, self.input_name: new}
        return args, kwargs

    def attach(self, module: nn.Module) -> Any:
        """Register this adapter's hook on ``module``; the handle."""
        if self.mode == "sequential":
            return module.register_forward_hook(self.hook)
        self.input_index, self.input_name = _input_position(module, RESIDUAL_INPUT if self.mode == "residual" else None)
        if self.mode == "residual":
            return module.register_forward_pre_hook(self.residual_pre_hook, with_kwargs=True)
        return module.register_forward_hook(self.parallel_hook, with_kwargs=True)

    def extra_repr(self) -> str:
        b, d = self.adapter_down.shape
        extra = f", mode={self.mode!r}" if self.mode != "sequential" else ""
        if self.scaling != 1.0:
            extra += f", scaling={self.scaling!r}"
        return f"dim={d}, bottleneck={b}, nonlinearity={self.nonlinearity!r}{extra}"


@register_strategy
@dataclass
class Adapter(Strategy):
    """Bottleneck adapters after (or beside) chosen modules: down-projection, nonlinearity, zero-initialized
    up-projection, scaled, added to the module output.

    Args:
        bottleneck: width of the bottleneck (the paper sweeps 8 to 256, Section 3.1).
        target_modules: names, dotted suffixes or a regex of the modules to follow (or sit beside); ``None`` uses
            the papers' placement for known model types: sequential after the attention output and feed-forward
            output projections (Houlsby et al.), parallel beside the attention and feed-forward sublayers (He et
            al.; BERT/RoBERTa: the ``attention.output`` and ``output`` blocks, Llama/Mistral/Qwen2: ``self_attn``,
            ``mlp``, GPT-2: ``attn``, ``mlp``, T5: ``SelfAttention``, ``EncDecAttention``, ``DenseReluDense``).
        nonlinearity: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        dropout: dropout on the adapter's input.
        dim: width of the targets' output when a target is not a linear layer and has no linear inside; default:
            the model's ``hidden_size``.
        init_weights: ``True`` starts the up-projection at zero (identity); ``False`` draws it at random.
        placement: ``"sequential"``: ``h -> h + s * A(h)`` on the module output ``h``; ``"parallel"``: ``M(x) + s *
            A(x)`` with ``x`` the module's input (a post-LN block with an ``input_tensor`` argument, such as
            ``BertSelfOutput`` / ``BertOutput``, gets ``s * A(input_tensor)`` added before its LayerNorm). A parallel
            target must keep its width (its input and output widths, read from its first and last linear, agree).
        scaling: the factor ``s``: a positive number (He et al. use 4 for the parallel feed-forward adapter), or
            ``"learned"``: one trained scalar per adapter, starting at 1.0 (as AdapterHub's ``scaling="learned"``).
        gate: multiply the contribution by UniPELT's learned gate ``sigmoid(W x + b)`` of the adapter's input, per
            token (:mod:`lightning_peft.core.gate`); see :func:`~lightning_peft.methods.gate.Gated`.

    Example:
        >>> Adapter(bottleneck=16, target_modules=["attention.output.dense", "output.dense"])
        Adapter(bottleneck=16, target_modules=['attention.output.dense', 'output.dense'], nonlinearity='relu', dropout=0.0, dim=None, init_weights=True, placement='sequential', scaling=1.0, gate=False)
        >>> Adapter(bottleneck=16, placement="parallel", scaling=4.0)  # He et al.'s parallel adapter, defaults per model
        Adapter(bottleneck=16, target_modules=None, nonlinearity='relu', dropout=0.0, dim=None, init_weights=True, placement='parallel', scaling=4.0, gate=False)
    """

    name = "adapter"
    prefix = "adapter_"
    up_factors = ("adapter_up",)
    level = Level.MODULE
    mergeable = False

    bottleneck: int = 64
    target_modules: list[str] | str | None = None
    nonlinearity: str = "relu"
    dropout: float = 0.0
    dim: int | None = None
    init_weights: bool = True
    placement: str = "sequential"
    scaling: float | str = 1.0
    gate: bool = False

    def __post_init__(self) -> None:
        check_positive(self.bottleneck, "bottleneck")
        check_patterns(self.target_modules, "target_modules")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise PeftConfigError(
                "target_modules=[] is empty; name at least one module, or None for the default"
            )
        if self.nonlinearity not in ACTIVATIONS:
            raise PeftConfigError(
                f"nonlinearity={self.nonlinearity!r} is not valid; expected one of {sorted(ACTIVATIONS)}"
            )
        check_probability(self.dropout, "dropout")
        if self.dim is not None:
            check_positive(self.dim, "dim")
        if self.placement not in PLACEMENTS:
            raise PeftConfigError(
                f"placement={self.placement!r} is not valid; expected 'sequential' (after the module) or 'parallel' "
                "(beside it, reading its input)"
            )
        number = isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool)
        if not (self.scaling == "learned" or (number and math.isfinite(self.scaling) and self.scaling > 0)):
            raise PeftConfigError(
                f"scaling={self.scaling!r} is not valid; expected a positive number (e.g. 4.0) or 'learned'"
            )
        if number:
            self.scaling = float(self.scaling)
        if not isinstance(self.gate, bool):
            raise PeftConfigError(f"gate={self.gate!r} is not valid; expected True or False")

    def _targets(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is not None:
            return self.target_modules
        defaults = PARALLEL_TARGETS if self.placement == "parallel" else DEFAULT_TARGETS
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise PeftConfigError(
                f"Adapter(target_modules=None, placement={self.placement!r}) has no default for "
                f"{type(model).__name__} (model_type={model_type!r}); defaults exist for {sorted(defaults)}; pass "
                "target_modules=[...]"
            )
        return defaults[model_type]

    def plan(self, model: nn.Module, ctx: ApplyContext) -> list[Site]:
        spec = self._targets(model)
        skip = re.compile(
            rf"(^|\.)({CONTAINER}|{PROMPT_HOST})(\.|$)|\.{BASE_LAYER}(\.|$)|\.{DELTAS}(\.|$)"
        )
        names = [
            n
            for n, _ in model.named_modules()
            if n and not skip.search(n) and n not in ctx.skip_modules and name_matches(n, spec)
        ]
        if not names:
            candidates = [n for n, m in model.named_modules() if n and is_linear(m) and not skip.search(n)]
            raise PeftConfigError(
                f"target_modules={spec!r} matched no module of {type(model).__name__}; linear layers include: "
                f"{preview(candidates)}"
            )
        hidden = self.dim or next(
            (
                getattr(getattr(model, "config", None), k, None)
                for k in ("hidden_size", "d_model", "n_embd")
                if isinstance(getattr(getattr(model, "config", None), k, None), int)
            ),
            None,
        )
        planned = []
        for n in names:
            module = model.get_submodule(n)
            if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
                raise PeftConfigError(
                    f"target_modules matched {n!r}, a {type(module).__name__} container; an adapter cannot be "
                    "added to a container module; target a module inside it"
                )
            if self.placement == "parallel":
                planned.append(self._parallel_site(n, module, hidden, model))
                continue
            if isinstance(module, AdaptedLinear):
                dim = module.out_features
            elif is_linear(module):
                dim = base_shape(module)[1]
            elif hidden is not None:
                dim = hidden
            else:
                raise PeftConfigError(
                    f"target_modules matched {n!r} ({type(module).__name__}), which is not a linear layer, and "
                    f"{type(model).__name__} has no config.hidden_size; pass dim=<width of its output>"
                )
            planned.append(Site(n, dim))
        return planned

    def _parallel_site(self, n: str, module: nn.Module, hidden: int | None, model: nn.Module) -> Site:
        """Where and how a parallel adapter reads its input beside ``module``; refuses a width-changing target."""
        widths = _widths(module)
        forward = inspect.signature(module.forward).parameters
        if RESIDUAL_INPUT in forward and not is_linear(module) and not isinstance(module, AdaptedLinear):
            # a post-LN output block: the sublayer's input is the residual it adds before its LayerNorm
            dim = widths[1] if widths is not None else hidden
            mode = "residual"
        else:
            if widths is not None and widths[0] != widths[1]:
                raise PeftConfigError(
                    f"Adapter(placement='parallel') cannot sit beside {n!r} ({type(module).__name__}): its input "
                    f"width {widths[0]} differs from its output width {widths[1]}, and a parallel adapter adds a "
                    "function of the input to the output; target a sublayer that keeps the width (e.g. the whole "
                    "attention or feed-forward block)"
                )
            dim = widths[0] if widths is not None else hidden
            mode = "parallel"
            try:
                _input_position(module, None)
            except (PeftConfigError, ValueError, TypeError):
                raise PeftConfigError(
                    f"Adapter(placement='parallel') cannot read the input of {n!r} ({type(module).__name__}): its "
                    "forward takes no positional input"
                ) from None
        if dim is None:
            raise PeftConfigError(
                f"target_modules matched {n!r} ({type(module).__name__}), which has no linear layer, and "
                f"{type(model).__name__} has no config.hidden_size; pass dim=<width of its input and output>"
            )
        return Site(n, dim, mode)

    def apply(self, model: nn.Module, plan: list[Site], ctx: ApplyContext) -> Applied:
        applied = Applied(targets=[site.name for site in plan], extra={"handles": [], "hosts": [], "wrapped": []})
        for name, dim, mode in plan:
            module = model.get_submodule(name)
            # hook the AdaptedLinear so that deltas on this layer stay under the adapter
            if is_linear(module):
                module = adapt_linear(model, name, ctx.state)
                applied.extra["wrapped"].append(name)
            adapter = BottleneckAdapter(
                dim,
                self.bottleneck,
                self.nonlinearity,
                self.dropout,
                ctx.set_name,
                ctx.state,
                self.init_weights,
                self.scaling,
                self.gate,
                mode,
            )
            device = next((p.device for p in module.parameters()), None)
            if device is not None and device.type != "meta":
                adapter.to(device)
            container = module._modules.get(CONTAINER)
            if container is None:
                container = nn.ModuleDict()
                module.add_module(CONTAINER, container)
            container[ctx.set_name] = adapter
            applied.extra["handles"].append(adapter.attach(module))
            applied.extra["hosts"].append(module)
            applied.modules.append(adapter)
        return applied

    def remove(self, model: nn.Module, applied: Applied, ctx: ApplyContext) -> None:
        for handle in applied.extra.get("handles", []):
            handle.remove()
        for host in applied.extra.get("hosts", []):
            container = host._modules.get(CONTAINER)
            if container is not None and ctx.set_name in container:
                del container[ctx.set_name]
            if container is not None and len(container) == 0:
                del host._modules[CONTAINER]
        for name in applied.extra.get("wrapped", []):
            try:
                restore_linear(model, name)
            except AttributeError:
                continue
