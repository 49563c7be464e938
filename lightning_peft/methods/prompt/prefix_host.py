"""The mechanism of prefix tuning (:mod:`lightning_peft.methods.prompt.prefix`): hooks on the model's backbone that
put each layer's key/value prefix into the cache and extend the attention mask, and, for a gated prefix, pre-hooks on
each self-attention module that scale that layer's prefix entries.

Why hooks and not a replaced ``forward``: see :mod:`lightning_peft.methods.prompt.host`. The backbone (the module
taking the cache: ``model.model``, ``transformer``, ``bert``; an encoder-decoder's decoder stack) is hooked rather
than the outer model, so a prompt host on the outer model prepends its virtual tokens first, whatever the order the
strategies were applied in; the prefix then sits in front of the prompt.

Limits: attention masks must be 2-D; a static cache has no room for the prefix; a bare backbone (e.g. a
``LlamaModel`` rather than ``LlamaForCausalLM``) with a prompt strategy too would need both hooks on one module,
whose order is the order the strategies were applied in.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_peft.core.state import PREFIX_HOST, AdapterState
from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.peft_protocol import PROMPT_PART
from lightning_peft.methods.prompt.hooked import HookedSets
from lightning_peft.methods.prompt.host import input_embeddings, position_limit

if TYPE_CHECKING:
    from lightning_peft.methods.prompt.prefix import PrefixEncoder, PrefixGeometry

_CACHE_KEYS = ("cache", "past_key_values")


# -- where the hooks go ---------------------------------------------------------------------------------------
@dataclass
class PrefixPlan:
    """What :meth:`PrefixTuning.plan <lightning_peft.methods.prompt.prefix.PrefixTuning.plan>` resolved: the model
    taking the prefix, its backbone and cache argument, the prefix geometry and (gate) the attention modules."""

    target_name: str
    backbone_name: str
    cache_key: str
    geometry: PrefixGeometry
    #: layer index -> the attention module's name in the backbone (only with ``gate=True``)
    attention: dict[int, str] | None = None


def _takes(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def backbone_of(target: nn.Module, who: str) -> tuple[str, str]:
    """(name in ``target``, cache argument) of the module that takes the key/value cache."""
    if getattr(getattr(target, "config", None), "is_encoder_decoder", False):
        getter = getattr(target, "get_decoder", None)
        module = getter() if callable(getter) else None
    else:
        module = getattr(target, "base_model", target)
    if not isinstance(module, nn.Module):
        module = target
    name = next((n for n, m in target.named_modules() if m is module), "")
    key = next((k for k in _CACHE_KEYS if _takes(module, k)), None)
    if key is None:
        raise PeftConfigError(
            f"{who}: {type(module).__name__}.forward takes no key/value cache ({' or '.join(_CACHE_KEYS)}), where "
            "prefix tuning puts its prefixes; use PromptTuning or a layer-level strategy for this model"
        )
    return name, key


def self_attention_modules(backbone: nn.Module, layers: int) -> dict[int, str] | None:
    """Layer index -> name (in ``backbone``) of each layer's self-attention, or ``None`` if not one per layer."""
    found: dict[int, list[str]] = {}
    for name, module in backbone.named_modules():
        idx = getattr(module, "layer_idx", None)
        if (
            isinstance(idx, int)
            and "attention" in type(module).__name__.lower()
            and not getattr(module, "is_cross_attention", False)
            and not any(
                isinstance(getattr(m, "layer_idx", None), int) and "attention" in type(m).__name__.lower()
                for c, m in module.named_modules() if c
            )
        ):
            found.setdefault(idx, []).append(name)
    if sorted(found) != list(range(layers)) or any(len(v) != 1 for v in found.values()):
        return None
    return {i: names[0] for i, names in found.items()}


# -- the hooks -------------------------------------------------------------------------------------------------
def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


@dataclass
class _Call:
    """One prefill forward in flight (for the gates): the cache, the unscaled prefixes, the caller's mask."""

    cache: Any
    kv: list[tuple[Tensor, Tensor]]
    mask: Tensor | None
    encoder: PrefixEncoder
    done: set[int] = field(default_factory=set)


