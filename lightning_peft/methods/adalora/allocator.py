"""AdaLoRA's rank allocator: importance scores, the cubic budget schedule and global masking (framework-free).

Follows Section 3 and Algorithm 1 of the paper, and agrees with PEFT's ``RankAllocator`` /
``AdaLoraModel.update_and_allocate`` step for step (see ``tests/test_adalora.py``):

- sensitivity of every entry of A, E and B: ``I = |w * dL/dw|``, read after the optimizer step;
- smoothed sensitivity ``Ibar <- beta1 Ibar + (1 - beta1) I``, uncertainty
  ``Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar|``, entry score ``s = Ibar * Ubar``;
- triplet score ``S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)``;
- budget ``b(t)``: ``init_budget`` up to ``tinit``, then ``int(b_T + (b_0 - b_T)(1 - (t - tinit) / (T - tinit -
  tfinal))^3)``, then ``target_budget`` from ``T - tfinal`` on;
- every ``delta_t`` steps in the cubic phase, the triplets whose score is at or below the
  ``(init_budget - b(t))``-th smallest are pruned (mask off, singular value zeroed), all layers together;
- at ``T - tfinal`` the final allocation is fixed and the score averages are freed.

The state is a fixed set of tensors the size of the adapters (no history): :meth:`RankAllocator.state_dict`
/ :meth:`RankAllocator.load_state_dict` make a run resumable mid-schedule.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.methods.adalora.method import AdaLoRADelta, required_adalora_parts

_PARTS = ("A", "E", "B")
STATE_VERSION = 1


def cubic_budget(
    step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int
) -> int:
    """The total rank budget after optimizer step ``step`` (1-based), as in PEFT's ``budget_schedule``."""
    if step <= tinit:
        return init_budget
    if step >= total_step - tfinal:
        return target_budget
    coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * (coeff**3) + target_budget)


