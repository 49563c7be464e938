"""Lightning glue shared by the PEFT callback and the mixin: adapter-only checkpoints and optimizer checks.

Lightning calls ``LightningModule.on_save_checkpoint`` for every checkpoint it writes, including
``ModelCheckpoint(save_weights_only=True)`` and ``trainer.save_checkpoint``, while callbacks'
``on_save_checkpoint`` is skipped in weights-only mode (REFERENCE.md). So trimming hooks into the module's
hooks, and everything else stays in the core.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.stack import PeftStack, apply_peft
from lightning_peft.strategies.base import Strategy

CHECKPOINT_KEY = "lightning_peft"
_HOOKED = "_lightning_peft_hooked"


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


def trim_checkpoint(pl_module: nn.Module, stack: PeftStack, checkpoint: dict[str, Any],
                    model_attr: str | None) -> None:
    """Keep only what training changed in ``checkpoint["state_dict"]`` and record the stack's description."""
    state_dict = checkpoint.get("state_dict")
    if state_dict is None:
        return
    keys = set(stack.adapter_keys(root=pl_module))
    checkpoint["state_dict"] = type(state_dict)((k, v) for k, v in state_dict.items() if k in keys)
    checkpoint[CHECKPOINT_KEY] = checkpoint_meta(stack, model_attr)
    if "hyper_parameters" in checkpoint:
        checkpoint["hyper_parameters"] = _plain(checkpoint["hyper_parameters"])


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


def check_checkpoint(pl_module: nn.Module, stack: PeftStack, checkpoint: dict[str, Any]) -> None:
    """Before Lightning loads a (non-strict) state dict: every adapter key must be there with its shape."""
    state_dict = checkpoint.get("state_dict", {})
    stack.check_adapter_state_dict(state_dict, root=pl_module, strict=False)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is not None:
        saved = [s["name"] for s in meta["stack"]["strategies"]]
        ours = [s.name for s in stack.strategies]
        if saved != ours:
            raise AdapterStateError(
                f"checkpoint was written by a stack with strategies {saved}, but this run's stack has {ours}"
            )


def install_checkpoint_hooks(pl_module: L.LightningModule, get_stack: Callable[[], PeftStack | None],
                             model_attr: str | None) -> None:
    """Wrap the module's ``on_save_checkpoint`` / ``on_load_checkpoint`` (once) so checkpoints hold adapters only."""
    if pl_module.__dict__.get(_HOOKED):
        return
    original_save = pl_module.on_save_checkpoint
    original_load = pl_module.on_load_checkpoint

    def on_save_checkpoint(self: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        original_save(checkpoint)
        stack = get_stack()
        if stack is not None:
            trim_checkpoint(self, stack, checkpoint, model_attr)

    def on_load_checkpoint(self: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        original_load(checkpoint)
        stack = get_stack()
        if stack is not None and CHECKPOINT_KEY in checkpoint:
            check_checkpoint(self, stack, checkpoint)

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


def restore_from_checkpoint(module: nn.Module, checkpoint: str | dict[str, Any]) -> PeftStack:
    """Rebuild the checkpoint's stack on ``module`` (a LightningModule) and load its adapter weights.

    For modules trained with the :class:`~lightning_peft.callbacks.PEFT` callback, whose own class knows
    nothing of PEFT: ``module = MyModule.load_from_checkpoint(path, strict=False)`` followed by
    ``restore_from_checkpoint(module, path)``.
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise AdapterStateError("checkpoint has no lightning_peft section; it was not written by a PEFT run")
    desc = meta["stack"]
    target = peft_target(module, meta.get("model_attr"))
    from lightning_peft.layers import get_state

    state = get_state(target)
    stack = state.stacks.get(desc["name"]) if state is not None else None
    if stack is None:
        stack = apply_peft(target, desc["strategies"], unfreeze=desc.get("unfreeze") or None, name=desc["name"],
                           **_apply_extras(desc))
    stack.load_adapter_state_dict(checkpoint["state_dict"], root=module, strict=False)
    return stack


def _apply_extras(desc: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of apply_peft recorded in a stack description beyond strategies and unfreeze."""
    extras: dict[str, Any] = {}
    if desc.get("quantization"):
        from lightning_peft.quantization import Quantization  # type: ignore[import-not-found]

        extras["quantize"] = Quantization(**desc["quantization"])
    return extras
