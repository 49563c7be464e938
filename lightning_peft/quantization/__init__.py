"""Quantized backbones with bitsandbytes: settings, in-place conversion, k-bit training, merging into a quantized
base, and the memory report. Adapters are never quantized: the stack quantizes first and injects after."""

from lightning_peft.core.backend import is_bnb_layer
from lightning_peft.quantization.config import Quantization, bnb_config, layer_quantization
from lightning_peft.quantization.convert import (
    detect_quantization,
    keep_in_fp32_names,
    keep_standard_layout,
    plan_quantization,
    quantize_model,
    quantized_linear,
)
from lightning_peft.quantization.kbit import prepare_for_kbit_training
from lightning_peft.quantization.memory import memory_report, quantized_weight_bytes

__all__ = [
    "Quantization",
    "bnb_config",
    "detect_quantization",
    "is_bnb_layer",
    "keep_in_fp32_names",
    "keep_standard_layout",
    "layer_quantization",
    "memory_report",
    "plan_quantization",
    "prepare_for_kbit_training",
    "quantize_model",
    "quantized_linear",
    "quantized_weight_bytes",
]
