"""One adapted layer over any supported base layer, holding any number of deltas from any number of strategies.

The rule, written once for every layer-level strategy::

    y = base(x * s_in) * s_out + sum_i delta_i(dropout_i(x))

``s_in`` / ``s_out`` come from scaling deltas (IA3), the sum from additive deltas (LoRA, AdaLoRA). A delta
that reads the base layer (DoRA, ``Delta.needs_base``) also gets the base output, to rescale it. The base
layer is any kind :mod:`~lightning_peft.core.backend` knows: a linear (``nn.Linear``, GPT-2's ``Conv1D`` or a
bitsandbytes ``Linear4bit`` / ``Linear8bitLt``), an ``nn.Embedding`` or a torch conv (``nn.Conv1d`` /
``nn.Conv2d`` / ``nn.Conv3d``); it is held once, frozen, and never wrapped twice. Which deltas a kind accepts
is the strategies' business (``LayerStrategy.base_kinds``): scaling deltas only sit on linears.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import (
    base_kind,
    base_shape,
    base_weight,
    get_submodule_parent,
    is_quantized,
    stored_weight,
)
from lightning_peft.core.state import BASE_LAYER, DELTAS, AdapterState
from lightning_peft.errors import PeftConfigError


class Delta(nn.Module):
    """One strategy's contribution to one :class:`AdaptedLayer` for one adapter set.

    ``kind`` is ``"additive"`` (``forward(x)`` returns a term added to the output, ``delta_weight()`` the
    equivalent weight: an (out, in) matrix for linears and embeddings, the conv's own (out, in / groups, *kernel)
    shape for convs) or ``"scale"`` (``input_scale()`` / ``output_scale()`` return vectors that
    multiply the base layer's input or output).

    An additive delta with ``needs_base = True`` (DoRA) depends on the base layer itself, not only on the
    input: the layer calls :meth:`add_to_base` instead of :meth:`add_to`, and merges through
    :meth:`delta_weight_on` / :meth:`base_weight_from`. A layer holds at most one such delta per adapter set,
    and none next to a scaling delta (the strategies refuse that combination when planning).
    """

    kind: ClassVar[str] = "additive"
    needs_base: ClassVar[bool] = False
    dropout: float = 0.0

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """``y`` plus this delta's contribution for the layer input ``x`` (deltas apply their own dropout,
        e.g. through :func:`project`); low-rank deltas override this to fuse the add into a matmul."""
        return y + self(x).to(y.dtype)

    def add_to_base(self, y: Tensor, x: Tensor, base: nn.Module, base_out: Tensor) -> Tensor:
        """``y`` plus this delta's contribution, for a delta that ``needs_base``: ``base`` is the base layer and
        ``base_out`` its output for ``x`` (bias included)."""
        raise NotImplementedError

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """``base(x)`` plus this delta as one fused computation when this delta is alone on its layer, or
        ``None`` (the default) to be composed as usual."""
        return None

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def delta_weight_on(self, weight: Tensor) -> Tensor:
        """What merging adds to the layer's float32 (out, in) base ``weight``: ``delta_weight()``, unless the
        delta ``needs_base`` (then a function of ``weight``)."""
        return self.delta_weight().detach().float()

    def base_weight_from(self, merged: Tensor) -> Tensor:
        """The inverse of :meth:`delta_weight_on` for ``unmerge``: the base weight ``w`` from
        ``w + delta_weight_on(w)``."""
        return merged - self.delta_weight().detach().float()

    def merge_refusal(self) -> str | None:
        """Why this delta cannot be folded into its base weight (e.g. a grouped conv), or ``None``."""
        return None

    def input_scale(self) -> Tensor | None:
        return None

    def output_scale(self) -> Tensor | None:
        return None

    def before_load(self, layer: AdaptedLinear, state_dict: dict[str, Any], prefix: str) -> None:
        """Called before ``state_dict`` (this delta's keys start with ``prefix``) is loaded into this delta, so a
        delta that changed its base layer (PiSSA's residual) can make the base agree with the loaded state."""


class AdaptedLayer(nn.Module):
    """A frozen base layer plus named deltas grouped by adapter set (``adapters[set][strategy]``).

    ``kind`` is the base's kind (``"linear"``, ``"embedding"`` or ``"conv"``, see
    :func:`~lightning_peft.core.backend.base_kind`); ``in_features`` / ``out_features`` its
    :func:`~lightning_peft.core.backend.base_shape`. ``AdaptedLinear`` is the same class (its former name).

    Example:
        >>> layer = AdaptedLayer(nn.Linear(4, 3), AdapterState())
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.kind = base_kind(base_layer)
        self.in_features, self.out_features = base_shape(base_layer)
        self.adapters = nn.ModuleDict()
        self._state = state
        self.merged: set[str] = set()

    # -- composition ---------------------------------------------------------------------------------------
    def add_delta(self, set_name: str, key: str, delta: Delta) -> None:
        if set_name not in self.adapters:
            self.adapters[set_name] = nn.ModuleDict().train(self.training)
        if key in self.adapters[set_name]:
            raise ValueError(f"adapter set {set_name!r} already has a {key!r} delta on this layer")
        if any((delta.needs_base and (d.needs_base or d.kind == "scale")) or (d.needs_base and delta.kind == "scale")
               for d in self.adapters[set_name].values()):  # a backstop: the strategies refuse this when planning
            raise ValueError(f"adapter set {set_name!r}: a delta that reads the base weight (DoRA) cannot share "
                             "this layer with another one or with a scaling delta")
        self.adapters[set_name][key] = delta

    def remove_deltas(self, set_name: str, key: str | None = None) -> None:
        if set_name not in self.adapters:
            return
        if key is None:
            del self.adapters[set_name]
        else:
            group = self.adapters[set_name]
            if key in group:
                del group[key]
            if len(group) == 0:
                del self.adapters[set_name]
        self.merged.discard(set_name)

    def deltas(self, set_name: str) -> list[Delta]:
        return list(self.adapters[set_name].values()) if set_name in self.adapters else []

    @property
    def weight(self) -> Tensor:  # code that inspects ``layer.weight`` (e.g. dtype checks) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._state.route is not None:  # a mixed-adapter batch: each row its own set (core/routing.py)
            return self._state.route.layer_forward(self, x, *args, **kwargs)
        active = self._state.active
        if active is None or active in self.merged or active not in self.adapters:
            return self.base_layer(x, *args, **kwargs)
        deltas = self.adapters[active].values()
        if len(deltas) == 1 and not args and not kwargs:
            fused = next(iter(deltas)).fused_forward(self.base_layer, x)
            if fused is not None:
                return fused
        x_base = x
        s_out = None
        additive = []
        for d in deltas:
            if d.kind == "scale":
                s_in = d.input_scale()
                if s_in is not None:
                    x_base = x_base * s_in.to(x_base.dtype)
                so = d.output_scale()
                if so is not None:
                    s_out = so if s_out is None else s_out * so
            else:
                additive.append(d)
        y = self.base_layer(x_base, *args, **kwargs)
        if s_out is not None:
            y = y * s_out.to(y.dtype)
        base_out = y
        for d in additive:
            y = d.add_to_base(y, x, self.base_layer, base_out) if d.needs_base else d.add_to(y, x)
        return y

    # -- loading -------------------------------------------------------------------------------------------
    def prepare_load(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Let each delta adjust the base before ``state_dict`` (this layer's keys start with ``prefix``) loads
        into it, unless the state dict brings the base layer itself (see :meth:`Delta.before_load`)."""
        if f"{prefix}{BASE_LAYER}.weight" in state_dict:  # one lookup: this runs for every layer of every load
            return
        for set_name, group in self.adapters.items():
            for key, delta in group.items():
                delta.before_load(self, state_dict, f"{prefix}{DELTAS}.{set_name}.{key}.")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.prepare_load(state_dict, prefix)  # nn.Module.load_state_dict: before the children load
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- merge ---------------------------------------------------------------------------------------------
    def _scales(self, set_name: str) -> tuple[Tensor | None, Tensor | None]:
        s_in = s_out = None
        for d in self.deltas(set_name):
            if d.kind != "scale":
                continue
            si, so = d.input_scale(), d.output_scale()
            if si is not None:
                s_in = si.detach().float() if s_in is None else s_in * si.detach().float()
            if so is not None:
                s_out = so.detach().float() if s_out is None else s_out * so.detach().float()
        return s_in, s_out

    def _delta_sum(self, set_name: str, weight: Tensor) -> Tensor | None:
        """The sum of the set's additive deltas on the (scaled) float32 base ``weight``, or ``None``."""
        total = None
        for d in self.deltas(set_name):
            if d.kind == "additive":
                w = d.delta_weight_on(weight)
                total = w if total is None else total + w
        return total

    def merge_refusal(self, set_name: str) -> str | None:
        """Why the deltas of ``set_name`` cannot be folded into this layer's weight, or ``None``."""
        return next((r for d in self.deltas(set_name) if (r := d.merge_refusal()) is not None), None)

    def merged_weight(self, set_name: str) -> tuple[Tensor, Tensor | None]:
        """The float32 weight (as :func:`~lightning_peft.core.backend.base_weight` gives it: (out, in), or a
        conv's shape) and bias that reproduce base + deltas of ``set_name`` in one layer of the base's kind."""
        reason = self.merge_refusal(set_name)
        if reason is not None:
            raise PeftConfigError(f"adapter set {set_name!r} cannot be merged: {reason}")
        w = base_weight(self.base_layer).float().clone()
        b = self.bias.detach().float().clone() if self.bias is not None else None
        s_in, s_out = self._scales(set_name)
        if s_in is not None:
            w = w * s_in.view(1, -1)
        if s_out is not None:
            w = w * s_out.view(-1, 1)
            if b is not None:
                b = b * s_out
        dw = self._delta_sum(set_name, w)
        if dw is not None:
            w = w + dw
        return w, b

    def merge(self, set_name: str) -> None:
        """Fold the set's deltas into a full-precision base weight in place (exactly reversible up to rounding)."""
        if set_name in self.merged or set_name not in self.adapters:
            return
        if is_quantized(self.base_layer):
            raise NotImplementedError(
                "merging into a quantized base layer in place is not supported; use PeftStack.merge() (it "
                "dequantizes, optionally requantize=True), lightning_peft.merge_and_export, or dequantize first"
            )
        w, b = self.merged_weight(set_name)
        with torch.no_grad():
            target = self.base_layer.weight
            target.copy_(stored_weight(self.base_layer, w).to(target.dtype))
            if b is not None:
                self.base_layer.bias.copy_(b.to(self.base_layer.bias.dtype))
        self.merged.add(set_name)

    def unmerge(self, set_name: str) -> None:
        if set_name not in self.merged:
            return
        w = base_weight(self.base_layer).float().clone()
        b = self.bias.detach().float().clone() if self.bias is not None else None
        # the deltas independent of the base first; then the one that reads it (DoRA) inverts its own part
        for d in sorted(self.deltas(set_name), key=lambda d: d.needs_base):
            if d.kind == "additive":
                w = d.base_weight_from(w)
        s_in, s_out = self._scales(set_name)
        if s_out is not None:
            w = w / s_out.view(-1, 1)
            if b is not None:
                b = b / s_out
        if s_in is not None:
            w = w / s_in.view(1, -1)
        with torch.no_grad():
            target = self.base_layer.weight
            target.copy_(stored_weight(self.base_layer, w).to(target.dtype))
            if b is not None:
                self.base_layer.bias.copy_(b.to(self.base_layer.bias.dtype))
        self.merged.discard(set_name)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, "
                f"sets={list(self.adapters)}")


#: the former name of :class:`AdaptedLayer` (from when only linears could be adapted), kept for compatibility
AdaptedLinear = AdaptedLayer


def merge_refusals(model: nn.Module, set_name: str) -> dict[str, str]:
    """Adapted layer name -> why the deltas of ``set_name`` on it cannot be folded into its weight.

    A delta can refuse (:meth:`Delta.merge_refusal`, e.g. LoRA on a grouped conv), and so does a layer whose
    base weight is tied to another module's (a word embedding and the LM head of GPT-2, T5, ...): folding a delta
    into it would change that module too, so the merged model would not compute what the adapted one does.
    """
    holders: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pname)
    refusals: dict[str, str] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, AdaptedLayer) or set_name not in layer.adapters or set_name in layer.merged:
            continue
        reason = layer.merge_refusal(set_name)
        own = f"{name}.base_layer.weight" if name else "base_layer.weight"
        tied = [n for n in holders.get(id(layer.base_layer.weight), []) if n != own]
        if reason is None and tied:
            reason = (f"its weight is tied to {tied[0]!r}: folding the adapters into it would change that module "
                      "too; export the adapters instead (save_adapters), or untie the weights before adapting")
        if reason is not None:
            refusals[name] = reason
    return refusals


def adapt_layer(model: nn.Module, name: str, state: AdapterState) -> AdaptedLayer:
    """Replace the layer at ``name`` by an :class:`AdaptedLayer` (or return the one already there)."""
    module = model.get_submodule(name)
    if isinstance(module, AdaptedLayer):
        return module
    if base_kind(module) is None:
        raise TypeError(f"{name!r} is a {type(module).__name__}, which no adapted layer can hold")
    parent, child = get_submodule_parent(model, name)
    layer = AdaptedLayer(module, state)
    layer.train(module.training)  # an adapted eval-mode model stays in eval mode (no adapter dropout)
    setattr(parent, child, layer)
    return layer


def restore_layer(model: nn.Module, name: str) -> None:
    """Put the base layer back when an :class:`AdaptedLayer` holds no delta and no hook (e.g. an Adapter's) any more."""
    module = model.get_submodule(name)
    if (isinstance(module, AdaptedLayer) and len(module.adapters) == 0 and not module._forward_hooks
            and not module._forward_pre_hooks):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, module.base_layer)


#: the former names of :func:`adapt_layer` / :func:`restore_layer`, kept for compatibility
adapt_linear = adapt_layer
restore_linear = restore_layer
