"""The bottleneck adapter module and its hooks: sequential after a module, parallel beside it (reading its input),
or on a post-LN block's residual input (see :mod:`lightning_peft.methods.bottleneck`)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.backend import base_shape, is_linear
from lightning_peft.core.gate import Gate
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.core.state import ADAPTER_CONTAINER as CONTAINER
from lightning_peft.core.state import AdapterState
from lightning_peft.errors import PeftConfigError

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
#: the parameter that marks a post-LN output block's residual input (BertSelfOutput, BertOutput, ...)
RESIDUAL_INPUT = "input_tensor"


def input_position(module: nn.Module, name: str | None) -> tuple[int, str]:
    """(position, name) of ``module.forward``'s parameter ``name`` (default: its first one)."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise PeftConfigError(f"{type(module).__name__}.forward takes no positional input a parallel adapter can read")
    names = [p.name for p in params]
    index = names.index(name) if name is not None else 0
    return index, names[index]


def widths(module: nn.Module) -> tuple[int, int] | None:
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
        self.input_index, self.input_name = input_position(module, RESIDUAL_INPUT if self.mode == "residual" else None)
        if self.mode == "residual":
            return module.register_forward_pre_hook(self.residual_pre_hook, with_kwargs=True)
        return module.register_forward_hook(self.parallel_hook, with_kwargs=True)

    def extra_repr(self) -> str:
        b, d = self.adapter_down.shape
        extra = f", mode={self.mode!r}" if self.mode != "sequential" else ""
        if self.scaling != 1.0:
            extra += f", scaling={self.scaling!r}"
        return f"dim={d}, bottleneck={b}, nonlinearity={self.nonlinearity!r}{extra}"


__all__ = ["ACTIVATIONS", "RESIDUAL_INPUT", "BottleneckAdapter", "input_position", "widths"]
