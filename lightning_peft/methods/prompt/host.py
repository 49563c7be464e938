"""The input-level mechanism shared by prompt strategies: virtual tokens in front of the caller's inputs.

For a model called with ``input_ids`` (or ``inputs_embeds``), ``attention_mask``, ``token_type_ids``,
``position_ids`` and ``labels``, the active adapter set's virtual token embeddings are prepended to the input
embeddings; the mask is extended with ones, token types with zeros, position ids are shifted behind the
virtual tokens, and token-level labels get -100 at virtual positions. What the caller gets back (logits,
hidden states, attentions) is stripped of the virtual positions, so it lines up with the caller's own inputs;
a causal LM head that takes ``logits_to_keep`` is told to score only the caller's positions (plus the last
virtual one when labels are given, which predicts the caller's first token as in PEFT), so no logits are
computed for the virtual tokens only to be cut away.
Encoder-decoder models get the prompts on the encoder input. During cached generation the cache already
holds the virtual tokens, so later steps only extend the mask and shift positions; ``generate()`` therefore
returns the caller's tokens followed by the new ones, as without prompts.

Why forward hooks (``register_forward_pre_hook(..., with_kwargs=True)`` plus an always-called forward hook)
rather than replacing ``model.forward`` with an instance attribute:

- a hook handle removes exactly this hook, whatever else wrapped the model meanwhile (accelerate's
  ``add_hook_to_module`` also swaps ``forward`` as an instance attribute; restoring a saved ``forward``
  would silently drop its wrapper, or leave ours in place), so :meth:`PromptHost.detach` restores the model
  exactly;
- ``model.forward`` keeps its class signature, which ``generate()`` and Lightning inspect;
- the hooks are bound methods of :class:`PromptHost`, a submodule of the model, so ``copy.deepcopy(model)``
  gives a copy whose hooks use the copy's prompts (a closure over ``model`` would keep the original's);
- the post hook pairs with its own call through the identity of the ``inputs_embeds`` tensor the pre hook
  made, not through a stack, so an exception in forward (or in another hook) cannot desynchronise calls.

The price: only calls through ``model(...)`` see prompts; calling ``model.forward(...)`` directly bypasses
hooks (``generate()`` and Lightning both go through ``__call__``).

Limits: attention masks must be 2-D; with ``return_dict=False`` an encoder-decoder model's encoder outputs come
back unstripped (tuple positions are not named); a static cache sized for the caller's tokens has no room for
the virtual ones.
"""

from __future__ import annotations

import inspect
import re
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core.state import PROMPT_HOST, AdapterState
from lightning_peft.errors import PeftConfigError, preview
from lightning_peft.methods.prompt.hooked import HookedSets
from lightning_peft.methods.prompt.outputs import strip_output

HOST_ATTR = PROMPT_HOST
_CACHE_KEYS = ("cache", "past_key_values")
_ABSOLUTE_POSITIONS = re.compile(r"(^|\.)(position_embeddings|wpe|embed_positions)$")


