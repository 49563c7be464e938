"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"; P-tuning v2,
Liu et al. 2022): learned key/value prefixes of length ``n`` in front of every attention layer's keys and values.

Mechanism, as Hugging Face ``peft`` (0.21) does it: one ``(n, num_layers * 2 * token_dim)`` table (optionally
produced by a two-layer MLP, the paper's reparameterization) is cut into each layer's keys and values and put into
the model's key/value cache before the forward, and the 2-D ``attention_mask`` gets ``n`` ones in front. Positions
are shifted by ``n`` (the cache length), as in ``peft``. Nothing is added to the caller's sequence, so logits and
hidden states line up with the caller's inputs; a returned cache holds the prefix.

The hooks sit on the model's backbone (the module that takes the cache: ``model.model``, ``transformer``, ``bert``;
the decoder stack of an encoder-decoder model, where ``peft`` puts the prefix on the decoder's self-attention
only), never replace ``forward``, and are removed exactly when the last prefix goes (see
:mod:`lightning_peft.methods.prompt.host` for why hooks). A prompt strategy in the same stack prepends its
virtual tokens at the outer model first, so the prefix sits in front of the prompt.

The gate (``gate=True``, UniPELT, Mao et al. 2022): per layer a ``Linear(hidden, 1)``; ``g = sigmoid(W x)``
averaged over the caller's non-padded positions of that layer's attention input ``x`` gives one gate per example
and layer, which multiplies that layer's prefix keys and values (a pre-hook on each attention module scales the
prefix entries of the cache just before the layer reads it). In cached generation the prefix keeps the scale of
the prefill step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.errors import AdapterStateError, PeftConfigError
from lightning_peft.methods.base import (
    Applied,
    ApplyContext,
    Level,
    Strategy,
    check_positive,
    register_strategy,
)
from lightning_peft.methods.peft_protocol import PREFIX_PART, PrefixTable, refuse_options, take
from lightning_peft.methods.prompt.hooked import applied_target
from lightning_peft.methods.prompt.host import (
    find_prompt_target,
    input_embeddings,
    position_limit,
)
from lightning_peft.methods.prompt.prefix_host import (
    PrefixHost,
    PrefixPlan,
    backbone_of,
    get_prefix_host,
    self_attention_modules,
)


# -- the model's attention geometry, as peft reads it ------------------------------------------------------------
@dataclass
class PrefixGeometry:
    """What one prefix table looks like for a model: ``peft``'s ``_prepare_prompt_learning_config``."""

    num_layers: int
    #: key/value heads (``num_key_value_heads`` for grouped-query attention, as ``peft``)
    heads: int
    head_dim: int
    #: the model's hidden size (a gate's input width)
    hidden: int
    encoder_decoder: bool

    @property
    def token_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def width(self) -> int:
        return self.num_layers * 2 * self.token_dim


def _first(config: Any, *keys: str) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def prefix_geometry(model: nn.Module, who: str) -> PrefixGeometry:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = _first(config, "num_hidden_layers", "num_layers", "n_layer")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    if layers is None or hidden is None or heads is None:
        raise PeftConfigError(
            f"{who}: {type(model).__name__} has no transformers config giving the number of layers, hidden size "
            "and attention heads (num_hidden_layers, hidden_size, num_attention_heads); prefix tuning needs them"
        )
    head_dim = _first(config, "head_dim", "d_kv")
    kv = _first(config, "num_key_value_heads")
    if kv is not None:  # grouped-query attention: prefixes per key/value head (peft #1901)
        heads, head_dim = kv, head_dim or hidden // heads
    else:
        if hidden % heads:
            raise PeftConfigError(f"{who}: hidden size {hidden} is not divisible by {heads} attention heads")
        head_dim = hidden // heads  # peft: token_dim // num_attention_heads
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder:
        decoder_layers = _first(config, "num_decoder_layers", "decoder_layers")
        if decoder_layers is not None and decoder_layers != layers:
            raise PeftConfigError(
                f"{who}: {type(model).__name__} has {layers} encoder and {decoder_layers} decoder layers; peft's "
                "prefix layout (num_layers) assumes as many of each, so such models are not supported"
            )
    return PrefixGeometry(layers, heads, head_dim, hidden, encoder_decoder)


