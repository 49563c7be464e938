"""Lightning glue shared by the PEFT callback and the mixin: adapter-only checkpoints and optimizer checks.

Lightning calls ``LightningModule.on_save_checkpoint`` for every checkpoint it writes, including
``ModelCheckpoint(save_weights_only=True)`` and ``trainer.save_checkpoint``, while callbacks'
``on_save_checkpoint`` is skipped in weights-only mode (REFERENCE.md). So trimming hooks into the module's
hooks, and everything else stays in the core.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.methods.base import Strategy
from lightning_peft.stack.peft_stack import PeftStack, apply_kwargs, apply_peft

CHECKPOINT_KEY = "lightning_peft"
_HOOKED = "_lightning_peft_hooked"
#: model_attr -> the getter of the stack a PEFT callback keeps on that part of the module (latest callback wins)
_GETTERS = "_lightning_peft_stack_getters"


def peft_target(pl_module: nn.Module, model_attr: str | None) -> nn.Module:
    """The module the stack is applied to: ``pl_module`` itself or its (dotted) attribute ``model_attr``."""
    if not model_attr:
        return pl_module
    target: Any = pl_module
    for part in model_attr.split("."):
        if not hasattr(target, part):
            children = [n for n, _ in pl_module.named_children()]
            raise PeftConfigError(
                f"model_attr={model_attr!r}: {type(pl_module).__name__} has no attribute {part!r}; "
                f"its child modules are: {preview(children)}"
            )
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        raise PeftConfigError(f"model_attr={model_attr!r} is a {type(target).__name__}, not a torch.nn.Module")
    return target


def checkpoint_meta(stack: PeftStack, model_attr: str | None) -> dict[str, Any]:
    return {"stack": stack.describe(), "model_attr": model_attr}


def default_load_hint(pl_module: nn.Module) -> str:
    """How to load an adapter-only checkpoint of a module whose class knows nothing of PEFT."""
    cls = type(pl_module).__name__
    return (
        f"adapter-only checkpoint (the frozen backbone is not in it): {cls}.load_from_checkpoint(path) alone fails "
        f"with the backbone's keys missing; use lightning_peft.callbacks.load_peft_checkpoint({cls}, path, "
        f"**init_kwargs), or trainer.fit/validate/test(..., ckpt_path=path) with the same PEFT callback"
    )


def trim_checkpoint(pl_module: nn.Module, stack: PeftStack | Sequence[tuple[PeftStack, str | None]],
                    checkpoint: dict[str, Any], model_attr: str | None = None, load_with: str | None = None) -> None:
    """Keep only what training changed in ``checkpoint["state_dict"]`` and record the stacks' descriptions.

    Args:
        pl_module: the module whose state dict the checkpoint holds.
        stack: the stack, or ``(stack, model_attr)`` pairs when several PEFT callbacks adapt parts of the module.
        checkpoint: the checkpoint dict Lightning is about to write.
        model_attr: where ``stack`` sits on ``pl_module`` (with a single stack).
        load_with: how to load the checkpoint, recorded as ``checkpoint["lightning_peft"]["load_with"]``.
    """
    state_dict = checkpoint.get("state_dict")
    if state_dict is None:
        return
    pairs = [(stack, model_attr)] if isinstance(stack, PeftStack) else list(stack)
    keys = {k for s, _ in pairs for k in s.adapter_keys(root=pl_module)}
    checkpoint["state_dict"] = type(state_dict)((k, v) for k, v in state_dict.items() if k in keys)
    checkpoint[CHECKPOINT_KEY] = {
        **checkpoint_meta(*pairs[0]),  # the first set at the top, as before several sets were recorded
        "sets": [checkpoint_meta(s, attr) for s, attr in pairs],
        "adapter_only": True,
        "load_with": load_with or default_load_hint(pl_module),
    }
    if "hyper_parameters" in checkpoint:
        checkpoint["hyper_parameters"] = _plain(checkpoint["hyper_parameters"])


def checkpoint_sets(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"stack": description, "model_attr": ...}`` of every set recorded in a checkpoint's lightning_peft section."""
    return list(meta.get("sets") or [{"stack": meta["stack"], "model_attr": meta.get("model_attr")}])


