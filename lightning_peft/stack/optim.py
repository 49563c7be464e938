"""Optimizer parameter groups built from a stack: LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank
Adaptation of Large Models").

LoRA+ trains the factor that maps the rank back out (``B``, which starts at zero) with a learning rate
``ratio`` times that of everything else. Which parameters are B-type is declared by each strategy
(:attr:`~lightning_peft.methods.base.Strategy.up_factors`: LoRA's ``lora_B``, AdaLoRA's ``adalora_B``, a
bottleneck adapter's ``adapter_up``), so a strategy a user registers takes part by declaring its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.state import get_stack
from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import check_positive
from lightning_peft.stack.peft_stack import PeftStack


def up_factor_parameters(stack: PeftStack) -> list[Tensor]:
    """The stack's B-type parameters (each strategy's ``up_factors``), in stack order."""
    out: list[Tensor] = []
    seen: set[int] = set()
    for strategy, applied in zip(stack.strategies, stack.applied):
        if not strategy.up_factors:
            continue
        for module in applied.modules:
            for name, p in module.named_parameters():
                if name.rpartition(".")[2] in strategy.up_factors and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def loraplus_param_groups(
    model: nn.Module | PeftStack,
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    parameters: Iterable[Tensor] | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Two parameter groups for LoRA+: ``lr`` for every trainable parameter but the B-type factors, ``lr *
    ratio`` for those.

    Args:
        model: a model with a stack (or the :class:`PeftStack` itself).
        lr: the learning rate of A-type factors and of everything else trained (heads, prompts, unfrozen
            modules); ``peft``'s ``create_loraplus_optimizer`` instead puts every 1-D parameter (biases, norms)
            in B's group.
        ratio: ``lr_B / lr_A``; the paper recommends 2**4 = 16 as a start (and a slightly smaller ``lr`` than
            plain LoRA's).
        weight_decay: for both groups.
        parameters: the parameters to optimize (default: every trainable parameter of the model).
        name: the adapter set when the model holds several (default: the active one).

    Returns:
        ``[{"params": others, "lr": lr, ...}, {"params": b_factors, "lr": lr * ratio, ...}]``, each with a
        ``"name"`` (``"loraplus_a"``, ``"loraplus_b"``); empty groups are dropped.

    Example:
        >>> groups = loraplus_param_groups(model, lr=2e-4, ratio=16)
        >>> optimizer = torch.optim.AdamW(groups)
    """
    check_positive(lr, "lr", integer=False)
    check_positive(ratio, "loraplus_lr_ratio", integer=False)
    stack = get_stack(model, name, required=True)
    b_params = up_factor_parameters(stack)
    if not b_params:
        raise PeftConfigError(
            f"loraplus_lr_ratio={ratio!r} needs a strategy with B-type factors (up_factors: LoRA, AdaLoRA, "
            f"Adapter); the stack {stack.name!r} has {[s.name for s in stack.strategies]}"
        )
    if parameters is None:
        source = stack.model if isinstance(model, PeftStack) else model
        parameters = [p for p in source.parameters() if p.requires_grad]
    is_b = {id(p) for p in b_params}
    params = list(parameters)
    groups = [
        {"name": "loraplus_a", "params": [p for p in params if id(p) not in is_b], "lr": lr,
         "weight_decay": weight_decay},
        {"name": "loraplus_b", "params": [p for p in params if id(p) in is_b], "lr": lr * ratio,
         "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def create_loraplus_optimizer(
    model: nn.Module | PeftStack,
    optimizer_cls: type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`loraplus_param_groups` (``kwargs`` go to the optimizer)."""
    return optimizer_cls(loraplus_param_groups(model, lr, ratio, weight_decay), **kwargs)


__all__ = ["create_loraplus_optimizer", "loraplus_param_groups", "up_factor_parameters"]
