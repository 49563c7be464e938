"""Merged export: fold the adapters into the base weights and save a plain transformers model.

The model handed in is left as it was: adapted (and quantized) layers are swapped for plain merged
``nn.Linear`` / ``Conv1D`` layers (adapted embeddings and convs for copies of themselves holding the merged
weight) only while ``save_pretrained`` runs, then put back.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.core.backend import (
    base_kind,
    base_weight,
    float_dtype,
    get_submodule_parent,
    is_linear,
    is_quantized,
    stored_weight,
)
from lightning_peft.core.gate import is_gated
from lightning_peft.core.layer import AdaptedLayer, merge_refusals
from lightning_peft.core.state import get_stack
from lightning_peft.errors import PeftConfigError
from lightning_peft.io.atomic import atomic_directory, write_json, write_tensors
from lightning_peft.io.peft_layout import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    hf_root,
    prefix_part_of,
    prompt_part_of,
)
from lightning_peft.methods.base import Level
from lightning_peft.quantization.convert import keep_in_fp32_names
from lightning_peft.quantization.merge import plain_layer
from lightning_peft.stack.peft_stack import PeftStack

PROMPT_SUBFOLDER = "prompt"
#: provenance of a merged folder (what was merged); also marks folders merge_and_export may overwrite
MERGE_MARKER = "lightning_peft_merge.json"


def _plain_layer(
    base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> nn.Module:
    """A plain ``nn.Linear`` (or GPT-2 ``Conv1D``) holding a copy of ``weight`` (out, in) and ``bias``.

    ``Conv1D`` when ``base`` is one, or is a bitsandbytes layer quantized from one: the checkpoint must hold
    GPT-2's (in, out) layout whatever the layer in memory is. An embedding or a conv becomes a copy of ``base``
    (same class and settings; its other tensors shared, not copied) holding ``weight`` in its own layout.
    """
    bias = bias.detach().to(dtype, copy=True) if bias is not None else None
    if base_kind(base) in ("embedding", "conv"):
        layer = copy.copy(base)
        layer._parameters, layer._buffers, layer._modules = (  # own dicts: base keeps its weight
            dict(base._parameters), dict(base._buffers), dict(base._modules))
        layer.weight = nn.Parameter(stored_weight(base, weight).to(dtype).contiguous(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer
    return plain_layer(base, weight.detach().to(dtype, copy=True), bias, dtype)


def _merged_layers(root: nn.Module, set_name: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Qualified name -> plain replacement for every adapted or quantized linear under ``root``.

    Replacements take ``dtype``, except the modules transformers keeps in fp32 at that dtype
    (:func:`~lightning_peft.quantization.keep_in_fp32_names`), which are written in fp32, as
    ``save_pretrained`` of the model itself writes them.
    """
    for name, reason in merge_refusals(root, set_name).items():
        raise PeftConfigError(f"merge_and_export: {name!r}: {reason}")
    fp32 = keep_in_fp32_names(root, dtype)
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        layer_dtype = torch.float32 if name in fp32 else dtype
        if isinstance(module, AdaptedLayer):
            inside.append(name + ".")
            if set_name in module.adapters and set_name not in module.merged:
                weight, bias = module.merged_weight(set_name)
            else:  # nothing of this set here, or already merged in place
                weight = base_weight(module.base_layer).float()
                bias = module.bias.detach().float() if module.bias is not None else None
            out[name] = _plain_layer(module.base_layer, weight, bias, layer_dtype)
        elif is_linear(module) and is_quantized(module):
            bias = module.bias.detach().float() if module.bias is not None else None
            out[name] = _plain_layer(module, base_weight(module).float(), bias, layer_dtype)
    return out


