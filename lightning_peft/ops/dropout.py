"""Dropout on a low-rank branch's input, as ``peft`` applies it.

Devices and dtypes: :func:`project` is plain ``torch.nn.functional`` (``dropout`` and ``linear``), so it serves
every device and floating dtype, under autocast and under ``torch.compile``. :func:`shared_dropout` (opt-in,
``LoRA(shared_dropout=True)``) draws its mask with ``torch.rand`` on the input's device and works on any device
and floating dtype in eager mode; while ``torch.compile`` traces, :func:`project` falls back to per-layer
dropout, since its cache is Python-side state.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


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
