"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as ``peft``'s ``use_dora=True``.

The adapted weight is split into a magnitude and a direction, the direction being LoRA's:
``W' = m * (W + s B A) / ||W + s B A||``, the norm taken per output feature (the paper's column norm of the
(in, out) matrix). The magnitude ``m`` (``lora_magnitude``, one value per output feature) starts at that norm
(Section 4.1), so the adapted layer starts equal to ``W + s B A`` (the base layer, with B = 0). The norm is
recomputed from the current A and B at every forward, from the dequantized weight on a 4-bit / 8-bit base,
and treated as a constant: no gradient flows through it (Section 4.3), as in ``peft``.

The forward pass is ``peft``'s: ``y = base(x) + (m/n - 1) * (base(x) - bias) + (m/n) * s B A dropout(x)``;
with dropout active in training the base part is recomputed on the dropped-out input,
``(m/n - 1) * W dropout(x)``, as ``peft`` does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.backend import base_weight, is_bnb_layer, is_conv1d
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.lora.method import VARIANTS, LoRADelta
from lightning_peft.ops.dropout import project


def dora_supported(module: nn.Module) -> bool:
    """Whether DoRA can sit on ``module``: an ``nn.Linear`` with a float weight, a GPT-2 ``Conv1D`` or a
    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (dequantized for the norm, as ``peft`` does)."""
    if is_conv1d(module) or is_bnb_layer(module):
        return True
    return isinstance(module, nn.Linear) and module.weight.is_floating_point()


def check_dora_targets(model: nn.Module, names: list[str]) -> None:
    """Refuse, before the model is touched, targets DoRA cannot adapt (naming the layer and its type)."""
    for name in names:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, AdaptedLinear) else module
        if not dora_supported(base):
            weight = getattr(base, "weight", None)
            what = type(base).__name__ + (f" with a {weight.dtype} weight" if isinstance(base, nn.Linear) else "")
            raise PeftConfigError(
                f"LoRA(use_dora=True) cannot adapt {name!r} ({what}): DoRA supports nn.Linear (float weights), "
                f"GPT-2 Conv1D and bitsandbytes Linear4bit / Linear8bitLt layers; leave it out with "
                f"exclude_modules=[{name!r}] or use use_dora=False"
            )
        if base.weight.device.type == "meta":
            raise PeftConfigError(
                f"LoRA(use_dora=True) cannot adapt {name!r}: its weight is on the meta device, and DoRA "
                "initializes its magnitude from the base weight; load the weights before applying the stack"
            )


class DoRADelta(LoRADelta):
    """LoRA's ``B A`` as the direction update, plus a learned magnitude per output feature (``lora_magnitude``).

    It reads the base layer (``needs_base``): :class:`~lightning_peft.core.layer.AdaptedLinear` calls
    :meth:`add_to_base` with the base layer and its output. Create it with :class:`LoRADelta`'s arguments, then
    call :meth:`init_magnitude` with the base layer (after anything else that initializes A, B or the base).
    """

    needs_base = True
    check_targets = staticmethod(check_dora_targets)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lora_magnitude = nn.Parameter(torch.ones(self.lora_B.shape[0], dtype=self.lora_B.dtype))
        self._merge_norm: Tensor | None = None  # the norm the last merge used (unmerge needs it back)

    def weight_norm(self, weight: Tensor) -> Tensor:
        """``||W + s B A||`` per output feature for the (out, in) base ``weight``, without gradient (Section 4.3)."""
        update = (self.lora_B.detach() @ self.lora_A.detach()).to(weight.dtype)
        return torch.linalg.norm(weight.detach() + self.scaling * update, dim=1)

    @torch.no_grad()
    def init_magnitude(self, base: nn.Module) -> None:
        """``m = ||W + s B A||``: the adapted layer starts equal to ``W + s B A`` (the paper's Section 4.1)."""
        self.lora_magnitude.copy_(self.weight_norm(base_weight(base).float()))

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        raise TypeError("DoRADelta reads the base layer: AdaptedLinear calls add_to_base(y, x, base, base_out)")

    def add_to_base(self, y: Tensor, x: Tensor, base: nn.Module, base_out: Tensor) -> Tensor:
        a = self.lora_A
        weight = base_weight(base).to(a.dtype)  # dequantized on a bitsandbytes base, (out, in) on a Conv1D
        scale = self.lora_magnitude / self.weight_norm(weight)  # m / ||W + s B A||, the norm detached
        if self.training and self.dropout > 0.0:  # as peft: the base part recomputed on the dropped-out input
            x = F.dropout(x.to(a.dtype), self.dropout, True)
            base_part = F.linear(x, weight)
        else:
            bias = getattr(base, "bias", None)
            base_part = (base_out if bias is None else base_out - bias).to(a.dtype)
        lora = F.linear(project(x, a, 0.0, False, self.scaling), self.lora_B)
        return y + ((scale - 1) * base_part + scale * lora).to(y.dtype)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return None  # the fused node knows plain LoRA only

    def delta_weight_on(self, weight: Tensor) -> Tensor:
        """``m / ||W + s B A|| * (W + s B A) - W`` for the float32 base ``weight`` W (row-wise)."""
        direction = weight + self.delta_weight().detach().float()
        self._merge_norm = torch.linalg.norm(direction, dim=1)
        return (self.lora_magnitude.detach().float() / self._merge_norm).view(-1, 1) * direction - weight

    def base_weight_from(self, merged: Tensor) -> Tensor:
        if self._merge_norm is None:
            raise RuntimeError("DoRADelta.base_weight_from needs the norm of a previous delta_weight_on (a merge)")
        scale = self._merge_norm / self.lora_magnitude.detach().float()
        self._merge_norm = None
        return merged * scale.view(-1, 1) - self.delta_weight().detach().float()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


VARIANTS["use_dora"] = DoRADelta

__all__ = ["DoRADelta", "check_dora_targets", "dora_supported"]
