"""``lightning-peft estimate``: the peak training memory per device of a recipe on a model config, by part.

    lightning-peft estimate --config llama_qlora --model-config llama-2-7b
    lightning-peft estimate --config my_run.yaml --model-config path/to/config.json --devices 4 --batch_size 2

The recipe gives the strategies and quantization (the task module's ``strategies`` / ``quantization``, or a
``PEFT`` callback's ``strategies`` / ``quantize``), ``gradient_checkpointing``, ``torch_dtype``, the batch size and
the maximum length (``data.init_args.batch_size`` / ``max_length``), ``trainer.precision`` (Lightning's
``"32-true"`` when the recipe sets none) / ``devices`` and the optimizer; every one of them can be overridden on
the command line. Nothing is downloaded: the model is built on the ``meta`` device from the config (see
:func:`lightning_peft.estimate_memory`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_peft.cli.convert import read_yaml_config
from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import Strategy, registered_strategies
from lightning_peft.quantization.config import Quantization
from lightning_peft.stack.estimate import DEVICES, OPTIMIZERS, PRECISIONS, MemoryEstimate, estimate_memory
from lightning_peft.stack.estimate_model import PRESETS

#: optimizer class names (the last part of a class path) by the estimate's optimizer kind
OPTIMIZER_NAMES = {
    "adamw": "adamw", "adam": "adamw", "fusedadam": "adamw",
    "pagedadamw": "paged_adamw", "pagedadamw32bit": "paged_adamw", "pagedadam": "paged_adamw",
    "adamw8bit": "adamw8bit", "adam8bit": "adamw8bit",
    "pagedadamw8bit": "paged_adamw8bit", "pagedadam8bit": "paged_adamw8bit",
    "sgd": "sgd",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-peft estimate",
        description="Predict the peak training memory per device of a recipe on a model config, by part "
                    "(weights, adapters, gradients, optimizer state, activations, logits, CUDA workspace).",
    )
    p.add_argument("--config", "-c", default=None,
                   help="a recipe (installed name or YAML path): strategies, quantization, batch size, max length, "
                        "precision, optimizer")
    p.add_argument("--model-config", "--model_config", dest="model_config", required=True,
                   help=f"a transformers config.json or a preset: {', '.join(PRESETS)}")
    p.add_argument("--devices", type=int, default=None, help="devices (default: the recipe's trainer.devices, or 1)")
    p.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--batch_size", "--batch-size", type=int, default=None, help="sequences per device per step")
    p.add_argument("--seq_len", "--seq-len", "--max_length", type=int, default=None, help="tokens per sequence")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None)
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None)
    p.add_argument("--weights_dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--gradient_checkpointing", choices=["true", "false"], default=None)
    p.add_argument("--fused_loss", action="store_true", help="chunked / compiled cross-entropy (no fp32 logits)")
    p.add_argument("--device", choices=list(DEVICES), default="cuda")
    return p


def run_estimate(argv: list[str]) -> MemoryEstimate:
    """Parse ``argv`` (``--config`` already resolved to a path by the command), read the recipe, print the
    breakdown; returns the estimate."""
    args = parser().parse_args(argv)
    settings = recipe_settings(args.config) if args.config else {}
    overrides = {
        "devices": args.devices, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "precision": args.precision, "optimizer": args.optimizer, "weights_dtype": args.weights_dtype,
        "gradient_checkpointing": None if args.gradient_checkpointing is None
        else args.gradient_checkpointing == "true",
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if "seq_len" not in settings:
        raise PeftConfigError(
            "lightning-peft estimate: no sequence length; give --seq_len N or a recipe with data.init_args.max_length"
        )
    model_config = args.model_config
    if model_config not in PRESETS and not Path(model_config).is_file():
        raise PeftConfigError(
            f"--model-config {model_config!r} is neither a file nor a preset; presets: {', '.join(PRESETS)}"
        )
    estimate = estimate_memory(model_config, fused_loss=args.fused_loss, device=args.device,
                               sharding=args.sharding, **settings)
    print(f"model {model_config}; " + ", ".join(f"{k}={v}" for k, v in estimate.settings.items()))
    print(f"trainable parameters {estimate.trainable_parameters:,}; frozen {estimate.frozen_parameters:,}")
    print(estimate.table())
    return estimate


def recipe_settings(path: str) -> dict[str, Any]:
    """The estimate's arguments a LightningCLI recipe fixes (see the module docstring)."""
    config = read_yaml_config(path, "--config")
    model = _init_args(config.get("model"))
    data = _init_args(config.get("data"))
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    peft = next((_init_args(c) for c in trainer.get("callbacks") or []
                 if isinstance(c, dict) and str(c.get("class_path", "")).rsplit(".", 1)[-1] == "PEFT"), {})
    out: dict[str, Any] = {}
    strategies = model.get("strategies", peft.get("strategies"))
    out["strategies"] = [_strategy(s, path) for s in strategies or []]
    quant = model.get("quantization", peft.get("quantize"))
    if isinstance(quant, dict):
        out["quantize"] = Quantization(**_init_args(quant) if "class_path" in quant else quant)
    if model.get("gradient_checkpointing") is not None:
        out["gradient_checkpointing"] = bool(model["gradient_checkpointing"])
    if model.get("torch_dtype"):
        out["weights_dtype"] = model["torch_dtype"]
    for key, name in (("batch_size", "batch_size"), ("max_length", "seq_len")):
        if isinstance(data.get(key), int):
            out[name] = data[key]
    out["precision"] = str(trainer.get("precision") or "32-true")  # Lightning's Trainer default
    if isinstance(trainer.get("devices"), int):
        out["devices"] = trainer["devices"]
    optimizer = model.get("optimizer") or config.get("optimizer")
    if optimizer:
        name = optimizer.get("class_path", "") if isinstance(optimizer, dict) else str(optimizer)
        kind = OPTIMIZER_NAMES.get(name.rsplit(".", 1)[-1].lower())
        if kind is None:
            raise PeftConfigError(
                f"--config {path!r}: optimizer {name!r} is not one the estimate knows; give --optimizer "
                f"{{{','.join(sorted(OPTIMIZERS))}}}"
            )
        out["optimizer"] = kind
    return out


def _init_args(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        return {}
    if "class_path" in section or "init_args" in section:
        return dict(section.get("init_args") or {})
    return dict(section)


def _strategy(spec: Any, path: str) -> Strategy:
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise PeftConfigError(f"--config {path!r}: strategy {spec!r} is not {{class_path: ..., init_args: ...}}")
    name = str(spec["class_path"]).rsplit(".", 1)[-1]
    classes = {cls.__name__: cls for cls in registered_strategies().values()}
    if name not in classes:
        raise PeftConfigError(
            f"--config {path!r}: strategy class_path {spec['class_path']!r} is not a strategy; known: "
            f"{', '.join(sorted(classes))}"
        )
    return classes[name](**_init_args(spec))


__all__ = ["recipe_settings", "run_estimate"]
