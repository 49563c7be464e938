"""``lightning-peft merge`` / ``lightning-peft export``: a fit run's checkpoint to a merged model or an adapter folder.

Usage::

    lightning-peft export --ckpt_path runs/x/checkpoints/epoch=2.ckpt --output adapters/   # PEFT layout + native
    lightning-peft merge  --ckpt_path runs/x/checkpoints/epoch=2.ckpt --output merged/     # plain transformers

The checkpoint holds the adapters only, so the LightningModule (and its frozen base model) is built again first:

1. from ``--config``, the run's configuration (the ``config.yaml`` LightningCLI writes into the log directory,
   or the recipe / file given to ``fit``): its ``model`` section;
2. else from the checkpoint's ``hyper_parameters`` when they name the class (modules built by LightningCLI that
   call ``save_hyperparameters``, as the task modules do);
3. else from the ``config.yaml`` LightningCLI wrote beside the checkpoint (``<log_dir>/config.yaml`` for
   ``<log_dir>/checkpoints/*.ckpt``).

``--model CLASS`` and ``--model.init_args.KEY VALUE`` (or ``--model.KEY VALUE``) override what was found, e.g.
the base model's new location. Then the adapter sets the checkpoint records are applied and loaded
(:func:`~lightning_peft.lightning.checkpointing.restore_from_checkpoint`). The checkpoint is read with
``torch.load(weights_only=True)``, and a class a checkpoint (or a config found beside it) names is only used if
its module is already imported or part of ``lightning_peft``, ``torch`` or ``lightning``, as Lightning's own
``load_from_checkpoint`` does: nothing a file names is imported unless you named it yourself.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_peft.core.state import get_stack
from lightning_peft.errors import PeftConfigError
from lightning_peft.io.adapters import MANIFEST_NAME, save_adapters
from lightning_peft.io.atomic import check_replaceable
from lightning_peft.io.merged import MERGE_MARKER, merge_and_export
from lightning_peft.lightning.checkpointing import (
    CHECKPOINT_KEY,
    checkpoint_sets,
    peft_target,
    restore_from_checkpoint,
)
from lightning_peft.methods.base import registered_strategies

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMMANDS = ("merge", "export")
#: top-level packages whose modules a checkpoint may name (imported on use): this library and its frameworks
TRUSTED_PACKAGES = ("lightning_peft", "torch", "lightning", "transformers")
#: where LightningCLI's config.yaml sits relative to a checkpoint file (``<log_dir>/checkpoints/x.ckpt``)
RUN_CONFIG_PLACES = ("../config.yaml", "config.yaml")


def parser_for(command: str) -> argparse.ArgumentParser:
    what = "a merged model folder (transformers from_pretrained)" if command == "merge" else (
        "an adapter folder (peft's layout + lightning_peft's native files)")
    p = argparse.ArgumentParser(
        prog=f"lightning-peft {command}",
        description=f"Turn an adapter-only checkpoint of a fit run into {what}. Other arguments --model CLASS and "
        "--model.init_args.KEY VALUE override how the module is built.",
    )
    p.add_argument("--ckpt_path", required=True, help="the checkpoint (.ckpt) a lightning-peft / PEFT run wrote")
    p.add_argument("--output", required=True, help="the folder to write (replaced if it is one this tool wrote)")
    p.add_argument("--config", default=None,
                   help="the run's config (LightningCLI's <log_dir>/config.yaml, or the recipe / file given to "
                   "fit); needed when the checkpoint does not say how to build the module")
    p.add_argument("--name", default=None, help="the adapter set, when the checkpoint holds several")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer saved into the folder (path or hub name); default: the run's "
                   "data.tokenizer or model_name_or_path when recorded; 'none' to leave it out")
    if command == "merge":
        p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                       help="dtype of the merged weights (default: the model's own float dtype)")
    else:
        p.add_argument("--uniform_rank", action="store_true",
                       help="one rank and lora_alpha for the whole LoRA part (vLLM, llama.cpp)")
    return p


def run_convert(command: str, argv: list[str]) -> Path:
    """Run ``lightning-peft merge`` / ``export`` with ``argv`` (the arguments after the command); the folder.

    ``run_cli`` calls this with ``--config NAME`` already resolved to the recipe's path."""
    args, rest = parser_for(command).parse_known_args(argv)
    overrides = _model_overrides(command, rest)
    checkpoint = read_checkpoint(args.ckpt_path)
    _check_before_building(command, args, checkpoint)
    module, source = build_module(checkpoint, args.ckpt_path, args.config, overrides)
    tokenizer = _tokenizer(args.tokenizer, module, source)
    if command == "merge":
        out = merge_and_export(module, args.output, tokenizer, name=args.name,
                               dtype=DTYPES[args.dtype] if args.dtype else None)
    else:
        out = save_adapters(module, args.output, uniform_rank=args.uniform_rank, tokenizer=tokenizer,
                            name=args.name)
    print(f"lightning-peft {command}: wrote {out} from {args.ckpt_path} ({type(module).__name__} built from "
          f"{source['from']})")
    return out


