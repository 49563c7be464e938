"""AdaLoRA (Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

Each adapted linear gets an update in SVD form, ``P diag(lambda) Q``, whose triplets (a column of P, one
singular value, a row of Q) are scored during training and pruned under a global budget by the
:class:`~lightning_peft.methods.adalora.allocator.RankAllocator` (driven in Lightning by
:class:`~lightning_peft.lightning.rank_budget.RankBudgetScheduler`).

Tensor names follow PEFT's (``lora_A`` / ``lora_E`` / ``lora_B``) under this strategy's own prefix:
``adalora_A`` (r, in) holds the right singular vectors (the paper's Q), ``adalora_E`` (r, 1) the singular
values (Lambda), ``adalora_B`` (out, r) the left singular vectors (P). The boolean buffer ``adalora_mask``
(r,) says which triplets are kept; it is persistent, so it is part of the adapter state and of checkpoints.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.backend import base_shape
from lightning_peft.core.gate import unwrap
from lightning_peft.core.layer import AdaptedLinear, Delta
from lightning_peft.core.state import get_stack
from lightning_peft.core.targets import ALL_LINEAR, check_patterns
from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.methods.adalora.regularizer import orthogonal_penalty
from lightning_peft.methods.base import (
    Applied,
    LayerStrategy,
    check_positive,
    check_probability,
    register_strategy,
)
from lightning_peft.methods.peft_protocol import (
    LOW_RANK_PART,
    LowRankFactors,
    check_shape,
    refuse_options,
    take,
)
from lightning_peft.ops.dropout import project
from lightning_peft.ops.lowrank import lowrank_linear

NO_SCHEDULER_WARNING = (
    "AdaLoRA is training but no rank allocator is attached: ranks are never pruned and the update behaves "
    "like a LoRA of rank init_r={r}. Add `RankBudgetScheduler(tinit=..., tfinal=..., delta_t=...)` to the "
    "Trainer's callbacks (or, in a plain PyTorch loop, build `RankAllocator.from_model(model, ...)` and call "
    "its `step(global_step)` after every optimizer step)."
)


class _AllocationFlag:
    """Shared by every delta of one AdaLoRA application: whether an allocator drives it, and whether we warned."""

    def __init__(self) -> None:
        self.attached = False
        self.warned = False


class AdaLoRADelta(Delta):
    """``B diag(E * mask) A x * scaling`` with A (r, in), E (r, 1), B (out, r) and a boolean mask (r,).

    The scaling is ``alpha / init_r`` and stays fixed as triplets are pruned (PEFT divides by
    ``init_r + 1e-5``; the relative difference, ``1e-5 / init_r``, is below float32 resolution of most updates).
    A pruned triplet contributes nothing and receives no gradient until a reallocation keeps it again.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        scaling: float,
        dropout: float,
        flag: _AllocationFlag | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.dropout = dropout
        self.adalora_A = nn.Parameter(torch.empty(r, in_features))
        self.adalora_E = nn.Parameter(torch.zeros(r, 1))
        self.adalora_B = nn.Parameter(torch.empty(out_features, r))
        self.register_buffer("adalora_mask", torch.ones(r, dtype=torch.bool))
        # As PEFT: P and Q ~ N(0, 0.02) and Lambda = 0, so the adapted model starts equal to the base model.
        nn.init.normal_(self.adalora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.adalora_B, mean=0.0, std=0.02)
        self._flag = flag if flag is not None else _AllocationFlag()

    def singular_values(self) -> Tensor:
        """The effective (masked) singular values, shape (r,)."""
        return self.adalora_E.view(-1).masked_fill(~self.adalora_mask, 0.0)

    @property
    def rank(self) -> int:
        """Number of kept triplets."""
        return int(self.adalora_mask.sum())

    def _check_scheduler(self) -> None:
        flag = self._flag
        if not flag.attached and not flag.warned and torch.is_grad_enabled() and self.adalora_E.requires_grad:
            flag.warned = True
            warnings.warn(NO_SCHEDULER_WARNING.format(r=self.r), UserWarning, stacklevel=3)

    def forward(self, x: Tensor) -> Tensor:
        self._check_scheduler()
        h = project(x, self.adalora_A, self.dropout, self.training)
        return F.linear(h * (self.singular_values() * self.scaling), self.adalora_B)

    def fused_forward(self, base: nn.Module, x: Tensor) -> Tensor | None:
        # P diag(lambda) Q x = (P diag(lambda)) (Q x): the masked singular values fold into B's columns
        self._check_scheduler()
        b = self.adalora_B * (self.singular_values() * self.scaling)
        return lowrank_linear(base, x, self.adalora_A, b, self.dropout, self.training, 1.0)

    def delta_weight(self) -> Tensor:
        return (self.adalora_B * (self.singular_values() * self.scaling)) @ self.adalora_A

    def extra_repr(self) -> str:
        return f"init_r={self.r}, rank={self.rank}, scaling={self.scaling:g}, dropout={self.dropout}"


