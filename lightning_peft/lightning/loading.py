"""Loading a LightningModule from an adapter-only checkpoint written by the PEFT callback."""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import lightning as L
import torch

from lightning_peft.lightning.checkpointing import CHECKPOINT_KEY, restore_from_checkpoint
from lightning_peft.lightning.mixin import PEFTMixin


def load_peft_checkpoint(module_cls: type[L.LightningModule], checkpoint_path: str | os.PathLike,
                         map_location: Any = None, **kwargs: Any) -> L.LightningModule:
    """``module_cls.load_from_checkpoint(checkpoint_path, **kwargs)`` for checkpoints the PEFT callback wrote.

    Such checkpoints hold the adapters only, so Lightning's own loader cannot fill the module's frozen backbone
    from them (it fails listing the backbone's keys, or with ``strict=False`` leaves the adapters out). This
    builds the module as Lightning does (saved hyperparameters, then ``kwargs``), with the backbone as
    ``__init__`` makes it (the pretrained weights), applies every recorded adapter set and loads its weights.
    Tensors the sets train in place (e.g. an unfrozen head) keep the base model's values as their base, so
    ``disable_adapters`` still gives the base model's output. A checkpoint without adapters, or a module class
    that restores PEFT itself (:class:`~lightning_peft.PEFTMixin`), is loaded by ``load_from_checkpoint``.

    Args:
        module_cls: the LightningModule class that was trained.
        checkpoint_path: the ``.ckpt`` file.
        map_location: as for ``load_from_checkpoint``.
        kwargs: ``__init__`` arguments overriding the saved hyperparameters, as for ``load_from_checkpoint``.

    Example:
        >>> module = load_peft_checkpoint(Classifier, "checkpoints/last.ckpt", path=base_model_path)
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    if CHECKPOINT_KEY not in checkpoint or issubclass(module_cls, PEFTMixin):
        return module_cls.load_from_checkpoint(checkpoint_path, map_location=map_location, **kwargs)
    # Lightning builds the module from everything but the state dict: the backbone stays as __init__ made it
    buffer = io.BytesIO()
    torch.save({**checkpoint, "state_dict": {}}, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(contains no parameters|Found keys that are in the model)")
        module = module_cls.load_from_checkpoint(buffer, map_location=map_location, strict=False, **kwargs)
    restore_from_checkpoint(module, checkpoint)
    return module


__all__ = ["load_peft_checkpoint"]
