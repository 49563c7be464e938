"""One adapted layer over any base linear, holding any number of deltas from any number of strategies.

The rule, written once for every layer-level strategy (see DESIGN.md)::

    y = base(x * s_in) * s_out + sum_i delta_i(dropout_i(x))

``s_in`` / ``s_out`` come from scaling deltas (IA3), the sum from additive deltas (LoRA, AdaLoRA). The base
layer can be ``nn.Linear``, GPT-2's ``Conv1D`` or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``; it is
held once, frozen, and never wrapped twice.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.targets import is_conv1d


class AdapterState:
    """Per-model bookkeeping shared by every adapted component: which adapter set is active, and the stacks."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.stacks: dict[str, Any] = {}


STATE_ATTR = "_lightning_peft_state"


def get_state(model: nn.Module, create: bool = False) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = AdapterState()
        model.__dict__[STATE_ATTR] = state
    return state


class _DropoutCache(threading.local):
    x: Tensor | None = None
    p: float = 0.0
    version: int = -1
    out: Tensor | None = None


_DROPOUT = _DropoutCache()


class _BitsDropout(torch.autograd.Function):
    """Inverted dropout from 16 random bits per element (CPU): about 3x cheaper than ``F.dropout`` there.

    The keep mask is ``bits >= round(p * 2**16) - 2**15`` on uniform int16 words drawn 4 per int64 from
    torch's generator (so ``torch.manual_seed`` governs it), i.e. an element is dropped with probability
    ``round(p * 65536) / 65536`` (|error| <= 7.7e-6; exact for p = 0.05 up to 3e-6). Only the bool mask is
    saved for backward, as in ``F.dropout``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= (round(p * 65536) - 32768)
        scale = 1.0 / (1.0 - round(p * 65536) / 65536)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype) * scale if x.dtype != torch.float32 else (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x: Tensor, p: float) -> Tensor:
    """Training-mode inverted dropout: the random-bits kernel on the CPU, ``F.dropout`` elsewhere."""
    if x.device.type == "cpu" and x.is_floating_point():
        return _BitsDropout.apply(x, p)
    return F.dropout(x, p, True)


def shared_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout whose mask is shared by every delta that reads the same input tensor in one forward pass.

    q/k/v projections (and any layers fed the same hidden states) see one mask, drawn once, instead of one
    full-size copy per layer as in PEFT. Each delta still sees standard inverted dropout with rate ``p``;
    only the masks of sibling layers are correlated, as they are when LoRA is applied to a fused qkv layer.
    """
    if p <= 0.0 or not training:
        return x
    cache = _DROPOUT
    try:
        version = x._version
    except RuntimeError:  # inference tensors have no version counter
        return dropout(x, p)
    if cache.x is x and cache.p == p and cache.version == version:
        return cache.out  # type: ignore[return-value]
    out = dropout(x, p)
    cache.x, cache.p, cache.version, cache.out = x, p, version, out
    return out


def clear_dropout_cache() -> None:
    _DROPOUT.x = _DROPOUT.out = None


