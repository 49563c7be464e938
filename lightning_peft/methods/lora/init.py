"""LoRA initializations that read the base weight: PiSSA, OLoRA and LoftQ, computed as ``peft`` 0.21 does.

- **PiSSA** (Meng et al. 2024): ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)`` from the top ``r`` singular
  triplets of ``W`` (``s`` the LoRA scaling), and the base keeps the residual ``W_res = W - s B A``. With
  ``"pissa_niter_K"`` the SVD is Halko et al.'s randomized one with ``K`` subspace iterations (``torch.svd_lowrank``,
  as ``peft``), its random sketch drawn from a fixed seed so the same weight always gives the same factors.
- **OLoRA** (Büyükakyüz 2024): ``W = QR``; ``B = Q[:, :r]``, ``A = R[:r]`` and ``W_res = W - s B A``.
- **LoftQ** (Li et al. 2023): alternately quantize ``W - s B A`` and fit ``s B A`` to the quantization error by a
  rank-``r`` SVD, so that ``Q + s B A`` approximates ``W``. Needs the full-precision ``W`` of a layer that
  ``apply_peft(..., quantize=...)`` is about to quantize; the quantization then stores ``Q``.

PiSSA and OLoRA keep their initial factors as buffers ``lora_A0`` / ``lora_B0``: the base gave up exactly
``s B0 A0``, so the trained update relative to the original weight is ``s (B A - B0 A0)``, a rank-``2r`` LoRA
``[A; A0]``, ``[B, -B0]`` (what the PEFT export writes, and ``peft``'s ``path_initial_model_for_weight_conversion``),
and loading them onto a fresh base rebuilds the residual exactly.

Everything is computed in ``LoRA.plan`` (reading weights only); ``before_quantization`` writes the residual into
the full-precision layers about to be quantized, and ``apply`` writes it into the others (a bitsandbytes base is
dequantized, and the residual quantized again with its settings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import (
    base_shape,
    base_weight,
    dequantize,
    is_linear,
    is_quantized,
    quantize,
    quantized_kind,
    set_base_weight,
)
from lightning_peft.errors import PeftConfigError, preview

#: ``init_weights`` values besides ``"pissa_niter_<K>"``
INITS = (True, False, "gaussian", "pissa", "olora", "loftq")
NITER = re.compile(r"pissa_niter_(\d+)")
#: the seed of the random sketch of ``"pissa_niter_K"``
SKETCH_SEED = 0


def check_init(init_weights: Any, loftq_iter: Any) -> None:
    """Raise :class:`PeftConfigError` unless ``init_weights`` is one of :data:`INITS` or ``"pissa_niter_<K>"``,
    and ``loftq_iter`` a positive integer (other than 1 only with LoftQ)."""
    ok = isinstance(init_weights, bool) or (
        isinstance(init_weights, str) and (init_weights in INITS or NITER.fullmatch(init_weights) is not None)
    )
    if not ok:
        valid = [*INITS, "pissa_niter_<K> (K >= 0 subspace iterations, e.g. 'pissa_niter_4')"]
        raise PeftConfigError(f"init_weights={init_weights!r} is not valid; expected one of {valid}")
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, int) or loftq_iter < 1:
        raise PeftConfigError(f"loftq_iter={loftq_iter!r} is not valid; expected an integer >= 1")
    if loftq_iter != 1 and init_weights != "loftq":
        raise PeftConfigError(
            f"loftq_iter={loftq_iter} applies to init_weights='loftq' only, not init_weights={init_weights!r}"
        )


def reads_base(init_weights: Any) -> bool:
    """Whether the init computes the adapter from the base weight and changes the base (PiSSA, OLoRA, LoftQ)."""
    return isinstance(init_weights, str) and init_weights != "gaussian"


def keeps_initial(init_weights: Any) -> bool:
    """Whether the init keeps its initial factors (``lora_A0`` / ``lora_B0``: PiSSA, OLoRA), whose ``s B0 A0`` the
    base gave up; an export then holds the update against the original weights."""
    return reads_base(init_weights) and init_weights != "loftq"


@dataclass
class Factors:
    """One layer's initial adapter ``A`` (r, in), ``B`` (out, r), and what its base becomes."""

    A: Tensor
    B: Tensor
    #: PiSSA / OLoRA: keep ``A``, ``B`` as ``lora_A0`` / ``lora_B0`` (the base gives up ``s B A``)
    keep_initial: bool
    #: LoftQ: the factors whose ``s B A`` the weight to quantize leaves out (``None``: ``W`` itself)
    quantize_without: tuple[Tensor, Tensor] | None = None
    #: the residual is already in the base (written before quantization)
    written: bool = False


class InitPlan(list):
    """The target names (as any layer strategy's plan), plus each target's :class:`Factors`."""

    def __init__(self, targets: list[str], factors: dict[str, Factors]) -> None:
        super().__init__(targets)
        self.factors = factors


