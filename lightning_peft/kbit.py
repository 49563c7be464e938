"""Training and merging on a quantized backbone: k-bit training preparation, merge into a bitsandbytes base
(full precision or re-quantized), and the memory a quantized model holds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.quantization import (
    is_bnb_layer,
    keep_standard_layout,
    layer_quantization,
    quantized_linear,
)
from lightning_peft.targets import conv1d_class


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = False,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    upcast: bool = True,
) -> list[str]:
    """Make a quantized model ready for adapter training (PEFT's ``prepare_model_for_kbit_training``).

    - with ``upcast``, half-precision (fp16/bf16) parameters outside the quantized layers go to fp32, as in
      PEFT: normalization layers are where low precision hurts stability, and once a norm computes in fp32 the
      hidden states it emits are fp32, so the other float layers (embeddings, output head) must follow;
      4-bit layers still compute in their ``compute_dtype``;
    - with ``gradient_checkpointing``, the model's checkpointing is turned on (reentrant by default, as PEFT)
      and the input embeddings' output requires grad, so that the checkpointed blocks of a frozen backbone
      still propagate gradients to the adapters inside them; the KV cache is turned off;
    - 4-bit layers keep bitsandbytes' standard weight layout on the CPU (:func:`keep_standard_layout`).

    Parameters keep their identity (only ``.data`` changes), so optimizers built earlier stay valid.

    Returns:
        The names of the parameters cast to fp32.
    """
    keep_standard_layout(model)
    cast: list[str] = []
    if upcast:
        quantized = {id(m.weight) for m in model.modules() if is_bnb_layer(m)}
        for name, p in model.named_parameters():
            if id(p) not in quantized and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
                cast.append(name)
    if gradient_checkpointing:
        # transformers >= 5.x renamed it activation_checkpointing_enable (the old name warns, goes in v6)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if not callable(enable):
            enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise PeftConfigError(
                f"gradient_checkpointing=True needs a model with gradient_checkpointing_enable() (a Hugging Face "
                f"PreTrainedModel); {type(model).__name__} has none"
            )
        kwargs = {"use_reentrant": True, **(gradient_checkpointing_kwargs or {})}
        enable(kwargs)  # first positional: activation_ / gradient_checkpointing_kwargs
        enable_input_require_grads(model)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "use_cache", None):
            config.use_cache = False
    return cast


def enable_input_require_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (idempotent)."""
    if "_lightning_peft_input_grad_hook" in model.__dict__:
        return
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module):
        raise PeftConfigError(
            f"gradient_checkpointing=True needs the input embeddings of {type(model).__name__} "
            "(get_input_embeddings() returned nothing)"
        )

    def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        output.requires_grad_(True)

    model.__dict__["_lightning_peft_input_grad_hook"] = emb.register_forward_hook(hook)


# -- merge ----------------------------------------------------------------------------------------------------
PREMERGE_ATTR = "_lightning_peft_premerge_base"


def _relative_error(approx: Tensor, exact: Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-12))


def plain_layer(
    like: nn.Module, weight: Tensor, bias: Tensor | None, dtype: torch.dtype | None = None
) -> nn.Module:
    """A frozen full-precision layer holding ``weight`` (out, in) and ``bias``, of ``like``'s original kind.

    A GPT-2 ``Conv1D`` (the weight stored transposed, (in, out)) when ``like`` is one or is a bitsandbytes
    layer quantized from one (:func:`~lightning_peft.targets.conv1d_class`), so the model keeps its
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
    from lightning_peft.layers import base_weight

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


# -- memory ----------------------------------------------------------------------------------------------------
def logical_numel(p: Tensor) -> int:
    """Number of parameters a tensor stands for: a packed 4-bit weight holds two (or more) per element."""
    state = getattr(p, "quant_state", None)
    if type(p).__name__ == "Params4bit" and state is not None:
        return int(torch.Size(state.shape).numel())
    return p.numel()


def _quant_state_tensors(state: Any) -> list[Tensor]:
    out = []
    for attr in ("absmax", "code", "offset"):
        t = getattr(state, attr, None)
        if isinstance(t, Tensor):
            out.append(t)
    nested = getattr(state, "state2", None)
    if nested is not None:
        out.extend(_quant_state_tensors(nested))
    return out


def quantized_weight_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes, parameters) held by one bitsandbytes layer's weight: packed data plus its quantization constants."""
    weight = module.weight
    tensors = [weight.data]
    if type(weight).__name__ == "Params4bit":
        tensors += _quant_state_tensors(weight.quant_state)
    else:
        scb = getattr(weight, "SCB", None)
        tensors.append(scb if scb is not None else module.state.SCB)
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            seen[t.data_ptr() or id(t)] = t.numel() * t.element_size()
    return sum(seen.values()), logical_numel(weight)


def memory_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Bytes and parameters held by quantized weights, other frozen parameters and trainable parameters."""
    quantized = [0, 0]
    qids: set[int] = set()
    for module in model.modules():
        if is_bnb_layer(module):
            b, n = quantized_weight_bytes(module)
            quantized[0] += b
            quantized[1] += n
            qids.add(id(module.weight))
    frozen = [0, 0]
    trainable = [0, 0]
    for p in model.parameters():
        if id(p) in qids:
            continue
        bucket = trainable if p.requires_grad else frozen
        bucket[0] += p.numel() * p.element_size()
        bucket[1] += p.numel()
    return {"quantized": tuple(quantized), "frozen": tuple(frozen), "trainable": tuple(trainable)}  # type: ignore[dict-item]


__all__ = [
    "enable_input_require_grads",
    "logical_numel",
    "memory_report",
    "merge_quantized_layer",
    "plain_layer",
    "prepare_for_kbit_training",
    "quantized_weight_bytes",
    "unmerge_quantized_layer",
]
