"""Published hybrid recipes as ordinary strategy lists: Mix-and-Match (MAM) and UniPELT.

A preset is a function that returns a list of strategies, so what it composes stays visible: in the summary
of the stack, in a checkpoint's config, and in a YAML recipe (which lists the same strategies).

- **MAM** (He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022): prefix
  tuning on every attention layer plus a parallel adapter, scaled, beside every feed-forward sublayer.
- **UniPELT** (Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
  ACL 2022): LoRA on the query and value projections, prefix tuning and a sequential bottleneck adapter after
  the feed-forward sublayer, each behind a learned gate (:func:`~lightning_peft.methods.gate.Gated`).

Both work on any model the pieces support (BERT/RoBERTa, Llama-family, GPT-2, T5) and on quantized backbones
(``apply_peft(model, UniPELT(), quantize=Quantization("nf4"))``): none of the pieces adapts a quantized weight
in place.
"""

from __future__ import annotations

from lightning_peft.methods.base import Strategy
from lightning_peft.methods.bottleneck import Adapter
from lightning_peft.methods.gate import Gated
from lightning_peft.methods.lora import LoRA
from lightning_peft.methods.prompt.prefix import PrefixTuning

#: the query and value projections of the model families the package knows (BERT/RoBERTa, Llama-family, T5;
#: GPT-2 fuses them into ``c_attn``); a name that a model lacks matches nothing there
QUERY_VALUE = ["query", "value", "q_proj", "v_proj", "q", "v", "c_attn"]


def MAM(
    num_virtual_tokens: int = 30,
    projection: int | None = 512,
    bottleneck: int = 64,
    scaling: float | str = 4.0,
) -> list[Strategy]:
    """He et al.'s Mix-and-Match adapter: prefix tuning on attention + a scaled parallel adapter on the feed-forward.

    The paper's best configuration uses 30 prefix tokens with a reparameterization MLP and a parallel adapter of
    scaling 4 on the feed-forward sublayer; its bottleneck (512 on 1024-wide models) is scaled down here so that the
    stored parameters (prefixes folded) stay near LoRA r=8's on small models. Tune ``bottleneck`` to the model.

    Args:
        num_virtual_tokens: prefix length per attention layer.
        projection: width of the prefix reparameterization MLP during training (folded away when saved); ``None``
            learns the prefixes directly.
        bottleneck: width of the parallel feed-forward adapter.
        scaling: the parallel adapter's fixed scale, or ``"learned"``.

    Example:
        >>> prefix, adapter = MAM()
        >>> adapter.placement, adapter.scaling
        ('parallel', 4.0)
    """
    return [
        PrefixTuning(num_virtual_tokens=num_virtual_tokens, projection=projection),
        Adapter(bottleneck=bottleneck, placement="parallel", scaling=scaling, sublayers="ffn"),
    ]


def UniPELT(
    r: int = 8,
    alpha: int = 16,
    lora_targets: list[str] | str | None = None,
    num_virtual_tokens: int = 10,
    projection: int | None = 512,
    bottleneck: int = 48,
) -> list[Strategy]:
    """Mao et al.'s UniPELT: gated LoRA (query, value), gated prefix tuning and a gated sequential adapter.

    The paper's configuration: LoRA r=8 on the query and value projections, 10 prefix tokens with a
    reparameterization MLP, a bottleneck adapter of width 48 after each feed-forward sublayer, and a learned
    sigmoid gate on each piece's contribution (a function of the sublayer's input).

    Args:
        r: LoRA's rank.
        alpha: LoRA's scale numerator (the update is scaled by ``alpha / r``).
        lora_targets: LoRA's targets; default: the query and value projections (:data:`QUERY_VALUE`).
        num_virtual_tokens: the prefix length per attention layer.
        projection: the width of the prefix reparameterization MLP (``None``: the prefixes are learned directly).
        bottleneck: the adapter's width.

    Example:
        >>> lora, prefix, adapter = UniPELT()
        >>> lora.gate and prefix.gate and adapter.gate
        True
    """
    return [
        Gated(LoRA(r=r, alpha=alpha, target_modules=list(lora_targets or QUERY_VALUE))),
        Gated(PrefixTuning(num_virtual_tokens=num_virtual_tokens, projection=projection)),
        Gated(Adapter(bottleneck=bottleneck, sublayers="ffn")),
    ]
