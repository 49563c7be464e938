"""The ``lightning-peft`` command: LightningCLI over any LightningModule / LightningDataModule (the task modules and
``TextDataModule`` are the ready-made ones).

Usage::

    lightning-peft fit --config demo                     # an installed recipe, by name
    lightning-peft fit --config my_recipe.yaml --trainer.max_epochs 3
    lightning-peft fit --model my.module.MyModule --data my.module.MyData --config peft.yaml  # PEFT callback
    lightning-peft recipes                               # list the installed recipes and their commands
    lightning-peft export --ckpt_path CKPT --output DIR  # adapter folder (see lightning_peft.cli.convert)
    lightning-peft merge --ckpt_path CKPT --output DIR   # merged transformers model folder
    lightning-peft estimate --config RECIPE --model-config llama-2-7b  # peak training memory per device, by part

``--config NAME`` takes the name of a recipe (the repository's ``cli_configs/``, installed with the package as
``lightning_peft/cli/recipes/``) or a path. Strategies are written
``{class_path: LoRA, init_args: {r: 8}}``; callbacks by short name (``PEFT``, ``RankBudgetScheduler``,
``AdapterExport``). ``--optimizer`` / ``--lr_scheduler`` become the task module's ``optimizer`` / ``scheduler``,
built over the trainable parameters only, after the PEFT stack is applied.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_peft.cli.data import TextDataModule  # noqa: F401  (imported: --data TextDataModule resolves)
from lightning_peft.cli.names import register_short_names
from lightning_peft.cli.tasks import CausalLM, Seq2SeqLM, SequenceClassification, TaskModule  # noqa: F401
from lightning_peft.errors import PeftConfigError

# the short names recipes use (``class_path: PEFT``, ``class_path: LoRA``), resolved before anything is parsed
register_short_names()


def recipe_dir() -> Path:
    """Where the recipes are: ``lightning_peft/cli/recipes/`` in an installed wheel (setuptools maps the
    repository's ``cli_configs/`` there), else ``cli_configs/`` beside the package (a source checkout, or an
    editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "recipes"
    return installed if installed.is_dir() else here.parents[1] / "cli_configs"


CONFIG_DIR = recipe_dir()
#: top-level LightningCLI groups moved into the task module's arguments
MOVED = {"optimizer": "optimizer", "lr_scheduler": "scheduler"}


def recipes() -> dict[str, Path]:
    """The installed recipes, by name (file stem)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_config_args(args: list[str]) -> list[str]:
    """Replace ``--config NAME`` (``-c NAME``, ``--config=NAME``) by the installed recipe's path, and short torch
    optimizer / scheduler names (``--optimizer AdamW``) by their import paths.

    The short names are qualified here because jsonargparse refuses a name that several imported classes share,
    and bitsandbytes (imported for quantization) defines its own ``AdamW``, ``Adam``, ``SGD``, ...
    """
    out = list(args)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if not eq and i + 1 < len(out):
            value = out[i + 1]
        fixer = _config_path if key in ("--config", "-c") else _TORCH_CLASS_ARGS.get(key)
        if fixer is None or (not eq and i + 1 >= len(out)):
            continue
        if eq:
            out[i] = f"{key}={fixer(value)}"
        else:
            out[i + 1] = fixer(value)
    return out


def _torch_class(module: Any) -> Any:
    def qualify(value: str) -> str:
        if value.isidentifier() and isinstance(getattr(module, value, None), type):
            return f"{module.__name__}.{value}"
        return value

    return qualify


_OPTIMIZERS, _SCHEDULERS = _torch_class(torch.optim), _torch_class(torch.optim.lr_scheduler)
_TORCH_CLASS_ARGS = {
    "--optimizer": _OPTIMIZERS,
    "--lr_scheduler": _SCHEDULERS,
    "--model.optimizer": _OPTIMIZERS,
    "--model.init_args.optimizer": _OPTIMIZERS,
    "--model.scheduler": _SCHEDULERS,
    "--model.init_args.scheduler": _SCHEDULERS,
}


def _config_path(value: str) -> str:
    if Path(value).exists() or "/" in value or "\\" in value or value.endswith((".yaml", ".yml", ".json")):
        return value
    known = recipes()
    if value in known:
        return str(known[value])
    raise SystemExit(
        f"lightning-peft: --config {value!r} is neither a file nor an installed recipe; recipes: "
        f"{', '.join(known)} (see `lightning-peft recipes`)"
    )


class PeftCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``--model`` / ``--data`` by import path).

    For the task modules, the data module's ``tokenizer`` is linked to the model's ``model_name_or_path`` (the
    link is skipped for a module without that argument) and ``--optimizer`` / ``--lr_scheduler`` move into the
    module's ``optimizer`` / ``scheduler``; any other module is Lightning's, with the ``PEFT`` callback in the
    config adding the adapters.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        model = config.get("model")
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        for group, argument in MOVED.items():
            value = config.get(group)
            if value is None or init_args is None or argument not in init_args:
                continue  # not a task module: Lightning's own handling, checked by the optimizer coverage check
            if init_args.get(argument) is not None:
                raise PeftConfigError(
                    f"--{group} and --model.init_args.{argument} are both given; give the {group} once "
                    f"(both mean the task module's {argument}, built over the trainable parameters only)"
                )
            init_args[argument] = value
            config[group] = None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps a constructor's error in "Does not validate against any of the Union subtypes"
            # reports; surface the constructor's own message (e.g. "r=0 is not valid; expected ...")
            reason = _innermost_reason(str(err))
            if reason is None or isinstance(err, PeftConfigError):
                raise
            raise PeftConfigError(f"invalid configuration: {reason}") from err


_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Expected a", "Given value", "Not a valid")


def _innermost_reason(message: str) -> str | None:
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(_NOISE):
            return text
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-peft`` console script (``args`` defaults to ``sys.argv[1:]``)."""
    run_cli(args)


def run_cli(args: list[str] | None = None, run: bool = True) -> PeftCLI | None:
    """Build (and with ``run``, run) the CLI; returns it (``None`` for ``recipes``, ``merge``, ``export`` and
    ``estimate``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["recipes"]:
        print_recipes()
        return None
    if argv[:1] in (["merge"], ["export"]):
        from lightning_peft.cli.convert import run_convert

        run_convert(argv[0], resolve_config_args(argv[1:]))
        return None
    if argv[:1] == ["estimate"]:
        from lightning_peft.cli.estimate import run_estimate

        run_estimate(resolve_config_args(argv[1:]))
        return None
    resolved = resolve_config_args(argv)
    if args is None:  # LightningCLI warns when given args while sys.argv has some: hand it sys.argv instead
        sys.argv[1:] = resolved
    return PeftCLI(
        L.LightningModule,  # the task modules, or any LightningModule (with the PEFT callback in the config)
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"epilog": EPILOG, "fit": {}},  # the top-level help only (a subcommand key keeps it there)
        args=None if args is None else resolved,
        run=run,
    )


#: the subcommands of ``lightning-peft`` that are not LightningCLI's, listed under its top-level ``--help``
EPILOG = (
    "more subcommands: `recipes` (list the installed recipes), `merge --ckpt_path CKPT --output DIR` (a merged "
    "model folder from a checkpoint), `export --ckpt_path CKPT --output DIR` (an adapter folder in peft's layout "
    "from a checkpoint), `estimate --config RECIPE --model-config CONFIG_OR_PRESET` (peak training memory per "
    "device, by part, before any download); each takes --help"
)


def print_recipes() -> None:
    for name, path in recipes().items():
        first = path.read_text().splitlines()[:1]
        command = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        print(f"{name:28s} {command}")
