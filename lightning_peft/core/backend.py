"""The kinds of base layer an adapter can sit on, told apart in one place.

Three kinds (:func:`base_kind`):

- ``"linear"``: an ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored transposed, (in, out)) or a bitsandbytes
  ``Linear4bit`` / ``Linear8bitLt`` (an ``nn.Linear`` subclass whose weight is a ``Params4bit`` / ``Int8Params``);
- ``"embedding"``: an ``nn.Embedding`` (a linear map of one-hot inputs: (in, out) = (num_embeddings,
  embedding_dim), weight stored transposed, (in, out));
- ``"conv"``: a torch ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` ((in, out) = channels, weight
  (out, in / groups, *kernel)); not GPT-2's ``Conv1D``, which is a linear.

Every check of which kind a layer or a weight is goes through the functions here, never through type names
spelled out elsewhere.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor, nn

try:  # GPT-2 style layers: a linear with a transposed (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the core importable
    Conv1D = None  # type: ignore[assignment,misc]

#: bitsandbytes' quantized parameter classes, by the kind of quantization they hold
_QUANTIZED_PARAMS = {"Params4bit": "4bit", "Int8Params": "8bit"}
_BNB_LAYERS = ("Linear4bit", "Linear8bitLt")
_TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

BaseKind = Literal["linear", "embedding", "conv"]
#: every kind of base layer an adapted layer can hold
BASE_KINDS: tuple[BaseKind, ...] = get_args(BaseKind)


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def conv1d_class(module: nn.Module) -> type[nn.Module] | None:
    """The GPT-2 ``Conv1D`` class ``module`` is, or was before bitsandbytes replaced it; else ``None``.

    ``Conv1D`` stores its weight (in, out), transposed against ``nn.Linear``. A bitsandbytes layer quantized
    from one holds the weight (out, in) and keeps the original class in ``source_cls`` (set by
    :func:`~lightning_peft.quantization.convert.quantized_linear`, and by transformers when it quantizes on
    load), so whatever writes the layer back as a full-precision checkpoint must transpose it again.
    """
    if is_conv1d(module):
        return type(module)
    source = getattr(module, "source_cls", None)
    if Conv1D is not None and isinstance(source, type) and issubclass(source, Conv1D):
        return source
    return None


def is_linear(module: nn.Module) -> bool:
    """A plain, bitsandbytes (subclasses of nn.Linear) or GPT-2 Conv1D linear layer."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` (or a subclass, e.g. a scaled word embedding)."""
    return isinstance(module, nn.Embedding)


def is_conv(module: nn.Module) -> bool:
    """A torch ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (not a transposed conv, not GPT-2's ``Conv1D``)."""
    return isinstance(module, _TORCH_CONVS)


def base_kind(module: nn.Module) -> BaseKind | None:
    """``"linear"``, ``"embedding"`` or ``"conv"`` for a layer an adapter can sit on, else ``None``."""
    if is_linear(module):
        return "linear"
    if is_embedding(module):
        return "embedding"
    if is_conv(module):
        return "conv"
    return None


def quantized_kind(weight: object) -> Literal["4bit", "8bit"] | None:
    """``"4bit"`` for a bitsandbytes ``Params4bit``, ``"8bit"`` for an ``Int8Params``, else ``None``.

    Matched by class name so that this module does not import bitsandbytes.
    """
    return _QUANTIZED_PARAMS.get(type(weight).__name__)  # type: ignore[return-value]


def is_quantized(base: nn.Module) -> bool:
    """Whether a base layer's weight is a bitsandbytes 4-bit or 8-bit parameter."""
    return quantized_kind(getattr(base, "weight", None)) is not None


def is_bnb_layer(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, or an ``nn.Linear`` holding a quantized weight."""
    return type(module).__name__ in _BNB_LAYERS or (isinstance(module, nn.Linear) and is_quantized(module))


def base_shape(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base layer: channels for a conv, (num_embeddings, embedding_dim) for an
    embedding."""
    if is_conv1d(base):
        return base.nx, base.nf
    if is_embedding(base):
        return base.num_embeddings, base.embedding_dim
    if is_conv(base):
        return base.in_channels, base.out_channels
    return base.in_features, base.out_features


def base_weight(base: nn.Module) -> Tensor:
    """The base weight as a float (out, in) matrix, dequantizing bitsandbytes layers; a conv's as it is stored,
    (out, in / groups, *kernel)."""
    weight = base.weight
    if is_conv1d(base) or is_embedding(base):
        return weight.detach().t()
    if quantized_kind(weight) is not None:
        return dequantize(weight, getattr(getattr(base, "state", None), "SCB", None))
    return weight.detach()


def dequantize(weight: Tensor, scb: Tensor | None = None) -> Tensor:
    """A bitsandbytes 4-bit or 8-bit parameter as a float32 (out, in) matrix (``scb``: an 8-bit layer's row
    scales when the parameter no longer holds them, as after its first forward)."""
    if quantized_kind(weight) == "4bit":
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    scb = getattr(weight, "SCB", None) if getattr(weight, "SCB", None) is not None else scb
    return weight.data.to(torch.float32) * scb.to(torch.float32).view(-1, 1) / 127.0


def quantize(weight: Tensor, kind: Literal["4bit", "8bit"], *, quant_type: str = "nf4", double_quant: bool = False,
             quant_storage: torch.dtype = torch.uint8, blocksize: int | None = None,
             module: nn.Module | None = None) -> nn.Parameter:
    """``weight`` (out, in) as a frozen bitsandbytes parameter quantized on its device, as a bitsandbytes layer
    quantizes its weight (``module``: the ``Linear4bit`` that will hold a 4-bit one)."""
    import bitsandbytes as bnb

    if kind == "4bit":
        return bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
            quant_type=quant_type, quant_storage=quant_storage, module=module,
        ).to(weight.device)
    # Int8Params quantizes when it leaves the CPU for a device (or stays on it)
    return bnb.nn.Int8Params(
        weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False
    ).to(weight.device)


def set_base_weight(base: nn.Module, weight: Tensor) -> None:
    """Write a float (out, in) matrix into a base linear in place, the inverse of :func:`base_weight`: cast to
    the layer's dtype, transposed for a ``Conv1D``, quantized again with the layer's own settings for a
    bitsandbytes layer (which adds that quantization's rounding error)."""
    old = base.weight
    kind = quantized_kind(old)
    with torch.no_grad():
        if kind is None:
            old.copy_((weight.t() if is_conv1d(base) else weight).to(old.dtype))
            return
        if kind == "4bit":
            dtype = getattr(old.quant_state, "dtype", None) or torch.float32
            base.weight = quantize(
                weight.to(old.device, dtype), "4bit", quant_type=old.quant_type,
                double_quant=old.compress_statistics, quant_storage=old.quant_storage, blocksize=old.blocksize,
                module=base,
            )
        else:
            base.weight = quantize(weight.to(old.device), "8bit")
            state = getattr(base, "state", None)
            if state is not None:  # a Linear8bitLt reads its row scales from here after the first forward
                state.CB = state.SCB = None


def stored_weight(base: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` in the layout ``base`` stores it: the inverse of :func:`base_weight` for a full-precision base
    (GPT-2 ``Conv1D`` and embeddings store the (out, in) matrix transposed)."""
    return weight.t() if is_conv1d(base) or is_embedding(base) else weight


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a merged full-precision layer takes: the input embeddings' (else the first float parameter's)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # vision models: transformers raises when there are none
        emb = None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the submodule ``name``, and the attribute name it has there."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
