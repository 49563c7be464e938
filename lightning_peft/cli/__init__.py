"""The ``lightning-peft`` command (LightningCLI over any LightningModule / LightningDataModule, with ready task
modules and a text data module; ``merge`` / ``export`` from a checkpoint), the task modules
(:mod:`lightning_peft.cli.tasks`), the data modules (:mod:`lightning_peft.cli.data`) and
:func:`register_short_names` for a user's own LightningCLI."""

from lightning_peft.cli.command import (
    CONFIG_DIR,
    PeftCLI,
    main,
    print_recipes,
    recipe_dir,
    recipes,
    resolve_config_args,
    run_cli,
)
from lightning_peft.cli.names import register_short_names

__all__ = [
    "CONFIG_DIR",
    "PeftCLI",
    "main",
    "print_recipes",
    "recipe_dir",
    "recipes",
    "register_short_names",
    "resolve_config_args",
    "run_cli",
]
