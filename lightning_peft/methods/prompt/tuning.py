"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

Also home of :class:`PromptStrategy`, the base of every input-level strategy (see
:mod:`lightning_peft.methods.prompt.host` for the mechanism that prepends the virtual tokens).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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
from lightning_peft.methods.peft_protocol import PROMPT_PART, check_shape, refuse_options, take
from lightning_peft.methods.prompt.hooked import applied_target
from lightning_peft.methods.prompt.host import (
    PromptHost,
    PromptProvider,
    find_prompt_target,
    get_host,
    input_embeddings,
    position_limit,
)

INITS = ("random", "text", "vocab")


@dataclass
class PromptPlan:
    target_name: str
    embedding: nn.Module
    limit: int | None
    token_ids: list[int] | None = None


@dataclass
class PromptStrategy(Strategy):
    """Base of input-level strategies: ``num_virtual_tokens`` learned embeddings in front of every input.

    Several prompt strategies in one adapter set are concatenated in stack order; their total must leave room
    for real tokens within the model's ``max_position_embeddings``.
    """

    level: ClassVar[Level] = Level.INPUT
    mergeable: ClassVar[bool] = False
    peft_part: ClassVar[str | None] = PROMPT_PART

    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        check_positive(self.num_virtual_tokens, "num_virtual_tokens")

    def make_provider(self, plan: PromptPlan, target: nn.Module) -> PromptProvider:
        raise NotImplementedError

    def peft_prompt(self, provider: nn.Module) -> Tensor:
        """The embeddings ``provider`` prepends at inference (a P-tuning encoder evaluated without dropout)."""
        training = provider.training
        provider.eval()
        try:
            with torch.no_grad():
                return provider().detach().float()
        finally:
            provider.train(training)

    def _who(self) -> str:
        return f"{type(self).__name__}(num_virtual_tokens={self.num_virtual_tokens})"

    def plan(self, model: nn.Module, ctx: ApplyContext) -> PromptPlan:
        name, target = find_prompt_target(model, self._who())
        embedding = input_embeddings(target)
        limit, _ = position_limit(target)
        if limit is not None and self.num_virtual_tokens >= limit:
            raise PeftConfigError(
                f"{self._who()}: num_virtual_tokens={self.num_virtual_tokens} leaves no position for real tokens "
                f"in {type(target).__name__} (max_position_embeddings={limit}); use at most {limit - 1}, in "
                "practice far fewer (the paper uses 5 to 150)"
            )
        return PromptPlan(name, embedding, limit)

    def apply(self, model: nn.Module, plan: PromptPlan, ctx: ApplyContext) -> Applied:
        target = model.get_submodule(plan.target_name) if plan.target_name else model
        host = get_host(target)
        existing = host.sets[ctx.set_name] if host is not None and ctx.set_name in host.sets else {}
        total = self.num_virtual_tokens + sum(p.num_virtual_tokens for p in existing.values())
        if plan.limit is not None and total >= plan.limit:
            others = ", ".join(f"{k}({p.num_virtual_tokens})" for k, p in existing.items())
            raise PeftConfigError(
                f"prompt strategies conflict in adapter set {ctx.set_name!r}: {others} and {self.name}"
                f"({self.num_virtual_tokens}) prepend {total} virtual tokens together, which leaves no position "
                f"for real tokens (max_position_embeddings={plan.limit}); lower their num_virtual_tokens"
            )
        provider = self.make_provider(plan, target)
        weight = plan.embedding.weight
        if weight.device.type != "meta":
            provider.to(weight.device)
        host = PromptHost.attach(target, ctx.state)
        host.add(ctx.set_name, self.name, provider)
        return Applied(modules=[provider], targets=[plan.target_name], extra={"target": plan.target_name})

    def remove(self, model: nn.Module, applied: Applied, ctx: ApplyContext) -> None:
        target = applied_target(model, applied)
        host = get_host(target) if target is not None else None
        if host is not None:
            host.remove_provider(target, ctx.set_name, self.name)


