"""The ``lightning-peft`` command (LightningCLI over the task modules and the text data module), the task modules
(:mod:`lightning_peft.cli.tasks`) and the data modules (:mod:`lightning_peft.cli.data`)."""

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

__all__ = [
    "CONFIG_DIR",
    "PeftCLI",
    "main",
    "print_recipes",
    "recipe_dir",
    "recipes",
    "resolve_config_args",
    "run_cli",
]
