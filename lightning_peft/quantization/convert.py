"""In-place conversion of a model's linears to bitsandbytes 4-bit NF4/FP4 (QLoRA) or 8-bit LLM.int8() layers.

Two ways in give one result: :func:`quantize_model` turns the linears of an already-built model into
bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers in place, and :func:`bnb_config` gives the transformers
``BitsAndBytesConfig`` that does the same at load time. The stack quantizes first and injects adapters after
(``apply_peft(..., quantize=Quantization("nf4"))``), so adapters are never quantized.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from lightning_peft.core.backend import get_submodule_parent, is_bnb_layer, is_conv1d, quantized_kind
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.core.targets import name_matches, output_head_names
from lightning_peft.errors import PeftConfigError, preview
from lightning_peft.quantization.config import Quantization, import_bnb, layer_quantization, settings_key

#: where :func:`quantize_model` records the settings on the model it quantized
QUANT_ATTR = "_lightning_peft_quantization"

def keep_standard_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its AVX512-BF16 CPU layout during eval forwards.

    On CPUs with AVX512-BF16, ``Linear4bit`` rewrites its packed weight in place on the first no-grad eval
    forward (bf16 block constants, double quantization undone, bf16 compute) and fails outright when
    ``out_features`` is not a multiple of 32. The standard layout keeps the weights bit-stable, dequantizable
    for merging and savable, and computes in ``compute_dtype``. Returns the number of layers changed.
    """
    n = 0
    for module in model.modules():
        if quantized_kind(getattr(module, "weight", None)) == "4bit" and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


KEEP_IN_FP32_ATTRS = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")


def _fp32_patterns(module: nn.Module, attr: str) -> list[str]:
    """The module names a transformers model lists in ``attr`` (a list or set of names; anything else: none).

    An entry naming a parameter (``"gate.weight"``) stands for the module holding it.
    """
    value = getattr(module, attr, None)
    if not isinstance(value, (list, tuple, set, frozenset)):
        return []
    out = []
    for entry in value:
        if isinstance(entry, str) and entry:
            for suffix in (".weight", ".bias"):
                entry = entry.removesuffix(suffix)
            out.append(entry)
    return out


def keep_in_fp32_names(model: nn.Module, dtype: torch.dtype | None = None) -> set[str]:
    """Qualified names of the modules transformers keeps in full precision, so never quantizes.

    These are the modules named in ``_keep_in_fp32_modules`` and ``_keep_in_fp32_modules_strict`` of
    ``model`` and of every transformers model inside it (a LightningModule holding one, say), each entry
    matching a module under that model by exact name or dotted suffix (T5's ``"wo"`` matches every
    ``...DenseReluDense.wo``). Loading with ``BitsAndBytesConfig`` leaves the ``_keep_in_fp32_modules``
    unquantized (T5, for one, casts its hidden states to ``wo.weight.dtype``, which a 4-bit ``wo`` stores as
    uint8); the strict list, which transformers upcasts to fp32 whatever the model's dtype, is never
    quantized either.

    With ``dtype``, only the modules transformers would hold in fp32 for a model in that dtype, as its
    loader's dtype plan: ``_keep_in_fp32_modules`` for ``float16``, ``_keep_in_fp32_modules_strict`` for
    ``float16`` and ``bfloat16``; none for ``float32``.
    """
    attrs: tuple[str, ...] = KEEP_IN_FP32_ATTRS
    if dtype is not None:
        attrs = {torch.float16: KEEP_IN_FP32_ATTRS, torch.bfloat16: KEEP_IN_FP32_ATTRS[1:]}.get(dtype, ())
    scopes = []
    for prefix, module in model.named_modules():
        patterns = [p for attr in attrs for p in _fp32_patterns(module, attr)]
        if patterns:
            scopes.append((prefix + "." if prefix else "", patterns))
    if not scopes:
        return set()
    found = set()
    for name, _ in model.named_modules():
        for prefix, patterns in scopes:
            inside = name.startswith(prefix) and name != prefix[:-1]
            if inside and name_matches(name.removeprefix(prefix), patterns):
                found.add(name)
                break
    return found


