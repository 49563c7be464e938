"""Merging adapters into a quantized (bitsandbytes) base: dequantize, add the deltas, keep the result in full
precision or quantize it again; and putting the quantized base back."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import base_weight, conv1d_class
from lightning_peft.errors import AdapterStateError
from lightning_peft.quantization.config import layer_quantization
from lightning_peft.quantization.convert import quantized_linear

PREMERGE_ATTR = "_lightning_peft_premerge_base"


def _relative_error(approx: Tensor, exact: Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-12))


def plain_layer(
    like: nn.Module, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A frozen full-precision layer holding ``weight`` (out, in) and ``bias``, of ``like``'s original kind.

    A GPT-2 ``Conv1D`` (the weight stored transposed, (in, out)) when ``like`` is one or is a bitsandbytes
    layer quantized from one (:func:`~lightning_peft.core.backend.conv1d_class`), so the model keeps its
    architecture and its checkpoint layout; else an ``nn.Linear``. ``dtype`` defaults to ``weight``'s; an ``nn.Linear`` holds
    ``weight`` and ``bias`` themselves (no copy) when they already have it.
    """
    dtype = dtype or weight.dtype
    out_features, in_features = weight.shape
    conv = conv1d_class(like)
    if conv is not None:
        with torch.device("meta"):
            layer = conv(out_features, in_features)
        layer.weight = nn.Parameter(weight.t().to(dtype).contiguous(), requires_grad=False)
        bias = bias if bias is not None else weight.new_zeros(out_features)  # Conv1D always has a bias
        layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    layer.train(like.training)
    return layer


def merge_quantized_layer(
    layer: nn.Module, set_name: str, requantize: bool = False, dtype: torch.dtype | None = None
) -> float:
    """Fold a set's deltas into an adapted layer whose base is a bitsandbytes layer.

    The base is dequantized and the deltas added in fp32. The merged weight then either stays in full
    precision (a new ``nn.Linear`` in ``dtype``, exact up to float rounding) or, with ``requantize``, is
    quantized again with the base layer's own settings, which adds a fresh rounding error on top of the
    first quantization (returned as ``||deq(Q(W')) - W'|| / ||W'||`` for the merged weight ``W'``).
    A base quantized from a GPT-2 ``Conv1D`` becomes a ``Conv1D`` again (or a bitsandbytes layer that still
    records it in ``source_cls``), so a later merged export writes the (in, out) layout GPT-2 loads.
    The original quantized layer is kept aside, so :func:`unmerge_quantized_layer` restores it bit for bit.

    Returns:
        The relative Frobenius error re-quantization added to this layer's weight (0.0 in full precision).
    """
    if set_name in layer.merged or set_name not in layer.adapters:
        return 0.0
    base = layer.base_layer
    weight, bias = layer.merged_weight(set_name)
    plain = plain_layer(base, weight, bias)  # a Conv1D again if the base was quantized from one
    error = 0.0
    if requantize:
        new = quantized_linear(plain, layer_quantization(base))  # transposes a Conv1D, records source_cls
        error = _relative_error(base_weight(new), weight)
    else:
        if dtype is None:  # the stack passes the model's float dtype; a layer alone only knows its bias
            dtype = base.bias.dtype if getattr(base, "bias", None) is not None else torch.float32
        new = plain.to(dtype)
    layer.__dict__.setdefault(PREMERGE_ATTR, {})[set_name] = (base, new)
    layer.base_layer = new
    layer.merged.add(set_name)
    return error


def unmerge_quantized_layer(layer: nn.Module, set_name: str) -> bool:
    """Put back the quantized base that :func:`merge_quantized_layer` set aside; ``False`` if it set none."""
    saved = layer.__dict__.get(PREMERGE_ATTR, {})
    if set_name not in saved or set_name not in layer.merged:
        return False
    original, merged = saved[set_name]
    if layer.base_layer is not merged:
        raise AdapterStateError(
            f"cannot unmerge adapter set {set_name!r}: another set was merged into this layer after it; "
            "unmerge in the reverse order of merging"
        )
    layer.base_layer = original
    layer.merged.discard(set_name)
    del saved[set_name]
    return True


__all__ = ["merge_quantized_layer", "plain_layer", "unmerge_quantized_layer"]
