"""AdaLoRA's orthogonal regularizer (paper Eq. 4): keeps P's columns and Q's rows near orthonormal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_peft.errors import PeftConfigError

#: set in a LightningModule's ``__dict__`` while its ``training_step`` already adds the regularizer (by the
#: ``RankBudgetScheduler``), so that a task module does not add it a second time
ORTH_REG_ADDED = "_lightning_peft_orth_reg_wrapped"


def _orth_terms(deltas: Iterable[nn.Module]) -> list[Tensor]:
    terms = []
    for d in deltas:
        for cov in (d.adalora_A @ d.adalora_A.T, d.adalora_B.T @ d.adalora_B):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(cov - eye)
    return terms


def orthogonal_penalty(
    deltas: Iterable[nn.Module], weight: float, convention: Literal["peft", "paper"] = "peft"
) -> Tensor:
    """The weighted regularizer over the matrices of ``deltas`` (AdaLoRA deltas); see
    :func:`~lightning_peft.methods.adalora.method.orthogonal_regularization` for the two conventions."""
    if convention not in ("peft", "paper"):
        raise PeftConfigError(f"convention={convention!r} is not valid; expected 'peft' or 'paper'")
    terms = _orth_terms(deltas)
    if not terms:
        return torch.zeros(())
    if convention == "peft":
        total = torch.stack([torch.linalg.matrix_norm(m, "fro") for m in terms]).mean()
    else:
        total = torch.stack([m.pow(2).sum() for m in terms]).sum()
    return total * weight


__all__ = ["ORTH_REG_ADDED", "orthogonal_penalty"]