def _check_before_building(command: str, args: argparse.Namespace, checkpoint: dict[str, Any]) -> None:
    """``--name`` and ``--output`` checked before the base model is loaded (which may take minutes)."""
    sets = [str(e["stack"].get("name")) for e in checkpoint_sets(checkpoint[CHECKPOINT_KEY])]
    if args.name is not None and args.name not in sets:
        raise PeftConfigError(
            f"--name {args.name!r} is not an adapter set of {args.ckpt_path!r}; it holds: {', '.join(sets)}"
        )
    try:
        check_replaceable(args.output, MERGE_MARKER if command == "merge" else MANIFEST_NAME)
    except FileExistsError as err:
        raise SystemExit(f"lightning-peft {command}: --output: {err}") from None


def _model_overrides(command: str, rest: list[str]) -> list[str]:
    for arg in rest:
        if arg.startswith("--") and not (arg == "--model" or arg.startswith(("--model.", "--model="))):
            raise SystemExit(
                f"lightning-peft {command}: unknown argument {arg!r}; expected --ckpt_path, --output, --config, "
                "--name, --tokenizer, " + ("--dtype" if command == "merge" else "--uniform_rank")
                + ", or --model / --model.init_args.KEY to override how the module is built"
            )
    return rest


def read_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint, read with ``torch.load(weights_only=True)``: tensors and plain containers, no code."""
    if not Path(path).is_file():
        raise SystemExit(f"lightning-peft: --ckpt_path {path!r} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise PeftConfigError(
            f"--ckpt_path {path!r} holds objects that torch.load(weights_only=True) refuses ({reason}); "
            "lightning-peft never unpickles other objects. Load the module in Python and call "
            "lightning_peft.save_adapters / merge_and_export instead"
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise PeftConfigError(
            f"--ckpt_path {path!r} has no {CHECKPOINT_KEY!r} section: it was not written by a run with the PEFT "
            "callback, PEFTMixin or a lightning-peft task module (a full checkpoint: load it with "
            "YourModule.load_from_checkpoint and call lightning_peft.save_adapters / merge_and_export)"
        )
    return checkpoint


# -- the module's configuration ----------------------------------------------------------------------------------
def _pop_model_class(overrides: list[str]) -> tuple[list[str], str | None]:
    """``--model CLASS`` (the class to build) taken out of the overrides; the rest override its arguments."""
    rest = list(overrides)
    for i, arg in enumerate(rest):
        if arg == "--model" and i + 1 < len(rest):
            value = rest.pop(i + 1)
            rest.pop(i)
            return rest, value
        if arg.startswith("--model="):
            return rest[:i] + rest[i + 1:], arg.partition("=")[2]
    return rest, None


def module_section(checkpoint: dict[str, Any], ckpt_path: str, config: str | None,
                   model_class: str | None = None) -> dict[str, Any]:
    """``{"class_path", "init_args", "from", "data"}``: how to build the run's LightningModule, and from what.

    ``model_class`` is the class the user named (``--model``): trusted, and it replaces the one found."""
    if config is not None:  # a recipe's name is already its path here (run_cli resolves --config)
        return {**_section_of(read_yaml_config(config, "--config"), config, "--config"), "from": f"--config {config}"}
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "_class_path" in hparams:
        init = {k: v for k, v in hparams.items() if not k.startswith("_")}
        section = {"class_path": hparams["_class_path"], "init_args": _strategy_class_paths(init),
                   "from": "the checkpoint's hyper_parameters", "data": {}}
        _check_class_paths(section, "the checkpoint's hyper_parameters", model_class)
        return section
    for place in RUN_CONFIG_PLACES:
        found = (Path(ckpt_path).parent / place).resolve()
        if found.is_file():
            section = _section_of(read_yaml_config(str(found), "the run's config"), str(found), "the run's config")
            _check_class_paths(section, str(found), model_class)
            return {**section, "from": f"the run's config {found}"}
    init = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if model_class is not None:
        return {"class_path": None, "init_args": _strategy_class_paths(init),
                "from": "--model" + (" and the checkpoint's hyper_parameters" if init else ""), "data": {}}
    raise PeftConfigError(
        f"--ckpt_path {ckpt_path!r} does not say which LightningModule wrote it (its hyper_parameters name no "
        f"class: the module called no save_hyperparameters(), or was not built by LightningCLI), and there is no "
        f"config.yaml beside it ({', '.join(RUN_CONFIG_PLACES)} relative to its folder). Pass --config with the "
        "run's config (LightningCLI writes it to <log_dir>/config.yaml), or --model your.module.Class with "
        "--model.init_args.KEY VALUE for its arguments"
    )


def read_yaml_config(path: str, what: str) -> dict[str, Any]:
    """A LightningCLI config file as a dict; a :class:`PeftConfigError` naming ``what`` when it is not one."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PeftConfigError(f"{what} {path!r} cannot be read as YAML: {err}") from None
    if not isinstance(data, dict):
        raise PeftConfigError(f"{what} {path!r} is not a mapping of LightningCLI groups (model:, data:, ...)")
    return data