def check_schedule(
    tinit: Any, tfinal: Any, delta_t: Any, total_step: Any, total_from: str = "total_step"
) -> None:
    """Validate schedule arguments; ``total_from`` names where ``total_step`` came from, for the message."""
    for value, arg in ((tinit, "tinit"), (tfinal, "tfinal")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PeftConfigError(f"{arg}={value!r} is not valid; expected an integer >= 0 (optimizer steps)")
    for value, arg in ((delta_t, "delta_t"), (total_step, total_from)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PeftConfigError(f"{arg}={value!r} is not valid; expected an integer > 0 (optimizer steps)")
    if tinit + tfinal >= total_step:
        raise PeftConfigError(
            f"tinit={tinit} + tfinal={tfinal} >= {total_from}={total_step}: no optimizer step is left for the "
            f"budget to shrink; choose tinit + tfinal < {total_step} (e.g. tinit={total_step // 10}, "
            f"tfinal={total_step // 5}) or train for more steps"
        )


class RankAllocator:
    """Scores AdaLoRA triplets and prunes them under a cubic global budget.

    Call :meth:`step` once after every optimizer step (before ``zero_grad``), with the 1-based count of
    optimizer steps taken; the gradients of that step must still be in ``.grad``.

    Args:
        deltas: AdaLoRA deltas by name (see :meth:`from_model`).
        target_r: average final rank; the final budget is ``target_r * len(deltas)``.
        tinit: optimizer steps of warm-up at the full budget.
        tfinal: optimizer steps at the end with the final allocation fixed.
        delta_t: reallocate every ``delta_t`` optimizer steps in the cubic phase.
        total_step: total optimizer steps T.
        beta1: sensitivity EMA coefficient.
        beta2: uncertainty EMA coefficient.

    Example:
        >>> allocator = RankAllocator.from_model(model, tinit=10, tfinal=20, delta_t=5, total_step=200)
        >>> loss.backward(); optimizer.step(); allocator.step(global_step); optimizer.zero_grad()
    """

    def __init__(
        self,
        deltas: Mapping[str, AdaLoRADelta],
        target_r: int,
        *,
        tinit: int,
        tfinal: int,
        delta_t: int,
        total_step: int,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ) -> None:
        if not deltas:
            raise PeftConfigError("RankAllocator needs at least one AdaLoRA delta; none were given")
        check_schedule(tinit, tfinal, delta_t, total_step)
        self.deltas = dict(deltas)
        self.tinit, self.tfinal, self.delta_t, self.total_step = tinit, tfinal, delta_t, total_step
        self.beta1, self.beta2 = beta1, beta2
        self.init_budget = sum(d.r for d in self.deltas.values())
        self.target_budget = target_r * len(self.deltas)
        if self.target_budget > self.init_budget:
            raise PeftConfigError(
                f"target_r={target_r} is larger than the adapters' rank; choose target_r <= init_r"
            )
        self.last_step = 0
        self.budget = self.init_budget
        self.finalized = False
        self.final_mask: dict[str, Tensor] | None = None
        self._reset_scores()
        for d in self.deltas.values():
            d._flag.attached = True

    @classmethod
    def from_model(
        cls,
        model_or_stack: Any,
        *,
        tinit: int,
        tfinal: int,
        delta_t: int,
        total_step: int,
        target_r: int | None = None,
    ) -> RankAllocator:
        """Build the allocator for the AdaLoRA strategy of a stack (or model); ``target_r``/betas from the strategy."""
        strategy, deltas, _ = required_adalora_parts(model_or_stack, "RankAllocator.from_model")
        return cls(
            deltas,
            strategy.target_r if target_r is None else target_r,
            tinit=tinit,
            tfinal=tfinal,
            delta_t=delta_t,
            total_step=total_step,
            beta1=strategy.beta1,
            beta2=strategy.beta2,
        )

    # -- scores ----------------------------------------------------------------------------------------------
    def _params(self, d: AdaLoRADelta) -> dict[str, Tensor]:
        return {"A": d.adalora_A, "E": d.adalora_E, "B": d.adalora_B}

    def _reset_scores(self) -> None:
        self.exp_avg_ipt: dict[str, dict[str, Tensor]] = {}
        self.exp_avg_unc: dict[str, dict[str, Tensor]] = {}
        if self.finalized:  # the averages are not needed any more; free them as PEFT does
            return
        for name, d in self.deltas.items():
            params = self._params(d)
            self.exp_avg_ipt[name] = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
            self.exp_avg_unc[name] = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold the current gradients into the sensitivity and uncertainty averages."""
        b1, b2 = self.beta1, self.beta2
        for name, d in self.deltas.items():
            avg, unc = self.exp_avg_ipt[name], self.exp_avg_unc[name]
            for k, p in self._params(d).items():
                if p.grad is None:  # e.g. a layer the batch never reached: no sensitivity this step
                    ipt = torch.zeros_like(avg[k])
                else:
                    ipt = (p.float() * p.grad.float()).abs()
                avg[k] = b1 * avg[k] + (1 - b1) * ipt
                unc[k] = b2 * unc[k] + (1 - b2) * (ipt - avg[k]).abs()

    def triplet_scores(self) -> dict[str, Tensor]:
        """Score of every triplet, (r,) per delta."""
        if self.finalized:
            raise AdapterStateError(
                "the allocation is final (step >= total_step - tfinal); scores were freed"
            )
        out = {}
        for name in self.deltas:
            s = {k: self.exp_avg_ipt[name][k] * self.exp_avg_unc[name][k] for k in _PARTS}
            vec = torch.cat([s["A"].mean(dim=1, keepdim=True), s["B"].mean(dim=0).view(-1, 1)], dim=1)
            out[name] = s["E"].view(-1) + vec.sum(dim=1).view(-1)
        return out

    # -- masking ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, Tensor]:
        """Keep the best ``budget`` triplets over all layers (ties at the threshold are pruned, as in PEFT)."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        if k <= 0:
            threshold = float("-inf")
        else:
            threshold = torch.kthvalue(torch.cat([s.detach().cpu() for s in scores.values()]), k=k)[0].item()
        masks = {name: s > threshold for name, s in scores.items()}
        self._apply_masks(masks)
        return masks

    @torch.no_grad()
    def _apply_masks(self, masks: Mapping[str, Tensor]) -> None:
        for name, d in self.deltas.items():
            keep = masks[name].to(device=d.adalora_mask.device, dtype=torch.bool).view(-1)
            d.adalora_mask.copy_(keep)
            d.adalora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to reallocate) at optimizer step ``step``, as PEFT's ``budget_schedule``."""
        budget = cubic_budget(
            step, self.init_budget, self.target_budget, self.tinit, self.tfinal, self.total_step
        )
        if step <= self.tinit:
            return budget, False
        if step > self.total_step - self.tfinal:
            return budget, True
        return budget, step % self.delta_t == 0

    def step(self, global_step: int) -> bool:
        """Update scores and masks after optimizer step ``global_step``; returns whether the masks were recomputed.

        Mirrors ``AdaLoraModel.update_and_allocate``: scores are updated before ``T - tfinal``; at
        ``T - tfinal`` the final allocation (``target_budget`` triplets) is fixed; after it, the final mask is
        re-applied every step.
        """
        final_step = self.total_step - self.tfinal
        reallocated = False
        if global_step < final_step and not self.finalized:
            self.update_scores()
            self.budget, reallocate = self.budget_schedule(global_step)
            if reallocate:
                self.mask_to_budget(self.budget)
                reallocated = True
        elif not self.finalized:
            self.budget = self.target_budget
            masks = self.mask_to_budget(self.target_budget)
            self.final_mask = {n: m.detach().cpu().clone() for n, m in masks.items()}
            self.finalized = True
            self._reset_scores()
            reallocated = True
        else:
            self.budget = self.target_budget
            self._apply_masks(self.final_mask)  # type: ignore[arg-type]
        self.last_step = global_step
        return reallocated

    # -- results ---------------------------------------------------------------------------------------------
    def masks(self) -> dict[str, Tensor]:
        return {name: d.adalora_mask.detach().cpu().clone() for name, d in self.deltas.items()}

    def rank_pattern(self) -> dict[str, int]:
        """Kept rank of every adapted matrix now."""
        return {name: d.rank for name, d in self.deltas.items()}

    def final_rank_pattern(self) -> dict[str, list[bool]] | None:
        """The final allocation as PEFT's ``rank_pattern`` (a boolean list per matrix), once fixed."""
        if self.final_mask is None:
            return None
        return {name: m.view(-1).tolist() for name, m in self.final_mask.items()}

    def kept(self) -> int:
        return sum(d.rank for d in self.deltas.values())

    def mean_rank(self) -> float:
        return self.kept() / len(self.deltas)

    # -- checkpointing ---------------------------------------------------------------------------------------
    def schedule(self) -> dict[str, Any]:
        return {
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "delta_t": self.delta_t,
            "total_step": self.total_step,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "init_budget": self.init_budget,
            "target_budget": self.target_budget,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: step, budget, schedule, score averages and the final mask."""
        return {
            "version": STATE_VERSION,
            "names": list(self.deltas),
            "schedule": self.schedule(),
            "last_step": self.last_step,
            "budget": self.budget,
            "finalized": self.finalized,
            "exp_avg_ipt": {
                f"{n}.{k}": t.detach().clone() for n, ts in self.exp_avg_ipt.items() for k, t in ts.items()
            },
            "exp_avg_unc": {
                f"{n}.{k}": t.detach().clone() for n, ts in self.exp_avg_unc.items() for k, t in ts.items()
            },
            "final_mask": None
            if self.final_mask is None
            else {n: m.clone() for n, m in self.final_mask.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises :class:`AdapterStateError` if the adapted matrices differ."""
        names = list(state.get("names", []))
        if names != list(self.deltas):
            missing = sorted(set(self.deltas) - set(names))
            extra = sorted(set(names) - set(self.deltas))
            raise AdapterStateError(
                f"rank allocator state does not match the AdaLoRA layers: missing {missing[:6]}, unexpected "
                f"{extra[:6]}; resume with the same AdaLoRA target_modules"
            )
        saved = dict(state["schedule"])
        for key in ("init_budget", "target_budget"):
            if saved[key] != getattr(self, key):
                raise AdapterStateError(
                    f"rank allocator state has {key}={saved[key]} but the model gives {getattr(self, key)}; "
                    "resume with the same AdaLoRA init_r and target_r"
                )
        changed = {k: (v, self.schedule()[k]) for k, v in saved.items() if self.schedule()[k] != v}
        if changed:
            warnings.warn(
                f"resuming AdaLoRA with a different schedule (saved, now): {changed}",
                UserWarning,
                stacklevel=2,
            )
        self.last_step = int(state["last_step"])
        self.budget = int(state["budget"])
        self.finalized = bool(state["finalized"])
        self.final_mask = (
            None if state["final_mask"] is None else {n: m.clone() for n, m in state["final_mask"].items()}
        )
        self._reset_scores()
        for attr in ("exp_avg_ipt", "exp_avg_unc"):
            target = getattr(self, attr)
            for name, parts in target.items():
                for k in list(parts):
                    parts[k] = (
                        state[attr][f"{name}.{k}"].to(device=parts[k].device, dtype=torch.float32).clone()
                    )

    def __repr__(self) -> str:
        return (
            f"RankAllocator({len(self.deltas)} matrices, budget {self.budget}/{self.init_budget} -> "
            f"{self.target_budget}, step {self.last_step}/{self.total_step})"
        )


__all__ = ["RankAllocator", "check_schedule", "cubic_budget"]