class PrefixHost(HookedSets):
    """Holds the prefix encoder of each adapter set of one model (``sets[set_name][strategy_name]``) and the hooks.

    Attached to the model as ``lightning_peft_prefixes``; detached (hooks removed, attribute deleted) with its last
    encoder.
    """

    attr = PREFIX_HOST
    feeds = "prefixes"

    def __init__(self, target: nn.Module, state: AdapterState, plan: PrefixPlan) -> None:
        super().__init__(state)
        self.cache_key = plan.cache_key
        self.backbone_name = plan.backbone_name
        self.limit, self.absolute = position_limit(target)
        self._call: _Call | None = None
        self._gate_handles: list[Any] = []
        backbone = target.get_submodule(plan.backbone_name) if plan.backbone_name else target
        self._handles = [
            backbone.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            backbone.register_forward_hook(self._post_hook, always_call=True),
        ]

    @classmethod
    def attach(cls, target: nn.Module, state: AdapterState, plan: PrefixPlan) -> PrefixHost:
        host = get_prefix_host(target)
        if host is None:
            host = cls(target, state, plan)
            target.add_module(PREFIX_HOST, host)
        else:
            host.check_state(target, state)
        if plan.attention and not host._gate_handles:
            backbone = target.get_submodule(plan.backbone_name) if plan.backbone_name else target
            for name in plan.attention.values():
                module = backbone.get_submodule(name)
                host._gate_handles.append(module.register_forward_pre_hook(host._gate_hook, with_kwargs=True))
        return host

    def remove_encoder(self, target: nn.Module, set_name: str, key: str) -> None:
        """Drop one encoder (the gate hooks go with the last gated one, the host with the last one)."""
        self.discard(target, set_name, key)
        if not any(e.gates is not None for s in self.sets.values() for e in s.values()):
            for handle in self._gate_handles:
                handle.remove()
            self._gate_handles = []

    def _active(self) -> PrefixEncoder | None:
        # a mixed-adapter batch never holds a prefix set (stack/mixed.py refuses them), so routed rows get none
        if self._state.route is not None:
            return None
        active = self._state.active
        if active is None or active not in self.sets:
            return None
        return next(iter(self.sets[active].values()), None)

    def _prompt_tokens(self) -> int:
        """Virtual tokens the active set's prompt strategies prepend (they sit between the prefix and the input)."""
        stack = self._state.stacks.get(self._state.active) if self._state.active else None
        return sum(s.num_virtual_tokens for s in getattr(stack, "strategies", ()) if s.peft_part == PROMPT_PART)

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        encoder = self._active()
        if encoder is None:
            return None
        kwargs = _as_kwargs(module, args, kwargs)
        inputs = next((kwargs[k] for k in ("inputs_embeds", "input_ids") if isinstance(kwargs.get(k), Tensor)), None)
        if inputs is None:
            return None
        cache = None
        for key in _CACHE_KEYS:
            value = kwargs.pop(key, None)
            cache = cache if value is None else value
        batch, current = inputs.shape[:2]
        n = encoder.num_virtual_tokens
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() != 2:
            raise PeftConfigError(
                f"prefix tuning needs a 2-D attention_mask (batch, length); got shape {tuple(mask.shape)}"
            )
        past = _cache_length(cache)
        pos = kwargs.get("position_ids")
        if past > 0:  # a cached step: the cache already holds the prefix (and any prompt)
            if isinstance(mask, Tensor):
                gap = past + current - mask.shape[1]
                if gap in (n, n + self._prompt_tokens()):
                    kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, gap), mask], dim=1)
            if isinstance(pos, Tensor):
                kwargs["position_ids"] = pos + n
            kwargs[self.cache_key] = cache
            return (), kwargs
        if self.absolute and self.limit is not None and n + current > self.limit:
            raise PeftConfigError(
                f"an input of {current} tokens plus the prefix's num_virtual_tokens={n} is {n + current} positions, "
                f"more than the model's max_position_embeddings={self.limit} (the prefix shifts positions by its "
                f"length); shorten the input to at most {self.limit - n} tokens or use a shorter prefix"
            )
        dtype = inputs.dtype if inputs.is_floating_point() else _embedding_dtype(module, encoder)
        kv = encoder.key_values(batch, dtype, inputs.device)
        kwargs[self.cache_key] = _fill(cache, kv, encoder.geometry.encoder_decoder)
        caller_mask = mask
        if isinstance(mask, Tensor) and mask.shape[1] == current:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if isinstance(pos, Tensor) and pos.shape[-1] == current:
            kwargs["position_ids"] = pos + n
        if encoder.gates is not None:
            mask_now = caller_mask if isinstance(caller_mask, Tensor) and caller_mask.shape[1] == current else None
            self._call = _Call(kwargs[self.cache_key], kv, mask_now, encoder)
        return (), kwargs

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._call = None

    def _gate_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        call = self._call
        if call is None:
            return
        i = module.layer_idx
        if i in call.done or i >= len(call.kv):
            return
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, Tensor):
            return
        gate = call.encoder.gates[i]  # type: ignore[index]
        g = torch.sigmoid(gate(x.to(gate.weight.dtype))).squeeze(-1)  # (batch, length)
        if call.mask is not None:
            m = call.mask.to(device=g.device, dtype=g.dtype)
            g = (g * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            g = g.mean(1)
        k, v = call.kv[i]
        g = g.to(k.dtype).view(-1, 1, 1, 1)
        cache = call.cache
        layer = (cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache).layers[i]
        layer.keys, layer.values = k * g, v * g
        call.done.add(i)


def _embedding_dtype(module: nn.Module, encoder: PrefixEncoder) -> torch.dtype:
    emb = input_embeddings(module)
    weight = getattr(emb, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        return weight.dtype
    return next(encoder.parameters()).dtype


def _fill(cache: Any, kv: list[tuple[Tensor, Tensor]], encoder_decoder: bool) -> Any:
    """``cache`` (an empty one the caller or ``generate`` passed, or a new one) holding the prefixes."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if cache is None:
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if encoder_decoder else DynamicCache()
    own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if not isinstance(own, DynamicCache):
        raise PeftConfigError(
            f"prefix tuning puts its prefixes into a DynamicCache; got an empty {type(own).__name__} (e.g. "
            "cache_implementation='static'), which has no room for them; use the default dynamic cache"
        )
    for i, (k, v) in enumerate(kv):
        own.update(k, v, i)
    return cache


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if not args:
        return kwargs
    params = inspect.signature(module.forward).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward got {len(args)} positional arguments")
    kwargs.update(zip(names, args))
    return kwargs


def get_prefix_host(target: nn.Module) -> PrefixHost | None:
    host = target._modules.get(PREFIX_HOST)
    return host if isinstance(host, PrefixHost) else None


__all__ = ["PrefixHost", "PrefixPlan", "backbone_of", "get_prefix_host", "self_attention_modules"]
