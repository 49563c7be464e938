"""The strategies under their first import path: a thin re-export of :mod:`lightning_peft.methods`."""

from lightning_peft.methods import *  # noqa: F403  (the same names, one list: methods.__all__)
from lightning_peft.methods import __all__  # noqa: F401