def _section_of(config: dict[str, Any], path: str, what: str) -> dict[str, Any]:
    if "model" not in config:
        for sub in ("fit", "validate", "test", "predict"):
            if isinstance(config.get(sub), dict) and "model" in config[sub]:
                config = config[sub]
                break
    model = config.get("model")
    if model is None:
        raise PeftConfigError(f"{what} {path!r} has no 'model' section; expected the run's LightningCLI config")
    if isinstance(model, str):
        model = {"class_path": model}
    if not isinstance(model, dict):
        raise PeftConfigError(f"{what} {path!r}: model={model!r} is not a class path or a mapping")
    if "class_path" not in model and "init_args" not in model:
        model = {"init_args": model}  # a LightningCLI built on one model class: its arguments directly
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return {"class_path": model.get("class_path"), "init_args": dict(model.get("init_args") or {}), "data": data}


def _strategy_class_paths(value: Any) -> Any:
    """Strategy config dicts (``{"name": "lora", "r": 8}``, as checkpoints store strategies) as jsonargparse's
    ``{"class_path": ..., "init_args": ...}``."""
    if isinstance(value, list):
        return [_strategy_class_paths(v) for v in value]
    if not isinstance(value, dict):
        return value
    cls = registered_strategies().get(value.get("name")) if isinstance(value.get("name"), str) else None
    if cls is not None and "class_path" not in value:
        init = {k: v for k, v in value.items() if k != "name"}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init}
    return {k: _strategy_class_paths(v) for k, v in value.items()}


def _class_paths(value: Any, where: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        found = [(where or "model", value[k]) for k in ("class_path", "_class_path")
                 if isinstance(value.get(k), str)]
        for key, item in value.items():
            found += _class_paths(item, f"{where}.{key}" if where else str(key))
        return found
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _class_paths(item, f"{where}[{i}]")]
    return []


