"""One adapted layer over any base linear, holding any number of deltas from any number of strategies.

The rule, written once for every layer-level strategy (see DESIGN.md)::

    y = base(x * s_in) * s_out + sum_i delta_i(dropout_i(x))

``s_in`` / ``s_out`` come from scaling deltas (IA3), the sum from additive deltas (LoRA, AdaLoRA). The base
layer can be ``nn.Linear``, GPT-2's ``Conv1D`` or a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``; it is
held once, frozen, and never wrapped twice.
"""

from __future__ import annotations

import math
import threading
import warnings
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

#: up to this rate, dropout on the CPU draws the dropped positions rather than a full-size mask
SPARSE_DROPOUT_MAX_P = 0.25


def keep_mask(x: Tensor, p: float) -> Tensor:
    """A boolean keep mask, each element kept with probability ``1 - p`` (the dense path).

    On the CPU it compares 16 random bits per element with a threshold, four 16-bit words per int64 drawn
    from torch's generator (``torch.manual_seed`` governs it): about 4x cheaper than ``F.dropout`` there. An
    element is then dropped with probability ``round(p * 65536) / 65536`` (:func:`drop_probability`; for
    p = 0.3 that is 0.300003).
    """
    if x.device.type == "cpu":
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
        return words.view(torch.int16)[: x.numel()].view(x.shape) >= (round(p * 65536) - 32768)
    return torch.rand(x.shape, device=x.device) >= p


def uses_sparse_dropout(p: float, device: torch.device) -> bool:
    return device.type == "cpu" and 0.0 < p <= SPARSE_DROPOUT_MAX_P


def drop_probability(p: float, device: torch.device) -> float:
    """The rate at which dropout in :func:`project` actually drops elements (see :func:`keep_mask`)."""
    if uses_sparse_dropout(p, device) or device.type != "cpu":
        return p
    return round(p * 65536) / 65536


def dropped_positions(numel: int, p: float, device: torch.device | None = None) -> Tensor:
    """Sorted flat positions in ``range(numel)``, each one present independently with probability ``p``.

    The gaps between successes of a Bernoulli(p) sequence are i.i.d. Geometric(p), so drawing about
    ``numel * p`` geometric gaps and summing them gives exactly the positions a full-size Bernoulli mask would
    drop, at ``p`` times the random draws and without a full-size mask (``torch.manual_seed`` governs it).
    """
    mean = numel * p
    count = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)
    scale = 1.0 / math.log1p(-p)

    def gaps() -> Tensor:  # Geometric(p) by inversion, from float64 uniforms: floor(log(1 - U) / log(1 - p)) + 1
        u = torch.rand(count, dtype=torch.float64, device=device)
        return u.neg_().log1p_().mul_(scale).floor_().to(torch.int64).add_(1)

    positions = gaps().cumsum_(0)
    while int(positions[-1]) <= numel:  # ran short of the end (probability ~1e-9): draw more gaps
        positions = torch.cat([positions, gaps().cumsum_(0) + positions[-1]])
    positions = positions[: int(torch.searchsorted(positions, numel, right=True))]
    return positions - 1  # the k-th success sits at trial cumsum_k, i.e. position cumsum_k - 1