@contextlib.contextmanager
def _swapped(root: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily install ``replacements`` and hide the model's quantization; restore everything after."""
    originals = {}
    config = getattr(root, "config", None)
    saved_attrs: dict[str, Any] = {}
    missing = object()
    try:
        for name, layer in replacements.items():
            parent, child = get_submodule_parent(root, name)
            originals[name] = getattr(parent, child)
            setattr(parent, child, layer)
        for attr in ("hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
            if attr in root.__dict__:
                saved_attrs[attr] = root.__dict__[attr]
                root.__dict__[attr] = None if attr in ("hf_quantizer", "quantization_method") else False
        for attr in ("quantization_config", "dtype", "architectures"):
            if config is not None:
                saved_attrs["config." + attr] = config.__dict__.get(attr, missing)
        if config is not None and "quantization_config" in config.__dict__:
            del config.__dict__["quantization_config"]
        yield
    finally:
        for name, layer in originals.items():
            parent, child = get_submodule_parent(root, name)
            setattr(parent, child, layer)
        for attr, value in saved_attrs.items():
            if attr.startswith("config."):
                key = attr.removeprefix("config.")
                if value is missing:
                    config.__dict__.pop(key, None)
                else:
                    config.__dict__[key] = value
            else:
                root.__dict__[attr] = value


def _check_mergeable(stack: PeftStack) -> list[str]:
    """Names of the prompt (input-level) strategies; an error for any other strategy that cannot merge."""
    prompts, blocked = [], []
    for strategy in stack.strategies:
        if strategy.level is Level.INPUT:
            prompts.append(strategy.name)
        elif strategy.level is Level.SELECTIVE:
            continue  # trains the base model's own tensors: they are already the merged model's weights
        elif not strategy.mergeable:
            blocked.append(f"{strategy.name} ({type(strategy).__name__})")
        elif is_gated(strategy):  # its update depends on the input (lightning_peft.core.gate)
            blocked.append(f"{strategy.name} ({type(strategy).__name__}(gate=True): a gated update depends on the input)")
    if blocked:
        raise PeftConfigError(
            f"merge_and_export: {', '.join(blocked)} cannot be folded into the base weights; export the stack "
            "with save_adapters instead (PEFT folder + native files)"
        )
    return prompts


def merge_and_export(
    model: nn.Module,
    dirpath: str | os.PathLike,
    tokenizer: Any = None,
    *,
    name: str | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save the model with its adapters merged as a plain transformers model (safetensors), atomically.

    Low-rank and scaling deltas are folded into the weights; a 4-bit or 8-bit base is dequantized to full
    precision (``dtype``, by default the model's own float dtype). The folder loads with
    ``AutoModel...from_pretrained`` and no lightning_peft installed. Prompt strategies cannot be merged: they
    are saved beside the model as a PEFT prompt adapter in ``prompt/`` (with a warning; a prefix as a
    ``PREFIX_TUNING`` adapter there, a gated one is refused), which
    ``peft.PeftModel.from_pretrained(merged_model, dirpath + "/prompt")`` adds back. ``model`` itself is not
    changed.

    Args:
        model: the adapted model (or a LightningModule containing it).
        dirpath: the folder to (re)write.
        tokenizer: saved with the model when given.
        name: the adapter set, when the model has several.
        dtype: dtype of the merged weights (default: the model's float dtype).

    Example:
        >>> merge_and_export(model, "merged/", tokenizer)
        >>> AutoModelForCausalLM.from_pretrained("merged/")
    """
    stack = get_stack(model, name, required=True)
    prompts = _check_mergeable(stack)
    root, _ = hf_root(stack)
    if not hasattr(root, "save_pretrained"):
        raise PeftConfigError(
            f"merge_and_export needs a transformers model (with save_pretrained); "
            f"{type(root).__name__} has none: use save_adapters"
        )
    dtype = dtype or float_dtype(root)
    replacements = _merged_layers(root, stack.name, dtype)
    prompt_part = None
    if prompts:
        native = stack.adapter_state_dict()
        prompt_part = prompt_part_of(stack, root, hf_root(stack)[1], native)
        if prompt_part is None:  # a prefix (PREFIX_TUNING) instead of virtual tokens
            prompt_part, why = prefix_part_of(stack, root)
            if why:
                raise PeftConfigError(f"merge_and_export: {', '.join(prompts)} cannot be merged into the weights "
                                      f"nor saved beside them: {why}; use save_adapters")
        warnings.warn(
            f"merge_and_export: {', '.join(prompts)} adds virtual tokens or key/value prefixes and cannot be merged "
            f"into the weights; it is saved as a PEFT prompt-learning adapter in {PROMPT_SUBFOLDER}/ beside the merged model (load it with "
            "peft.PeftModel.from_pretrained(merged_model, <dirpath>/prompt))",
            stacklevel=2,
        )
    final = Path(dirpath)
    state = stack.ctx.state
    with atomic_directory(final, MERGE_MARKER) as tmp, _swapped(root, replacements):
        previous, state.active = state.active, None  # any component left (prompts) must stay out of the way
        try:
            owned_elsewhere = _non_layer_tensor_ids(stack)
            state_dict = {
                k: v.detach()
                for k, v in root.state_dict(keep_vars=True).items()
                if id(v) not in owned_elsewhere
            }
            root.save_pretrained(str(tmp), state_dict=state_dict)
        finally:
            state.active = previous
        if prompt_part is not None:
            prompt_part.config["base_model_name_or_path"] = str(final)
            folder = tmp / PROMPT_SUBFOLDER
            folder.mkdir()
            write_json(folder / PEFT_CONFIG_NAME, prompt_part.config)
            write_tensors(folder / PEFT_WEIGHTS_NAME, prompt_part.tensors)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        desc = stack.describe()
        write_json(
            tmp / MERGE_MARKER,
            {
                "format": "lightning_peft.merged",
                "library_version": desc.get("library_version"),
                "stack": desc,
                "dtype": str(dtype).removeprefix("torch."),
                "prompt_adapter": PROMPT_SUBFOLDER if prompt_part is not None else None,
            },
        )
    return final


def _non_layer_tensor_ids(stack: PeftStack) -> set[int]:
    """Tensors that prompt strategies attached to the model: not part of the merged model's weights."""
    ids: set[int] = set()
    for strategy, applied in zip(stack.strategies, stack.applied):
        if strategy.level is Level.INPUT:
            for module in applied.modules:
                ids.update(id(t) for t in [*module.parameters(), *module.buffers()])
            ids.update(id(t) for t in applied.parameters)
    return ids


__all__ = ["merge_and_export"]
