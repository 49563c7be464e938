"""How the frozen backbone is quantized: the :class:`Quantization` settings, those of an existing bitsandbytes
layer, and the transformers ``BitsAndBytesConfig`` that quantizes the same way at load time."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.core.backend import quantized_kind
from lightning_peft.core.targets import check_patterns
from lightning_peft.errors import PeftConfigError

MODES = ("nf4", "fp4", "int8")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = {"uint8": torch.uint8, **FLOAT_DTYPES}
#: transformers' default skips when ``llm_int8_skip_modules`` is given (it then drops its own head detection)
HEAD_SKIPS = ("lm_head", "score", "classifier")


def _dtype_name(value: Any, argument: str, valid: dict[str, torch.dtype]) -> str | None:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if not isinstance(value, str) or value.removeprefix("torch.") not in valid:
        raise PeftConfigError(f"{argument}={value!r} is not valid; expected one of {list(valid)}")
    return value.removeprefix("torch.")


@dataclass
class Quantization:
    """How the frozen backbone is quantized with bitsandbytes.

    Args:
        mode: ``"nf4"`` (4-bit NormalFloat, QLoRA Section 3, the default: optimal for normally distributed
            weights), ``"fp4"`` (4-bit float) or ``"int8"`` (LLM.int8(), row-wise absmax).
        double_quant: quantize the 4-bit absmax constants again (QLoRA Section 3, "Double Quantization":
            4.127 instead of 4.5 bits per parameter). 4-bit modes only.
        compute_dtype: dtype the 4-bit layers compute in: ``"float32"`` (default, as transformers),
            ``"bfloat16"`` or ``"float16"``. 4-bit modes only.
        skip_modules: module names (exact or dotted suffix) or a regex never quantized, in addition to the
            output head, the modules the stack unfreezes and those a transformers model keeps in fp32
            (``_keep_in_fp32_modules``, e.g. T5's ``wo``). Each must match a module of the model.
        quant_storage: dtype the packed 4-bit weights are stored as (``"uint8"`` by default; a float dtype
            lets FSDP shard them with the other weights). 4-bit modes only.
        int8_threshold: LLM.int8() outlier threshold on activations (paper Section 3.2 uses 6.0, the
            default; 0 disables the mixed-precision decomposition). ``"int8"`` only.

    Example:
        >>> Quantization("nf4", double_quant=True, compute_dtype="bfloat16")
        Quantization(mode='nf4', double_quant=True, compute_dtype='bfloat16', skip_modules=None, quant_storage=None, int8_threshold=None)
    """

    mode: Literal["nf4", "fp4", "int8"] = "nf4"
    double_quant: bool = False
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    skip_modules: list[str] | str | None = None
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] | None = None
    int8_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PeftConfigError(f"mode={self.mode!r} is not valid; expected one of {list(MODES)}")
        if not isinstance(self.double_quant, bool):
            raise PeftConfigError(f"double_quant={self.double_quant!r} is not valid; expected True or False")
        self.compute_dtype = _dtype_name(self.compute_dtype, "compute_dtype", FLOAT_DTYPES)  # type: ignore[assignment]
        self.quant_storage = _dtype_name(self.quant_storage, "quant_storage", STORAGE_DTYPES)  # type: ignore[assignment]
        check_patterns(self.skip_modules, "skip_modules")
        if isinstance(self.skip_modules, tuple):
            self.skip_modules = list(self.skip_modules)
        if self.mode == "int8":
            for argument in ("compute_dtype", "quant_storage"):
                if getattr(self, argument) is not None:
                    raise PeftConfigError(
                        f"{argument}={getattr(self, argument)!r} applies to the 4-bit modes only, not mode='int8' "
                        "(Linear8bitLt stores int8 and computes in the input's dtype); drop it or use mode='nf4'"
                    )
            if self.double_quant:
                raise PeftConfigError(
                    "double_quant=True applies to the 4-bit modes only (it quantizes the 4-bit block constants), "
                    "not mode='int8'; drop it or use mode='nf4'"
                )
            t = self.int8_threshold
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0):
                raise PeftConfigError(
                    f"int8_threshold={t!r} is not valid; expected a number >= 0 (6.0 by default)"
                )
        elif self.int8_threshold is not None:
            raise PeftConfigError(
                f"int8_threshold={self.int8_threshold!r} applies to mode='int8' only, not mode={self.mode!r}"
            )

    @property
    def is_4bit(self) -> bool:
        return self.mode != "int8"

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.compute_dtype or "float32"]

    @property
    def torch_quant_storage(self) -> torch.dtype:
        return STORAGE_DTYPES[self.quant_storage or "uint8"]

    @property
    def threshold(self) -> float:
        return 6.0 if self.int8_threshold is None else float(self.int8_threshold)

    def config(self) -> dict[str, Any]:
        """JSON-serializable fields (``Quantization(**q.config())`` rebuilds it)."""
        return asdict(self)


def import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("quantization needs bitsandbytes: pip install 'bitsandbytes>=0.45'") from err
    return bnb


def settings_key(q: Quantization) -> tuple[Any, ...]:
    if not q.is_4bit:
        return (q.mode, q.threshold)
    return (q.mode, q.double_quant, q.torch_compute_dtype, q.torch_quant_storage)


def layer_quantization(module: nn.Module) -> Quantization:
    """The settings one bitsandbytes layer was quantized with."""
    if quantized_kind(module.weight) == "8bit":
        return Quantization("int8", int8_threshold=float(module.state.threshold))
    storage = str(getattr(module, "quant_storage", torch.uint8)).removeprefix("torch.")
    dtype = getattr(module, "compute_dtype", None)
    return Quantization(
        module.weight.quant_type,
        double_quant=bool(module.weight.compress_statistics),
        compute_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,  # type: ignore[arg-type]
        quant_storage=None if storage == "uint8" else storage,  # type: ignore[arg-type]
    )


def bnb_config(quantization: Quantization) -> Any:
    """The transformers ``BitsAndBytesConfig`` that quantizes at load time as :func:`quantize_model` does.

    Pass it to ``from_pretrained(path, quantization_config=..., dtype=<the dtype the weights were in>)``.
    When ``skip_modules`` is given, transformers stops detecting the output head itself, so the usual
    head names (``lm_head``, ``score``, ``classifier``) are added to the skip list. transformers leaves the
    model's ``_keep_in_fp32_modules`` unquantized itself, as :func:`quantize_model` does.
    """
    from transformers import BitsAndBytesConfig

    q = quantization
    skip = None
    if q.skip_modules is not None:  # transformers matches a pattern from the start, or a literal suffix
        if isinstance(q.skip_modules, str):
            skip = [f"(?:{q.skip_modules})"]
        else:
            skip = [rf"(?:.*\.)?{re.escape(name)}" for name in q.skip_modules]
        skip += list(HEAD_SKIPS)
    if not q.is_4bit:
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=q.threshold, llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=q.torch_compute_dtype,
        bnb_4bit_quant_storage=q.torch_quant_storage,
        llm_int8_skip_modules=skip,
    )


__all__ = ["Quantization", "bnb_config", "layer_quantization", "settings_key"]