def _skip_set(model: nn.Module, quantization: Quantization, skip: Iterable[str]) -> set[str]:
    names = [n for n, _ in model.named_modules() if n]
    # the output head, and the modules transformers keeps in fp32 (BitsAndBytesConfig skips them too)
    skipped = set(skip) | output_head_names(model) | keep_in_fp32_names(model)
    spec = quantization.skip_modules
    if spec:
        patterns = [spec] if isinstance(spec, str) else list(spec)
        for pattern in patterns:
            hits = [n for n in names if name_matches(n, pattern if isinstance(spec, str) else [pattern])]
            if not hits:
                raise PeftConfigError(
                    f"skip_modules={pattern!r} matched no module of {type(model).__name__}; "
                    f"top-level modules: {preview([n for n in names if '.' not in n])}"
                )
            skipped.update(hits)
    return skipped


def plan_quantization(model: nn.Module, quantization: Quantization, skip: Iterable[str] = ()) -> list[str]:
    """Names of the linears :func:`quantize_model` would replace; checks everything, modifies nothing."""
    if not isinstance(quantization, Quantization):
        raise TypeError(f"quantize must be a Quantization, got {type(quantization).__name__}")
    import_bnb()
    existing = [(n, m) for n, m in model.named_modules() if is_bnb_layer(m)]
    if not existing and any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise PeftConfigError(
            f"{type(model).__name__} already carries adapters; quantize the backbone before adding adapters "
            "(apply_peft(..., quantize=...) does both in the right order) so that adapters stay unquantized"
        )
    # already quantized (loaded with quantization_config=..., or another adapter set's apply_peft/load_adapters
    # quantized it): fine if the settings agree, and nothing is quantized again
    if existing:
        have = layer_quantization(existing[0][1])
        if settings_key(have) != settings_key(quantization):
            raise PeftConfigError(
                f"quantize={quantization!r} but {type(model).__name__} is already quantized differently "
                f"({len(existing)} bitsandbytes layers such as {existing[0][0]} with {have!r}); pass quantize=None "
                "to keep the model as it is, or load it unquantized"
            )
        return []
    skipped = _skip_set(model, quantization, skip)
    names = []
    for name, module in model.named_modules():
        # exact nn.Linear only, as transformers: subclasses such as MHA's out_proj are read through .weight
        if not (type(module) is nn.Linear or is_conv1d(module)):
            continue
        if name in skipped or any(name.startswith(s + ".") for s in skipped):
            continue
        if module.weight.device.type == "meta":
            raise PeftConfigError(
                f"{name} has its weight on the meta device; materialize the model before quantizing"
            )
        names.append(name)
    if not names:
        raise PeftConfigError(
            f"quantize={quantization!r} found no linear layer to quantize in {type(model).__name__}"
        )
    return names


