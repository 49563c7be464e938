"""LoRA in ``peft``'s layout (``peft_type: "LORA"``), both directions (the protocol of
:mod:`lightning_peft.methods.peft_protocol`).

``peft`` 0.21 stores a linear's (and GPT-2 ``Conv1D``'s) and a conv's factors as ``<module>.lora_A.weight`` /
``<module>.lora_B.weight`` (a conv's in conv shapes), an embedding's as ``<module>.lora_embedding_A`` (r, num_embeddings)
/ ``<module>.lora_embedding_B`` (embedding_dim, r), and DoRA's magnitude as ``<module>.lora_magnitude_vector``; each
module's rank and alpha come from ``r`` / ``lora_alpha`` and the first matching key of ``rank_pattern`` /
``alpha_pattern``. Importing keeps exactly the modules the folder holds tensors for (whatever ``target_modules``
and ``exclude_modules`` said), and refuses the options that change the computation and have no equivalent here
(``bias``, ``layers_to_transform``, an init that rewrites the base weights when ``peft`` loads the folder, ...).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import base_kind, base_shape
from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.methods.base import check_positive
from lightning_peft.methods.lora import init
from lightning_peft.methods.peft_protocol import (
    LowRankFactors,
    check_shape,
    pattern_value,
    refuse_options,
    take,
)

SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
#: the ``init_lora_weights`` values that only set the starting factors (which the folder's tensors replace);
#: the others (``"pissa"``, ``"olora"``, ``"loftq"``, ``"corda"``, ``"eva"``, ...) rewrite the base weights when
#: ``peft`` loads the folder, so the folder alone does not say what the model computes
PLAIN_INITS = (True, False, "gaussian")
_READ = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "use_dora",
         "rank_pattern", "alpha_pattern")


def check_patterns(lora: Any) -> None:
    """Validate ``rank_pattern`` / ``alpha_pattern`` of a :class:`~lightning_peft.methods.lora.LoRA`."""
    for argument, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        value = getattr(lora, argument)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
            raise PeftConfigError(f"{argument}={value!r} is not valid; expected a dict of module name -> "
                                  f"{'rank' if integer else 'alpha'}, e.g. {{'v_proj': 4}}")
        for key, v in value.items():
            check_positive(v, f"{argument}[{key!r}]", integer=integer)
        if value and init.reads_base(lora.init_weights):
            raise PeftConfigError(f"{argument}={value!r} with init_weights={lora.init_weights!r} is not supported: "
                                  "that init reads the base weight at one rank; use init_weights=True")


def factors(delta: nn.Module) -> LowRankFactors:
    """A LoRA delta's ``(A, B, scale)``, raw (the parameters themselves, as ``peft`` stores them)."""
    A, B, names = delta.lora_A.detach(), delta.lora_B.detach(), ("lora_A", "lora_B")
    if getattr(delta, "lora_A0", None) is not None:  # PiSSA / OLoRA: the base gave up s B0 A0, so against
        # the original weights the update is s (B A - B0 A0) = s [B, -B0] [A; A0] (peft's conversion)
        A, B, names = torch.cat([A, delta.lora_A0.to(A.dtype)]), torch.cat([B, -delta.lora_B0.to(B.dtype)], 1), None
    return LowRankFactors(A, B, float(delta.scaling), names)


def part_config(lora: Any) -> dict[str, Any]:
    """The LoRA fields of ``adapter_config.json`` for a part holding this strategy alone (raw factors).

    PiSSA / OLoRA are converted to plain LoRA of the original base at rank ``2r``, as ``peft`` converts them
    (``alpha`` doubled with it, ``sqrt(2)`` times with rsLoRA, so the scale stays ``alpha / r``).
    """
    r, alpha = lora.r, lora.alpha
    if lora.keeps_initial_factors:
        r, alpha = 2 * r, alpha * (2**0.5 if lora.use_rslora else 2)
    return {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(lora.dropout),
        "rank_pattern": dict(lora.rank_pattern or {}),
        "alpha_pattern": dict(lora.alpha_pattern or {}),
        "use_rslora": lora.use_rslora,
    }


def lora_kwargs(config: dict[str, Any], tensors: dict[str, dict[str, Tensor]], prefix: str) -> dict[str, Any]:
    """The :class:`~lightning_peft.methods.lora.LoRA` arguments a ``peft`` LoRA folder describes.

    ``target_modules`` become the exact (prefixed) names of the modules with tensors; the per-module ranks and
    alphas are resolved with ``peft``'s rule and kept as exact names (relative to the transformers model, which
    the same rule matches under any prefix).
    """
    refuse_options(config, "peft_type='LORA'", _READ,
                   allowed={"bias": ("none",), "init_lora_weights": PLAIN_INITS})
    if not tensors:
        raise AdapterStateError("the peft LoRA folder holds no LoRA tensors (lora_A / lora_B)")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    modules = sorted(tensors)
    ranks = {m: pattern_value(config.get("rank_pattern"), m, r) for m in modules}
    alphas = {m: pattern_value(config.get("alpha_pattern"), m, alpha) for m in modules}
    return {
        "r": r,
        "alpha": alpha,
        "dropout": float(config.get("lora_dropout") or 0.0),
        "target_modules": [prefix + m for m in modules],
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": bool(config.get("use_dora", False)),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r} or None,
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha} or None,
    }


def factor_suffixes(kind: str) -> tuple[str, str]:
    """The endings of ``peft``'s keys of A and B on a layer of ``kind`` (``"linear"``, ``"embedding"``, ``"conv"``);
    the export writes them and the import reads them."""
    return ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")


def lora_state(lora: Any, module: str, base: nn.Module | None, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``peft``'s tensors of ``module`` as the LoRA delta's state (``lora_A``, ``lora_B``, DoRA's magnitude)."""
    kind = base_kind(base) if base is not None else None
    if kind is None:
        raise AdapterStateError(
            f"the peft folder has LoRA tensors for {module!r}, a {type(base).__name__}; LoRA adapts linear, "
            "embedding and conv layers"
        )
    n_in, n_out = base_shape(base)
    k = lora.rank_of(module)
    names = factor_suffixes(kind)
    if kind == "embedding":
        shapes: tuple[tuple[int, ...], ...] = ((k, n_in), (n_out, k))
    elif kind == "conv":
        dims = base.weight.dim() - 2
        if k % base.groups:
            raise AdapterStateError(f"module {module!r} is a conv with groups={base.groups}, which does not divide "
                                    f"its rank {k} in the peft folder")
        shapes = ((k, n_in, *base.kernel_size), (n_out, k // base.groups, *(1,) * dims))
    else:
        shapes = ((k, n_in), (n_out, k))
    A, B = take(tensors, module, *names)
    check_shape(module, names[0], A, shapes[0])
    check_shape(module, names[1], B, shapes[1])
    state = {"lora_A": A, "lora_B": B}
    used = set(names)
    if lora.use_dora:
        (m,) = take(tensors, module, "lora_magnitude_vector")
        check_shape(module, "lora_magnitude_vector", m, (n_out,))
        state["lora_magnitude"] = m
        used.add("lora_magnitude_vector")
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterStateError(
            f"the peft folder has {extra[0]!r} for module {module!r}, which its config "
            f"(use_dora={lora.use_dora}, a {kind} layer) does not use"
        )
    return state


__all__ = ["PLAIN_INITS", "SUFFIXES", "check_patterns", "factors", "lora_kwargs", "lora_state", "part_config"]