class PromptProvider(nn.Module):
    """Produces the (num_virtual_tokens, dim) virtual token embeddings of one strategy."""

    num_virtual_tokens: int

    def forward(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        emb = getter()
    except (NotImplementedError, AttributeError):
        return None
    return emb if isinstance(emb, nn.Module) and isinstance(getattr(emb, "weight", None), Tensor) else None


def _accepts_inputs_embeds(model: nn.Module) -> bool:
    try:
        return "inputs_embeds" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def find_prompt_target(model: nn.Module, who: str) -> tuple[str, nn.Module]:
    """The (name, module) that takes prompts: ``model`` itself or its one outermost submodule with input embeddings.

    A LightningModule wrapping a Hugging Face model is resolved to the wrapped model.
    """
    candidates = [
        (n, m)
        for n, m in model.named_modules()
        if not isinstance(m, PromptHost) and input_embeddings(m) is not None and _accepts_inputs_embeds(m)
    ]
    outer = [
        (n, m) for n, m in candidates if not any(n.startswith(o + ".") for o, _ in candidates if o != n and o)
    ]
    if any(n == "" for n, _ in outer):
        return "", model
    if len(outer) == 1:
        return outer[0]
    if not outer:
        raise PeftConfigError(
            f"{who} prepends virtual tokens to the input embeddings, but {type(model).__name__} has no input "
            "embeddings: no module of it has get_input_embeddings() returning an embedding and a forward() "
            "taking inputs_embeds; use a layer-level strategy (LoRA, IA3) for this model"
        )
    raise PeftConfigError(
        f"{who}: {type(model).__name__} holds several models with input embeddings "
        f"({preview([n for n, _ in outer])}); apply the stack to the one that should take prompts"
    )


def position_limit(model: nn.Module) -> tuple[int | None, bool]:
    """(max_position_embeddings or n_positions, whether positions are a learned absolute table)."""
    config = getattr(model, "config", None)
    limit = None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limit = value
            break
    absolute = any(
        isinstance(m, nn.Embedding) and _ABSOLUTE_POSITIONS.search(n) is not None
        for n, m in model.named_modules()
    )
    return limit, absolute


def get_host(target: nn.Module) -> PromptHost | None:
    host = target._modules.get(HOST_ATTR)
    return host if isinstance(host, PromptHost) else None


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


class PromptHost(HookedSets):
    """Holds every prompt provider of one model (``sets[set_name][strategy_name]``) and the hooks that use them.

    It is attached to the prompted model as ``lightning_peft_prompts``, so the providers' parameters are in the
    model's ``state_dict``; it is detached (hooks removed, attribute deleted) when its last provider goes.
    """

    attr = HOST_ATTR
    feeds = "prompts"

    def __init__(self, target: nn.Module, state: AdapterState) -> None:
        super().__init__(state)
        self.is_encoder_decoder = bool(getattr(getattr(target, "config", None), "is_encoder_decoder", False))
        self._pending: dict[int, tuple[weakref.ref, int, int | None]] = {}
        self._signatures: dict[type, list[str]] = {}
        self._accepts: dict[tuple[type, str], bool] = {}
        self.limit, self.absolute = position_limit(target)
        self._handles.append(target.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._handles.append(
            target.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
        )
        if self.is_encoder_decoder:
            encoder = target.get_encoder()
            self._handles.append(encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True))

    # -- bookkeeping ---------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, target: nn.Module, state: AdapterState) -> PromptHost:
        host = get_host(target)
        if host is None:
            host = cls(target, state)
            target.add_module(HOST_ATTR, host)
        else:
            host.check_state(target, state)
        return host

    def remove_provider(self, target: nn.Module, set_name: str, key: str) -> None:
        """Drop one provider; with the last one gone, remove the hooks and the host (the model is as before)."""
        self.discard(target, set_name, key)

    def num_virtual_tokens(self, set_name: str) -> int:
        return sum(p.num_virtual_tokens for p in self.sets[set_name].values()) if set_name in self.sets else 0

    def _active(self) -> list[PromptProvider] | None:
        """The active set's providers; in a mixed-adapter batch the first routed set's (all have as many
        virtual tokens, which :mod:`lightning_peft.stack.mixed` checks)."""
        route = self._state.route
        active = self._state.active if route is None else next((s for s in route.sets if s in self.sets), None)
        if active is None or active not in self.sets:
            return None
        return list(self.sets[active].values())

    def _set_prompt(self, set_name: str) -> Tensor:
        parts = [p() for p in self.sets[set_name].values()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def prompt(self, batch: int, dtype: torch.dtype) -> Tensor:
        """The active set's virtual tokens as a (batch, n, dim) tensor (each row its own set's when mixed)."""
        route = self._state.route
        if route is not None:
            return route.per_row({s: self._set_prompt(s) for s in route.groups if s in self.sets}).to(dtype)
        return self._set_prompt(self._state.active).to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def _as_kwargs(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if not args:
            return kwargs
        names = self._signatures.get(type(module))
        if names is None:
            params = inspect.signature(module.forward).parameters.values()
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            self._signatures[type(module)] = names
        if len(args) > len(names):
            raise TypeError(
                f"{type(module).__name__}.forward got {len(args)} positional arguments, expected at most "
                f"{len(names)}"
            )
        for name, value in zip(names, args):
            kwargs[name] = value
        return kwargs

    def _takes(self, module: nn.Module, name: str) -> bool:
        key = (type(module), name)
        takes = self._accepts.get(key)
        if takes is None:
            try:
                takes = name in inspect.signature(module.forward).parameters
            except (TypeError, ValueError):
                takes = False
            self._accepts[key] = takes
        return takes

    def _is_ours(self, tensor: Any) -> bool:
        entry = self._pending.get(id(tensor)) if isinstance(tensor, Tensor) else None
        return entry is not None and entry[0]() is tensor

    # -- prepending ----------------------------------------------------------------------------------------
    def _prepend(self, module: nn.Module, kwargs: dict[str, Any], *, full: bool) -> None:
        """Put the virtual tokens in front of ``kwargs``' inputs (and, with ``full``, of its token-level labels)."""
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        if embeds is None:
            if ids is None:
                return
            embeds = input_embeddings(module)(ids)
        batch, length = embeds.shape[:2]
        n = sum(p.num_virtual_tokens for p in self._active() or [])
        lead = None  # leading logits positions to cut: n, or fewer when the head was told to skip them
        limit = self.limit
        if full and self.absolute and limit is not None and n + length > limit:
            raise PeftConfigError(
                f"an input of {length} tokens plus num_virtual_tokens={n} is {n + length} positions, more than the "
                f"model's max_position_embeddings={limit}; shorten the input to at most {limit - n} tokens or use "
                "fewer virtual tokens"
            )
        new = torch.cat([self.prompt(batch, embeds.dtype).to(embeds.device), embeds], dim=1)
        kwargs["inputs_embeds"] = new
        kwargs["input_ids"] = None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):
            if mask.dim() != 2:
                raise PeftConfigError(
                    f"prompt strategies need a 2-D attention_mask (batch, length); got shape {tuple(mask.shape)}"
                )
            if mask.shape[1] == length:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if full:
            types = kwargs.get("token_type_ids")
            if isinstance(types, Tensor) and types.shape[-1] == length:
                kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
            pos = kwargs.get("position_ids")
            if isinstance(pos, Tensor) and pos.shape[-1] == length:
                head = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
                kwargs["position_ids"] = torch.cat([head, pos + n], dim=-1)
            labels = kwargs.get("labels")
            token_labels = (
                not self.is_encoder_decoder
                and isinstance(labels, Tensor)
                and labels.dim() >= 2
                and tuple(labels.shape[:2]) == (batch, length)
            )
            pad_labels = n
            if (
                not self.is_encoder_decoder
                and "logits_to_keep" not in kwargs
                and self._takes(module, "logits_to_keep")
            ):
                # A causal LM head need not score the virtual positions: keep the caller's positions only, plus
                # the last virtual one when labels are given (it predicts the caller's first token, as in PEFT,
                # whose loss this keeps). No logits for the virtual tokens are computed, then cut away.
                lead = 1 if token_labels else 0
                kwargs["logits_to_keep"] = length + lead
                pad_labels = lead
            if token_labels and pad_labels:
                pad = labels.new_full((batch, pad_labels, *labels.shape[2:]), -100)
                kwargs["labels"] = torch.cat([pad, labels], dim=1)
        self._pending = {k: v for k, v in self._pending.items() if v[0]() is not None}
        self._pending[id(new)] = (weakref.ref(new), n, lead)

    # -- hooks ---------------------------------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        providers = self._active()
        if not providers:
            return None
        kwargs = self._as_kwargs(module, args, kwargs)
        n = sum(p.num_virtual_tokens for p in providers)
        if self.is_encoder_decoder:
            encoder_outputs = kwargs.get("encoder_outputs")
            # the encoder already ran (generate): align the caller's mask with its output
            if encoder_outputs is not None:
                enc_len = encoder_outputs[0].shape[1]
                mask = kwargs.get("attention_mask")
                if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] + n == enc_len:
                    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
                return (), kwargs
            self._prepend(module, kwargs, full=False)
            return (), kwargs
        cache = next((kwargs[k] for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        past = _cache_length(cache)
        if past > 0:  # a cached step: the cache already holds the virtual tokens
            current = next(
                (
                    kwargs[k].shape[1]
                    for k in ("input_ids", "inputs_embeds")
                    if isinstance(kwargs.get(k), Tensor)
                ),
                0,
            )
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] + n == past + current:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
            pos = kwargs.get("position_ids")
            if isinstance(pos, Tensor):
                kwargs["position_ids"] = pos + n
            return (), kwargs
        self._prepend(module, kwargs, full=True)
        return (), kwargs

    def _encoder_pre_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict] | None:
        if not self._active():
            return None
        kwargs = self._as_kwargs(module, args, kwargs)
        if self._is_ours(kwargs.get("inputs_embeds")):  # prompts already prepended by the model's own hook
            return (), kwargs
        self._prepend(module, kwargs, full=False)
        return (), kwargs

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        embeds = kwargs.get("inputs_embeds") if isinstance(kwargs, dict) else None
        entry = self._pending.pop(id(embeds), None) if isinstance(embeds, Tensor) else None
        if entry is None or entry[0]() is not embeds or output is None:
            return None
        n, lead = entry[1], entry[2]
        total = embeds.shape[1]
        keep_logits = lead is None and bool(kwargs.get("logits_to_keep"))
        return strip_output(output, n, total, self.is_encoder_decoder, keep_logits, lead)