# -- the learned prefixes -----------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """The ``(num_virtual_tokens, num_layers * 2 * token_dim)`` key/value table of one adapter set.

    Plain (``projection=None``): the table itself, ``prefix_embeddings``. With ``projection=k``: ``peft``'s
    ``PrefixEncoder`` MLP, ``Embedding(n, token_dim) -> Linear(token_dim, k) -> Tanh -> Linear(k, width)``.
    With ``gates``: one ``Linear(hidden, 1)`` per layer (see the module docstring).
    """

    def __init__(self, n: int, geometry: PrefixGeometry, projection: int | None, gate: bool) -> None:
        super().__init__()
        self.num_virtual_tokens = n
        self.geometry = geometry
        if projection is None:
            self.prefix_embeddings = nn.Parameter(torch.randn(n, geometry.width))  # peft: nn.Embedding's N(0, 1)
        else:
            self.embedding = nn.Embedding(n, geometry.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(geometry.token_dim, projection), nn.Tanh(), nn.Linear(projection, geometry.width)
            )
        self.gates: nn.ModuleList | None = None
        if gate:
            self.gates = nn.ModuleList(nn.Linear(geometry.hidden, 1) for _ in range(geometry.num_layers))
            for g in self.gates:
                nn.init.normal_(g.weight, std=0.02)
                nn.init.zeros_(g.bias)

    def forward(self) -> Tensor:
        if hasattr(self, "prefix_embeddings"):
            return self.prefix_embeddings
        return self.transform(self.embedding.weight)

    def folded(self) -> Tensor:
        """The table as a plain float32 tensor (the MLP evaluated once, as ``peft`` saves it)."""
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self().detach().float().contiguous()
        finally:
            self.train(training)

    def key_values(self, batch: int, dtype: torch.dtype, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Each decoder (or encoder) layer's (keys, values), (batch, heads, n, head_dim), in ``peft``'s order."""
        g = self.geometry
        n = self.num_virtual_tokens
        table = self().to(device=device, dtype=dtype)
        per = table.view(n, 2 * g.num_layers, g.heads, g.head_dim).permute(1, 2, 0, 3)  # (2L, heads, n, dim)
        out = []
        for i in range(g.num_layers):
            # peft: encoder-decoder tables are concatenated with themselves and cut in fours per layer (self k, v,
            # cross k, v); the cross-attention part is then dropped, so layer i reads rows 4i and 4i + 1 (mod 2L)
            k, v = ((4 * i) % (2 * g.num_layers), (4 * i + 1) % (2 * g.num_layers)) if g.encoder_decoder else (
                2 * i, 2 * i + 1)
            out.append((per[k].unsqueeze(0).expand(batch, -1, -1, -1), per[v].unsqueeze(0).expand(batch, -1, -1, -1)))
        return out

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"num_virtual_tokens={self.num_virtual_tokens}, layers={g.num_layers}, heads={g.heads}, "
                f"head_dim={g.head_dim}, gate={self.gates is not None}")