def _plain(value: Any) -> Any:
    """Strategy objects in saved hyperparameters become their config dicts, so ``weights_only`` loading works
    (every place that takes strategies also takes these dicts)."""
    if isinstance(value, Strategy):
        return value.config()
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def check_checkpoint(pl_module: nn.Module, stack: PeftStack, checkpoint: dict[str, Any],
                     model_attr: str | types.EllipsisType | None = ...) -> None:
    """Before Lightning loads a (non-strict) state dict: every adapter key must be there with its shape.

    ``model_attr`` (where ``stack`` sits on ``pl_module``) picks the recorded set to compare with when the
    checkpoint holds several; by default the set of the same name.
    """
    state_dict = checkpoint.get("state_dict", {})
    stack.check_adapter_state_dict(state_dict, root=pl_module, strict=False)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is not None:
        recorded = checkpoint_sets(meta)
        match = [e for e in recorded if e["stack"].get("name") == stack.name
                 and (model_attr is ... or e.get("model_attr") == model_attr)]
        entry = match[0] if match else recorded[0] if len(recorded) == 1 else None
        if entry is None:
            names = [f"{e['stack'].get('name')!r} (model_attr={e.get('model_attr')!r})" for e in recorded]
            raise AdapterStateError(
                f"checkpoint holds adapter sets {preview(names)}, none of them this run's {stack.describe_short()}"
            )
        saved = [s["name"] for s in entry["stack"]["strategies"]]
        ours = [s.name for s in stack.strategies]
        if saved != ours:
            raise AdapterStateError(
                f"checkpoint was written by a stack with strategies {saved}, but this run's stack has {ours}"
            )


def install_checkpoint_hooks(pl_module: L.LightningModule, get_stack: Callable[[], PeftStack | None],
                             model_attr: str | None) -> None:
    """Wrap the module's ``on_save_checkpoint`` / ``on_load_checkpoint`` (once) so checkpoints hold adapters only.

    Each call registers ``get_stack`` for ``model_attr`` (replacing an earlier callback's getter for the same
    part of the module, e.g. a previous fit's); checkpoints hold the adapters of every registered stack.
    """
    getters: dict[str | None, Callable[[], PeftStack | None]] = pl_module.__dict__.setdefault(_GETTERS, {})
    getters[model_attr] = get_stack
    if pl_module.__dict__.get(_HOOKED):
        return
    original_save = pl_module.on_save_checkpoint
    original_load = pl_module.on_load_checkpoint

    def stacks() -> list[tuple[PeftStack, str | None]]:
        found = [(get(), attr) for attr, get in getters.items()]
        return [(stack, attr) for stack, attr in found if stack is not None]

    def on_save_checkpoint(self: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        original_save(checkpoint)
        pairs = stacks()
        if pairs:
            trim_checkpoint(self, pairs, checkpoint)

    def on_load_checkpoint(self: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        original_load(checkpoint)
        if CHECKPOINT_KEY in checkpoint:
            for stack, attr in stacks():
                check_checkpoint(self, stack, checkpoint, attr)

    pl_module.on_save_checkpoint = types.MethodType(on_save_checkpoint, pl_module)
    pl_module.on_load_checkpoint = types.MethodType(on_load_checkpoint, pl_module)
    pl_module.__dict__[_HOOKED] = True
    # adapter-only state dicts load into the full model; completeness is checked in on_load_checkpoint
    pl_module.strict_loading = False


def check_optimizer_coverage(trainer: L.Trainer, pl_module: nn.Module) -> None:
    """Every parameter that requires grad must be in some optimizer, else training silently skips it."""
    if not trainer.optimizers:
        return
    in_optimizer = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        raise PeftConfigError(
            f"{len(missing)} trainable parameter(s) are in no optimizer, e.g. {preview(missing, 4)}. The optimizer "
            "was built over the wrong parameters (for example by LightningCLI's --optimizer, which builds it "
            "before callbacks add adapters). Build it in configure_optimizers from the parameters that require "
            "grad, e.g. torch.optim.AdamW([p for p in self.parameters() if p.requires_grad]), or use "
            "lightning_peft's task modules / PEFTMixin, whose `optimizer` argument does this."
        )


def restore_from_checkpoint(module: nn.Module, checkpoint: str | os.PathLike | dict[str, Any]) -> PeftStack:
    """Rebuild the checkpoint's stacks on ``module`` (a LightningModule) and load their adapter weights.

    For modules trained with the :class:`~lightning_peft.callbacks.PEFT` callback, whose own class knows
    nothing of PEFT; :func:`load_peft_checkpoint` builds the module and calls this in one go. Every adapter set
    the checkpoint holds (one per PEFT callback of the run) is restored.

    Returns:
        The stack of the first set the checkpoint records (the only one with a single PEFT callback).
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise AdapterStateError("checkpoint has no lightning_peft section; it was not written by a PEFT run")
    from lightning_peft.core.state import get_state

    restored: list[PeftStack] = []
    for entry in checkpoint_sets(meta):
        desc = entry["stack"]
        target = peft_target(module, entry.get("model_attr"))
        state = get_state(target)
        stack = state.stacks.get(desc["name"]) if state is not None else None
        if stack is None:
            stack = apply_peft(target, desc["strategies"], unfreeze=desc.get("unfreeze") or None,
                               name=desc["name"], **apply_kwargs(desc))
        stack.load_adapter_state_dict(checkpoint["state_dict"], root=module, strict=False)
        restored.append(stack)
    return restored[0]
