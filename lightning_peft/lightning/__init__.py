"""The Lightning layer: callbacks (PEFT, AdapterExport, RankBudgetScheduler), the mixin, checkpoint hooks and
checkpoint IO, distributed and precision checks. Thin hooks over the layers below, which know nothing of
Lightning.

Importing this package lets LightningCLI / jsonargparse take any strategy where ``Strategy`` is annotated:
jsonargparse treats dataclasses as final types, so ``strategies: list[Strategy]`` would refuse
``class_path: lightning_peft.LoRA``; enabling subclasses for ``Strategy`` makes YAML like ``- class_path: LoRA``
+ ``init_args: {r: 8}`` work for the task modules, the mixin and the PEFT callback. Every module here (so every
callback, the mixin and the CLI) is imported after this runs.
"""

from jsonargparse import set_parsing_settings

from lightning_peft.methods.base import Strategy

set_parsing_settings(subclasses_enabled=[Strategy])
