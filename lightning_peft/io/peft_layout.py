"""Hugging Face PEFT's adapter layout: the parts of a stack that ``peft.PeftModel.from_pretrained`` can load.

One :class:`PeftPart` per PEFT adapter type, each written as ``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT's key names (peft 0.21). Each strategy says which part holds it
(``Strategy.peft_part``) and gives its tensors in PEFT's terms (``peft_factors`` / ``peft_scaling`` /
``peft_prompt``, see :mod:`lightning_peft.methods.peft_protocol`), so a strategy a user registers exports too;
nothing here looks at strategy names.

- ``lora``: the low-rank strategies, e.g. LoRA and AdaLoRA (after pruning), folded into one standard LoRA
  adapter. Where AdaLoRA adapts a module, its update ``P diag(lambda) Q * alpha / init_r`` is exactly ``B' A'`` with ``A' = (lambda * Q)[kept]``
  and ``B' = P[:, kept] * alpha / init_r``; where both adapt one module the ranks are concatenated. Per-module
  ranks go to ``rank_pattern`` with one global ``lora_alpha`` (each module's ``rank / r`` folded into its B, so
  readers that ignore ``alpha_pattern`` scale it right too); ``uniform_rank=True`` zero-pads every module to one rank
  with one scale instead (serving engines read a single ``r`` / ``lora_alpha``). LoRA on embeddings and convs
  keeps PEFT's key names and shapes (:mod:`~lightning_peft.io.lora_layout`).
- ``ia3``: the scaling vectors (``ia3_l``) of one scaling strategy (IA3).
- ``prefix``: a prefix-tuning table (``prompt_embeddings``, ``PREFIX_TUNING``), its MLP evaluated once and folded in
  as ``peft``'s ``get_prompt_embedding_to_save`` does (the native files keep the MLP); a gated prefix has no form.
- ``prompt``: the prompt strategies' final embeddings (``prompt_embeddings``); a P-tuning encoder is evaluated
  once and stored as plain prompt tuning, so this part cannot resume training (the native files can).

Modules the stack unfreezes become PEFT ``modules_to_save`` of the first part. DoRA's magnitudes are added by
:mod:`lightning_peft.io.peft_dora`. Nothing here imports ``peft``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.backend import is_conv1d, is_quantized
from lightning_peft.core.gate import is_gated
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.io.lora_layout import pad_rank, peft_lora_key
from lightning_peft.io.peft_common import (
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    PeftExport,
    PeftPart,
    adapted_layers,
    common_config,
    hf_root,
    task_type,
)
from lightning_peft.io.peft_dora import add_magnitudes, fold_refusal
from lightning_peft.methods.base import Level, Strategy
from lightning_peft.methods.peft_protocol import (
    LOW_RANK_PART,
    PREFIX_PART,
    PROMPT_PART,
    SCALING_PART,
    LowRankFactors,
)
from lightning_peft.stack.peft_stack import PeftStack


# -- low-rank part ----------------------------------------------------------------------------------------------
def _low_rank(stack: PeftStack) -> list[Strategy]:
    """The strategies the LoRA part holds: not a gated one (``gate=True``: ``peft`` has no gates)."""
    return [s for s in stack.strategies if s.peft_part == LOW_RANK_PART and not is_gated(s)]


def gate_refusal(strategy: Strategy) -> str:
    """Why a gated strategy has no ``peft`` form."""
    return (f"peft has no gates: {type(strategy).__name__}(gate=True) multiplies its update by sigmoid(W x + b) "
            "of the layer input, which no peft adapter computes (kept in the native files only)")


def _conversion_refusal(stack: PeftStack) -> str | None:
    """Why a PiSSA / OLoRA stack has no exact PEFT form: on a quantized base, the update against the original
    weights (which PEFT loads quantized) misses the residual's own quantization error."""
    converted = any(getattr(s, "keeps_initial_factors", False) for s in _low_rank(stack))
    if converted and any(is_quantized(layer.base_layer) for layer in adapted_layers(stack).values()):
        return ("PiSSA / OLoRA on a quantized base: PEFT's layout holds the update against the original weights, "
                "which differ from this quantized residual by its quantization error (kept in the native files "
                "only; merge_and_export writes the adapted model in full precision)")
    return None


