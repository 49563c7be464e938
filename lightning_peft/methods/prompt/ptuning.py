"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens reparametrized by a prompt encoder."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import check_positive, check_probability, register_strategy
from lightning_peft.methods.prompt.host import PromptProvider
from lightning_peft.methods.prompt.tuning import PromptPlan, PromptStrategy

ENCODERS = ("mlp", "lstm")


class _Dense(nn.Module):
    """A linear map kept out of ``nn.Linear`` so that ``"all-linear"`` strategies never adapt the prompt encoder."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class PromptEncoder(PromptProvider):
    """Virtual token embeddings passed through an MLP, or a bidirectional LSTM then an MLP (the paper's Section 3.2).

    The output, not the raw table, is what is prepended; the encoder only shapes optimization. The layer shapes
    are PEFT's ``PromptEncoder``'s (MLP: dim -> hidden -> hidden -> dim; LSTM: bidirectional, then
    2 hidden -> 2 hidden -> dim), so weights can be copied either way.
    """

    def __init__(
        self, num_virtual_tokens: int, dim: int, hidden: int, encoder: str, num_layers: int, dropout: float
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder = encoder
        self.dropout = dropout
        self.ptuning_embeddings = nn.Parameter(torch.empty(num_virtual_tokens, dim).uniform_(-0.5, 0.5))
        if encoder == "lstm":
            self.ptuning_lstm = nn.LSTM(
                dim,
                hidden,
                num_layers=num_layers,
                dropout=dropout if num_layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
            )
            self.ptuning_mlp = nn.ModuleList([_Dense(2 * hidden, 2 * hidden), _Dense(2 * hidden, dim)])
        else:
            dims = [dim] + [hidden] * num_layers + [dim]
            self.ptuning_mlp = nn.ModuleList([_Dense(a, b) for a, b in itertools.pairwise(dims)])

    def forward(self) -> Tensor:
        h = self.ptuning_embeddings
        if self.encoder == "lstm":
            h = self.ptuning_lstm(h.unsqueeze(0))[0].squeeze(0)
        for i, layer in enumerate(self.ptuning_mlp):
            h = layer(h)
            if i < len(self.ptuning_mlp) - 1:
                h = F.dropout(F.relu(h), self.dropout, self.training)
        return h

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, encoder={self.encoder!r}"


@register_strategy
@dataclass
class PTuning(PromptStrategy):
    """Virtual tokens produced by a trainable prompt encoder (MLP or LSTM), prepended like :class:`PromptTuning`.

    Args:
        num_virtual_tokens: number of virtual tokens.
        encoder: ``"mlp"`` or ``"lstm"`` (a bidirectional LSTM followed by a two-layer MLP, as in the paper).
        encoder_hidden_size: hidden width of the encoder; default: the model's embedding width.
        encoder_num_layers: hidden layers of the MLP, or LSTM layers.
        encoder_dropout: dropout inside the encoder.

    Example:
        >>> PTuning(num_virtual_tokens=10, encoder="lstm")
        PTuning(num_virtual_tokens=10, encoder='lstm', encoder_hidden_size=None, encoder_num_layers=2, encoder_dropout=0.0)
    """

    name = "p_tuning"
    prefix = "ptuning_"

    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ENCODERS:
            raise PeftConfigError(f"encoder={self.encoder!r} is not valid; expected one of {list(ENCODERS)}")
        if self.encoder_hidden_size is not None:
            check_positive(self.encoder_hidden_size, "encoder_hidden_size")
        check_positive(self.encoder_num_layers, "encoder_num_layers")
        check_probability(self.encoder_dropout, "encoder_dropout")

    def make_provider(self, plan: PromptPlan, target: nn.Module) -> PromptEncoder:
        dim = plan.embedding.weight.shape[1]
        hidden = self.encoder_hidden_size or dim
        return PromptEncoder(
            self.num_virtual_tokens, dim, hidden, self.encoder, self.encoder_num_layers, self.encoder_dropout
        )