@register_strategy
@dataclass
class AdaLoRA(LayerStrategy):
    """Adaptive-rank low-rank update ``W + (alpha / init_r) P diag(lambda) Q`` with a global rank budget.

    Every adapted matrix starts at rank ``init_r``; a :class:`RankBudgetScheduler` (or a
    :class:`RankAllocator` in a plain loop) then prunes triplets until on average ``target_r`` remain.
    Add :func:`orthogonal_regularization` to the loss (the scheduler does it for you by default).

    Args:
        init_r: initial rank of every adapted matrix (PEFT's default 12).
        target_r: average final rank per adapted matrix; the final budget is ``target_r * n_matrices``.
        alpha: scale numerator; the update is multiplied by ``alpha / init_r`` whatever the pruned rank (the
            reference implementation found rescaling with the kept rank hurt).
        dropout: dropout on the layer input of the AdaLoRA branch.
        target_modules: exact names or dotted suffixes, a regex matching the whole qualified name, or
            ``"all-linear"`` (same rules as LoRA; the paper adapts every linear of every layer).
        exclude_modules: names or regex of modules never adapted.
        beta1: EMA coefficient of the sensitivity (0.85 in the paper's experiments and in PEFT).
        beta2: EMA coefficient of the uncertainty (0.85 in the paper and in PEFT).
        orth_reg_weight: weight gamma of the orthogonal regularizer (PEFT's default 0.5).
        gate: multiply each layer's update by a learned per-token gate ``sigmoid(W x + b)`` of the layer input
            (UniPELT; :mod:`lightning_peft.core.gate`). The rank allocator still finds the gated deltas; a gated
            AdaLoRA cannot be merged and has no ``peft`` form (native files only).

    Example:
        >>> AdaLoRA(init_r=12, target_r=4, target_modules=["query", "value"])  # doctest: +ELLIPSIS
        AdaLoRA(init_r=12, target_r=4, alpha=8.0, ...)
    """

    name = "adalora"
    prefix = "adalora_"
    up_factors = ("adalora_B",)
    loss_term = "adalora/orth_reg"
    peft_part = LOW_RANK_PART
    peft_types = ("ADALORA",)
    peft_suffixes = ("lora_A", "lora_E", "lora_B")

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    gate: bool = False

    def __post_init__(self) -> None:
        check_positive(self.init_r, "init_r")
        check_positive(self.target_r, "target_r")
        if self.target_r > self.init_r:
            raise PeftConfigError(
                f"target_r={self.target_r} is larger than init_r={self.init_r}; AdaLoRA only prunes ranks, so "
                f"choose target_r <= init_r (e.g. target_r={max(1, self.init_r // 3)})"
            )
        check_positive(self.alpha, "alpha", integer=False)
        check_probability(self.dropout, "dropout")
        check_patterns(self.target_modules, "target_modules")
        check_patterns(self.exclude_modules, "exclude_modules")
        for arg in ("beta1", "beta2"):
            value = getattr(self, arg)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
                raise PeftConfigError(f"{arg}={value!r} is not valid; expected a number in (0, 1), e.g. 0.85")
        check_positive(self.orth_reg_weight, "orth_reg_weight", integer=False, allow_zero=True)
        if not isinstance(self.gate, bool):
            raise PeftConfigError(f"gate={self.gate!r} is not valid; expected True or False")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.init_r

    def variant_name(self) -> str:
        return f"{type(self).__name__}(gate=True)" if self.gate else type(self).__name__

    def regularization(self, model: nn.Module) -> Tensor:
        return orthogonal_regularization(model)

    def new_applied(self, plan: list[str]) -> Applied:
        # one flag shared by the deltas of this application: whether an allocator drives them
        return Applied(targets=list(plan), extra={"allocation_flag": _AllocationFlag()})

    def make_delta(self, layer: AdaptedLinear, name: str, applied: Applied) -> AdaLoRADelta:
        flag = applied.extra["allocation_flag"]
        return AdaLoRADelta(layer.in_features, layer.out_features, self.init_r, self.scaling, self.dropout, flag)

    # -- peft's layout ---------------------------------------------------------------------------------------
    def peft_factors(self, delta: nn.Module) -> LowRankFactors:
        """Kept triplets: ``A' = (E * A)[kept]``, ``B' = B[:, kept]``, scale ``alpha / init_r`` (folded into a
        LoRA part: ``peft``'s own AdaLoRA layout needs its allocator's state)."""
        kept = delta.adalora_mask.detach().reshape(-1).bool()
        E = delta.adalora_E.detach().reshape(-1)
        return LowRankFactors((delta.adalora_A.detach() * E.view(-1, 1))[kept], delta.adalora_B.detach()[:, kept],
                              float(delta.scaling))

    @classmethod
    def from_peft(cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], prefix: str = "") -> AdaLoRA:
        """An AdaLoRA ``peft`` folder: ``init_r``, ``target_r``, ``lora_alpha``, dropout, betas and the orthogonal
        weight carry over; the allocator schedule (``tinit``, ``tfinal``, ``deltaT``, ``total_step``) is the
        :class:`~lightning_peft.lightning.rank_budget.RankBudgetScheduler`'s to give when training on."""
        refuse_options(config, "peft_type='ADALORA'",
                       ("init_r", "target_r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
                        "beta1", "beta2", "orth_reg_weight", "tinit", "tfinal", "deltaT", "total_step",
                        "rank_pattern", "r"),
                       allowed={"bias": ("none",), "init_lora_weights": (True, False)})
        if not tensors:
            raise AdapterStateError("the peft AdaLoRA folder holds no lora_A / lora_E / lora_B tensors")
        init_r = config.get("init_r", 12)
        return cls(init_r=init_r, target_r=min(config.get("target_r", 8), init_r), alpha=config.get("lora_alpha", 8),
                   dropout=float(config.get("lora_dropout") or 0.0), target_modules=[prefix + m for m in sorted(tensors)],
                   beta1=config.get("beta1", 0.85), beta2=config.get("beta2", 0.85),
                   orth_reg_weight=config.get("orth_reg_weight", 0.5))

    def peft_state(self, module: str, base: nn.Module | None, tensors: dict[str, Tensor],
                   config: dict[str, Any]) -> dict[str, Tensor]:
        """``peft`` saves only the kept triplets when its ``rank_pattern`` (a boolean list of length ``init_r`` per
        ``<module>.lora_E``) is set: they go back to their positions, the pruned ones stay zero and masked."""
        n_in, n_out = base_shape(base)  # type: ignore[arg-type]
        pattern = config.get("rank_pattern") or {}
        kept = pattern.get(f"{module}.lora_E", pattern.get(f"{module}.lora_E.default"))
        mask = torch.ones(self.init_r, dtype=torch.bool) if kept is None else torch.tensor(kept, dtype=torch.bool)
        if mask.numel() != self.init_r:
            raise AdapterStateError(f"rank_pattern of {module!r} has {mask.numel()} entries, init_r={self.init_r}")
        k = int(mask.sum())
        A, E, B = take(tensors, module, "lora_A", "lora_E", "lora_B")
        for what, t, shape in (("lora_A", A, (k, n_in)), ("lora_E", E, (k, 1)), ("lora_B", B, (n_out, k))):
            check_shape(module, what, t, shape)
        full_A, full_E = A.new_zeros(self.init_r, n_in), E.new_zeros(self.init_r, 1)
        full_B = B.new_zeros(n_out, self.init_r)
        full_A[mask], full_E[mask], full_B[:, mask] = A, E, B
        return {"adalora_A": full_A, "adalora_E": full_E, "adalora_B": full_B, "adalora_mask": mask}


