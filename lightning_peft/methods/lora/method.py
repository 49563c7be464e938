"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.backend import BASE_KINDS, BaseKind
from lightning_peft.core.layer import AdaptedLayer, Delta
from lightning_peft.core.targets import ALL_LINEAR, check_patterns
from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import (
    Applied,
    ApplyContext,
    LayerStrategy,
    check_positive,
    check_probability,
    register_strategy,
)
from lightning_peft.methods.lora.layers import conv_problem, make_layer_delta
from lightning_peft.ops.dropout import project
from lightning_peft.ops.lowrank import lowrank_linear


class LoRADelta(Delta):
    """``B A x * scaling`` with A (r, in) and B (out, r)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 init_weights: bool = True, shared_dropout: bool = False) -> None:
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.dropout = dropout
        self.shared_dropout = shared_dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        # Section 4.1 of the paper: random A, zero B, so the adapted model starts equal to the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not init_weights:  # non-zero B: useful in tests that need a delta from step 0
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        h = project(x, self.lora_A, self.dropout, self.training, self.scaling, self.shared_dropout)
        return F.linear(h, self.lora_B)

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        h = project(x, self.lora_A, self.dropout, self.training, self.scaling, self.shared_dropout)
        if y.dtype == self.lora_B.dtype and y.dim() >= 2:  # one fused addmm instead of a matmul and an add
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t())
            return out.view(y.shape)
        return y + F.linear(h, self.lora_B).to(y.dtype)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        return lowrank_linear(base, x, self.lora_A, self.lora_B, self.dropout, self.training, self.scaling)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}"


@register_strategy
@dataclass
class LoRA(LayerStrategy):
    """Low-rank update ``W + (alpha / r) B A`` on chosen linear layers, and on embeddings and convs named in
    ``target_modules`` (see :mod:`lightning_peft.methods.lora.layers`).

    Args:
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the layer input of the LoRA branch, drawn independently per layer as in ``peft``
            (see :func:`lightning_peft.ops.dropout.project`).
        target_modules: exact names or dotted suffixes (``["query", "value"]``), a regex matching the whole
            qualified name, or ``"all-linear"`` (every linear except the output head; QLoRA, Section 4, found
            adapting all linears necessary to match full fine-tuning). Names and regexes also select
            ``nn.Embedding`` and ``nn.Conv1d/2d/3d`` layers; ``"all-linear"`` never does.
        exclude_modules: names or regex of modules never adapted.
        use_rslora: scale by ``alpha / sqrt(r)`` (Kalajdzievski 2023) so larger ranks keep learning.
        init_weights: ``True`` for the paper's init (B = 0); ``False`` draws B at random (for tests).
        shared_dropout: opt-in memory saver: layers that read one input tensor (q/k/v) share one dropout
            mask and one masked copy of it instead of one each. Their draws are then correlated; measured on
            SST-2 in ``BENCHMARKS.md``. Not exported (``peft`` has no such option; it changes only training).

    Example:
        >>> LoRA(r=8, alpha=16, target_modules=["query", "value"])
        LoRA(r=8, alpha=16, dropout=0.0, target_modules=['query', 'value'], exclude_modules=None, use_rslora=False, init_weights=True, shared_dropout=False)
    """

    name = "lora"
    prefix = "lora_"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init_weights: bool = True
    shared_dropout: bool = False

    def __post_init__(self) -> None:
        check_positive(self.r, "r")
        check_positive(self.alpha, "alpha", integer=False)
        check_probability(self.dropout, "dropout")
        check_patterns(self.target_modules, "target_modules")
        check_patterns(self.exclude_modules, "exclude_modules")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def base_kinds(self) -> tuple[BaseKind, ...]:  # type: ignore[override]
        # the embedding and conv deltas are plain LoRA: a variant (a subclass, a non-default init) adapts linears
        # only unless it says otherwise
        return BASE_KINDS if type(self) is LoRA and isinstance(self.init_weights, bool) else ("linear",)

    def plan(self, model: nn.Module, ctx: ApplyContext) -> list[str]:
        names = super().plan(model, ctx)
        for name in names:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            problem = conv_problem(base, self.r)
            if problem is not None:
                raise PeftConfigError(f"LoRA(r={self.r}) cannot adapt {name!r} ({type(base).__name__}): {problem}; "
                                      "leave it out with exclude_modules")
        return names

    def make_delta(self, layer: AdaptedLayer, name: str, applied: Applied) -> Delta:
        if layer.kind != "linear":
            return make_layer_delta(layer.kind, layer.base_layer, self.r, self.scaling, self.dropout,
                                    self.init_weights)
        return LoRADelta(layer.in_features, layer.out_features, self.r, self.scaling, self.dropout,
                         self.init_weights, self.shared_dropout)
