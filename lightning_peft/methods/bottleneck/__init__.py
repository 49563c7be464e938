"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"), sequential or
parallel and scaled (He et al. ICLR 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

A module-level strategy. ``placement="sequential"``: after each chosen module, ``h + s * up(act(down(h)))``.
``placement="parallel"``: beside each chosen sublayer, reading its input ``x``: ``M(x) + s * up(act(down(x)))``
(a forward hook that sees the input and the output). A post-LN BERT-style output block
(``BertSelfOutput`` / ``BertOutput``: ``forward(hidden_states, input_tensor)`` computes
``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``) is detected by its ``input_tensor`` parameter: its
sublayer's input is that residual, so the parallel adapter adds ``s * A(input_tensor)`` to the sum before the
LayerNorm, as He et al.'s and AdapterHub's parallel adapter (a forward pre-hook that replaces ``input_tensor`` by
``input_tensor + s * A(input_tensor)``). ``s`` is a fixed factor or one learned scalar per adapter (starting at
1.0); with ``gate=True`` the contribution is also multiplied by UniPELT's per-token gate
(:mod:`lightning_peft.core.gate`) of the adapter's input. The adapter is a forward hook on
the chosen module (on the :class:`~lightning_peft.core.layer.AdaptedLinear` when the module is a linear, so that
LoRA/IA3 on the same layer, merged or not, sit under the adapter whatever the order of the strategies). Each
adapter's weights live on the module it follows (``<module>.lightning_peft_adapter.<set>``) so they are in the
model's ``state_dict``; they are raw parameters, not ``nn.Linear``, so ``"all-linear"`` never adapts them.
"""

from lightning_peft.core.state import ADAPTER_CONTAINER as CONTAINER
from lightning_peft.methods.bottleneck.method import (
    DEFAULT_TARGETS,
    PARALLEL_TARGETS,
    PLACEMENTS,
    Adapter,
    Site,
)
from lightning_peft.methods.bottleneck.module import ACTIVATIONS, RESIDUAL_INPUT, BottleneckAdapter

__all__ = [
    "ACTIVATIONS",
    "CONTAINER",
    "DEFAULT_TARGETS",
    "PARALLEL_TARGETS",
    "PLACEMENTS",
    "RESIDUAL_INPUT",
    "Adapter",
    "BottleneckAdapter",
    "Site",
]
