"""The data module under its first import path (recipes' ``class_path``): a re-export of
:mod:`lightning_peft.cli.data`."""

from lightning_peft.cli.data import *  # noqa: F403  (the same names, one list: cli.data.__all__)
from lightning_peft.cli.data import __all__  # noqa: F401
