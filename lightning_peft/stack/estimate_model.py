"""The model side of the memory estimate: named Llama presets, config resolution, and the parameter census of a
model with its PEFT stack built on the ``meta`` device (nothing is allocated).

The census applies the real strategies to a ``meta``-device copy of the model (``apply_peft`` under
``torch.device("meta")``), so the adapter parameter counts are exact for every strategy and target rule the
stack supports (LoRA, AdaLoRA, IA3, prompt tuning, bottleneck adapters, selective unfreezing, hybrids), not a
formula. Quantization is not applied on ``meta`` (bitsandbytes packs real data); the census records which
linears it would quantize: every ``nn.Linear`` except the output head, the ``unfreeze`` modules and the
linears that carry trainable parameters of their own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.core.layer import AdaptedLayer
from lightning_peft.core.targets import output_head_names
from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import Strategy, strategy_from_config

#: published shapes (the models' ``config.json`` on the Hugging Face hub / the papers), by preset name
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0),
}
#: the config fields the activation accounting reads
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def resolve_config(model_config: Any) -> Any:
    """A transformers ``PretrainedConfig`` from a config, a dict, a ``config.json`` path or a preset name."""
    from transformers import AutoConfig, LlamaConfig, PretrainedConfig

    if isinstance(model_config, PretrainedConfig):
        config = model_config
    elif isinstance(model_config, dict):
        values = dict(model_config)
        model_type = values.pop("model_type", "llama")
        try:
            config = AutoConfig.for_model(model_type, **values)
        except Exception as err:  # transformers' ValueError, huggingface_hub's strict-dataclass validation errors
            raise PeftConfigError(f"model_config={model_config!r} is not a valid transformers config: {err}") from None
    elif isinstance(model_config, (str, Path)) and str(model_config) in PRESETS:
        config = LlamaConfig(**PRESETS[str(model_config)])
    elif isinstance(model_config, (str, Path)) and Path(model_config).is_file():
        try:
            values = json.loads(Path(model_config).read_text())
        except (OSError, ValueError) as err:
            raise PeftConfigError(f"model_config={str(model_config)!r} is not a readable JSON file: {err}") from None
        return resolve_config(values)
    else:
        raise PeftConfigError(
            f"model_config={model_config!r} is not valid; expected a transformers PretrainedConfig, a dict, the "
            f"path of a config.json, or a preset name: {', '.join(PRESETS)}"
        )
    missing = [f for f in SHAPE_FIELDS if getattr(config, f, None) is None]
    if missing:
        raise PeftConfigError(
            f"model_config (model_type={getattr(config, 'model_type', None)!r}) has no {', '.join(missing)}; the "
            "estimate covers Llama-family decoders (hidden_size, intermediate_size, num_hidden_layers, "
            "num_attention_heads, vocab_size)"
        )
    return config


@dataclass
class LinearInfo:
    """One linear layer of a decoder block, as the activation accounting needs it."""

    name: str  # the last name part: q_proj, ..., down_proj
    in_features: int
    out_features: int
    weight_trainable: bool
    low_rank: list[tuple[int, float, int]] = field(default_factory=list)  # (r, dropout, saved per token) per delta
    scaled_input: bool = False  # IA3 on the input (feed-forward)
    scaled_output: bool = False  # IA3 on the output


@dataclass
class Census:
    """Parameters of the adapted model, by kind; the first decoder block's linears; the prompt length."""

    config: Any
    frozen: dict[str, int]  # "quantizable" (linears to quantize), "other" (embeddings, norms, head): counts
    trainable: int
    layer_linears: list[LinearInfo]
    norms_trainable: bool
    head_trainable: bool
    bottleneck: list[int]  # bottleneck sizes of adapters in one block
    virtual_tokens: int
    largest_linear: int  # elements of the largest quantizable linear weight
    first_stage: int = 0  # where gradients start in the first block (FIRST_STAGES); nothing before it is saved


#: where the first trainable parameter of the first block sits, in forward order (0: the block's input needs
#: a gradient already: a trainable embedding, prompt tokens); 5: the block trains nothing
FIRST_STAGES = ("input", "attention", "after attention", "mlp", "after mlp", "none")