# -- finding the AdaLoRA part of a model ---------------------------------------------------------------------
def has_adalora(stack: Any) -> bool:
    return any(isinstance(s, AdaLoRA) for s in stack.strategies)


def find_adalora_stack(model_or_stack: Any) -> Any:
    """The :class:`~lightning_peft.stack.peft_stack.PeftStack` holding an AdaLoRA strategy, or ``None``.

    ``model_or_stack`` can be a stack, the model it was applied to, or any module containing that model
    (e.g. a LightningModule); the active adapter set is looked at first.
    """
    return get_stack(model_or_stack, where=has_adalora)


def adalora_parts(stack: Any) -> tuple[AdaLoRA, dict[str, AdaLoRADelta], _AllocationFlag | None]:
    """The AdaLoRA strategy of ``stack``, its deltas by adapted module name, and their shared flag."""
    for strategy, applied in zip(stack.strategies, stack.applied):
        if isinstance(strategy, AdaLoRA):
            # a gated AdaLoRA (gate=True) wraps each delta: the allocator works on the AdaLoRA delta inside
            deltas = {name: unwrap(d) for name, d in zip(applied.targets, applied.modules)}
            return strategy, deltas, applied.extra.get("allocation_flag")
    raise PeftConfigError(f"stack {stack.describe_short()} has no AdaLoRA strategy")


