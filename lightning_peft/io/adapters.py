"""Save and load adapter folders (native + Hugging Face PEFT layout), atomically; no pickle anywhere.

A folder written by :func:`save_adapters` holds:

- ``lightning_peft.json``: the manifest: the stack's description (strategies, configs, unfreeze,
  quantization), the base model's identity (class, ``model_type``, ``name_or_path``, adapted modules with
  their shapes and a fingerprint of them), the library version, and the SHA-256 of every tensor file.
- the PEFT layout for the parts PEFT can represent (see :mod:`lightning_peft.io.peft_layout`): at the top of the
  folder when there is one part, else one subfolder per part (``lora/``, ``ia3/``, ``prompt/``).
- ``adapters.safetensors``: every adapter tensor of the stack not already stored unchanged in a PEFT file
  (the manifest's ``tensor_map`` says where those are), so that :func:`load_adapters` restores the stack
  bit for bit, including state PEFT has no place for (AdaLoRA masks, P-tuning encoders, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_peft.core.backend import base_kind, base_shape
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.core.state import ADAPTER_CONTAINER, DELTAS, PREFIX_HOST, PROMPT_HOST, get_stack
from lightning_peft.errors import AdapterStateError, preview
from lightning_peft.io.atomic import atomic_directory, sha256_file, write_json, write_tensors
from lightning_peft.io.peft_import import (
    check_set_name,
    is_peft_folder,
    load_peft_folder,
    make_room,
    restore_active,
)
from lightning_peft.io.peft_layout import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, build_peft_export, hf_root
from lightning_peft.stack.peft_stack import DEFAULT_SET, PeftStack, apply_kwargs, apply_peft

MANIFEST_NAME = "lightning_peft.json"
NATIVE_WEIGHTS_NAME = "adapters.safetensors"
MANIFEST_FORMAT = "lightning_peft.adapters"
MANIFEST_VERSION = 1


# -- the base model's identity -----------------------------------------------------------------------------------
def adapted_modules(stack: PeftStack) -> dict[str, list[int]]:
    """Qualified name -> [in_features, out_features] of every layer the stack adapts."""
    return {
        n: [m.in_features, m.out_features]
        for n, m in stack.model.named_modules()
        if isinstance(m, AdaptedLinear) and stack.name in m.adapters
    }


def fingerprint(modules: dict[str, list[int]]) -> str:
    text = json.dumps(sorted((n, list(s)) for n, s in modules.items()))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def base_identity(stack: PeftStack) -> dict[str, Any]:
    root, prefix = hf_root(stack)
    config = getattr(root, "config", None)
    modules = adapted_modules(stack)
    return {
        "class": type(stack.model).__name__,
        "hf_class": type(root).__name__ if config is not None else None,
        "hf_prefix": prefix,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": (getattr(config, "_name_or_path", None) or None) if config is not None else None,
        "adapted_modules": modules,
        "fingerprint": fingerprint(modules),
    }


# -- save --------------------------------------------------------------------------------------------------------
def save_adapters(
    model_or_stack: nn.Module | PeftStack,
    dirpath: str | os.PathLike,
    *,
    uniform_rank: bool = False,
    tokenizer: Any = None,
    name: str | None = None,
) -> Path:
    """Write the stack's adapters to ``dirpath`` (atomically): PEFT layout where possible + native files.

    Args:
        model_or_stack: the adapted model (or a module containing it, e.g. a LightningModule), or its stack.
        dirpath: the folder to (re)write.
        uniform_rank: zero-pad the LoRA part to one rank with one ``lora_alpha`` and no per-module patterns,
            for serving engines (vLLM, llama.cpp's converter) that read a single rank.
        tokenizer: saved into the folder with ``save_pretrained`` when given.
        name: which adapter set, when the model has several.

    Returns:
        The folder's path.

    Example:
        >>> save_adapters(model, "adapters/")  # then peft.PeftModel.from_pretrained(base, "adapters/")
    """
    stack = get_stack(model_or_stack, name, required=True)
    native = stack.adapter_state_dict()
    export = build_peft_export(stack, native, uniform_rank=uniform_rank)
    for strategy, reason in export.skipped.items():
        warnings.warn(
            f"save_adapters: {strategy}: {reason}; PeftModel.from_pretrained will not reproduce the "
            "model from this folder's PEFT files, load_adapters will",
            stacklevel=2,
        )
    nested = len(export.parts) > 1
    tensor_map: dict[str, list[str]] = {}
    parts_meta = []
    final = Path(dirpath)
    with atomic_directory(final, MANIFEST_NAME) as tmp:
        files: dict[str, dict[str, Any]] = {}
        for part in export.parts:
            sub = part.name if nested else "."
            folder = tmp / sub
            folder.mkdir(exist_ok=True)
            write_json(folder / PEFT_CONFIG_NAME, part.config)
            rel = os.path.normpath(os.path.join(sub, PEFT_WEIGHTS_NAME))
            write_tensors(folder / PEFT_WEIGHTS_NAME, part.tensors)
            files[rel] = {}
            for peft_key, native_key in part.verbatim.items():
                tensor_map.setdefault(native_key, [rel, peft_key])
            parts_meta.append(
                {
                    "name": part.name,
                    "path": sub,
                    "peft_type": part.config["peft_type"],
                    "strategies": part.strategies,
                }
            )
        rest = {k: v for k, v in native.items() if k not in tensor_map}
        if rest:
            write_tensors(tmp / NATIVE_WEIGHTS_NAME, rest)
            files[NATIVE_WEIGHTS_NAME] = {}
        for rel in files:
            path = tmp / rel
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "library_version": stack.describe().get("library_version"),
            "stack": stack.describe(),
            "base_model": base_identity(stack),
            "peft": {
                "layout": "nested" if nested else ("single" if export.parts else "none"),
                "parts": parts_meta,
                "not_exported": export.skipped,
            },
            "files": files,
            "tensor_map": tensor_map,
        }
        write_json(tmp / MANIFEST_NAME, manifest)  # written last: its presence marks a complete folder
    return final


# -- load --------------------------------------------------------------------------------------------------------
def read_manifest(dirpath: str | os.PathLike) -> dict[str, Any]:
    folder = Path(dirpath)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        hint = (
            " (it looks like a PEFT adapter: load_adapters reads it)"
            if (folder / PEFT_CONFIG_NAME).is_file()
            else ""
        )
        raise AdapterStateError(
            f"dirpath={str(folder)!r} has no {MANIFEST_NAME}; it is not a lightning_peft adapter folder{hint}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterStateError(f"{path} is corrupted: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise AdapterStateError(f"{path} is not a lightning_peft manifest (no format={MANIFEST_FORMAT!r})")
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        raise AdapterStateError(
            f"{path} has format_version={manifest['format_version']}, newer than this library reads "
            f"({MANIFEST_VERSION}); upgrade lightning_peft (written by {manifest.get('library_version')})"
        )
    return manifest


def _read_tensors(folder: Path, rel: str, expected: dict[str, Any] | None) -> dict[str, Tensor]:
    path = folder / rel
    if not path.is_file():
        raise AdapterStateError(f"{path} is missing; the adapter folder is incomplete")
    if expected:
        size = path.stat().st_size
        if size != expected.get("bytes", size) or sha256_file(path) != expected.get("sha256"):
            raise AdapterStateError(
                f"{path} is corrupted or truncated: {size} bytes, SHA-256 differs from the manifest's "
                f"({expected.get('bytes')} bytes when written)"
            )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterStateError(
            f"{path} is not a readable safetensors file (corrupted or truncated?): {err}"
        ) from None


def read_adapter_tensors(
    dirpath: str | os.PathLike, manifest: dict[str, Any] | None = None
) -> dict[str, Tensor]:
    """The stack's full native adapter state dict from a folder, checking every file against the manifest."""
    folder = Path(dirpath)
    manifest = manifest if manifest is not None else read_manifest(folder)
    files = manifest.get("files", {})
    cache: dict[str, dict[str, Tensor]] = {}

    def tensors_of(rel: str) -> dict[str, Tensor]:
        if rel not in cache:
            cache[rel] = _read_tensors(folder, rel, files.get(rel))
        return cache[rel]

    state: dict[str, Tensor] = {}
    if NATIVE_WEIGHTS_NAME in files:
        state.update(tensors_of(NATIVE_WEIGHTS_NAME))
    for native_key, (rel, peft_key) in manifest.get("tensor_map", {}).items():
        source = tensors_of(rel)
        if peft_key not in source:
            raise AdapterStateError(
                f"{folder / rel} has no tensor {peft_key!r} (for {native_key!r}); "
                "the folder was modified after it was written"
            )
        state[native_key] = source[peft_key]
    return state


def check_base(model: nn.Module, manifest: dict[str, Any]) -> None:
    """Raise naming the first difference between ``model`` and the base the adapters were saved from."""
    base = manifest.get("base_model", {})
    config = getattr(model, "config", None)
    saved_type, our_type = base.get("model_type"), getattr(config, "model_type", None)
    if saved_type and our_type and saved_type != our_type:
        raise AdapterStateError(
            f"base model mismatch: the adapters were saved from a {saved_type!r} model ({base.get('hf_class')}), "
            f"this is a {our_type!r} model ({type(model).__name__})"
        )
    modules = dict(model.named_modules())
    for name, (n_in, n_out) in base.get("adapted_modules", {}).items():
        module = modules.get(name)
        if module is None:
            raise AdapterStateError(
                f"base model mismatch: adapted module {name!r} does not exist in {type(model).__name__} "
                f"(saved from {base.get('class')})"
            )
        if not (base_kind(module) or isinstance(module, AdaptedLinear)):
            raise AdapterStateError(
                f"base model mismatch: {name!r} is a {type(module).__name__}, not a linear, embedding or conv layer"
            )
        shape = (
            [module.in_features, module.out_features]
            if isinstance(module, AdaptedLinear)
            else list(base_shape(module))
        )
        if shape != [n_in, n_out]:
            raise AdapterStateError(
                f"base model mismatch: {name!r} has (in, out) = {tuple(shape)}, the adapters were saved for "
                f"{(n_in, n_out)}"
            )


def _rebase(manifest: dict[str, Any], model: nn.Module) -> tuple[dict[str, Any], str]:
    """When saved from a LightningModule but loaded onto the bare HF model inside it: strip the prefix."""
    base = manifest.get("base_model", {})
    prefix = base.get("hf_prefix") or ""
    if (
        not prefix
        or type(model).__name__ == base.get("class")
        or type(model).__name__ != base.get("hf_class")
    ):
        return manifest, ""
    manifest = json.loads(json.dumps(manifest))
    manifest["base_model"]["adapted_modules"] = {
        k.removeprefix(prefix): v for k, v in base.get("adapted_modules", {}).items()
    }
    manifest["stack"]["unfreeze"] = [u.removeprefix(prefix) for u in manifest["stack"].get("unfreeze", [])]
    return manifest, prefix


def rename_set_keys(state: dict[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    """``state`` with the keys of adapter set ``old`` renamed to set ``new``.

    A set's own tensors live in per-set containers (``<layer>.adapters.<set>.*``,
    ``<module>.lightning_peft_adapter.<set>.*``, ``lightning_peft_prompts.sets.<set>.*``, ``lightning_peft_prefixes.sets.<set>.*``); only the set segment
    right after one of those containers is renamed, so a base module that happens to share the set's name, and
    the tensors a set trains in place in the base (an unfrozen head, BitFit's biases), keep their keys.
    """
    if old == new:
        return dict(state)
    containers = "|".join(
        re.escape(c) for c in (DELTAS, ADAPTER_CONTAINER, f"{PROMPT_HOST}.sets", f"{PREFIX_HOST}.sets")
    )
    pattern = re.compile(rf"(^|\.)({containers})\.{re.escape(old)}(\.|$)")
    return {pattern.sub(lambda m: f"{m[1]}{m[2]}.{new}{m[3]}", k): v for k, v in state.items()}


def load_adapters(model: nn.Module, dirpath: str | os.PathLike, name: str | None = None, *,
                  replace: bool = False) -> PeftStack:
    """Rebuild the saved stack on a fresh base ``model`` and load its adapter tensors (bit for bit).

    ``dirpath`` may also be a folder Hugging Face ``peft`` wrote (``save_pretrained``: ``adapter_config.json`` and
    ``adapter_model.safetensors``, no manifest): LoRA (rsLoRA, DoRA, rank / alpha patterns, embeddings, convs,
    GPT-2 ``Conv1D``), AdaLoRA, IA3, prompt tuning and P-tuning (as prompt tuning with the saved embeddings),
    with ``modules_to_save`` as unfrozen modules (:mod:`lightning_peft.io.peft_import`). Unsupported types and
    options are refused by name before the model is touched.

    The set can be loaded under any ``name``, whatever name it was saved under: folders written by the ``PEFT``
    callback and ``AdapterExport`` hold the callback's set name (``"default"`` unless ``PEFT(name=...)``), and
    two of them load side by side as ``load_adapters(model, a, name="task_a")`` and
    ``load_adapters(model, b, name="task_b")``.

    Args:
        model: the base model the adapters were trained on, without them (built or loaded the same way); the
            bare transformers model works too when the adapters were saved from a LightningModule around it.
            It may already hold other adapter sets (see :mod:`lightning_peft.stack.sets`).
        dirpath: a folder written by :func:`save_adapters` (or the ``AdapterExport`` callback), or by ``peft``.
        name: adapter set name to apply under (default: the saved one; ``"default"`` for a ``peft`` folder).
        replace: a set ``name`` already on ``model`` is refused unless ``replace=True``, which unloads it once the
            folder has been read and checked against the model.

    Returns:
        The new stack. Any mismatch (other architecture, sizes, target modules, missing or unexpected tensors,
        corrupted files) raises :class:`~lightning_peft.errors.AdapterStateError` and leaves ``model`` as it was.

    Example:
        >>> stack = load_adapters(AutoModelForCausalLM.from_pretrained(base_id), "adapters/")
    """
    folder = Path(dirpath)
    if not (folder / MANIFEST_NAME).is_file() and is_peft_folder(folder):
        return load_peft_folder(model, folder, name, replace)
    manifest, prefix = _rebase(read_manifest(folder), model)
    desc = manifest["stack"]
    saved_name = desc.get("name", DEFAULT_SET)
    name = name or saved_name
    check_set_name(model, name, replace)
    check_base(model, manifest)
    state = read_adapter_tensors(folder, read_manifest(folder))
    if prefix:
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    state = rename_set_keys(state, saved_name, name)
    extras: dict[str, Any] = {}
    if desc.get("quantization"):

        extras = apply_kwargs(desc)
    previous = make_room(model, name)  # replace=True; another set is active again if this load fails
    stack = apply_peft(
        model,
        desc["strategies"],
        unfreeze=desc.get("unfreeze") or None,
        name=name,
        **extras,
    )
    try:
        saved = set(manifest["base_model"].get("adapted_modules", {}))
        ours = set(adapted_modules(stack))
        if saved != ours:
            extra, missing = sorted(ours - saved), sorted(saved - ours)
            raise AdapterStateError(
                "base model mismatch: the strategies adapt other modules on this model than on the saved one"
                + (f"; not in the saved adapters: {preview(extra, 4)}" if extra else "")
                + (f"; missing here: {preview(missing, 4)}" if missing else "")
            )
        expected = set(stack.adapter_keys())
        unexpected, missing_keys = sorted(set(state) - expected), sorted(expected - set(state))
        if unexpected or missing_keys:
            raise AdapterStateError(
                f"adapter tensors in {folder} do not match the rebuilt stack {stack.describe_short()}"
                + (f"; missing: {preview(missing_keys, 6)}" if missing_keys else "")
                + (f"; unexpected: {preview(unexpected, 6)}" if unexpected else "")
            )
        stack.load_adapter_state_dict(state, strict=True)
    except BaseException:
        stack.remove()
        restore_active(model, previous)
        raise
    return stack


__all__ = [
    "MANIFEST_NAME",
    "NATIVE_WEIGHTS_NAME",
    "atomic_directory",
    "load_adapters",
    "read_adapter_tensors",
    "read_manifest",
    "rename_set_keys",
    "save_adapters",
]
