"""``python -m lightning_peft.cli``: the ``lightning-peft`` command."""

from lightning_peft.cli.command import main

main()
