"""Files: atomic writes, adapter folders (:func:`save_adapters` / :func:`load_adapters`), the Hugging Face PEFT
layout, and the merged full-model export."""

from lightning_peft.io.adapters import load_adapters, read_adapter_tensors, read_manifest, save_adapters
from lightning_peft.io.merged import merge_and_export

__all__ = ["load_adapters", "merge_and_export", "read_adapter_tensors", "read_manifest", "save_adapters"]