class Delta(nn.Module):
    """One strategy's contribution to one :class:`AdaptedLinear` for one adapter set.

    ``kind`` is ``"additive"`` (``forward(x)`` returns a term added to the output, ``delta_weight()`` the
    equivalent (out, in) matrix) or ``"scale"`` (``input_scale()`` / ``output_scale()`` return vectors that
    multiply the base layer's input or output).
    """

    kind: ClassVar[str] = "additive"
    dropout: float = 0.0

    def delta_weight(self) -> Tensor:
        raise NotImplementedError

    def input_scale(self) -> Tensor | None:
        return None

    def output_scale(self) -> Tensor | None:
        return None


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base linear."""
    if is_conv1d(base):
        return base.nx, base.nf
    return base.in_features, base.out_features


def base_weight(base: nn.Module) -> Tensor:
    """The base weight as a float (out, in) matrix, dequantizing bitsandbytes layers."""
    weight = base.weight
    if is_conv1d(base):
        return weight.detach().t()
    if type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    if type(weight).__name__ == "Int8Params":
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = base.state.SCB
        return weight.data.to(torch.float32) * scb.to(torch.float32).view(-1, 1) / 127.0
    return weight.detach()


def is_quantized(base: nn.Module) -> bool:
    return type(base.weight).__name__ in ("Params4bit", "Int8Params")


class AdaptedLinear(nn.Module):
    """A frozen base linear plus named deltas grouped by adapter set (``adapters[set][strategy]``).

    Example:
        >>> layer = AdaptedLinear(nn.Linear(4, 3), AdapterState())
    """

    def __init__(self, base_layer: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
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
        active = self._state.active
        if active is None or active in self.merged or active not in self.adapters:
            return self.base_layer(x, *args, **kwargs)
        deltas = self.adapters[active].values()
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
        for d in additive:
            y = y + d(shared_dropout(x, d.dropout, self.training)).to(y.dtype)
        return y

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

    def _delta_sum(self, set_name: str) -> Tensor | None:
        total = None
        for d in self.deltas(set_name):
            if d.kind == "additive":
                w = d.delta_weight().detach().float()
                total = w if total is None else total + w
        return total

    def merged_weight(self, set_name: str) -> tuple[Tensor, Tensor | None]:
        """The (out, in) float32 weight and bias that reproduce base + deltas of ``set_name`` in one linear."""
        w = base_weight(self.base_layer).float().clone()
        b = self.bias.detach().float().clone() if self.bias is not None else None
        s_in, s_out = self._scales(set_name)
        if s_in is not None:
            w = w * s_in.view(1, -1)
        if s_out is not None:
            w = w * s_out.view(-1, 1)
            if b is not None:
                b = b * s_out
        dw = self._delta_sum(set_name)
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
            target.copy_((w.t() if is_conv1d(self.base_layer) else w).to(target.dtype))
            if b is not None:
                self.base_layer.bias.copy_(b.to(self.base_layer.bias.dtype))
        self.merged.add(set_name)

    def unmerge(self, set_name: str) -> None:
        if set_name not in self.merged:
            return
        w = base_weight(self.base_layer).float().clone()
        b = self.bias.detach().float().clone() if self.bias is not None else None
        dw = self._delta_sum(set_name)
        if dw is not None:
            w = w - dw
        s_in, s_out = self._scales(set_name)
        if s_out is not None:
            w = w / s_out.view(-1, 1)
            if b is not None:
                b = b / s_out
        if s_in is not None:
            w = w / s_in.view(1, -1)
        with torch.no_grad():
            target = self.base_layer.weight
            target.copy_((w.t() if is_conv1d(self.base_layer) else w).to(target.dtype))
            if b is not None:
                self.base_layer.bias.copy_(b.to(self.base_layer.bias.dtype))
        self.merged.discard(set_name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sets={list(self.adapters)}"


def adapt_linear(model: nn.Module, name: str, state: AdapterState) -> AdaptedLinear:
    """Replace the linear at ``name`` by an :class:`AdaptedLinear` (or return the one already there)."""
    from lightning_peft.targets import get_submodule_parent

    module = model.get_submodule(name)
    if isinstance(module, AdaptedLinear):
        return module
    parent, child = get_submodule_parent(model, name)
    layer = AdaptedLinear(module, state)
    layer.train(module.training)  # an adapted eval-mode model stays in eval mode (no adapter dropout)
    setattr(parent, child, layer)
    return layer


def restore_linear(model: nn.Module, name: str) -> None:
    """Put the base layer back when an :class:`AdaptedLinear` holds no delta and no hook (e.g. an Adapter's) any more."""
    from lightning_peft.targets import get_submodule_parent

    module = model.get_submodule(name)
    if (isinstance(module, AdaptedLinear) and len(module.adapters) == 0 and not module._forward_hooks
            and not module._forward_pre_hooks):
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, module.base_layer)