def quantized_linear(
    module: nn.Module, q: Quantization, device: torch.device | str | None = None
) -> nn.Module:
    """A bitsandbytes layer holding ``module``'s weights (``nn.Linear`` or ``Conv1D``), quantized on ``device``
    (default: where the weights are)."""
    bnb = import_bnb()
    weight = module.weight.detach()
    if is_conv1d(module):  # GPT-2 stores (in, out); bitsandbytes wants (out, in), as transformers on load
        weight = weight.t()
    out_features, in_features = weight.shape
    device = weight.device if device is None else torch.device(device)
    weight = weight.to(device)
    has_bias = getattr(module, "bias", None) is not None
    if q.is_4bit:
        new = bnb.nn.Linear4bit(
            in_features,
            out_features,
            has_bias,
            q.torch_compute_dtype,
            compress_statistics=q.double_quant,
            quant_type=q.mode,
            quant_storage=q.torch_quant_storage,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            compress_statistics=q.double_quant,
            quant_type=q.mode,
            quant_storage=q.torch_quant_storage,
            module=new,
        ).to(device)
        new.support_avx512bf16_for_cpu = False  # see keep_standard_layout
    else:
        new = bnb.nn.Linear8bitLt(
            in_features, out_features, has_bias, has_fp16_weights=False, threshold=q.threshold, device="meta"
        )
        # Int8Params quantizes when it leaves the CPU for a device (or stays on it), as transformers loads it
        new.weight = bnb.nn.Int8Params(
            weight.to("cpu").contiguous(), requires_grad=False, has_fp16_weights=False
        ).to(device)
    if has_bias:
        new.bias = nn.Parameter(module.bias.detach().to(device, copy=True), requires_grad=False)
    new.source_cls = type(module)
    new.train(module.training)  # int8 layers take another path in training mode
    return new


def quantize_model(
    model: nn.Module,
    quantization: Quantization,
    skip: Iterable[str] = (),
    device: torch.device | str | None = None,
) -> list[str]:
    """Replace the model's linears by bitsandbytes layers holding the same weights, in place.

    Every ``nn.Linear`` and GPT-2 ``Conv1D`` (transposed) becomes a ``Linear4bit`` or ``Linear8bitLt``
    quantized on the device its weight lives on, except the output head, the modules a transformers model
    keeps in fp32 (its ``_keep_in_fp32_modules`` and ``_keep_in_fp32_modules_strict``, see
    :func:`keep_in_fp32_names`; transformers' ``BitsAndBytesConfig`` skips them too), the ``skip`` names
    (and everything under them) and ``quantization.skip_modules``. Layers are converted one at a time, so
    peak memory is the model plus one layer.

    Args:
        model: a built model with float weights and no adapters yet.
        quantization: the settings.
        skip: qualified module names never quantized (the stack passes the modules it unfreezes).
        device: quantize on this device, leaving the quantized layers there (e.g. CUDA for a model still on
            the CPU, as the Lightning callback does); default: where each layer's weights are.

    Returns:
        The qualified names of the quantized layers; empty when the model already holds bitsandbytes layers
        with the same settings (e.g. it was loaded through :func:`bnb_config`).

    Example:
        >>> names = quantize_model(model, Quantization("nf4", double_quant=True))
    """
    names = plan_quantization(model, quantization, skip)
    keep_standard_layout(model)
    narrow = []
    for name in names:
        parent, child = get_submodule_parent(model, name)
        module = getattr(parent, child)
        on = module.weight.device if device is None else torch.device(device)
        if quantization.is_4bit and on.type == "cpu" and base_in_features(module) % 64:
            narrow.append(name)
        setattr(parent, child, quantized_linear(module, quantization, device))
    if narrow:
        warnings.warn(
            f"{len(narrow)} layers (e.g. {narrow[0]}) have rows that are not a multiple of bitsandbytes' 64-element "
            "4-bit block; bitsandbytes' CPU kernels (0.50) dequantize such rows with a much larger error than the "
            "quantization itself (e.g. 0.41 instead of 0.09 relative error at 16 x 32); CUDA is not affected",
            stacklevel=2,
        )
    model.__dict__[QUANT_ATTR] = quantization
    return names


def base_in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def detect_quantization(model: nn.Module) -> Quantization | None:
    """The :class:`Quantization` a model was quantized with (by :func:`quantize_model` or at load time)."""
    found = model.__dict__.get(QUANT_ATTR)
    if found is not None:
        return found
    layer = next((m for m in model.modules() if is_bnb_layer(m)), None)
    return layer_quantization(layer) if layer is not None else None


__all__ = [
    "QUANT_ATTR",
    "detect_quantization",
    "keep_in_fp32_names",
    "keep_standard_layout",
    "plan_quantization",
    "quantize_model",
    "quantized_linear",
]
