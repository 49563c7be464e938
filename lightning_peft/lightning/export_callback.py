"""The ``AdapterExport`` callback: an adapter folder beside every checkpoint, and one at the end of fit.

How it sees checkpoints: Lightning gives callbacks no hook with checkpoint paths or their removal by
``ModelCheckpoint``'s top-k (REFERENCE.md); only the strategy's ``CheckpointIO`` sees ``save_checkpoint(path)``
and ``remove_checkpoint(path)``. So ``setup`` wraps the strategy's CheckpointIO (whatever it is: the default
``TorchCheckpointIO``, an ``AsyncCheckpointIO``, a user plugin) in one that delegates every call and then
writes, or removes, the adapter folder of that path; ``teardown`` puts the original back. This follows every
path Lightning writes, including ``trainer.save_checkpoint(...)`` and any number of ``ModelCheckpoint``
callbacks, with no bookkeeping of ``best_k_models`` that could drift. Lightning only calls CheckpointIO on
global rank zero; the callback also checks ``trainer.is_global_zero`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import Callback

from lightning_peft.core.state import get_stack
from lightning_peft.io.adapters import MANIFEST_NAME, save_adapters
from lightning_peft.io.atomic import remove_directory

FINAL_NAME = "final"


class _ExportingCheckpointIO(CheckpointIO):
    """Delegates to the wrapped CheckpointIO, then exports (or removes) the adapter folder of each path."""

    def __init__(self, inner: CheckpointIO, callback: AdapterExport) -> None:
        self.inner = inner
        self.callback = callback

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.callback._export_for(path)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        self.callback._remove_for(path)

    def teardown(self) -> None:
        self.inner.teardown()

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped plugin offers
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class AdapterExport(Callback):
    """Write an adapter folder (PEFT layout + native files) beside every checkpoint, and ``final/`` after fit.

    Each checkpoint ``<dir>/<name>.ckpt`` gets the folder ``<dir>/<name>/`` (or ``<dirpath>/<name>/`` when
    ``dirpath`` is given), which ``peft.PeftModel.from_pretrained(base, folder)`` or
    :func:`lightning_peft.load_adapters` loads; when ``ModelCheckpoint`` deletes a checkpoint (top-k), its
    folder goes too. At the end of fit the adapters are written to ``<dirpath>/final/`` (default: the first
    ``ModelCheckpoint``'s directory, else ``trainer.default_root_dir``). Every folder is written to a temporary
    name in the same directory and renamed into place, so a crash never leaves a half-written folder.
    With ``ModelCheckpoint(save_last="link")`` the ``last.ckpt`` symlink gets no folder of its own (Lightning
    creates it without CheckpointIO); the checkpoint it points to has one.

    Args:
        dirpath: where the folders go; ``None`` puts each beside its checkpoint.
        every_checkpoint: export beside every checkpoint Lightning saves.
        final: export ``final/`` at the end of ``fit``.
        uniform_rank: one rank and ``lora_alpha`` for the whole LoRA part (for vLLM / llama.cpp).
        name: the adapter set to export (the ``PEFT`` callback's ``name``) when the module holds several, e.g.
            with one ``PEFT`` callback per model part; default: the active set. The folder records the set under
            its name; :func:`~lightning_peft.load_adapters` can load it under any other.

    Example:
        >>> trainer = L.Trainer(callbacks=[PEFT([LoRA(r=8)]), ModelCheckpoint(save_top_k=2, monitor="val_loss"),
        ...                                AdapterExport()])
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_checkpoint: bool = True,
        final: bool = True,
        uniform_rank: bool = False,
        name: str | None = None,
    ) -> None:
        self.dirpath = dirpath
        self.name = name
        self.every_checkpoint = every_checkpoint
        self.final = final
        self.uniform_rank = uniform_rank
        self._trainer: L.Trainer | None = None
        self._pl_module: L.LightningModule | None = None
        self._io: _ExportingCheckpointIO | None = None

    # -- paths -----------------------------------------------------------------------------------------------
    def folder_for(self, checkpoint_path: str | os.PathLike) -> Path:
        """The adapter folder that goes with a checkpoint file."""
        path = Path(checkpoint_path)
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name + ".adapter"
        return (Path(self.dirpath) if self.dirpath else path.parent) / stem

    def final_folder(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath) / FINAL_NAME
        ckpt = trainer.checkpoint_callback
        base = getattr(ckpt, "dirpath", None) or trainer.default_root_dir
        return Path(base) / FINAL_NAME

    # -- hooks -----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer, self._pl_module = trainer, pl_module
        if self.every_checkpoint and stage == "fit":
            current = trainer.strategy.checkpoint_io
            if not (isinstance(current, _ExportingCheckpointIO) and current.callback is self):
                self._io = _ExportingCheckpointIO(current, self)
                trainer.strategy.checkpoint_io = self._io

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._io is not None and trainer.strategy.checkpoint_io is self._io:
            trainer.strategy.checkpoint_io = self._io.inner
        self._io = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.final and trainer.is_global_zero:
            stack = get_stack(pl_module, self.name, required=True)
            save_adapters(stack, self.final_folder(trainer), uniform_rank=self.uniform_rank)

    # -- called by the CheckpointIO wrapper -------------------------------------------------------------------
    def _export_for(self, checkpoint_path: Any) -> None:
        trainer, pl_module = self._trainer, self._pl_module
        if trainer is None or pl_module is None or not trainer.is_global_zero:
            return
        stack = get_stack(pl_module, self.name, required=True)
        save_adapters(stack, self.folder_for(checkpoint_path), uniform_rank=self.uniform_rank)

    def _remove_for(self, checkpoint_path: Any) -> None:
        trainer = self._trainer
        if trainer is not None and not trainer.is_global_zero:
            return
        folder = self.folder_for(checkpoint_path)
        if not (folder / MANIFEST_NAME).is_file():  # only folders this callback wrote
            return
        remove_directory(folder)  # atomic: the folder is either complete or gone


__all__ = ["AdapterExport"]
