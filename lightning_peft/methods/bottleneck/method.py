"""The ``Adapter`` strategy: its config, default placements per model type, planning and hooking (the module and
its hooks: :mod:`lightning_peft.methods.bottleneck.module`)."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from lightning_peft.core.backend import base_kind, base_shape, is_linear
from lightning_peft.core.layer import AdaptedLinear, adapt_linear, restore_linear
from lightning_peft.core.state import ADAPTER_CONTAINER as CONTAINER
from lightning_peft.core.state import BASE_LAYER, DELTAS, PROMPT_HOST
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
from lightning_peft.methods.bottleneck.module import (
    ACTIVATIONS,
    RESIDUAL_INPUT,
    BottleneckAdapter,
    input_position,
    widths,
)

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
#: ``sublayers="attention"`` / ``"ffn"``: the default sites of one kind only, per placement and model type, as regexes
#: over whole module names (``(attention, feed-forward)``)
_BERT_SEQ = (r"(.*\.)?attention\.output\.dense", r"(.*\.)?layer\.\d+\.output\.dense")
_BERT_PAR = (r"(.*\.)?layer\.\d+\.attention\.output", r"(.*\.)?layer\.\d+\.output")
_LLAMA_SEQ, _LLAMA_PAR = (r"(.*\.)?o_proj", r"(.*\.)?down_proj"), (r"(.*\.)?self_attn", r"(.*\.)?mlp")
SUBLAYER_SITES: dict[str, dict[str, tuple[str, str]]] = {
    "sequential": {"bert": _BERT_SEQ, "roberta": _BERT_SEQ, "llama": _LLAMA_SEQ, "mistral": _LLAMA_SEQ,
                   "qwen2": _LLAMA_SEQ, "gpt2": (r"(.*\.)?attn\.c_proj", r"(.*\.)?mlp\.c_proj"),
                   "t5": (r"(.*\.)?(SelfAttention|EncDecAttention)\.o", r"(.*\.)?DenseReluDense\.wo")},
    "parallel": {"bert": _BERT_PAR, "roberta": _BERT_PAR, "llama": _LLAMA_PAR, "mistral": _LLAMA_PAR,
                 "qwen2": _LLAMA_PAR, "gpt2": (r"(.*\.)?attn", r"(.*\.)?mlp"),
                 "t5": (r"(.*\.)?(SelfAttention|EncDecAttention)", r"(.*\.)?DenseReluDense")},
}
SUBLAYERS = ("both", "attention", "ffn")
class Site(NamedTuple):
    """One planned adapter: the module, the adapter's width, and how it attaches (``"sequential"``, ``"parallel"``
    reading the module's first input, or ``"residual"`` for a post-LN block's ``input_tensor``)."""

    name: str
    dim: int
    mode: str = "sequential"


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
        sublayers: with ``target_modules=None``, which default sites: ``"both"`` (attention and feed-forward),
            ``"attention"`` or ``"ffn"`` (the feed-forward only, as MAM's and UniPELT's adapters).
        gate: multiply the contribution by UniPELT's learned gate ``sigmoid(W x + b)`` of the adapter's input, per
            token (:mod:`lightning_peft.core.gate`); see :func:`~lightning_peft.methods.gate.Gated`.

    Example:
        >>> Adapter(bottleneck=16, target_modules=["attention.output.dense", "output.dense"])
        Adapter(bottleneck=16, target_modules=['attention.output.dense', 'output.dense'], nonlinearity='relu', dropout=0.0, dim=None, init_weights=True, placement='sequential', scaling=1.0, gate=False, sublayers='both')
        >>> Adapter(bottleneck=16, placement="parallel", scaling=4.0)  # He et al.'s parallel adapter, defaults per model
        Adapter(bottleneck=16, target_modules=None, nonlinearity='relu', dropout=0.0, dim=None, init_weights=True, placement='parallel', scaling=4.0, gate=False, sublayers='both')
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
    sublayers: str = "both"

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
        if self.sublayers not in SUBLAYERS:
            raise PeftConfigError(
                f"sublayers={self.sublayers!r} is not valid; expected one of {list(SUBLAYERS)}"
            )
        if self.sublayers != "both" and self.target_modules is not None:
            raise PeftConfigError(
                f"sublayers={self.sublayers!r} picks among the default sites, but target_modules="
                f"{self.target_modules!r} names the modules; pass one of them (or sublayers='both')"
            )

    def _targets(self, model: nn.Module) -> list[str] | str:
        if self.target_modules is not None:
            return self.target_modules
        defaults = PARALLEL_TARGETS if self.placement == "parallel" else DEFAULT_TARGETS
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if self.sublayers != "both" and model_type in defaults:
            return SUBLAYER_SITES[self.placement][model_type][SUBLAYERS.index(self.sublayers) - 1]
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
        kind = module.kind if isinstance(module, AdaptedLinear) else base_kind(module)
        if kind in ("embedding", "conv"):
            what = "token ids" if kind == "embedding" else "channels-first feature maps"
            raise PeftConfigError(
                f"Adapter(placement='parallel') cannot sit beside {n!r} ({type(module).__name__}): its input is "
                f"{what}, not hidden states of its output's width; target the attention or feed-forward blocks"
            )
        sizes = widths(module)
        forward = inspect.signature(module.forward).parameters
        if RESIDUAL_INPUT in forward and not is_linear(module) and not isinstance(module, AdaptedLinear):
            # a post-LN output block: the sublayer's input is the residual it adds before its LayerNorm
            dim = sizes[1] if sizes is not None else hidden
            mode = "residual"
        else:
            if sizes is not None and sizes[0] != sizes[1]:
                raise PeftConfigError(
                    f"Adapter(placement='parallel') cannot sit beside {n!r} ({type(module).__name__}): its input "
                    f"width {sizes[0]} differs from its output width {sizes[1]}, and a parallel adapter adds a "
                    "function of the input to the output; target a sublayer that keeps the width (e.g. the whole "
                    "attention or feed-forward block)"
                )
            dim = sizes[0] if sizes is not None else hidden
            mode = "parallel"
            try:
                input_position(module, None)
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


__all__ = ["DEFAULT_TARGETS", "PARALLEL_TARGETS", "PLACEMENTS", "SUBLAYERS", "SUBLAYER_SITES", "Adapter", "Site"]
