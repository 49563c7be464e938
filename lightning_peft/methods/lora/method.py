"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
from lightning_peft.methods.lora import init, peft_format
from lightning_peft.methods.lora.layers import conv_problem, make_layer_delta
from lightning_peft.methods.peft_protocol import LOW_RANK_PART, LowRankFactors, pattern_value
from lightning_peft.ops.dropout import project
from lightning_peft.ops.lowrank import lowrank_linear


class LoRADelta(Delta):
    """``B A x * scaling`` with A (r, in) and B (out, r)."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 init_weights: bool | str = True, shared_dropout: bool = False) -> None:
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.dropout = dropout
        self.shared_dropout = shared_dropout
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        # Section 4.1 of the paper: random A, zero B, so the adapted model starts equal to the base model.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_weights == "gaussian":  # peft's "gaussian": A ~ N(0, 1/r^2), B = 0
            nn.init.normal_(self.lora_A, std=1 / r)
        if init_weights is False:  # non-zero B: useful in tests that need a delta from step 0
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

    def before_load(self, layer: AdaptedLayer, state_dict: dict[str, Any], prefix: str) -> None:
        init.rebase(self, layer.base_layer, state_dict, prefix)  # PiSSA / OLoRA: the base follows A0, B0

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}"


#: LoRA's variants that replace the delta, by the config flag that selects them (``"use_dora"``: DoRA). Each
#: registers itself from its own module of this package (imported by the package), built on this one.
VARIANTS: dict[str, Any] = {}


@register_strategy
@dataclass
class LoRA(LayerStrategy):
    r"""Low-rank update ``W + (alpha / r) B A`` on chosen linear layers, and on embeddings and convs named in
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
        init_weights: ``True`` for the paper's init (random A, B = 0); ``False`` draws B at random too (for
            tests); ``"gaussian"``: A ~ N(0, 1/r^2), B = 0. Three read the base weight, as ``peft``'s of the same
            names (see :mod:`lightning_peft.methods.lora.init`): ``"pissa"`` (A, B from the top-``r`` singular
            triplets of W, the base keeps the residual; ``"pissa_niter_K"``: a randomized SVD with ``K``
            subspace iterations, fast on large layers), ``"olora"`` (from W's QR decomposition; the base keeps
            the residual) and ``"loftq"`` (on layers ``apply_peft(..., quantize=...)`` quantizes: Q + s B A
            fits W). A PEFT export of a PiSSA / OLoRA adapter is converted to a rank-``2r`` LoRA of the
            original base weights.
        shared_dropout: opt-in memory saver: layers that read one input tensor (q/k/v) share one dropout
            mask and one masked copy of it instead of one each. Their draws are then correlated; measured on
            SST-2 in ``BENCHMARKS.md``. Not exported (``peft`` has no such option; it changes only training).
        loftq_iter: LoftQ's alternating rounds of quantization and SVD (``init_weights="loftq"`` only); the bits
            and format are those of ``apply_peft(..., quantize=...)``.

        use_dora: DoRA (Liu et al. 2024): a learned magnitude per output feature times the normalized
            ``W + (alpha / r) B A`` (:mod:`lightning_peft.methods.lora.dora`), as ``peft``'s ``use_dora=True``.
            On ``nn.Linear``, GPT-2 ``Conv1D`` and bitsandbytes 4-bit / 8-bit layers; not on a layer that IA3
            also scales, and not with ``shared_dropout``.
        rank_pattern: per-module ranks overriding ``r``, as ``peft``'s: ``{key: rank}`` where a module whose
            qualified name matches ``(.*\.)?key$`` (the key itself, or a dotted suffix) takes the first matching
            key's rank. Not with an init that reads the base weight.
        alpha_pattern: per-module ``alpha`` overriding ``alpha``, by the same rule.
        gate: UniPELT's learned gate (Mao et al. 2022): each layer's update is multiplied by ``sigmoid(W x + b)``
            of the layer input, per token (:mod:`lightning_peft.core.gate`; :func:`~lightning_peft.methods.gate.Gated`
            sets it). Linears only; a gated LoRA cannot be merged and has no ``peft`` form (native files only). Not
            with DoRA (which rescales the base: not additive) nor an init that reads the base weight.

    Example:
        >>> LoRA(r=8, alpha=16, target_modules=["query", "value"])
        LoRA(r=8, alpha=16, dropout=0.0, target_modules=['query', 'value'], exclude_modules=None, use_rslora=False, init_weights=True, shared_dropout=False, loftq_iter=1, use_dora=False, rank_pattern=None, alpha_pattern=None, gate=False)
    """

    name = "lora"
    prefix = "lora_"
    up_factors = ("lora_B",)
    peft_part = LOW_RANK_PART
    peft_types = ("LORA",)
    peft_suffixes = peft_format.SUFFIXES

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    init_weights: bool | str = True
    shared_dropout: bool = False
    loftq_iter: int = 1
    use_dora: bool = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        check_positive(self.r, "r")
        check_positive(self.alpha, "alpha", integer=False)
        check_probability(self.dropout, "dropout")
        check_patterns(self.target_modules, "target_modules")
        check_patterns(self.exclude_modules, "exclude_modules")
        init.check_init(self.init_weights, self.loftq_iter)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not isinstance(self.use_dora, bool):
            raise PeftConfigError(f"use_dora={self.use_dora!r} is not valid; expected True or False")
        if self.use_dora and self.shared_dropout:
            raise PeftConfigError(
                f"use_dora=True with shared_dropout={self.shared_dropout!r} is not supported: DoRA recomputes the "
                "base layer on its own dropped-out input; use one or the other"
            )
        peft_format.check_patterns(self)
        if not isinstance(self.gate, bool):
            raise PeftConfigError(f"gate={self.gate!r} is not valid; expected True or False")
        if self.gate and self.use_dora:
            raise PeftConfigError(
                "use_dora=True with gate=True is not supported: DoRA rescales the base weight to learned norms, which "
                "is not an additive update a gate can multiply; use one or the other"
            )
        if self.gate and init.reads_base(self.init_weights):
            raise PeftConfigError(
                f"gate=True with init_weights={self.init_weights!r} is not supported: the base keeps only the residual "
                "of the initial B A, so a gate (about 0.5 at the start) would change the model before training; use "
                "init_weights=True or 'gaussian' with a gate"
            )
        if self.use_dora and init.reads_base(self.init_weights):
            raise PeftConfigError(
                f"use_dora=True with init_weights={self.init_weights!r} is not supported: the export back to the "
                "original base weights has no form for a magnitude vector; use init_weights=True with DoRA"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_of(self, name: str) -> int:
        """The rank of the LoRA on module ``name`` (``rank_pattern``, else ``r``)."""
        return pattern_value(self.rank_pattern, name, self.r)

    def scaling_of(self, name: str) -> float:
        """The scale of the LoRA on module ``name``, with its ``rank_pattern`` / ``alpha_pattern`` entries."""
        r = self.rank_of(name)
        return pattern_value(self.alpha_pattern, name, self.alpha) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def base_kinds(self) -> tuple[BaseKind, ...]:  # type: ignore[override]
        # the embedding and conv deltas are plain LoRA: a variant (a subclass, DoRA, a base-reading init) adapts
        # linears only unless it says otherwise
        plain = type(self) is LoRA and isinstance(self.init_weights, bool) and not self.use_dora and not self.gate
        return BASE_KINDS if plain else ("linear",)

    def variant_name(self) -> str:
        name = type(self).__name__
        if self.use_dora:
            return f"{name}(use_dora=True)"
        if self.gate:
            return f"{name}(gate=True)"
        return name if isinstance(self.init_weights, bool) else f"{name}(init_weights={self.init_weights!r})"

    @property
    def changes_base(self) -> bool:
        """PiSSA, OLoRA and LoftQ change the base weights (shared by every adapter set of the model)."""
        return init.reads_base(self.init_weights)

    @property
    def keeps_initial_factors(self) -> bool:
        """PiSSA and OLoRA keep their initial factors: exports hold the update against the original weights."""
        return init.keeps_initial(self.init_weights)

    def delta_kind(self) -> str:
        return "decomposed" if self.use_dora else "additive"

    def plan(self, model: nn.Module, ctx: ApplyContext) -> list[str]:
        targets = super().plan(model, ctx)
        for name in targets:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            problem = conv_problem(base, self.rank_of(name))
            if problem is not None:
                raise PeftConfigError(f"LoRA(r={self.rank_of(name)}) cannot adapt {name!r} ({type(base).__name__}): {problem}; "
                                      "leave it out with exclude_modules")
        if self.use_dora:
            VARIANTS["use_dora"].check_targets(model, targets)
        return init.plan_init(self, model, targets, ctx) if self.changes_base else targets

    def before_quantization(self, model: nn.Module, plan: list[str], ctx: ApplyContext) -> None:
        if isinstance(plan, init.InitPlan):
            init.write_before_quantization(plan, model, self.scaling, ctx.to_quantize)

    def new_applied(self, plan: list[str]) -> Applied:
        applied = super().new_applied(plan)
        if isinstance(plan, init.InitPlan):  # taken by make_delta, layer by layer
            applied.extra["init"] = dict(plan.factors)
        return applied

    def make_delta(self, layer: AdaptedLayer, name: str, applied: Applied) -> Delta:
        r, scaling = self.rank_of(name), self.scaling_of(name)
        if layer.kind != "linear":
            return make_layer_delta(layer.kind, layer.base_layer, r, scaling, self.dropout, self.init_weights)
        cls = VARIANTS["use_dora"] if self.use_dora else LoRADelta
        delta = cls(layer.in_features, layer.out_features, r, scaling, self.dropout, self.init_weights,
                    self.shared_dropout)
        factors = applied.extra.get("init", {}).pop(name, None)
        if factors is not None:
            init.start(delta, layer.base_layer, factors)
        if self.use_dora:  # last: the magnitude is the norm of the final base weight plus the initial B A
            delta.init_magnitude(layer.base_layer)
        return delta

    def remove(self, model: nn.Module, applied: Applied, ctx: ApplyContext) -> None:
        for name, delta in zip(applied.targets, applied.modules):  # PiSSA / OLoRA: the base takes back its part
            layer = model.get_submodule(name)
            if isinstance(layer, AdaptedLayer):
                init.give_back(delta, layer.base_layer)
        super().remove(model, applied, ctx)

    # -- peft's layout (see lightning_peft.methods.lora.peft_format) -------------------------------------------
    def peft_factors(self, delta: nn.Module) -> LowRankFactors | None:
        return peft_format.factors(delta)

    def peft_config(self) -> dict[str, Any] | None:
        return peft_format.part_config(self)

    @classmethod
    def from_peft(cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], prefix: str = "") -> LoRA:
        return cls(**peft_format.lora_kwargs(config, tensors, prefix))

    def peft_state(self, module: str, base: nn.Module | None, tensors: dict[str, Tensor],
                   config: dict[str, Any]) -> dict[str, Tensor]:
        return peft_format.lora_state(self, module, base, tensors)
