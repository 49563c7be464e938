"""The new LoRA factors of one layer under adapter arithmetic (:func:`~lightning_peft.stack.combine_adapter_sets`),
computed as ``peft``'s ``add_weighted_adapter`` computes them (``peft/tuners/lora/model.py``), in the same order.

Shapes follow the delta kind: a linear's or embedding's ``A`` is (r, in) and ``B`` (out, r); a conv's ``A`` is
(r, in, *kernel) and ``B`` (out, r, 1, ...). The full updates the SVD methods decompose are taken the way
``peft``'s ``get_delta_weight`` lays them out (transposed for GPT-2's ``Conv1D`` and for embeddings), so that
DARE's random masks fall on the same entries; they are turned back to (out, in) before the SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import is_conv1d
from lightning_peft.core.layer import Delta
from lightning_peft.errors import PeftConfigError
from lightning_peft.ops.merging import merge_tensors

#: the methods that merge ``A`` and ``B`` separately and need one rank
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass
class LoRAPart:
    """One input set's LoRA on one layer: its weight, its delta (``lora_A``, ``lora_B``, ``scaling``) and the
    layer's base."""

    weight: float
    delta: Delta
    base: nn.Module


def combined_rank(method: str, ranks: dict[str, int], svd_rank: int | None) -> int:
    """The new set's rank, as ``peft`` chooses it: the common rank, the sum (``"cat"``), or ``svd_rank`` / the
    largest (SVD methods); sets of different ranks are refused by the methods that need one."""
    if method in SAME_RANK:
        if len(set(ranks.values())) > 1:
            raise PeftConfigError(
                f"method={method!r} merges the sets' A and B factors entry by entry, so every set needs one rank; "
                f"got ranks {ranks}; use method='cat' or 'svd' (or a *_svd method) for sets of different ranks"
            )
        return next(iter(ranks.values()))
    if method == "cat":
        return sum(ranks.values())
    return svd_rank or max(ranks.values())


def lora_factors(method: str, parts: list[LoRAPart], rank: int, density: float | None, sign_method: str,
                 svd_clamp: float | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The new ``(A, B)`` of one layer from the ``parts`` of the sets that adapt it (in the weights' order)."""
    if method == "cat":
        return _cat(parts, rank)
    if method in SAME_RANK:
        return _factorwise(method, parts, density, sign_method, generator)
    kind = "linear" if method == "svd" else method[: -len("_svd")]
    return _svd(kind, parts, rank, density, sign_method, svd_clamp, generator)


def _cat(parts: list[LoRAPart], rank: int) -> tuple[Tensor, Tensor]:
    a = torch.cat([p.delta.lora_A.detach() * p.weight * p.delta.scaling for p in parts], dim=0)
    b = torch.cat([p.delta.lora_B.detach() for p in parts], dim=1)
    new_a = a.new_zeros((rank, *a.shape[1:]))
    new_b = b.new_zeros((b.shape[0], rank, *b.shape[2:]))
    new_a[: a.shape[0]] = a
    new_b[:, : b.shape[1]] = b
    return new_a, new_b


def _factorwise(kind: str, parts: list[LoRAPart], density: float | None, sign_method: str,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """A and B merged separately: A_i weighted by sign(w s) sqrt(|w s|), B_i by sqrt(|w s|)."""
    weights_a, weights_b = [], []
    for p in parts:
        ws = p.weight * p.delta.scaling
        weights_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        weights_b.append(math.sqrt(abs(ws)))
    a0 = parts[0].delta.lora_A
    shapes = {tuple(p.delta.lora_A.shape) for p in parts}
    if len(shapes) > 1:  # sets of one r, but per-module ranks that differ here
        raise PeftConfigError(f"method={kind!r} needs the sets' factors of one shape on each layer; got A shapes "
                              f"{sorted(shapes)}; use method='cat' or 'svd'")
    factors = []
    for attr, w in (("lora_A", weights_a), ("lora_B", weights_b)):
        tensors = [getattr(p.delta, attr).detach() for p in parts]
        merged = merge_tensors(kind, tensors, torch.tensor(w).to(a0.device), density, sign_method, generator)
        factors.append(merged.to(a0.dtype))
    return factors[0], factors[1]


def _update(part: LoRAPart) -> tuple[Tensor, bool]:
    """The part's full update ``s B A`` laid out as ``peft``'s ``get_delta_weight`` (transposed for ``Conv1D``
    and embeddings: then the flag is set), in float32."""
    delta = part.delta
    a, b = delta.lora_A.detach().float(), delta.lora_B.detach().float()
    if a.dim() > 2:  # a conv: (out, in, *kernel)
        return delta.delta_weight().detach().float(), False
    transposed = is_conv1d(part.base) or isinstance(part.base, nn.Embedding)
    product = b @ a
    return (product.T if transposed else product) * delta.scaling, transposed


def _svd(kind: str, parts: list[LoRAPart], rank: int, density: float | None, sign_method: str,
         svd_clamp: float | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The merged full update truncated to ``rank`` by SVD: B = U S, A = V^T (zero-padded past the layer's
    smaller dimension), optionally clamped to the ``svd_clamp`` quantile of their entries."""
    updates = [_update(p) for p in parts]
    weights = torch.tensor([p.weight for p in parts]).to(updates[0][0].device)
    merged = merge_tensors(kind, [u for u, _ in updates], weights, density, sign_method, generator)
    if updates[0][1]:
        merged = merged.T
    a0, b0 = parts[0].delta.lora_A, parts[0].delta.lora_B
    matrix = merged.flatten(1)  # a conv's (out, in, *kernel) as (out, in * kernel)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, s.shape[0])
    u = u[:, :keep] @ torch.diag(s[:keep])
    vh = vh[:keep, :]
    if svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    if keep < rank:  # the layer's update has at most ``keep`` directions: the rest of the rank is zero
        u = torch.cat([u, u.new_zeros(u.shape[0], rank - keep)], dim=1)
        vh = torch.cat([vh, vh.new_zeros(rank - keep, vh.shape[1])], dim=0)
    new_b = u.reshape(b0.shape[0], rank, *b0.shape[2:])
    new_a = vh.reshape(rank, *a0.shape[1:])
    return new_a.to(a0.dtype), new_b.to(b0.dtype)


__all__ = ["SAME_RANK", "LoRAPart", "combined_rank", "lora_factors"]
