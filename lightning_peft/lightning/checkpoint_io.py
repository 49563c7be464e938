"""Checkpoint files that are never half-written, whatever the machine's ``/tmp``.

Lightning's ``TorchCheckpointIO`` writes through ``_atomic_save``: ``torch.save`` to memory, then an fsspec
transaction that writes a ``tempfile.mkstemp()`` file in the *system* temp directory and ``shutil.move``-s it
to the checkpoint path. When ``/tmp`` is on the checkpoint's filesystem that move is a rename (atomic); when it
is not (``/tmp`` on tmpfs, a checkpoint directory on another disk or a network mount) ``shutil.move`` copies,
and a kill during the copy leaves a truncated file under the final name, e.g. ``last.ckpt``. Nothing is
fsynced either. :class:`AtomicCheckpointIO` writes through :func:`~lightning_peft.io.atomic.atomic_torch_save`
(a hidden temporary file in the checkpoint's own directory, fsync, ``os.replace``, fsync of the directory), so
the path holds the previous complete checkpoint or the new complete one. The PEFT callback installs it in ``setup`` in
place of a plain ``TorchCheckpointIO`` (also the one inside ``AdapterExport``'s wrapper) and puts the original
back in ``teardown``; remote paths and other CheckpointIO plugins are left alone.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from lightning_peft.io.atomic import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (see the module docstring).

    Example:
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()])  # the PEFT callback does this by itself
    """

    def __init__(self, replaced: TorchCheckpointIO | None = None) -> None:
        super().__init__()
        self.replaced = replaced  # the plugin put back by restore_checkpoint_io

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in ((protocol,) if isinstance(protocol, str) else protocol)
        if storage_options is not None or not local:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoint_io(trainer: L.Trainer) -> bool:
    """Put :class:`AtomicCheckpointIO` in place of the strategy's plain ``TorchCheckpointIO``.

    A wrapper that delegates to an ``inner`` plugin (``AdapterExport``'s) gets its inner plugin replaced.

    Returns:
        Whether a plugin was replaced.
    """
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO(replaced=current)
        return True
    inner = getattr(current, "__dict__", {}).get("inner")
    if type(inner) is TorchCheckpointIO:
        current.inner = AtomicCheckpointIO(replaced=inner)
        return True
    return False


def restore_checkpoint_io(trainer: L.Trainer) -> None:
    """Undo :func:`use_atomic_checkpoint_io` (the PEFT callback's ``teardown``): the Trainer is left as found."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, AtomicCheckpointIO) and current.replaced is not None:
        strategy.checkpoint_io = current.replaced
        return
    inner = getattr(current, "__dict__", {}).get("inner")
    if isinstance(inner, AtomicCheckpointIO) and inner.replaced is not None:
        current.inner = inner.replaced


__all__ = ["AtomicCheckpointIO", "restore_checkpoint_io", "use_atomic_checkpoint_io"]