class _MaskInput(torch.autograd.Function):
    """``x * keep``: dropout without the ``1 / (1 - p)`` factor, which the low-rank branch folds into its
    scaling on the rank-``r`` side for free. Saves only the bool mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (keep,) = ctx.saved_tensors
        return grad * keep, None


def _zeroed(x: Tensor, dropped: Tensor) -> Tensor:
    return x.clone().view(-1).index_fill_(0, dropped, 0).view(x.shape)


def _dropped_product(x: Tensor, weight: Tensor, dropped: Tensor | None, sparse: Tensor | None) -> Tensor:
    """``x`` (n, in) with the elements at ``dropped`` zeroed (none if ``None``), times ``weight.T``."""
    if dropped is None:
        return x @ weight.t()
    if sparse is None:
        return _zeroed(x, dropped) @ weight.t()
    return torch.addmm(x @ weight.t(), sparse, weight.t(), alpha=-1)


def _dropped_grads(
    ctx: Any, grad_h: Tensor, x: Tensor, weight: Tensor, dropped: Tensor | None, x_index: int, w_index: int
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of :func:`_dropped_product` w.r.t. ``x`` and ``weight`` from the gradient of its result."""
    grad_x = grad_w = None
    if ctx.needs_input_grad[w_index]:
        grad_w = grad_h.t() @ (x if dropped is None else _zeroed(x, dropped))
    if ctx.needs_input_grad[x_index]:
        grad_x = grad_h @ weight
        if dropped is not None:
            grad_x.view(-1).index_fill_(0, dropped, 0)
    return grad_x, grad_w


