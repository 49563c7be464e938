"""Import an adapter folder that Hugging Face ``peft`` wrote (``save_pretrained``): ``adapter_config.json`` +
``adapter_model.safetensors``, no ``lightning_peft.json``.

The folder's ``peft_type`` picks the strategy class that imports it (:func:`~lightning_peft.methods.peft_protocol.
peft_importer`: LoRA for ``LORA``, AdaLoRA, IA3, and prompt tuning for ``PROMPT_TUNING`` and ``P_TUNING``, or a
strategy a user registered). That class builds itself from the config (``Strategy.from_peft``, refusing the options
it cannot honour by name) and turns ``peft``'s tensors of each module into its own (``Strategy.peft_state``,
checking them against the module's shape). Modules ``peft`` saves in full (``modules_to_save``, e.g. a sequence
classifier's head) become the stack's ``unfreeze`` modules with the saved weights.

Everything is read and checked before the model is touched; then the stack is applied and loaded, and removed
again if anything still fails, so a folder is never half-loaded. No pickle: an ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_peft.core.layer import AdaptedLayer
from lightning_peft.core.state import get_state
from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.io.peft_common import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, hf_model_root
from lightning_peft.methods.base import Strategy
from lightning_peft.methods.peft_protocol import PREFIX_PART, PROMPT_PART, peft_importer
from lightning_peft.stack.peft_stack import DEFAULT_SET, PeftStack, apply_peft

#: ``peft``'s key prefix: the tuner's model inside ``PeftModel`` (LoRA, IA3, ...), or the model itself (prompts)
_KEY_PREFIX = {PROMPT_PART: "base_model.", PREFIX_PART: "base_model."}
_DEFAULT_KEY_PREFIX = "base_model.model."


@dataclass
class PeftImport:
    """A ``peft`` folder read and checked against a model, before anything is applied."""

    strategy: Strategy
    #: module name on the model (``""`` for a prompt) -> the strategy's state for the delta or provider there
    states: dict[str, dict[str, Tensor]]
    #: ``modules_to_save``: module names on the model, and their tensors by parameter name on the model
    unfreeze: list[str] = field(default_factory=list)
    unfrozen: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def is_peft_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a ``peft`` adapter (an ``adapter_config.json``)."""
    return (Path(folder) / PEFT_CONFIG_NAME).is_file()


