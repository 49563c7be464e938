"""Quantization under the PEFT callback, and how it meets Lightning's own ``BitsandbytesPrecision`` plugin.

The plugin converts every ``nn.Linear`` of the LightningModule in ``strategy.setup``, which runs after the
callback has built the stack: left alone it would also quantize adapter modules built from ``nn.Linear``
(bottleneck adapters, P-tuning encoders) and the modules the stack unfreezes. It converts nothing when the
model already holds bitsandbytes layers, so the callback quantizes the backbone itself in ``setup`` with the
plugin's settings; the plugin then only sets the 4-bit compute dtype, and adapters stay unquantized.
On a CUDA Trainer the callback quantizes on the GPU (:func:`quantize_on_device`).
Lightning refuses the plugin on the CPU (``Bitsandbytes is only supported on CUDA GPUs``); the callback's own
``quantize=`` works on the CPU and on CUDA.
"""

from __future__ import annotations

import re
from typing import Any

from lightning_peft.errors import PeftConfigError
from lightning_peft.quantization import Quantization, quantize_model

#: the plugin's layer class (it keeps no mode string) -> (mode, double_quant)
PLUGIN_MODES = {
    "_NF4Linear": ("nf4", False),
    "_NF4DQLinear": ("nf4", True),
    "_FP4Linear": ("fp4", False),
    "_FP4DQLinear": ("fp4", True),
    "_Int8LinearInference": ("int8", False),
}


def quantization_from_precision(plugin: Any, model_attr: str | None = None) -> Quantization | None:
    """The :class:`Quantization` equivalent to a ``BitsandbytesPrecision`` plugin (``None`` for other plugins)."""
    from lightning.fabric.plugins.precision.bitsandbytes import BitsandbytesPrecision

    if not isinstance(plugin, BitsandbytesPrecision):
        return None
    cls_name = getattr(getattr(plugin, "_linear_cls", None), "__name__", "?")
    if cls_name not in PLUGIN_MODES:
        raise PeftConfigError(
            f"BitsandbytesPrecision with layer class {cls_name} (mode='int8-training') keeps trainable fp16 weights "
            "and is not a frozen quantized backbone; use BitsandbytesPrecision('int8') or, better, no plugin and "
            "PEFT(quantize=Quantization('int8'))"
        )
    mode, double_quant = PLUGIN_MODES[cls_name]
    skip = None
    if plugin.ignore_modules:  # prefixes of names in the LightningModule; ours are relative to model_attr
        prefix = f"{model_attr}." if model_attr else ""
        names = [p.removeprefix(prefix) for p in sorted(plugin.ignore_modules)]
        skip = "|".join(f"{re.escape(n)}.*" for n in names)
    compute = str(plugin.dtype).removeprefix("torch.") if mode != "int8" else None
    return Quantization(mode, double_quant=double_quant, compute_dtype=compute, skip_modules=skip)  # type: ignore[arg-type]


def resolve_quantization(
    quantize: Quantization | None, plugin: Any, model_attr: str | None = None
) -> Quantization | None:
    """What the callback quantizes with, given its own ``quantize`` and the Trainer's precision plugin.

    With Lightning's ``BitsandbytesPrecision`` the plugin's settings are used (or checked against
    ``quantize``: a different mode, double quantization or an explicit, different compute dtype is an error,
    since the plugin would silently override the compute dtype).
    """
    from_plugin = quantization_from_precision(plugin, model_attr)
    if from_plugin is None:
        return quantize
    if quantize is None:
        return from_plugin
    clash = quantize.mode != from_plugin.mode or quantize.double_quant != from_plugin.double_quant
    if quantize.compute_dtype is not None and from_plugin.compute_dtype != quantize.compute_dtype:
        clash = True
    if clash:
        raise PeftConfigError(
            f"PEFT(quantize={quantize!r}) disagrees with the Trainer's BitsandbytesPrecision plugin "
            f"(mode={from_plugin.mode!r}, double_quant={from_plugin.double_quant}, "
            f"dtype={from_plugin.compute_dtype!r}); give the settings once: drop the plugin (PEFT's quantize works "
            "on the CPU too) or drop quantize="
        )
    if quantize.compute_dtype is None and from_plugin.compute_dtype is not None:
        return Quantization(**{**quantize.config(), "compute_dtype": from_plugin.compute_dtype})
    return quantize


def quantize_on_device(model: Any, quantize: Quantization, unfreeze: Any, device: Any) -> list[str]:
    """Quantize ``model`` on ``device`` (the Trainer's CUDA device) before the stack is applied.

    In ``setup`` the model is usually still on the CPU; quantizing each layer on the GPU is much faster and
    leaves the packed weights there, and :func:`~lightning_peft.stack.apply_peft` then finds the model
    quantized with the same settings and goes on to inject. The ``unfreeze`` modules are skipped, as the stack
    would.
    """
    from lightning_peft.core.targets import resolve_unfreeze

    return quantize_model(model, quantize, skip=resolve_unfreeze(model, unfreeze), device=device)


__all__ = ["quantization_from_precision", "quantize_on_device", "resolve_quantization"]
