"""Task-tensor merging: weighted sums, TIES and DARE, on stacked tensors of one shape.

The same arithmetic as ``peft.utils.merge_utils`` (so adapter arithmetic agrees with ``peft``'s
``add_weighted_adapter``), written once here for any tensors:

- **task arithmetic** (Ilharco et al. 2023): ``sum_i w_i T_i``;
- **magnitude pruning**: each ``T_i`` keeps its ``int(density * numel)`` largest entries by magnitude, then the
  weighted sum;
- **TIES** (Yadav et al. 2023, "TIES-Merging"): magnitude pruning, then an elected sign per entry (the sign of
  the sum of the pruned tensors, ``"total"``, or of the sum of their signs, ``"frequency"``); each entry is the
  mean of the weighted entries agreeing with it;
- **DARE** (Yu et al. 2024, "Language Models are Super Mario"): each entry of each ``T_i`` kept with probability
  ``density`` and rescaled by ``1 / density``, then the weighted sum (``dare_linear``) or TIES' sign election and
  disjoint mean (``dare_ties``).

DARE's masks are ``torch.bernoulli`` draws, one per task tensor in order, from ``generator`` (default: torch's
global generator, as ``peft`` draws them). ``density >= 1`` prunes nothing and draws nothing.

Devices and dtypes: plain tensor ops, on the tensors' device and in their dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: how TIES elects each entry's sign
SIGN_METHODS = ("total", "frequency")


def _weighted(stacked: Tensor, weights: Tensor) -> Tensor:
    """``stacked`` (n, ...) times ``weights`` (n,) broadcast over the remaining dimensions."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def magnitude_pruned(tensor: Tensor, density: float) -> Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Each entry kept with probability ``density`` and rescaled by ``1 / density`` (DARE)."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """Where each of the ``stacked`` (n, ...) tensors agrees with the elected sign of its entry (ties: +)."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r} is not valid; expected one of {SIGN_METHODS}")
    return sign == torch.where(magnitude >= 0, 1, -1)


def disjoint_mean(weighted: Tensor, mask: Tensor) -> Tensor:
    """Per entry, the mean of the weighted tensors' entries selected by ``mask`` (0 where none is)."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``sum_i weights[i] * tensors[i]``."""
    return _weighted(torch.stack(list(tensors), dim=0), weights).sum(dim=0)


def magnitude_prune(tensors: Sequence[Tensor], weights: Tensor, density: float) -> Tensor:
    """The weighted sum of the magnitude-pruned tensors."""
    return task_arithmetic([magnitude_pruned(t, density) for t in tensors], weights)


def ties(tensors: Sequence[Tensor], weights: Tensor, density: float, sign_method: str = "total") -> Tensor:
    """TIES: magnitude pruning, sign election, disjoint mean of the weighted tensors."""
    stacked = torch.stack([magnitude_pruned(t, density) for t in tensors], dim=0)
    mask = majority_sign_mask(stacked, sign_method)
    return disjoint_mean(_weighted(stacked, weights), mask)


def dare_linear(tensors: Sequence[Tensor], weights: Tensor, density: float,
                generator: torch.Generator | None = None) -> Tensor:
    """DARE: random pruning with rescaling, then the weighted sum."""
    return task_arithmetic([randomly_pruned(t, density, generator) for t in tensors], weights)


def dare_ties(tensors: Sequence[Tensor], weights: Tensor, density: float, sign_method: str = "total",
              generator: torch.Generator | None = None) -> Tensor:
    """DARE's random pruning with rescaling, then TIES' sign election and disjoint mean."""
    stacked = torch.stack([randomly_pruned(t, density, generator) for t in tensors], dim=0)
    mask = majority_sign_mask(stacked, sign_method)
    return disjoint_mean(_weighted(stacked, weights), mask)


#: the kinds :func:`merge_tensors` knows (adapter arithmetic's ``*_svd`` methods merge with the same ones)
MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_tensors(kind: str, tensors: Sequence[Tensor], weights: Tensor, density: float | None = None,
                  sign_method: str = "total", generator: torch.Generator | None = None) -> Tensor:
    """Merge ``tensors`` with ``weights`` by ``kind`` (a key of :data:`MERGES`); ``density`` for the pruning
    kinds, ``sign_method`` for TIES and DARE-TIES, ``generator`` for DARE's masks."""
    if kind == "linear":
        return task_arithmetic(tensors, weights)
    if density is None:
        raise ValueError(f"merging by {kind!r} needs a density")
    if kind == "ties":
        return ties(tensors, weights, density, sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, sign_method, generator)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ValueError(f"unknown merge {kind!r}; expected one of {MERGES}")


__all__ = [
    "MERGES",
    "SIGN_METHODS",
    "dare_linear",
    "dare_ties",
    "disjoint_mean",
    "magnitude_prune",
    "magnitude_pruned",
    "majority_sign_mask",
    "merge_tensors",
    "randomly_pruned",
    "task_arithmetic",
    "ties",
]