def read_peft_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The folder's ``adapter_config.json`` and tensors (safetensors only)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterStateError(f"{folder / PEFT_CONFIG_NAME} is not readable JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterStateError(f"{folder / PEFT_CONFIG_NAME} holds {type(config).__name__}, not a JSON object")
    path = folder / PEFT_WEIGHTS_NAME
    if not path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise AdapterStateError(
            f"dirpath={str(folder)!r} has no {PEFT_WEIGHTS_NAME}"
            + ("; its adapter_model.bin is a pickle, which is never loaded (save with safe_serialization=True)"
               if pickled else "; the peft folder is incomplete")
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterStateError(f"{path} is not a readable safetensors file: {err}") from None
    return config, tensors


def _group(tensors: dict[str, Tensor], cls: type[Strategy]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """Tensors by module and key ending (one of the class's ``peft_suffixes``), and the rest (by key relative to
    the transformers model)."""
    prefix = _KEY_PREFIX.get(cls.peft_part, _DEFAULT_KEY_PREFIX)  # type: ignore[arg-type]
    suffixes = tuple(cls.peft_suffixes)
    grouped: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for raw, tensor in tensors.items():
        key = raw.removeprefix(prefix)
        for suffix in sorted(suffixes, key=len, reverse=True):
            if key == suffix or key.endswith("." + suffix):
                grouped.setdefault(key[: -len(suffix)].rstrip("."), {})[suffix] = tensor
                break
        else:
            rest[key] = tensor
    return grouped, rest


def _base_of(root: nn.Module, module: str, modules: dict[str, nn.Module]) -> nn.Module:
    if module == "":
        get = getattr(root, "get_input_embeddings", None)
        if get is None or get() is None:
            raise AdapterStateError(f"the peft folder holds prompt embeddings, but {type(root).__name__} has no "
                                    "input embeddings to prepend them to")
        return get()
    base = modules.get(module)
    if base is None:
        raise AdapterStateError(f"the peft folder adapts module {module!r}, which does not exist in "
                                f"{type(root).__name__}; it was saved from another model")
    return base.base_layer if isinstance(base, AdaptedLayer) else base


def _extras(root: nn.Module, prefix: str, rest: dict[str, Tensor], adapted: set[str],
            modules_to_save: list[str]) -> tuple[list[str], dict[str, Tensor]]:
    """``modules_to_save`` tensors (unfreeze modules + values), after checking every other leftover key."""
    named = dict(root.state_dict(keep_vars=True))
    unfreeze: list[str] = []
    values: dict[str, Tensor] = {}
    for key, tensor in sorted(rest.items()):
        module = key.rpartition(".")[0]
        if module.endswith(".base_layer") and module.removesuffix(".base_layer") in adapted:
            # peft saves an adapted embedding's base weights too (save_embedding_layers): they must be this model's
            own = named.get(module.removesuffix(".base_layer") + "." + key.rpartition(".")[2])
            if own is None or own.shape != tensor.shape or not torch.equal(own.detach().cpu(), tensor.to(own.dtype)):
                raise AdapterStateError(
                    f"the peft folder saves the base weights {key!r}, which differ from this model's (resized or "
                    "other embeddings); load it onto the model it was trained on"
                )
            continue
        if not any(module == m or module.endswith("." + m) for m in modules_to_save):
            raise AdapterStateError(f"the peft folder has tensor {key!r}, which is neither an adapter tensor of its "
                                    f"peft_type nor in its modules_to_save={modules_to_save!r}")
        own = named.get(key)
        if own is None:
            raise AdapterStateError(f"modules_to_save tensor {key!r} of the peft folder does not exist in "
                                    f"{type(root).__name__}")
        if tuple(own.shape) != tuple(tensor.shape):
            raise AdapterStateError(f"adapter tensors do not match the model: modules_to_save tensor {key!r} has "
                                    f"shape {tuple(tensor.shape)}, the model's is {tuple(own.shape)}")
        if prefix + module not in unfreeze:
            unfreeze.append(prefix + module)
        values[prefix + key] = tensor
    return unfreeze, values


def plan_peft_import(model: nn.Module, dirpath: str | os.PathLike) -> PeftImport:
    """Read a ``peft`` folder and check it against ``model`` (or the transformers model inside it); touches nothing.

    Raises:
        PeftConfigError: an unsupported ``peft_type`` or option, named.
        AdapterStateError: unreadable files, or tensors that do not fit the model (the first mismatching module and
            both shapes).
    """
    config, raw = read_peft_folder(dirpath)
    cls = peft_importer(config.get("peft_type"))
    root, prefix = hf_model_root(model)
    grouped, rest = _group(raw, cls)
    strategy = cls.from_peft(config, grouped, prefix)
    modules = dict(root.named_modules())
    states = {}
    for module, group in sorted(grouped.items()):
        base = _base_of(root, module, modules)
        states[prefix + module if module else ""] = strategy.peft_state(module, base, group, config)
    mts = config.get("modules_to_save") or []
    if isinstance(mts, str):
        mts = [mts]
    unfreeze, unfrozen = _extras(root, prefix, rest, set(grouped), list(mts))
    return PeftImport(strategy, states, unfreeze, unfrozen, config)


def _pairs(stack: PeftStack, states: dict[str, dict[str, Tensor]]) -> list[tuple[nn.Module, dict[str, Tensor]]]:
    applied = stack.applied[0]
    if set(states) == set(applied.targets) and len(applied.targets) == len(applied.modules):
        by_target = dict(zip(applied.targets, applied.modules))
        return [(by_target[t], state) for t, state in states.items()]
    if len(states) == 1 and len(applied.modules) == 1:  # a prompt: one provider
        return [(applied.modules[0], next(iter(states.values())))]
    raise AdapterStateError(
        f"{type(stack.strategies[0]).__name__} adapted {preview(sorted(applied.targets), 4)}, the peft folder holds "
        f"tensors for {preview(sorted(states), 4)}"
    )


def apply_peft_import(model: nn.Module, plan: PeftImport, name: str) -> PeftStack:
    """Apply a checked import under ``name`` and load its tensors; on any failure the stack is removed again."""
    stack = apply_peft(model, [plan.strategy], unfreeze=plan.unfreeze or None, name=name)
    try:
        keys = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
        state: dict[str, Tensor] = dict(plan.unfrozen)
        for module, values in _pairs(stack, plan.states):
            own = module.state_dict(keep_vars=True)
            for param, value in values.items():
                if param not in own:
                    raise AdapterStateError(f"{type(module).__name__} has no {param!r} to load")
                state[keys[id(own[param])]] = value
        stack.load_adapter_state_dict(state, strict=True)
    except BaseException:
        stack.remove()
        raise
    return stack


def check_set_name(model: nn.Module, name: Any, replace: bool) -> None:
    """Refuse an invalid set name, or one already on ``model`` unless ``replace`` (before anything changes)."""
    if not isinstance(replace, bool):
        raise PeftConfigError(f"replace={replace!r} is not valid; expected True or False")
    if not isinstance(name, str) or not name.isidentifier():
        raise PeftConfigError(f"name={name!r} is not valid; use a Python identifier such as 'default' or 'task_a'")
    existing = get_state(model)
    if existing is not None and name in existing.stacks and not replace:
        raise PeftConfigError(
            f"name={name!r} is taken: {type(model).__name__} already has an adapter set named {name!r} "
            f"({existing.stacks[name].describe_short()}); load under another name=, pass replace=True, or "
            f"unload(model, {name!r}) first to replace it"
        )


def make_room(model: nn.Module, name: str) -> str | None:
    """Unload the set ``name`` when ``model`` has one (``replace=True``, after every check passed); returns the set
    that was active before, to activate again if the load then fails."""
    from lightning_peft.stack.sets import unload

    state = get_state(model)
    if state is not None and name in state.stacks:
        unload(model, name)
    state = get_state(model)
    return getattr(state, "active", None)


def restore_active(model: nn.Module, previous: str | None) -> None:
    state = get_state(model)
    if previous is not None and state is not None and previous in state.stacks:
        from lightning_peft.stack.sets import activate

        activate(model, previous)


def load_peft_folder(model: nn.Module, dirpath: str | os.PathLike, name: str | None = None,
                     replace: bool = False) -> PeftStack:
    """:func:`~lightning_peft.io.adapters.load_adapters` for a folder ``peft`` wrote (see the module docstring)."""
    name = name or DEFAULT_SET
    check_set_name(model, name, replace)
    plan = plan_peft_import(model, dirpath)
    previous = make_room(model, name)
    try:
        return apply_peft_import(model, plan, name)
    except BaseException:
        restore_active(model, previous)
        raise


__all__ = [
    "PeftImport",
    "apply_peft_import",
    "check_set_name",
    "is_peft_folder",
    "load_peft_folder",
    "make_room",
    "plan_peft_import",
    "read_peft_folder",
    "restore_active",
]