# -- the factorizations ----------------------------------------------------------------------------------------
def _split(U: Tensor, S: Tensor, Vh: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """``A = sqrt(S / s) Vh``, ``B = U sqrt(S / s)``: ``s B A = U diag(S) Vh`` (peft's expressions)."""
    root = torch.diag(torch.sqrt(S / scaling))
    return root @ Vh, U @ root


def randomized_svd(W: Tensor, q: int, niter: int, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """``torch.svd_lowrank(W, q, niter)`` (Halko et al. 2009, Algorithm 5.1) with the sketch drawn from
    ``generator``: the same result as ``torch.svd_lowrank`` when both draw the same sketch."""
    m, n = W.shape
    A = W.mH if m < n else W
    R = torch.randn(A.shape[-1], q, dtype=A.dtype, device=A.device, generator=generator)
    Q = torch.linalg.qr(A @ R).Q
    for _ in range(niter):
        Q = torch.linalg.qr(A.mH @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mH @ A, full_matrices=False)
    U, V = Q @ U, Vh.mH
    return (V, S, U) if m < n else (U, S, V)


def pissa(W: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """PiSSA's (A, B) for the float32 (out, in) weight ``W``: the top ``r`` singular triplets, by a full SVD or
    (``niter``) the randomized one."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return _split(U[:, :r], S[:r], Vh[:r], scaling)
    generator = torch.Generator(device=W.device).manual_seed(SKETCH_SEED)
    U, S, V = randomized_svd(W, r, niter, generator)
    return _split(U, S, V.t(), scaling)


def olora(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA's (A, B): ``A = R[:r]``, ``B = Q[:, :r]`` of ``W = QR``."""
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def roundtrip(weight: Tensor, quantization: Any) -> Tensor:
    """``weight`` quantized with ``quantization``'s settings (as the stack quantizes a layer) and dequantized."""
    if quantization.is_4bit:
        param = quantize(weight, "4bit", quant_type=quantization.mode, double_quant=quantization.double_quant,
                         quant_storage=quantization.torch_quant_storage)
    else:
        param = quantize(weight, "8bit")
    return dequantize(param)


def loftq(W: Tensor, r: int, scaling: float, num_iter: int, quantization: Any,
          dtype: torch.dtype) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """LoftQ (peft's ``loftq_init``): ``num_iter`` rounds of ``Q = quant(W - s B A)``, ``(A, B) = SVD_r(W - Q)``.

    ``dtype``: the layer's dtype, which the weight to quantize is cast to first, as the stack quantizes it.
    Returns A, B and the (A, B) whose ``s B A`` the weight to quantize leaves out (``None``: the first round's
    ``W``). Unlike peft's, the factors account for the scaling ``s`` (peft's assume ``s = 1``; the same when
    ``alpha == r``).
    """
    previous = None
    res = W
    for i in range(num_iter):
        q = roundtrip(res.to(dtype), quantization)
        U, S, Vh = torch.linalg.svd(W - q, full_matrices=False)
        A, B = _split(U[:, :r], S[:r], Vh[:r], scaling)
        if i + 1 == num_iter:
            break
        previous = (A, B)
        res = _residual(W, A, B, scaling)
    return A, B, previous


def _residual(W: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    return W - scaling * B @ A


# -- planning and applying -------------------------------------------------------------------------------------
def _weight_problem(name: str, base: nn.Module, init: str, r: int, ctx: Any, tied: dict[int, list[str]]) -> str:
    if not is_linear(base):
        return f"{name} is a {type(base).__name__}; init_weights={init!r} reads linear layers only"
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or weight.device.type == "meta":
        return f"{name} has no weight to read (on the meta device, or none): materialize the model first"
    kind = quantized_kind(weight)
    if kind is None and not weight.is_floating_point():
        return f"{name} holds a {weight.dtype} weight that is neither full precision nor bitsandbytes-dequantizable"
    if kind == "8bit" and weight.dtype != torch.int8:
        return f"{name} is an 8-bit layer that holds no quantized weight (has_fp16_weights=True?)"
    if init == "loftq" and name not in ctx.to_quantize:
        if is_quantized(base):
            return (f"{name} is already quantized, so its full-precision weight is lost: load the model unquantized "
                    "and pass apply_peft(..., quantize=Quantization(...)), which quantizes it after LoftQ")
        return (f"{name} is not quantized by this apply_peft call: LoftQ fits the adapter to the quantization "
                "error, so pass quantize=Quantization('nf4') (or 'int8') and keep the layer out of skip_modules")
    out_features, in_features = base_shape(base)
    if r > min(in_features, out_features):
        return f"r={r} exceeds min(in, out) = {min(in_features, out_features)} of {name}"
    others = [n for n in tied.get(id(weight), []) if n != name + ".weight"]
    if others:
        return f"{name}'s weight is tied to {preview(others, 2)}, which would change too"
    return ""


def plan_init(strategy: Any, model: nn.Module, targets: list[str], ctx: Any) -> InitPlan:
    """Check every target and compute its factors from its weight; the model is not modified."""
    init = strategy.init_weights
    if ctx.state.stacks:
        raise PeftConfigError(
            f"init_weights={init!r} changes the base weights that every adapter set of the model shares, and "
            f"{type(model).__name__} already has adapter sets {sorted(ctx.state.stacks)}; apply it to a model "
            "without other sets"
        )
    tied: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(pname)
    problems = [p for n in targets if (p := _weight_problem(n, _base(model, n), init, strategy.r, ctx, tied))]
    if problems:
        raise PeftConfigError(f"init_weights={init!r} cannot initialize {len(problems)} layer(s): "
                              + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    factors = {}
    with torch.no_grad():
        for name in targets:
            base = _base(model, name)
            W = base_weight(base).to(torch.float32)
            s = strategy.scaling
            if init == "olora":
                factors[name] = Factors(*olora(W, strategy.r), keep_initial=keeps_initial(init))
            elif init == "loftq":
                A, B, without = loftq(W, strategy.r, s, strategy.loftq_iter, ctx.quantization, base.weight.dtype)
                factors[name] = Factors(A, B, keep_initial=keeps_initial(init), quantize_without=without)
            else:
                niter = NITER.fullmatch(init)
                factors[name] = Factors(*pissa(W, strategy.r, s, int(niter[1]) if niter else None),
                                        keep_initial=keeps_initial(init))
    return InitPlan(targets, factors)


def _base(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module)  # already adapted by another strategy of this stack


def write_before_quantization(plan: InitPlan, model: nn.Module, scaling: float, to_quantize: set[str]) -> None:
    """Put into each full-precision layer about to be quantized what it must hold: PiSSA's / OLoRA's residual,
    LoftQ's weight to quantize."""
    with torch.no_grad():
        for name, f in plan.factors.items():
            if name not in to_quantize:
                continue
            base = _base(model, name)
            W = base_weight(base).to(torch.float32)
            if f.keep_initial:
                set_base_weight(base, _residual(W, f.A, f.B, scaling))
            elif f.quantize_without is not None:
                set_base_weight(base, _residual(W, *f.quantize_without, scaling))
            f.written = True


def start(delta: nn.Module, base: nn.Module, f: Factors) -> None:
    """Give ``delta`` its initial factors and, unless done before quantization, ``base`` its residual."""
    with torch.no_grad():
        delta.lora_A.copy_(f.A)
        delta.lora_B.copy_(f.B)
        if f.keep_initial:
            delta.register_buffer("lora_A0", f.A.detach().clone().to(delta.lora_A.dtype))
            delta.register_buffer("lora_B0", f.B.detach().clone().to(delta.lora_B.dtype))
        if not f.written and f.keep_initial:
            set_base_weight(base, _residual(base_weight(base).to(torch.float32), f.A, f.B, delta.scaling))


def give_back(delta: nn.Module, base: nn.Module) -> None:
    """Undo :func:`start` on removal: the base takes back ``s B0 A0`` (quantized again for a bitsandbytes base)."""
    if getattr(delta, "lora_A0", None) is None:
        return
    with torch.no_grad():
        W = base_weight(base).to(torch.float32)
        set_base_weight(base, W + delta.scaling * delta.lora_B0.float() @ delta.lora_A0.float())


def rebase(delta: nn.Module, base: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Before loading a state dict that brings other initial factors than the delta's: the base gives back
    ``s B0 A0`` and gives up the loaded ``s B0' A0'`` (an SVD run on another device, or before another load)."""
    A0, B0 = state_dict.get(prefix + "lora_A0"), state_dict.get(prefix + "lora_B0")
    if getattr(delta, "lora_A0", None) is None or not isinstance(A0, Tensor) or not isinstance(B0, Tensor):
        return
    if A0.shape != delta.lora_A0.shape or B0.shape != delta.lora_B0.shape:
        return  # the shape check of the load reports it
    A0, B0 = A0.to(delta.lora_A0), B0.to(delta.lora_B0)  # the device and dtype the load copies them to
    if torch.equal(A0, delta.lora_A0) and torch.equal(B0, delta.lora_B0):
        return
    with torch.no_grad():
        W = base_weight(base).to(torch.float32)
        old = delta.lora_B0.float() @ delta.lora_A0.float()
        set_base_weight(base, W + delta.scaling * (old - B0.float() @ A0.float()))


__all__ = ["INITS", "Factors", "InitPlan", "check_init", "loftq", "olora", "pissa", "keeps_initial", "plan_init",
           "reads_base"]
