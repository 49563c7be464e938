"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import base_shape
from lightning_peft.core.layer import AdaptedLinear, Delta
from lightning_peft.core.targets import check_patterns, name_matches, resolve_targets
from lightning_peft.errors import AdapterStateError, PeftConfigError, preview
from lightning_peft.methods.base import Applied, ApplyContext, LayerStrategy, register_strategy
from lightning_peft.methods.peft_protocol import (
    SCALING_PART,
    ScalingVector,
    check_shape,
    refuse_options,
    take,
)

#: PEFT's defaults per model type: (target_modules, feedforward_modules); keys, values and the FFN output
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}


class IA3Delta(Delta):
    """A learned vector that scales a layer's input (feed-forward layers) or its output (all others).

    ``ia3_l`` has PEFT's layout: (1, in_features) on feed-forward layers, (out_features, 1) otherwise.
    """

    kind = "scale"

    def __init__(
        self, in_features: int, out_features: int, feedforward: bool, init_weights: bool = True
    ) -> None:
        super().__init__()
        self.feedforward = feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)
        # Section 3.3 of the paper: vectors initialized to ones, so the adapted model starts as the base model
        self.ia3_l = nn.Parameter(torch.ones(shape) if init_weights else torch.randn(shape))

    def input_scale(self) -> Tensor | None:
        return self.ia3_l.view(-1) if self.feedforward else None

    def output_scale(self) -> Tensor | None:
        return None if self.feedforward else self.ia3_l.view(-1)

    def extra_repr(self) -> str:
        return f"scales={'input' if self.feedforward else 'output'}, size={self.ia3_l.numel()}"


@register_strategy
@dataclass
class IA3(LayerStrategy):
    """Learned scaling vectors on chosen linears: ``y = base(x * l_in) * l_out``.

    Feed-forward layers (``feedforward_modules``) scale their input, every other target scales its output, as in
    PEFT. On a layer that also has LoRA or AdaLoRA the scales apply to the base path only and the low-rank
    terms read the layer's own input (the rule in :mod:`lightning_peft.core.layer`). Mergeable.

    Args:
        target_modules: names, dotted suffixes or a regex of the linears to scale (keys, values and the
            feed-forward output in the paper, Section 3.3); ``None`` uses PEFT's default for known model types.
        feedforward_modules: the subset of ``target_modules`` whose input is scaled; ``None`` with
            ``target_modules=None`` uses PEFT's default, otherwise means none.
        exclude_modules: names or regex of modules never adapted.
        init_weights: ``True`` starts at ones (the identity); ``False`` draws random values (for tests).

    Example:
        >>> IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
        IA3(target_modules=['k_proj', 'v_proj', 'down_proj'], feedforward_modules=['down_proj'], exclude_modules=None, init_weights=True)
    """

    name = "ia3"
    prefix = "ia3_"
    peft_part = SCALING_PART
    peft_types = ("IA3",)
    peft_suffixes = ("ia3_l",)

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        check_patterns(self.target_modules, "target_modules")
        check_patterns(self.feedforward_modules, "feedforward_modules")
        check_patterns(self.exclude_modules, "exclude_modules")
        for attr in ("target_modules", "feedforward_modules", "exclude_modules"):
            if isinstance(getattr(self, attr), tuple):
                setattr(self, attr, list(getattr(self, attr)))

    def _specs(self, model: nn.Module) -> tuple[Any, Any]:
        if self.target_modules is not None:
            return self.target_modules, self.feedforward_modules
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise PeftConfigError(
                f"IA3(target_modules=None) has no default for {type(model).__name__} (model_type={model_type!r}); "
                f"defaults exist for {sorted(DEFAULT_TARGETS)}; pass target_modules=[...] and feedforward_modules=[...]"
            )
        targets, ff = DEFAULT_TARGETS[model_type]
        return targets, ff if self.feedforward_modules is None else self.feedforward_modules

    def plan(self, model: nn.Module, ctx: ApplyContext) -> dict[str, bool]:
        targets, ff = self._specs(model)
        names = resolve_targets(model, targets, self.exclude_modules, skip=ctx.skip_modules, who="IA3")
        feedforward = {n: bool(ff) and name_matches(n, ff) for n in names}
        if ff and not any(feedforward.values()):
            raise PeftConfigError(
                f"feedforward_modules={ff!r} matched none of the IA3 target layers ({preview(names)}); it must "
                "name a subset of target_modules"
            )
        if ff and not isinstance(ff, str):
            missing = [p for p in ff if not any(name_matches(n, [p]) for n in names)]
            if missing:
                raise PeftConfigError(
                    f"feedforward_modules={ff!r}: {missing} match no layer in target_modules={targets!r}; "
                    "feedforward_modules must be a subset of target_modules"
                )
        return feedforward

    def new_applied(self, plan: dict[str, bool]) -> Applied:
        return Applied(targets=list(plan), extra={"feedforward": dict(plan)})

    def delta_kind(self) -> str:
        return "scale"

    def make_delta(self, layer: AdaptedLinear, name: str, applied: Applied) -> IA3Delta:
        feedforward = applied.extra["feedforward"][name]
        return IA3Delta(layer.in_features, layer.out_features, feedforward, self.init_weights)

    # -- peft's layout (the same vector layout both ways) -----------------------------------------------------
    def peft_scaling(self, delta: nn.Module) -> ScalingVector:
        return ScalingVector(delta.ia3_l.detach(), bool(delta.feedforward), "ia3_l")

    @classmethod
    def from_peft(cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], prefix: str = "") -> IA3:
        """An IA3 ``peft`` folder; a module is feed-forward (its vector scales the input) when its vector is
        (1, in), as ``peft`` shapes it, else by ``feedforward_modules`` (a (1, 1) vector)."""
        refuse_options(config, "peft_type='IA3'",
                       ("target_modules", "feedforward_modules", "exclude_modules", "init_ia3_weights"))
        ff_spec = config.get("feedforward_modules") or []
        feedforward = []
        for module, group in sorted(tensors.items()):
            (vector,) = take(group, module, "ia3_l")
            if vector.dim() != 2 or 1 not in vector.shape:
                raise AdapterStateError(f"ia3_l of {module!r} has shape {tuple(vector.shape)}; peft's is (1, in) "
                                        "or (out, 1)")
            if vector.shape == (1, 1):
                ff = re.fullmatch(ff_spec, module) is not None if isinstance(ff_spec, str) else any(
                    module.endswith(k) for k in ff_spec)
            else:
                ff = vector.shape[0] == 1
            if ff:
                feedforward.append(prefix + module)
        return cls(target_modules=[prefix + m for m in sorted(tensors)], feedforward_modules=feedforward or None)

    def peft_state(self, module: str, base: nn.Module | None, tensors: dict[str, Tensor],
                   config: dict[str, Any]) -> dict[str, Tensor]:
        n_in, n_out = base_shape(base)  # type: ignore[arg-type]
        ff = any(f == module or f.endswith("." + module) for f in self.feedforward_modules or [])
        (vector,) = take(tensors, module, "ia3_l")
        check_shape(module, "ia3_l", vector, (1, n_in) if ff else (n_out, 1))
        return {"ia3_l": vector}
