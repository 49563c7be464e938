"""What a PEFT stack needs from Lightning's distributed strategies, checked and set in ``PEFT.setup``.

Supported (see the README's "Scaling out"):

- **DDP** (``"ddp"``, ``"ddp_spawn"``, ``DDPStrategy``): every stack, full precision and bitsandbytes-quantized.
  DDP's reducer expects a gradient for every trainable parameter on every step unless
  ``find_unused_parameters=True``. LoRA, AdaLoRA (pruned triplets still receive a zero gradient), IA3, prompt
  tuning, P-tuning and bottleneck adapters use all their parameters in every forward, so the default (faster)
  ``False`` is kept. Selective strategies (``BitFit``, ``LayerNormTuning``, ``Unfreeze``) train existing
  parameters chosen by name, some of which may be off the forward path (e.g. BERT's pooler under a token-level
  head), so for them ``find_unused_parameters=True`` is set automatically (an explicit user setting wins).
  On the first optimizer step, any trainable parameter without a gradient under
  ``find_unused_parameters=False`` raises a :class:`PeftConfigError` naming it, instead of DDP's error on the
  next step.
- **FSDP** (``FSDPStrategy``): full-precision / bf16 backbones with ``use_orig_params=True`` (Lightning's
  default), which allows frozen and trainable parameters in one wrapped unit. bitsandbytes layers cannot be
  flattened and sharded by FSDP: a quantized backbone (``PEFT(quantize=...)``, a model loaded in 4/8 bits, or
  ``BitsandbytesPrecision``) under FSDP fails here and names DDP, the supported way to scale QLoRA out.
- **DeepSpeed**: not supported with quantized backbones (same message); full precision is not tested here.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_peft.core.backend import is_bnb_layer
from lightning_peft.errors import PeftConfigError, preview
from lightning_peft.methods.base import Level
from lightning_peft.stack.peft_stack import PeftStack

#: strategy levels whose parameters may be off the forward path (chosen by name among existing ones)
MAY_BE_UNUSED_LEVELS = (Level.SELECTIVE,)
_CHECKED = "_lightning_peft_unused_checked"


def strategy_kind(trainer: L.Trainer) -> str:
    """``"fsdp"``, ``"deepspeed"``, ``"ddp"`` or ``"other"`` for the Trainer's strategy."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        return "fsdp"
    if isinstance(strategy, DeepSpeedStrategy):  # a DDPStrategy subclass: test it first
        return "deepspeed"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "other"


def _has_bnb(model: nn.Module) -> bool:
    return any(is_bnb_layer(m) for m in model.modules())


def check_strategy(trainer: L.Trainer, model: nn.Module, quantize: Any = None) -> None:
    """Refuse, before the model is touched, combinations of the Trainer's strategy and the backbone that fail.

    Args:
        trainer: the Trainer whose ``strategy`` is checked.
        model: the module the stack is (or will be) applied to.
        quantize: the quantization the callback is about to apply, if any.
    """
    kind = strategy_kind(trainer)
    if kind not in ("fsdp", "deepspeed"):
        return
    name = type(trainer.strategy).__name__
    if quantize is not None or _has_bnb(model):
        what = f"quantize={quantize!r}" if quantize is not None else "a bitsandbytes-quantized backbone"
        raise PeftConfigError(
            f"{what} is not supported under {name}: bitsandbytes 4/8-bit weights cannot be flattened and sharded "
            "(Lightning's FSDP also refuses BitsandbytesPrecision). Scale QLoRA out with DDP: "
            "Trainer(strategy='ddp', devices=N) keeps one quantized copy of the backbone per device and "
            "all-reduces only the adapters' gradients; or train a full-precision/bf16 backbone under FSDP"
        )
    if kind == "fsdp" and trainer.strategy.kwargs.get("use_orig_params") is False:
        raise PeftConfigError(
            "FSDPStrategy(use_orig_params=False) cannot hold frozen backbone weights and trainable adapters in one "
            "flattened unit (FSDP needs uniform requires_grad per unit); use FSDPStrategy(use_orig_params=True), "
            "Lightning's default"
        )


def unused_parameter_reasons(stack: PeftStack) -> list[str]:
    """Why some of the stack's trainable parameters may get no gradient on a step (empty: all are used)."""
    return [
        f"{s.name} (a {s.level.value} strategy picks existing parameters by name, some may be off the forward path)"
        for s in stack.strategies
        if s.level in MAY_BE_UNUSED_LEVELS
    ]


def configure_ddp(trainer: L.Trainer, stack: PeftStack) -> bool:
    """Set ``find_unused_parameters=True`` on a DDP strategy when the stack needs it and the user left it unset.

    Runs in ``Callback.setup``, before the strategy wraps the model in ``DistributedDataParallel``.

    Returns:
        Whether the option was set by this call.
    """
    if strategy_kind(trainer) != "ddp":
        return False
    kwargs: dict[str, Any] = trainer.strategy._ddp_kwargs
    if "find_unused_parameters" in kwargs:  # the user chose; on_before_optimizer_step checks False
        return False
    reasons = unused_parameter_reasons(stack)
    if not reasons:
        return False
    kwargs["find_unused_parameters"] = True
    rank_zero_info(f"lightning_peft: DDP find_unused_parameters=True set for {'; '.join(reasons)}")
    return True


def check_gradients_on_first_step(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Under DDP without ``find_unused_parameters``, every trainable parameter must have a gradient.

    Otherwise DDP fails on the next step with "Expected to have finished reduction in the prior iteration";
    this names the parameters and the fix instead. Checked once, on the first optimizer step.
    """
    if pl_module.__dict__.get(_CHECKED):
        return
    pl_module.__dict__[_CHECKED] = True
    if strategy_kind(trainer) != "ddp" or trainer.strategy._ddp_kwargs.get("find_unused_parameters", False):
        return
    missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise PeftConfigError(
            f"{len(missing)} trainable parameter(s) got no gradient on the first step under DDP with "
            f"find_unused_parameters=False: {preview(missing, 6)}. They are not on the forward path of the loss "
            "(e.g. adapters on modules the loss does not use, or an `unfreeze` module the model skips). Drop them "
            "from target_modules / unfreeze, or use Trainer(strategy='ddp_find_unused_parameters_true')"
        )


__all__ = [
    "check_gradients_on_first_step",
    "check_strategy",
    "configure_ddp",
    "strategy_kind",
    "unused_parameter_reasons",
]
