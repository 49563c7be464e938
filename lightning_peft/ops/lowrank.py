"""The fused low-rank node: a frozen linear plus a LoRA branch in one autograd node.

Devices and dtypes: plain tensor ops (``addmm``, ``matmul``), so it serves every device and every floating dtype
(fp32, bf16, fp16), and ``torch.compile`` traces it. :func:`lowrank_linear` only uses it for an exact frozen
``nn.Linear`` with input, weight and adapters in one dtype, outside autocast and without active dropout;
anything else (bitsandbytes or Conv1D bases, mixed dtypes) is composed the usual way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


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