def _meta_safe(strategy: Strategy) -> Strategy:
    """The strategy with an initialisation that reads no data (counts do not depend on it)."""
    fields = {f.name for f in dataclasses.fields(strategy)} if dataclasses.is_dataclass(strategy) else set()
    changes: dict[str, Any] = {}
    if "init" in fields and strategy.init != "random":
        changes["init"] = "random"
        changes.update({k: None for k in ("init_text", "init_token_ids", "tokenizer") if k in fields})
    for name in ("init_weights", "init_lora_weights"):
        if name in fields and getattr(strategy, name) not in (True, False, "gaussian"):
            changes[name] = True  # PiSSA / OLoRA / LoftQ read the weights; the shapes are LoRA's
    return dataclasses.replace(strategy, **changes) if changes else strategy


def build_census(config: Any, strategies: Sequence[Strategy | dict[str, Any]], unfreeze: Any = None) -> Census:
    """Build the model on ``meta``, apply the strategies there, and count."""
    from transformers import AutoModelForCausalLM

    from lightning_peft.stack.peft_stack import apply_peft

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        strategies = [_meta_safe(strategy_from_config(s)) for s in strategies]
        if strategies or unfreeze:
            apply_peft(model, strategies, unfreeze=unfreeze)
        else:  # full fine-tuning
            for p in model.parameters():
                p.requires_grad_(True)
    heads = output_head_names(model)
    quantizable: set[int] = set()
    largest = 0
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if type(base) is nn.Linear and name not in heads and not base.weight.requires_grad:
            quantizable.add(id(base.weight))
            largest = max(largest, base.weight.numel())
    frozen = {"quantizable": 0, "other": 0}
    trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen["quantizable" if id(p) in quantizable else "other"] += p.numel()
    block = _first_block(model)
    linears, bottleneck = _block_linears(block)
    norms = [m for n, m in block.named_modules() if n.endswith("norm") and hasattr(m, "weight")]
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    first = 0 if _virtual_tokens(strategies) or any(p.requires_grad for p in embedding.parameters()) else min(
        (_stage(name) for name, p in block.named_parameters() if p.requires_grad), default=5)
    return Census(
        config=config, frozen=frozen, trainable=trainable, layer_linears=linears,
        norms_trainable=any(m.weight.requires_grad for m in norms),
        head_trainable=head is not None and any(p.requires_grad for p in head.parameters()),
        bottleneck=bottleneck, virtual_tokens=_virtual_tokens(strategies), largest_linear=largest,
        first_stage=first,
    )


def _stage(name: str) -> int:
    """The forward position (FIRST_STAGES) of a block's parameter, from its qualified name."""
    after = "lightning_peft_adapter" in name  # a bottleneck adapter reads its module's output
    if name.startswith(("self_attn.", "attn.", "attention.")):
        return 2 if after else 1
    if name.startswith("post_attention_layernorm"):
        return 2
    if name.startswith("mlp."):
        return 4 if after else 3
    return 0


def _first_block(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("layers.0") or name.endswith("h.0"):
            return module
    raise PeftConfigError(f"model_config: found no decoder block (layers.0) in {type(model).__name__}")


def _block_linears(block: nn.Module) -> tuple[list[LinearInfo], list[int]]:
    out: list[LinearInfo] = []
    bottleneck: list[int] = []
    for name, module in block.named_modules():
        if hasattr(module, "adapter_down") and isinstance(module.adapter_down, nn.Parameter):
            bottleneck.append(module.adapter_down.shape[0])
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if type(base) is not nn.Linear or (module is base and isinstance(_parent(block, name), AdaptedLayer)):
            continue
        info = LinearInfo(name.rsplit(".", 1)[-1], base.in_features, base.out_features, base.weight.requires_grad)
        if isinstance(module, AdaptedLayer):
            for delta in module.adapters.modules():
                if delta is module.adapters or not hasattr(delta, "add_to"):
                    continue
                r, p = getattr(delta, "r", None), float(getattr(delta, "dropout", 0.0) or 0.0)
                if r is not None:  # LoRA (r), AdaLoRA (r, plus its E-scaled rank vector)
                    info.low_rank.append((int(r), p, 2 * int(r) if hasattr(delta, "adalora_E") else int(r)))
                elif getattr(delta, "feedforward", None) is not None:
                    info.scaled_input |= bool(delta.feedforward)
                    info.scaled_output |= not delta.feedforward
        out.append(info)
    return out, bottleneck


def _parent(root: nn.Module, name: str) -> nn.Module | None:
    if "." not in name:
        return root
    return root.get_submodule(name.rsplit(".", 1)[0])


def _virtual_tokens(strategies: Sequence[Strategy]) -> int:
    return sum(int(getattr(s, "num_virtual_tokens", 0) or 0) for s in strategies)


__all__ = ["PRESETS", "Census", "LinearInfo", "build_census", "resolve_config"]
