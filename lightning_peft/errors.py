"""The package's own exceptions: subclasses of the built-in types a user would catch."""

from __future__ import annotations


class PeftConfigError(ValueError):
    """A strategy, stack or quantization setting the user gave cannot be applied to this model."""


class AdapterStateError(ValueError):
    """Adapter weights that do not fit the stack they are loaded into (missing, unexpected or misshapen keys)."""


def preview(names, limit: int = 12) -> str:
    """Comma-joined first ``limit`` names, with a count of the rest, for error messages."""
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown or "(none)"