@register_strategy
@dataclass
class PrefixTuning(Strategy):
    """Learned key/value prefixes in every attention layer (prefix tuning / P-tuning v2), ``peft``'s
    ``PREFIX_TUNING``.

    Works for causal LMs (Llama-style, GPT-2, including cached ``generate()``), encoders (BERT-style classifiers) and
    encoder-decoder models (T5: on the decoder's self-attention, as ``peft``); the caller's code and tensors are
    unchanged and outputs line up with the caller's inputs.

    Args:
        num_virtual_tokens: the prefix length ``n`` (positions are shifted by ``n``; with learned absolute
            positions, ``n`` plus the input length must fit ``max_position_embeddings``).
        projection: hidden width of the reparameterization MLP (Li & Liang's, ``peft``'s ``encoder_hidden_size``
            with ``prefix_projection=True``); ``None``: the prefixes are learned directly. Exports fold the MLP
            into the plain table; the native files keep it, so training resumes exactly.
        gate: a learned per-layer, per-example gate on the prefix (UniPELT); not in ``peft``'s layout.

    Example:
        >>> PrefixTuning(num_virtual_tokens=10, projection=64)
        PrefixTuning(num_virtual_tokens=10, projection=64, gate=False)
    """

    name = "prefix_tuning"
    prefix = "prefix_"
    level: ClassVar[Level] = Level.INPUT
    mergeable: ClassVar[bool] = False
    peft_part: ClassVar[str | None] = PREFIX_PART
    peft_types = ("PREFIX_TUNING",)
    peft_suffixes = ("prompt_embeddings",)

    num_virtual_tokens: int = 20
    projection: int | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        check_positive(self.num_virtual_tokens, "num_virtual_tokens")
        if self.projection is not None:
            check_positive(self.projection, "projection")
        if not isinstance(self.gate, bool):
            raise PeftConfigError(f"gate={self.gate!r} is not valid; expected True or False")

    def _who(self) -> str:
        return f"PrefixTuning(num_virtual_tokens={self.num_virtual_tokens})"

    def plan(self, model: nn.Module, ctx: ApplyContext) -> PrefixPlan:
        who = self._who()
        name, target = find_prompt_target(model, who)
        geometry = prefix_geometry(target, who)
        limit, _ = position_limit(target)
        if limit is not None and self.num_virtual_tokens >= limit:
            raise PeftConfigError(
                f"{who}: num_virtual_tokens={self.num_virtual_tokens} leaves no position for real tokens in "
                f"{type(target).__name__} (max_position_embeddings={limit}); the prefix shifts positions by its "
                f"length, so use at most {limit - 1}, in practice far fewer (the paper uses 5 to 200)"
            )
        backbone_name, cache_key = backbone_of(target, who)
        host = get_prefix_host(target)
        if host is not None and ctx.set_name in host.sets:
            raise PeftConfigError(
                f"{who}: adapter set {ctx.set_name!r} already has a prefix ({', '.join(host.sets[ctx.set_name])}); "
                "one PrefixTuning per adapter set"
            )
        attention = None
        if self.gate:
            if geometry.encoder_decoder:
                raise PeftConfigError(
                    f"{who}: gate=True is not supported on encoder-decoder models ({type(target).__name__}); use "
                    "gate=False"
                )
            backbone = target.get_submodule(backbone_name) if backbone_name else target
            attention = self_attention_modules(backbone, geometry.num_layers)
            if attention is None:
                raise PeftConfigError(
                    f"{who}: gate=True needs one self-attention module with a layer_idx per layer, which "
                    f"{type(target).__name__} does not have; use gate=False"
                )
        return PrefixPlan(name, backbone_name, cache_key, geometry, attention)

    def apply(self, model: nn.Module, plan: PrefixPlan, ctx: ApplyContext) -> Applied:
        target = model.get_submodule(plan.target_name) if plan.target_name else model
        encoder = PrefixEncoder(self.num_virtual_tokens, plan.geometry, self.projection, self.gate)
        emb = input_embeddings(target)
        weight = getattr(emb, "weight", None)
        if isinstance(weight, Tensor) and weight.device.type != "meta":
            encoder.to(weight.device)
        host = PrefixHost.attach(target, ctx.state, plan)
        host.add(ctx.set_name, self.name, encoder)
        return Applied(modules=[encoder], targets=[plan.target_name], extra={"target": plan.target_name})

    def remove(self, model: nn.Module, applied: Applied, ctx: ApplyContext) -> None:
        target = applied_target(model, applied)
        host = get_prefix_host(target) if target is not None else None
        if host is not None:
            host.remove_encoder(target, ctx.set_name, self.name)

    # -- peft's layout -------------------------------------------------------------------------------------------
    def peft_prefix(self, provider: nn.Module) -> PrefixTable:
        """Export: the folded table and the ``PREFIX_TUNING`` fields of ``adapter_config.json``."""
        if not isinstance(provider, PrefixEncoder):
            raise TypeError(f"expected a PrefixEncoder, got {type(provider).__name__}")
        if provider.gates is not None:
            return PrefixTable(None, {}, "gate=True: peft's PREFIX_TUNING has no gates, so a gated prefix has no "
                                         "peft form (kept in the native files only)")
        g = provider.geometry
        config = {
            "num_virtual_tokens": provider.num_virtual_tokens,
            "token_dim": g.token_dim,
            "num_transformer_submodules": 2 if g.encoder_decoder else 1,
            "num_attention_heads": g.heads,
            "num_layers": g.num_layers,
            "encoder_hidden_size": g.token_dim,
            "prefix_projection": False,  # folded
        }
        return PrefixTable(provider.folded(), config)

    @classmethod
    def from_peft(cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]],
                  prefix: str = "") -> PrefixTuning:
        """A ``PREFIX_TUNING`` folder: its saved (folded) table, trained on directly."""
        who = "peft_type='PREFIX_TUNING'"
        refuse_options(config, who, ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                                     "encoder_hidden_size", "prefix_projection", "init_weights",
                                     "tokenizer_name_or_path"),
                       allowed={"num_transformer_submodules": (1, 2, None)})
        if set(tensors) != {""}:
            raise AdapterStateError(f"a {who} folder holds one 'prompt_embeddings' tensor; this one has "
                                    f"{sorted(tensors)[:4]}")
        (table,) = take(tensors[""], "(prefix)", "prompt_embeddings")
        n = config.get("num_virtual_tokens")
        if table.dim() != 2 or (n is not None and table.shape[0] != n):
            raise AdapterStateError(f"prompt_embeddings has shape {tuple(table.shape)}; the config says "
                                    f"num_virtual_tokens={n}")
        return cls(num_virtual_tokens=int(table.shape[0]))

    def peft_state(self, module: str, base: nn.Module | None, tensors: dict[str, Tensor],
                   config: dict[str, Any]) -> dict[str, Tensor]:
        (table,) = take(tensors, "(prefix)", "prompt_embeddings")
        return {"prefix_embeddings": table}


__all__ = ["PrefixEncoder", "PrefixGeometry", "PrefixHost", "PrefixPlan", "PrefixTuning", "prefix_geometry"]
