"""LoRA on embeddings and convolutions, as ``peft``'s ``lora.Embedding`` and ``lora.Conv1d/2d/3d`` compute it.

- Embedding (``nn.Embedding``): ``A`` (r, num_embeddings), ``B`` (embedding_dim, r);
  ``y = base(x) + embedding(x, A.T) @ B.T * scaling`` with the base's ``padding_idx`` / ``max_norm`` /
  ``norm_type`` / ``scale_grad_by_freq`` / ``sparse``, times the base's ``embed_scale`` when it has one
  (scaled word embeddings). No dropout, as in ``peft`` (an index has nothing to drop); ``A`` starts at zero and
  ``B`` normal, ``peft``'s init.
- Conv (``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``): ``A`` a conv in -> r with the base's kernel size, stride
  and padding (undilated, ungrouped, as ``peft``'s), ``B`` a 1x1 conv r -> out with the base's ``groups``;
  ``y = base(x) + B(A(dropout(x))) * scaling``. The merged delta is ``B A`` contracted over the rank, in the
  base's (out, in, *kernel) shape. A grouped base (``groups > 1``, e.g. a depthwise conv) needs ``r`` divisible
  by ``groups`` and cannot be merged (its ``A`` reads every input channel), as in ``peft``. Dropout is drawn per
  layer (``shared_dropout`` applies to linears only). A dilated conv, or one padding other than with zeros, is
  refused in ``LoRA.plan`` (:func:`conv_problem`): ``peft``'s branch ignores both, so it has no merged equivalent.

The parameters keep LoRA's names (``lora_A`` / ``lora_B``); the PEFT export writes an embedding's as
``lora_embedding_A`` / ``lora_embedding_B`` and a conv's as ``lora_A.weight`` / ``lora_B.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core.backend import base_shape, is_conv
from lightning_peft.core.layer import Delta

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoRAEmbeddingDelta(Delta):
    """``embedding(x, A.T) @ B.T * scaling`` with A (r, num_embeddings) and B (embedding_dim, r)."""

    def __init__(self, base: nn.Embedding, r: int, scaling: float, init_weights: bool = True) -> None:
        super().__init__()
        num_embeddings, dim = base_shape(base)
        self.r, self.scaling, self.dropout = r, scaling, 0.0
        # the base's lookup arguments, applied to A's columns as the base applies them to its rows
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        scale = getattr(base, "embed_scale", None)  # scaled word embeddings multiply their output: so does LoRA
        self.embed_scale = float(scale) if isinstance(scale, (int, float, Tensor)) else None
        self.lora_A = nn.Parameter(torch.zeros(r, num_embeddings))
        self.lora_B = nn.Parameter(torch.empty(dim, r))
        nn.init.normal_(self.lora_B)  # peft's init: A = 0, B ~ N(0, 1), so the adapted model starts as the base
        if not init_weights:  # non-zero A: useful in tests that need a delta from step 0
            nn.init.normal_(self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        h = F.embedding(x, self.lora_A.T, self.padding_idx, self.max_norm, self.norm_type,
                        self.scale_grad_by_freq, self.sparse)
        out = (h @ self.lora_B.T) * self.scaling
        return out * self.embed_scale if self.embed_scale is not None else out

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (embedding_dim, num_embeddings): the (out, in) matrix

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, embedding"


class LoRAConvDelta(Delta):
    """``B(A(dropout(x))) * scaling``: A (r, in, *kernel) a conv with the base's kernel, stride and padding,
    B (out, r / groups, 1, ...) a 1x1 conv with the base's groups."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init_weights: bool = True) -> None:
        super().__init__()
        in_channels, out_channels = base_shape(base)
        self.r, self.scaling, self.dropout = r, scaling, dropout
        self.dims = base.weight.dim() - 2
        self.stride, self.padding, self.groups = base.stride, base.padding, base.groups
        self.lora_A = nn.Parameter(torch.empty(r, in_channels, *base.kernel_size))
        self.lora_B = nn.Parameter(torch.zeros(out_channels, r // base.groups, *(1,) * self.dims))
        # Section 4.1 of the paper (and peft's init): random A, zero B
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if not init_weights:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        conv = _CONV[self.dims]
        x = x.to(self.lora_A.dtype)
        if self.training and self.dropout > 0.0:
            x = F.dropout(x, self.dropout, True)
        h = conv(x, self.lora_A, None, self.stride, self.padding)
        return conv(h, self.lora_B, None, 1, 0, 1, self.groups) * self.scaling

    def merge_refusal(self) -> str | None:
        if self.groups > 1:
            return (f"LoRA on a grouped conv (groups={self.groups}) has no equivalent weight: its A reads every "
                    "input channel (as peft's, which cannot merge it either); export the adapters instead")
        return None

    def delta_weight(self) -> Tensor:
        reason = self.merge_refusal()
        if reason is not None:
            raise NotImplementedError(reason)
        # sum over the rank of B[o, k] A[k, i, *kernel]: the one conv equal to A then B
        return torch.einsum("ok,ki...->oi...", self.lora_B.flatten(1), self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout}, conv{self.dims}d, groups={self.groups}"


def conv_problem(base: nn.Module, r: int) -> str | None:
    """Why LoRA of rank ``r`` cannot adapt ``base`` the way ``peft`` does and merge exactly, or ``None``."""
    if not is_conv(base):
        return None
    if base.padding_mode != "zeros":
        return (f"its padding_mode={base.padding_mode!r}: LoRA's conv branch pads with zeros (as peft's), so "
                "the adapted layer would have no merged equivalent")
    if any(d != 1 for d in base.dilation):
        return (f"its dilation={tuple(base.dilation)}: peft's conv LoRA ignores dilation (its A conv is "
                "undilated), so no adapter could match both peft and the merged weights")
    if r % base.groups:
        return (f"its groups={base.groups} does not divide r={r}: LoRA on a grouped conv needs r divisible by "
                "groups (as in peft)")
    return None


def make_layer_delta(kind: str | None, base: nn.Module, r: int, scaling: float, dropout: float,
                     init_weights: bool) -> Delta:
    """LoRA's delta for an embedding or conv base (linears have :class:`~lightning_peft.methods.lora.LoRADelta`)."""
    if kind == "embedding":
        return LoRAEmbeddingDelta(base, r, scaling, init_weights)
    if kind == "conv":
        return LoRAConvDelta(base, r, scaling, dropout, init_weights)
    raise TypeError(f"LoRA has no delta for a {type(base).__name__} (kind={kind!r})")


__all__ = ["LoRAConvDelta", "LoRAEmbeddingDelta", "conv_problem", "make_layer_delta"]