class _SparseDropProject(torch.autograd.Function):
    """``x`` (n, in) with the elements at flat positions ``dropped`` zeroed, times ``weight.T`` (in, r).

    Forward is the full product minus the dropped elements' share, a sparse (CSR) times dense product, so
    neither a mask nor a masked copy of ``x`` is made or kept; backward zeroes ``x``'s gradient at the dropped
    positions and uses a transient zeroed copy of ``x`` for ``weight``'s. Saves ``x`` itself (no copy; it is
    usually alive for the base layer's sake anyway) and the positions.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, dropped: Tensor, sparse: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, dropped)
        return _dropped_product(x, weight, dropped, sparse)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, dropped = ctx.saved_tensors
        return (*_dropped_grads(ctx, grad, x, weight, dropped, 0, 1), None, None)


def _csr(x: Tensor, dropped: Tensor) -> Tensor | None:
    """The dropped elements of the 2-D ``x`` as a CSR matrix of its shape (``None`` where CSR matmul is slow
    or unsupported: half precision)."""
    if x.dtype not in (torch.float32, torch.float64):
        return None
    rows, width = x.shape
    crow = torch.searchsorted(dropped, torch.arange(0, rows * width + 1, width, device=x.device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            crow, dropped % width, x.detach().view(-1)[dropped], x.shape, check_invariants=False
        )


def _cached(x: Tensor, p: float, dtype: torch.dtype, make: Any) -> Any:
    """``make()``, computed once per (input tensor, version, p, dtype) and reused by sibling layers."""
    cache = _DROPOUT
    try:
        version = x._version
    except RuntimeError:  # inference tensors have no version counter: nothing to share safely
        version = None
    if version is not None and cache.x is x and cache.version == version and cache.p == p and cache.dtype == dtype:
        return cache.out
    out = make()
    if version is not None:
        cache.x, cache.version, cache.p, cache.dtype, cache.out = x, version, p, dtype, out
    return out


def shared_dropout(x: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """``x`` (cast to ``dtype``) times a keep mask, shared by every delta that reads this tensor in one forward.

    The dense path of :func:`project`. q/k/v projections (and any layers fed the same hidden states) see one
    mask, drawn once, and one masked copy of the input, instead of one full-size copy per layer as in PEFT;
    autograd sums the siblings' gradients before the single masking step of backward. The result is *not*
    rescaled: multiply by ``1 / (1 - drop_probability(p))`` (see :func:`project`).
    """
    return _cached(x, p, dtype, lambda: _MaskInput.apply(x.to(dtype), keep_mask(x, p)))


def shared_drops(x: Tensor, p: float, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """(``x`` as a contiguous (n, in) matrix of ``dtype``, its sorted dropped flat positions, those elements as
    a CSR matrix).

    The sparse path of :func:`project`: drawn once per input tensor and shared by the layers that read it.
    """

    def make() -> tuple[Tensor, Tensor, Tensor | None]:
        x2 = x.to(dtype).reshape(-1, x.shape[-1]).contiguous()
        dropped = dropped_positions(x2.numel(), p, x2.device)
        return x2, dropped, _csr(x2, dropped)

    return _cached(x, p, dtype, make)


def project(x: Tensor, weight: Tensor, p: float, training: bool, scale: float = 1.0) -> Tensor:
    """``dropout(x) @ weight.T * scale`` for a small ``weight`` (r, in): the first half of a low-rank branch.

    ``x`` is cast to ``weight``'s dtype (adapters keep their own precision over a bf16 or quantized base).
    With dropout active, the layers that read one input tensor share its dropout draw (q/k/v see one mask, as
    with LoRA on a fused qkv projection; each branch still sees standard inverted dropout at rate ``p``), and
    the inverted-dropout factor is applied to the rank-``r`` result rather than to the full-size input. On the
    CPU with ``p <= 0.25`` no mask is made at all: the dropped positions are drawn directly
    (:func:`dropped_positions`) and their contributions subtracted (:class:`_SparseDropProject`); otherwise a
    keep mask and one masked copy per input tensor (:func:`shared_dropout`).
    """
    if p <= 0.0 or not training:
        h = F.linear(x.to(weight.dtype), weight)
        return h * scale if scale != 1.0 else h
    scale = scale / (1.0 - drop_probability(p, x.device))
    if uses_sparse_dropout(p, x.device):
        x2, dropped, sparse = shared_drops(x, p, weight.dtype)
        h = _SparseDropProject.apply(x2, weight, dropped, sparse)
        return (h * scale).view(*x.shape[:-1], weight.shape[0])
    return F.linear(shared_dropout(x, p, weight.dtype), weight) * scale


class _LowRankLinear(torch.autograd.Function):
    """``x @ W.T + b + (dropout(x) @ A.T * scale) @ B.T`` for a frozen plain linear ``W``, ``b`` in one node.

    The same arithmetic as the base layer plus a LoRA branch, with fewer full-size tensors: the low-rank
    product is added into the base output in place, and backward adds ``grad @ W`` into the branch's input
    gradient in place, instead of autograd allocating both input gradients and then their sum. Dropout is the
    sparse CPU draw of :func:`project` (``dropped``, ``sparse``) or none.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float,
        dropped: Tensor | None, sparse: Tensor | None,
    ) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        h = _dropped_product(x2, a, dropped, sparse).mul_(scale)
        out.addmm_(h, b.t())
        ctx.save_for_backward(x2, weight, a, b, h, dropped)
        ctx.scale, ctx.in_shape = scale, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x2, weight, a, b, h, dropped = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        g_h = (g2 @ b).mul_(ctx.scale)
        grad_b = g2.t() @ h if ctx.needs_input_grad[4] else None
        grad_x, grad_a = _dropped_grads(ctx, g_h, x2, a, dropped, 0, 3)
        if grad_x is not None:  # the base layer's input gradient, added in place
            grad_x = grad_x.addmm_(g2, weight).view(ctx.in_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def lowrank_linear(
    base: nn.Module, x: Tensor, a: Tensor, b: Tensor, p: float, training: bool, scale: float
) -> Tensor | None:
    """``base(x) + (dropout(x) @ a.T * scale) @ b.T`` as one fused node, or ``None`` where that does not apply.

    It applies to an exact ``nn.Linear`` whose weight and bias are frozen and unhooked, with ``x``, the weight
    and the adapters in one floating dtype, outside autocast, and with no dropout or the sparse CPU dropout of
    :func:`project` (the same draw, shared by sibling layers). Otherwise the caller composes the usual way.
    """
    if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return None
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if not (x.dtype == weight.dtype == a.dtype == b.dtype) or not x.is_floating_point():
        return None
    if x.device != weight.device or _autocast_on(x.device.type) or x.dim() < 2:
        return None
    dropped = sparse = None
    if training and p > 0.0:
        if not uses_sparse_dropout(p, x.device):
            return None
        _, dropped, sparse = shared_drops(x, p, a.dtype)
        scale = scale / (1.0 - p)
    return _LowRankLinear.apply(x, weight, bias, a, b, scale, dropped, sparse)


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
