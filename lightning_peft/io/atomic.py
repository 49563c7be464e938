"""Files that are never half-written: atomic replacement of a file or a folder, atomic removal of a folder, and the
safetensors / JSON writers and checksums of an adapter folder.

Everything new is written beside its target (a hidden ``.<name>.tmp-<pid>-<token>``), fsynced, and renamed over
the target with ``os.replace``, then the parent directory is fsynced: a crash or kill at any point leaves the
previous complete version or the new complete one under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

#: temporary files and folders are named ``.<name>.tmp-<pid>-<token>`` beside the target
TMP_MARK = ".tmp-"


def _token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_replaceable(dirpath: str | os.PathLike, marker: str) -> Path:
    """``dirpath`` as a Path; ``FileExistsError`` unless it is absent, empty, or an export holding ``marker``.

    :func:`atomic_directory` checks this first; a caller with expensive work to do first can check it earlier.
    """
    final = Path(dirpath)
    if final.exists() and not (final.is_dir() and (not any(final.iterdir()) or (final / marker).is_file())):
        raise FileExistsError(
            f"dirpath={str(final)!r} exists and is not a lightning_peft export (no {marker}); refusing to "
            "replace it: choose a new or empty folder"
        )
    return final


@contextlib.contextmanager
def atomic_directory(dirpath: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a temporary folder beside ``dirpath``; on success it replaces ``dirpath`` by renames.

    A crash or kill at any point leaves either the previous complete folder or the new complete one under the
    final name (or, between the two renames, nothing and the previous one renamed aside), never a partial one.
    An existing ``dirpath`` is only replaced when it is empty or holds ``marker`` (a file this library writes
    into its exports), so a mistyped path never deletes someone's data.
    """
    final = check_replaceable(dirpath, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    token = _token()
    tmp = final.parent / f".{final.name}{TMP_MARK}{token}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            aside = final.parent / f".{final.name}.old-{token}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same directory, fsync and ``os.replace``."""
    _atomic_file(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it, fsync and ``os.replace``."""
    _atomic_file(path, "w", lambda f: f.write(text), encoding="utf-8", newline="")


def _atomic_file(path: str | os.PathLike, mode: str, write: Callable[[IO], Any], **open_kwargs: Any) -> None:
    """Open a temporary file beside ``path`` with ``mode``, ``write`` it, fsync, then ``os.replace`` it onto
    ``path`` (the temporary file is removed if anything fails)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{_token()}"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def remove_directory(folder: Path) -> None:
    """Delete ``folder`` so that it is either complete or gone: renamed aside atomically, then removed."""
    aside = folder.parent / f".{folder.name}.del-{uuid.uuid4().hex[:8]}"
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    """Flush every file of the new folder (and the folders) before the rename publishes it."""
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(child)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable; directories cannot be opened on some platforms, where this does nothing."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        if t.data_ptr() in seen and t.numel() > 0:  # tied tensors: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        out[key] = t
    save_file(out, str(path), metadata={"format": "pt"})


__all__ = [
    "TMP_MARK",
    "atomic_directory",
    "atomic_write_text",
    "atomic_torch_save",
    "check_replaceable",
    "remove_directory",
    "sha256_file",
    "write_json",
    "write_tensors",
]