def _lora_part(
    stack: PeftStack, root: nn.Module, prefix: str, native: dict[str, Tensor], uniform_rank: bool
) -> PeftPart | None:
    low = {s.name: s for s in _low_rank(stack)}
    names = list(low)
    if not names:
        return None
    per_module: dict[str, list[LowRankFactors]] = {}
    layers: dict[str, AdaptedLinear] = {}
    conv1d = False
    for name, layer in adapted_layers(stack).items():
        parts = []
        for strategy, delta in layer.adapters[stack.name].items():
            if strategy in low:
                lr = low[strategy].peft_factors(delta)
                if lr is not None and lr.A.shape[0] > 0:
                    if lr.names is not None:  # native keys of A and B when stored unchanged
                        lr.names = tuple(f"{name}.adapters.{stack.name}.{strategy}.{n}" for n in lr.names)
                    parts.append(lr)
        if parts:
            per_module[name.removeprefix(prefix)] = parts
            layers[name.removeprefix(prefix)] = layer
            conv1d = conv1d or is_conv1d(layer.base_layer)
    if not per_module:
        return None
    tensors: dict[str, Tensor] = {}
    verbatim: dict[str, str] = {}
    config: dict[str, Any] = {"peft_type": "LORA"}
    own = [c for s in low.values() if (c := s.peft_config()) is not None]  # strategies stored as peft stores them
    dropout = own[0]["lora_dropout"] if own else 0.0
    if len(low) == 1 and own:
        # one strategy with raw factors (plain LoRA): exactly what PEFT itself would save (raw A and B, the user's
        # r, alpha and patterns; PiSSA / OLoRA converted to plain LoRA of the original base by the strategy)
        fields = ("r", "lora_alpha", "rank_pattern", "alpha_pattern")
        r, alpha, rank_pattern, alpha_pattern = (own[0][k] for k in fields)
        for module, (lr,) in per_module.items():
            keys = lr.names or (None, None)
            for which, tensor, key in (("A", lr.A, keys[0]), ("B", lr.B, keys[1])):
                peft_key = peft_lora_key(module, which, layers[module])
                tensors[peft_key] = tensor
                if key in native:
                    verbatim[peft_key] = key
        use_rslora = own[0]["use_rslora"]
    else:
        # folded: each module's factors concatenated along the rank with the scale moved into B; alpha = r
        folded = {}
        for module, lrs in per_module.items():
            A = torch.cat([lr.A.float() for lr in lrs], 0)
            B = torch.cat([lr.B.float() * lr.scale for lr in lrs], 1)
            folded[module] = (A, B)
        ranks = {m: a.shape[0] for m, (a, _) in folded.items()}
        if uniform_rank:
            r = max(ranks.values())
            for m, (A, B) in folded.items():
                folded[m] = pad_rank(A, B, r, layers[m], m)
            rank_pattern = {}
        else:
            r = Counter(ranks.values()).most_common(1)[0][0]
            rank_pattern = {m: k for m, k in ranks.items() if k != r}
            # one global lora_alpha, no alpha_pattern: a reader that scales every module by lora_alpha / its rank
            # (peft, and engines that ignore alpha_pattern, e.g. llama.cpp's converter) gets r / k; fold k / r
            # into B so that both give each module its trained update
            for m, k in rank_pattern.items():
                A, B = folded[m]
                folded[m] = (A, B * (k / r))
        alpha, alpha_pattern = r, {}
        for module, (A, B) in folded.items():
            tensors[peft_lora_key(module, "A", layers[module])] = A.contiguous()
            tensors[peft_lora_key(module, "B", layers[module])] = B.contiguous()
        use_rslora = False
    config.update(common_config(stack, root))
    config.update(
        {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "target_modules": sorted(per_module),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_rslora": use_rslora,
            "modules_to_save": None,
            "bias": "none",
            "fan_in_fan_out": conv1d,
            "init_lora_weights": True,
            "use_dora": False,
            "layers_to_transform": None,
            "layers_pattern": None,
            "exclude_modules": None,
        }
    )
    return PeftPart(LOW_RANK_PART, config, tensors, verbatim, names)