def _check_class_paths(section: dict[str, Any], what: str, model_class: str | None = None) -> None:
    """Refuse a class whose module is neither imported nor ours: a file we did not get from the user names it."""
    found = {"class_path": model_class or section.get("class_path"), "init_args": section["init_args"]}
    for where, path in _class_paths(found):
        module = path.rpartition(".")[0]
        if path == model_class or not module or module in sys.modules or module.split(".")[0] in TRUSTED_PACKAGES:
            continue
        raise PeftConfigError(
            f"{what} names the class {path!r} (at {where}), whose module is not imported; lightning-peft does not "
            "import code named by a checkpoint or a config it found. If you trust it, pass "
            + (f"--config {what}" if Path(what).is_file() else f"--model {path}")
            + " (or --config with the run's config)"
        )


def build_module(checkpoint: dict[str, Any], ckpt_path: str, config: str | None,
                 overrides: list[str]) -> tuple[L.LightningModule, dict[str, Any]]:
    """The run's LightningModule rebuilt (base model as its ``__init__`` loads it) with the checkpoint's adapters."""
    overrides, model_class = _pop_model_class(overrides)
    section = module_section(checkpoint, ckpt_path, config, model_class)
    if model_class is not None:
        section["class_path"] = model_class
    if not section.get("class_path"):
        raise PeftConfigError(
            f"{section['from']} gives the module's arguments but not its class; pass --model your.module.Class"
        )
    parser = ArgumentParser(exit_on_error=False, prog="lightning-peft")
    parser.add_subclass_arguments(L.LightningModule, "model", fail_untyped=False, required=True)
    model = {"class_path": section["class_path"], "init_args": section["init_args"]}
    try:
        cfg = parser.parse_args(["--model", json.dumps(model, default=str), *overrides])
        module = parser.instantiate_classes(cfg).model
    except PeftConfigError:
        raise
    except Exception as err:  # jsonargparse's parse errors, or the module's own __init__
        raise PeftConfigError(
            f"cannot build the module {section['class_path']!r} from {section['from']}: {err}"
        ) from err
    sets = checkpoint_sets(checkpoint[CHECKPOINT_KEY])
    if any(not _has_path(module, e.get("model_attr")) for e in sets):
        module.configure_model()  # a module that builds its backbone lazily, as Lightning calls it before fit
    restore_from_checkpoint(module, checkpoint)
    for entry in sets:  # a stack the module applied itself (PEFTMixin) must be the checkpoint's
        stack = get_stack(peft_target(module, entry.get("model_attr")), entry["stack"]["name"], required=True)
        ours, saved = [s.config() for s in stack.strategies], list(entry["stack"]["strategies"])
        if ours != saved:
            raise PeftConfigError(
                f"{section['class_path']} built from {section['from']} applies adapter set "
                f"{stack.name!r} as {ours}, but the checkpoint's is {saved}; build it with the run's configuration"
            )
    _restore_label_names(module, checkpoint)
    return module, section


def _has_path(module: L.LightningModule, attr: str | None) -> bool:
    target: Any = module
    for part in (attr or "").split(".") if attr else []:
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


def _restore_label_names(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """A classifier trained on ``TextDataModule`` data: the label names into the Hugging Face config."""
    labels = (checkpoint.get("TextDataModule") or {}).get("labels")
    config = getattr(getattr(module, "model", None), "config", None)
    if labels and hasattr(module, "label_names") and config is not None:
        module.label_names = list(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {n: i for i, n in enumerate(labels)}


def _tokenizer(value: str | None, module: L.LightningModule, section: dict[str, Any]) -> Any:
    from lightning_peft.cli.data.encoding import load_tokenizer

    if value is not None:
        return None if value.lower() == "none" else load_tokenizer(value)
    data_args = (section.get("data") or {}).get("init_args") or {}
    name = data_args.get("tokenizer") or getattr(module, "model_name_or_path", None)
    if not isinstance(name, str):
        return None
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as err:
        print(f"lightning-peft: no tokenizer saved (loading {name!r} failed: {err}); pass --tokenizer",
              file=sys.stderr)
        return None


__all__ = ["COMMANDS", "build_module", "module_section", "parser_for", "read_checkpoint", "read_yaml_config", "run_convert"]
