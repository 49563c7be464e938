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
    version: int = -1
    p: float = 0.0
    dtype: torch.dtype | None = None
    out: Any = None


_DROPOUT = _DropoutCache()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


class _MaskInput(torch.autograd.Function):
    """``x * keep``: dropout without the ``1 / (1 - p)`` factor, which the low-rank branch folds into its
    scaling on the rank-``r`` side. Saves only the bool mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep, None


def shared_dropout(x: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """``x`` (cast to ``dtype``) times one keep mask, shared by every delta that reads this tensor in a forward.

    The opt-in memory saver behind ``LoRA(shared_dropout=True)``: q/k/v projections (any layers fed the same
    hidden states) see one mask, drawn once (``torch.rand`` on the input's device), and one masked copy of the
    input, instead of one per layer; autograd sums the siblings' gradients before the single masking step.
    The draws of sibling layers are then *not* independent. The result is not rescaled: multiply by
    ``1 / (1 - p)``. The cache is Python-side state keyed on the tensor and its version counter, so while
    ``torch.compile`` traces, each layer draws its own mask instead (:func:`project`).
    """
    cache = _DROPOUT
    try:
        version = x._version
    except RuntimeError:  # inference tensors have no version counter: nothing to share safely
        version = None
    if version is not None and cache.x is x and cache.version == version and cache.p == p and cache.dtype == dtype:
        return cache.out
    out = _MaskInput.apply(x.to(dtype), torch.rand(x.shape, device=x.device) >= p)
    if version is not None:
        cache.x, cache.version, cache.p, cache.dtype, cache.out = x, version, p, dtype, out
    return out


def project(
    x: Tensor, weight: Tensor, p: float, training: bool, scale: float = 1.0, shared: bool = False
) -> Tensor:
    """``dropout(x) @ weight.T * scale`` for a small ``weight`` (r, in): the first half of a low-rank branch.

    ``x`` is cast to ``weight``'s dtype (adapters keep their own precision over a bf16 or quantized base).
    Dropout is ``torch.nn.functional.dropout`` on the branch's input, drawn independently per layer and per
    forward: the same arithmetic and the same statistics as ``peft`` on every device and dtype, under autocast
    and under ``torch.compile``. With ``shared=True`` the layers that read one input tensor share one draw
    (:func:`shared_dropout`), and the ``1 / (1 - p)`` factor is applied on the rank-``r`` side.
    """
    if p <= 0.0 or not training:
        h = F.linear(x.to(weight.dtype), weight)
        return h * scale if scale != 1.0 else h
    if shared and not _compiling():
        return F.linear(shared_dropout(x, p, weight.dtype), weight) * (scale / (1.0 - p))
    h = F.linear(F.dropout(x.to(weight.dtype), p, True), weight)
    return h * scale if scale != 1.0 else h


class _LowRankLinear(torch.autograd.Function):
    """``x @ W.T + b + (x @ A.T * scale) @ B.T`` for a frozen plain linear ``W``, ``b`` in one node.

    The same arithmetic as the base layer plus a LoRA branch without dropout, with fewer full-size tensors:
    the low-rank product is added into the base output in place, and backward adds ``grad @ W`` into the
    branch's input gradient in place, instead of autograd allocating both input gradients and then their sum.
    Plain tensor ops only, so it serves every device and floating dtype, and ``torch.compile`` traces it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        h = (x2 @ a.t()).mul_(scale)
        out.addmm_(h, b.t())
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.scale, ctx.in_shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, a, b, h = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        g_h = (g2 @ b).mul_(ctx.scale)
        grad_b = g2.t() @ h if ctx.needs_input_grad[4] else None
        grad_a = g_h.t() @ x2 if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:  # the branch's input gradient plus the base layer's, added in place
            grad_x = (g_h @ a).addmm_(g2, weight).view(ctx.in_shape)
        return grad_x, None, None, grad_a, grad_b, None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def lowrank_linear(
    base: nn.Module, x: Tensor, a: Tensor, b: Tensor, p: float, training: bool, scale: float
) -> Tensor | None:
    """``base(x) + (x @ a.T * scale) @ b.T`` as one fused node, or ``None`` where that does not apply.

    It applies to an exact ``nn.Linear`` whose weight and bias are frozen and unhooked, with ``x``, the weight
    and the adapters in one floating dtype, outside autocast, and without active dropout. Otherwise the caller
    composes the usual way (:func:`project`).
    """
    if training and p > 0.0:
        return None
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return None
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if not (x.dtype == weight.dtype == a.dtype == b.dtype) or not x.is_floating_point():
        return None
    if x.device != weight.device or _autocast_on(x.device.type) or x.dim() < 2:
        return None
    return _LowRankLinear.apply(x, weight, bias, a, b, scale)


class Delta(nn.Module):
    """One strategy's contribution to one :class:`AdaptedLinear` for one adapter set.

    ``kind`` is ``"additive"`` (``forward(x)`` returns a term added to the output, ``delta_weight()`` the
    equivalent (out, in) matrix) or ``"scale"`` (``input_scale()`` / ``output_scale()`` return vectors that
    multiply the base layer's input or output).
    """

    kind: ClassVar[str] = "additive"
    dropout: float = 0.0

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """``y`` plus this delta's contribution for the layer input ``x`` (deltas apply their own dropout,
        e.g. through :func:`project`); low-rank deltas override this to fuse the add into a matmul."""
        return y + self(x).to(y.dtype)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        """``base(x)`` plus this delta as one fused computation when this delta is alone on its layer, or
        ``None`` (the default) to be composed as usual."""
        return None

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
        for d in additive:
            y = d.add_to(y, x)
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