# -- IA3 -------------------------------------------------------------------------------------------------------
def _ia3_part(stack: PeftStack, root: nn.Module, prefix: str, native: dict[str, Tensor]) -> PeftPart | None:
    strategy = next((s for s in stack.strategies if s.peft_part == SCALING_PART), None)
    if strategy is None:
        return None
    tensors: dict[str, Tensor] = {}
    verbatim: dict[str, str] = {}
    targets, feedforward = [], []
    for name, layer in adapted_layers(stack).items():
        group = layer.adapters[stack.name]
        if strategy.name not in group:
            continue
        scaling = strategy.peft_scaling(group[strategy.name])
        module = name.removeprefix(prefix)
        targets.append(module)
        if scaling.feedforward:  # PEFT's layout: (1, in) scales the input of feed-forward layers, else (out, 1)
            feedforward.append(module)
        peft_key = f"base_model.model.{module}.ia3_l"
        tensors[peft_key] = scaling.vector
        native_key = f"{name}.adapters.{stack.name}.{strategy.name}.{scaling.name}"
        if scaling.name is not None and native_key in native:
            verbatim[peft_key] = native_key
    if not targets:
        return None
    config = {
        "peft_type": "IA3",
        **common_config(stack, root),
        "target_modules": sorted(targets),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_ia3_weights": True,
    }
    return PeftPart(SCALING_PART, config, tensors, verbatim, [strategy.name])