def required_adalora_parts(
    model_or_stack: Any, caller: str
) -> tuple[AdaLoRA, dict[str, AdaLoRADelta], _AllocationFlag | None]:
    """:func:`adalora_parts` of the stack found on ``model_or_stack``; a :class:`PeftConfigError` naming
    ``caller`` when there is none."""
    stack = find_adalora_stack(model_or_stack)
    if stack is None:
        raise PeftConfigError(
            f"{caller}: {type(model_or_stack).__name__} has no AdaLoRA strategy applied; add AdaLoRA(...) to the "
            "strategies given to apply_peft or to the PEFT callback first"
        )
    return adalora_parts(stack)


def adalora_deltas(model_or_stack: Any) -> dict[str, AdaLoRADelta]:
    """AdaLoRA deltas by adapted module name (empty when the model has no AdaLoRA strategy)."""
    stack = find_adalora_stack(model_or_stack)
    return {} if stack is None else adalora_parts(stack)[1]


# -- orthogonal regularization -------------------------------------------------------------------------------
def orthogonal_regularization(
    model_or_stack: Any, weight: float | None = None, convention: Literal["peft", "paper"] = "peft"
) -> Tensor:
    """The weighted orthogonal regularizer of every AdaLoRA matrix, a scalar to add to the training loss.

    With ``convention="peft"`` (default) it is ``weight * mean_M ||M||_F`` over the matrices
    ``M = A Aᵀ - I`` and ``M = Bᵀ B - I`` of every adapted layer (the plain Frobenius norm, averaged over
    matrices), which is exactly the term PEFT adds to ``outputs.loss``. ``convention="paper"`` gives the
    paper's term, ``weight * sum_k (||P_kᵀP_k - I||²_F + ||Q_kQ_kᵀ - I||²_F)``. Both vanish exactly when P has
    orthonormal columns and Q orthonormal rows, but their gradients differ: the plain norm's gradient
    ``M / ||M||`` has unit size per matrix, the squared one's ``2M`` grows with the distance and the sum grows
    with the number of layers, so a weight tuned for one convention does not carry over to the other.

    It never looks at the model output, so it works with any loss a LightningModule computes.

    Args:
        model_or_stack: a :class:`~lightning_peft.stack.peft_stack.PeftStack`, the adapted model, or a module containing it.
        weight: the weight; ``None`` uses the strategy's ``orth_reg_weight``.
        convention: ``"peft"`` or ``"paper"`` (see above).

    Example:
        >>> loss = task_loss + orthogonal_regularization(self.model)
    """
    if convention not in ("peft", "paper"):
        raise PeftConfigError(f"convention={convention!r} is not valid; expected 'peft' or 'paper'")
    strategy, deltas, _ = required_adalora_parts(model_or_stack, "orthogonal_regularization")
    w = strategy.orth_reg_weight if weight is None else weight
    return orthogonal_penalty(deltas.values(), w, convention)


__all__ = [
    "AdaLoRA",
    "AdaLoRADelta",
    "adalora_deltas",
    "adalora_parts",
    "find_adalora_stack",
    "orthogonal_regularization",
]
