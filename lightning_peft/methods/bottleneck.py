"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A module-level strategy: after each chosen module, ``h + up(act(down(h)))``. The adapter is a forward hook on
the chosen module (on the :class:`~lightning_peft.core.layer.AdaptedLinear` when the module is a linear, so that
LoRA/IA3 on the same layer, merged or not, sit under the adapter whatever the order of the strategies). Each
adapter's weights live on the module it follows (``<module>.lightning_peft_adapter.<set>``) so they are in the
model's ``state_dict``; they are raw parameters, not ``nn.Linear``, so ``"all-linear"`` never adapts them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.backend import base_shape, is_linear
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


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(dropout(h))))`` with ``up`` starting at zero, so the model starts unchanged."""

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        nonlinearity: str,
        dropout: float,
        set_name: str,
        state: AdapterState,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.adapter_down = nn.Parameter(torch.empty(bottleneck, dim))
        self.adapter_down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.adapter_up = nn.Parameter(torch.zeros(dim, bottleneck))
        self.adapter_up_bias = nn.Parameter(torch.zeros(dim))
        nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))
        if not init_weights:  # non-zero up-projection: for tests that need an effect from step 0
            nn.init.kaiming_uniform_(self.adapter_up, a=math.sqrt(5))
        self.nonlinearity = nonlinearity
        self.dropout = dropout
        self.set_name = set_name
        self._state = state

    def adapt(self, h: Tensor) -> Tensor:
        x = F.dropout(h.to(self.adapter_down.dtype), self.dropout, self.training)
        z = ACTIVATIONS[self.nonlinearity](F.linear(x, self.adapter_down, self.adapter_down_bias))
        return h + F.linear(z, self.adapter_up, self.adapter_up_bias).to(h.dtype)

    def hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
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

    def extra_repr(self) -> str:
        b, d = self.adapter_down.shape
        return f"dim={d}, bottleneck={b}, nonlinearity={self.nonlinearity!r}"


@register_strategy
@dataclass
class Adapter(Strategy):
    """Bottleneck adapters after chosen modules: down-projection, nonlinearity, zero-initialized up-projection, residual.

    Args:
        bottleneck: width of the bottleneck (the paper sweeps 8 to 256, Section 3.1).
        target_modules: names, dotted suffixes or a regex of the modules to follow; ``None`` uses the
            paper's placement (attention output and feed-forward output of each block) for known model types.
        nonlinearity: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``.
        dropout: dropout on the adapter's input.
        dim: width of the targets' output when a target is not a linear layer; default: the model's
            ``hidden_size``.
        init_weights: ``True`` starts the up-projection at zero (identity); ``False`` draws it at random.

    Example:
        >>> Adapter(bottleneck=16, target_modules=["attention.output.dense", "output.dense"])
        Adapter(bottleneck=16, target_modules=['attention.output.dense', 'output.dense'], nonlinearity='relu', dropout=0.0, dim=None, init_weights=True)
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

    def _targets(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is not None:
            return self.target_modules
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise PeftConfigError(
                f"Adapter(target_modules=None) has no default for {type(model).__name__} (model_type="
                f"{model_type!r}); defaults exist for {sorted(DEFAULT_TARGETS)}; pass target_modules=[...]"
            )
        return DEFAULT_TARGETS[model_type]

    def plan(self, model: nn.Module, ctx: ApplyContext) -> list[tuple[str, int]]:
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
            planned.append((n, dim))
        return planned

    def apply(self, model: nn.Module, plan: list[tuple[str, int]], ctx: ApplyContext) -> Applied:
        applied = Applied(targets=[n for n, _ in plan], extra={"handles": [], "hosts": [], "wrapped": []})
        for name, dim in plan:
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
            )
            device = next((p.device for p in module.parameters()), None)
            if device is not None and device.type != "meta":
                adapter.to(device)
            container = module._modules.get(CONTAINER)
            if container is None:
                container = nn.ModuleDict()
                module.add_module(CONTAINER, container)
            container[ctx.set_name] = adapter
            applied.extra["handles"].append(module.register_forward_hook(adapter.hook))
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