# -- prompt tuning ---------------------------------------------------------------------------------------------
def prompt_part_of(
    stack: PeftStack, root: nn.Module, prefix: str, native: dict[str, Tensor]
) -> PeftPart | None:
    """The stack's prompt strategies as one PEFT ``PROMPT_TUNING`` adapter (their final embeddings)."""
    providers = [
        (s, m) for s, a in zip(stack.strategies, stack.applied) if s.level is Level.INPUT for m in a.modules
    ]
    if not providers or any(s.peft_part != PROMPT_PART for s, _ in providers):
        return None
    # concatenated in stack order, as the prompt host does (a P-tuning encoder's dropout is off at inference)
    rows = [s.peft_prompt(provider) for s, provider in providers]
    embeddings = torch.cat(rows, 0).contiguous()
    names = [s.name for s, _ in providers]
    config_obj = getattr(root, "config", None)
    config = {
        "peft_type": "PROMPT_TUNING",
        **common_config(stack, root),
        "num_virtual_tokens": int(embeddings.shape[0]),
        "token_dim": int(embeddings.shape[1]),
        # 1: prompts on the encoder only for seq2seq models, as our prompt host does (PEFT's default is 2)
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(config_obj, "num_attention_heads", None),
        "num_layers": getattr(config_obj, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "modules_to_save": None,
    }
    return PeftPart(PROMPT_PART, config, {"prompt_embeddings": embeddings}, {}, names)


# -- prefix tuning ---------------------------------------------------------------------------------------------
def prefix_part_of(stack: PeftStack, root: nn.Module) -> tuple[PeftPart | None, str | None]:
    """The stack's prefix as one PEFT ``PREFIX_TUNING`` adapter (its table, any MLP folded), or why it has none."""
    found = [(s, m) for s, a in zip(stack.strategies, stack.applied) if s.peft_part == PREFIX_PART for m in a.modules]
    if not found:
        return None, None
    if any(s.level is Level.INPUT and s.peft_part != PREFIX_PART for s in stack.strategies):
        return None, "PEFT holds one prompt-learning adapter per model, so a prefix next to a prompt has no PEFT form"
    strategy, provider = found[0]
    prefix = strategy.peft_prefix(provider)
    if prefix.table is None:
        return None, prefix.refusal
    config = {
        "peft_type": "PREFIX_TUNING",
        **common_config(stack, root),
        **prefix.config,
        "init_weights": None,
        "modules_to_save": None,
    }
    return PeftPart(PREFIX_PART, config, {"prompt_embeddings": prefix.table}, {}, [strategy.name]), None


# -- modules_to_save -------------------------------------------------------------------------------------------
def _modules_to_save(stack: PeftStack, root: nn.Module, prefix: str) -> tuple[list[str], str | None]:
    """Module names (relative to ``root``) PEFT must save in full, or why that is impossible.

    These are the unfrozen modules, plus, for sequence classifiers, every module PEFT's
    ``PeftModelForSequenceClassification`` wraps by itself (names ending in ``classifier`` or ``score``, PEFT's
    suffix rule): PEFT fails to load a SEQ_CLS adapter without their weights.
    """
    modules: list[str] = []
    for name in stack.unfreeze:
        rel = name.removeprefix(prefix)
        try:
            target = root.get_submodule(rel)
        except AttributeError:
            rel = rel.rpartition(".")[0]  # a parameter: PEFT saves its whole module
            target = root.get_submodule(rel) if rel else root
        if target is root:
            return [], f"unfreeze={name!r} is a top-level parameter; PEFT's modules_to_save needs a submodule"
        if rel not in modules:
            modules.append(rel)
    if task_type(root) == "SEQ_CLS":
        heads = [n for n, _ in root.named_modules() if n and n.endswith(("classifier", "score"))]
        modules.extend(n for n in heads if n not in modules)
    modules = [m for m in modules if not any(m.startswith(o + ".") for o in modules if o != m)]
    for rel in modules:
        if any(isinstance(m, AdaptedLinear) for m in root.get_submodule(rel).modules()):
            return [], f"module {rel!r} is saved in full but also has adapted layers; PEFT cannot hold both"
    return modules, None


def _add_modules_to_save(
    part: PeftPart,
    modules: list[str],
    root: nn.Module,
    prefix: str,
    native: dict[str, Tensor],
    key_prefix: str,
) -> None:
    for rel in modules:
        for k, v in root.get_submodule(rel).state_dict(keep_vars=True).items():
            peft_key = f"{key_prefix}{rel}.{k}"
            part.tensors[peft_key] = v.detach()
            native_key = f"{prefix}{rel}.{k}"
            if native_key in native:
                part.verbatim[peft_key] = native_key
    part.config["modules_to_save"] = list(modules) or None


def build_peft_export(stack: PeftStack, native: dict[str, Tensor], uniform_rank: bool = False) -> PeftExport:
    """Everything of ``stack`` PEFT's format can hold, as parts in nesting order, plus what it cannot."""
    root, prefix = hf_root(stack)
    refusal = fold_refusal(_low_rank(stack)) or _conversion_refusal(stack)
    lora = None if refusal else _lora_part(stack, root, prefix, native, uniform_rank)
    add_magnitudes(lora, stack, prefix, native)
    prefix_part, prefix_refusal = prefix_part_of(stack, root)
    parts = [
        p
        for p in (
            lora,
            _ia3_part(stack, root, prefix, native),
            prompt_part_of(stack, root, prefix, native),
            prefix_part,
        )
        if p is not None
    ]
    covered = {n for p in parts for n in p.strategies}
    skipped = {
        s.name: prefix_refusal if prefix_refusal and s.peft_part == PREFIX_PART
        else gate_refusal(s) if is_gated(s)
        else refusal if refusal and s.peft_part == LOW_RANK_PART
        else f"PEFT has no format for {type(s).__name__} (kept in the native files only)"
        for s in stack.strategies
        if s.name not in covered
    }
    modules, reason = _modules_to_save(stack, root, prefix)
    if reason:
        skipped["unfreeze"] = reason
    elif modules and not parts and stack.unfreeze:
        skipped["unfreeze"] = "PEFT's modules_to_save needs a PEFT adapter to belong to"
    for part in parts:  # every part carries them: PEFT's SEQ_CLS models insist on their heads
        if part.name not in (PROMPT_PART, PREFIX_PART):
            key_prefix = "base_model.model."
        elif len(parts) > 1:  # the prompt adapter is loaded around the inner PeftModel (see the README)
            key_prefix = "base_model.base_model.model."
        else:
            key_prefix = "base_model."
        _add_modules_to_save(part, modules, root, prefix, native, key_prefix)
    return PeftExport(parts, skipped)


__all__ = [
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "PeftExport",
    "PeftPart",
    "build_peft_export",
    "hf_root",
    "prefix_part_of",
    "task_type",
]