class PromptEmbedding(PromptProvider):
    """A plain (num_virtual_tokens, dim) table of virtual token embeddings."""

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.num_virtual_tokens = init.shape[0]
        self.prompt_embeddings = nn.Parameter(init)

    def forward(self) -> Tensor:
        return self.prompt_embeddings

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.prompt_embeddings.shape[1]}"


def text_token_ids(text: str, tokenizer: str | None, model: nn.Module, who: str) -> list[int]:
    """Token ids of ``text`` (no special tokens) from ``tokenizer`` or the model's ``name_or_path``."""
    path = (
        tokenizer
        or getattr(model, "name_or_path", None)
        or getattr(getattr(model, "config", None), "_name_or_path", None)
    )
    if not path:
        raise PeftConfigError(
            f"{who}: init='text' needs a tokenizer, and {type(model).__name__} has no name_or_path to load one "
            "from; pass tokenizer='<path or hub name>'"
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise PeftConfigError(
            f"{who}: could not load the tokenizer from {path!r} for init='text': {err}"
        ) from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise PeftConfigError(f"{who}: init_text={text!r} gives no tokens")
    return list(ids)


def initial_prompt(embedding: nn.Module, n: int, init: str, token_ids: list[int] | None, who: str) -> Tensor:
    """The initial (n, dim) float32 prompt: uniform random, rows of given tokens, or sampled vocabulary rows."""
    weight = embedding.weight.detach()
    vocab, dim = weight.shape
    if init == "random":
        # Section 2.2 of the paper: random uniform in [-0.5, 0.5]
        return torch.empty(n, dim).uniform_(-0.5, 0.5)
    if init == "vocab":
        ids = torch.randint(0, vocab, (n,)).tolist()
    else:
        bad = [i for i in token_ids or [] if not 0 <= i < vocab]
        if bad:
            raise PeftConfigError(f"{who}: token ids {bad[:6]} are outside the vocabulary of size {vocab}")
        ids = (list(token_ids) * math.ceil(n / len(token_ids)))[:n]  # repeat or truncate, as PEFT does
    rows = torch.tensor(ids, device=weight.device)
    return weight[rows].float().cpu().clone()


@register_strategy
@dataclass
class PromptTuning(PromptStrategy):
    """Learned virtual token embeddings prepended to every input (soft prompts).

    Works for encoder classifiers (BERT-style), causal LMs (Llama-style, including ``generate()``) and
    encoder-decoder models (prompts on the encoder input); the caller's code and tensors are unchanged.

    Args:
        num_virtual_tokens: number of virtual tokens (the paper finds 20 enough at scale, Section 3.2).
        init: ``"random"`` (uniform in [-0.5, 0.5]), ``"text"`` (embeddings of ``init_text``'s tokens,
            repeated or truncated to the length; the paper's best, Section 3.2) or ``"vocab"`` (rows of the
            embedding matrix sampled at random).
        init_text: the text for ``init="text"``.
        tokenizer: path or hub name of the tokenizer for ``init="text"``; default: the model's ``name_or_path``.
        init_token_ids: token ids for ``init="text"`` instead of text and tokenizer.

    Example:
        >>> PromptTuning(num_virtual_tokens=20, init="text", init_text="Classify the sentiment:")
        PromptTuning(num_virtual_tokens=20, init='text', init_text='Classify the sentiment:', tokenizer=None, init_token_ids=None)
    """

    name = "prompt_tuning"
    prefix = "prompt_"
    #: a P-tuning folder holds the encoder's output embeddings (``peft`` saves those), imported as prompt tuning
    peft_types = ("PROMPT_TUNING", "P_TUNING")
    peft_suffixes = ("prompt_embeddings",)

    init: Literal["random", "text", "vocab"] = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    init_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in INITS:
            raise PeftConfigError(f"init={self.init!r} is not valid; expected one of {list(INITS)}")
        if self.init_token_ids is not None:
            ids = self.init_token_ids
            if (
                not isinstance(ids, (list, tuple))
                or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            ):
                raise PeftConfigError(
                    f"init_token_ids={ids!r} is not valid; expected a non-empty list of ints"
                )
            self.init_token_ids = list(ids)
        if self.init == "text":
            if not self.init_text and not self.init_token_ids:
                raise PeftConfigError(
                    "init='text' needs init_text='...' (or init_token_ids=[...]); got neither"
                )
            if self.init_text is not None and not isinstance(self.init_text, str):
                raise PeftConfigError(f"init_text={self.init_text!r} is not valid; expected a string")
        elif self.init_text is not None or self.init_token_ids is not None or self.tokenizer is not None:
            raise PeftConfigError(
                f"init={self.init!r} conflicts with init_text/init_token_ids/tokenizer, which only apply to "
                "init='text'; set init='text' or drop them"
            )

    def plan(self, model: nn.Module, ctx: ApplyContext) -> PromptPlan:
        plan = super().plan(model, ctx)
        if self.init == "text":
            target = model.get_submodule(plan.target_name) if plan.target_name else model
            ids = self.init_token_ids or text_token_ids(
                self.init_text or "", self.tokenizer, target, self._who()
            )
            vocab = plan.embedding.weight.shape[0]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise PeftConfigError(
                    f"{self._who()}: init token ids {bad[:6]} are outside the vocabulary of size {vocab}"
                )
            plan.token_ids = ids
        return plan

    def make_provider(self, plan: PromptPlan, target: nn.Module) -> PromptEmbedding:
        init = initial_prompt(plan.embedding, self.num_virtual_tokens, self.init, plan.token_ids, self._who())
        return PromptEmbedding(init)

    # -- peft's layout -----------------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, config: dict[str, Any], tensors: dict[str, dict[str, Tensor]],
                  prefix: str = "") -> PromptTuning:
        """A ``PROMPT_TUNING`` or ``P_TUNING`` folder as prompt tuning with the saved embeddings. ``peft`` saves a
        P-tuning adapter's encoder *output*, not the encoder, so training goes on on the embeddings directly (the
        encoder's reparametrization is gone; a warning says so)."""
        who = f"peft_type={config.get('peft_type')!r}"
        refuse_options(config, who, ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers",
                                     "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                     "tokenizer_kwargs", "encoder_hidden_size", "encoder_num_layers",
                                     "encoder_reparameterization_type", "encoder_dropout"),
                       allowed={"num_transformer_submodules": (1, None)})
        if set(tensors) != {""}:
            raise AdapterStateError(f"a {who} folder holds one 'prompt_embeddings' tensor; this one has "
                                    f"{sorted(tensors)[:4]}")
        (embeddings,) = take(tensors[""], "(input embeddings)", "prompt_embeddings")
        n = config.get("num_virtual_tokens")
        if embeddings.dim() != 2 or (n is not None and embeddings.shape[0] != n):
            raise AdapterStateError(f"prompt_embeddings has shape {tuple(embeddings.shape)}; the config says "
                                    f"num_virtual_tokens={n}")
        if config.get("peft_type") == "P_TUNING":
            warnings.warn("load_adapters: a P_TUNING folder holds the prompt encoder's output embeddings (peft saves "
                          "those, not the encoder); loaded as PromptTuning with these embeddings, which reproduces "
                          "peft's outputs; further training updates the embeddings directly", stacklevel=5)
        return cls(num_virtual_tokens=int(embeddings.shape[0]))

    def peft_state(self, module: str, base: nn.Module | None, tensors: dict[str, Tensor],
                   config: dict[str, Any]) -> dict[str, Tensor]:
        (embeddings,) = take(tensors, "(input embeddings)", "prompt_embeddings")
        dim = base.weight.shape[1]  # type: ignore[union-attr]
        check_shape("(input embeddings)", "prompt_embeddings", embeddings, (self.num_virtual_tokens, dim))
        return {"prompt_embeddings": embeddings}
