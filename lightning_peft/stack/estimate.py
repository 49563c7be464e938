"""Peak training memory per device, predicted before any weights are loaded: :func:`estimate_memory`.

The parameter side is a census of the real stack applied on the ``meta`` device
(:mod:`lightning_peft.stack.estimate_model`); the activation side is the accounting of what autograd saves
for backward in a Llama-family decoder block (transformers' ``LlamaDecoderLayer`` with SDPA attention),
measured tensor by tensor on the CPU and written out in ``docs/memory_estimate.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_peft.errors import PeftConfigError
from lightning_peft.methods.base import Strategy
from lightning_peft.quantization.config import Quantization
from lightning_peft.stack.estimate_model import Census, build_census, resolve_config

#: bytes per element of each dtype name
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: per precision: (dtype of the frozen weights and trainable parameters, bytes of an activation element)
PRECISIONS = {
    "32-true": ("float32", 4), "32": ("float32", 4),
    "bf16-mixed": ("float32", 2), "16-mixed": ("float32", 2),
    "bf16-true": ("bfloat16", 2), "16-true": ("float16", 2),
}
#: optimizer state bytes per trainable parameter: (bytes per element in the parameter's dtype, fixed bytes)
OPTIMIZERS = {
    "adamw": (2.0, 0.0),  # torch AdamW: exp_avg and exp_avg_sq, each in the parameter's dtype
    "paged_adamw": (0.0, 8.0),  # bitsandbytes paged AdamW (32-bit): two fp32 states, pageable to the host
    "adamw8bit": (0.0, 2.0 + 8 / 256),  # bitsandbytes 8-bit AdamW: 2 x 1 byte + 2 fp32 absmax per 256 block
    "paged_adamw8bit": (0.0, 2.0 + 8 / 256),
    "sgd": (0.0, 0.0),  # plain SGD (momentum 0): no state
}
#: the CUDA constant: cuBLAS / cuBLASLt workspaces (32 MiB per handle on Hopper, one handle per stream, up to a
#: few streams), attention kernels' scratch and the caching allocator's block rounding; the CUDA context
#: itself (about 0.3-0.6 GB) lies outside torch's counters and is not included
CUDA_WORKSPACE_BYTES = 512 * 2**20
DEVICES = ("cuda", "cpu")
CONVENTIONS = ("device", "saved-tensors")
SHARDINGS = ("ddp", "fsdp")


@dataclass
class MemoryEstimate:
    """Predicted peak training memory per device, in bytes, by part (see :func:`estimate_memory`)."""

    parts: dict[str, int]
    settings: dict[str, Any]
    trainable_parameters: int
    frozen_parameters: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / 2**30

    def table(self) -> str:
        """The breakdown as a plain-text table (GiB and GB)."""
        width = max(len(k) for k in [*self.parts, "total"])
        rows = [f"{'part':{width}s}  {'GiB':>9s}  {'GB':>9s}"]
        for name, value in [*self.parts.items(), ("total", self.total)]:
            if name == "total":
                rows.append("-" * len(rows[0]))
            rows.append(f"{name:{width}s}  {value / 2**30:9.3f}  {value / 1e9:9.3f}")
        return "\n".join(rows)


def estimate_memory(
    model_config: Any,
    strategies: Sequence[Strategy | dict[str, Any]] = (),
    *,
    quantize: Quantization | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    devices: int = 1,
    sharding: str = "ddp",
    precision: str = "bf16-mixed",
    weights_dtype: str | None = None,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    fused_loss: bool = False,
    quantized_saves_input: bool = False,
    unfreeze: Sequence[str] | str | None = None,
    device: str = "cuda",
    convention: str = "device",
    workspace_bytes: int | None = None,
) -> MemoryEstimate:
    """Predict the peak memory one device holds while training ``model_config`` with ``strategies``.

    Args:
        model_config: a transformers ``PretrainedConfig``, a dict of its fields, the path of a ``config.json``,
            or a preset name (``"llama-2-7b"``, ``"llama-2-13b"``, ``"llama-2-70b"``, ``"llama-65b"``,
            ``"llama-3.1-8b"``, ``"llama-3.1-70b"``). Llama-family decoders.
        strategies: the PEFT strategies, as for :func:`~lightning_peft.apply_peft`; none means full
            fine-tuning.
        quantize: the backbone's quantization (nf4 / fp4 / int8), as for ``apply_peft``.
        batch_size: sequences per device per step (the micro-batch).
        seq_len: tokens per sequence (prompt tuning's virtual tokens are added on top).
        devices: number of devices; with ``sharding="fsdp"`` weights, gradients and optimizer state are split.
        sharding: ``"ddp"`` (a replica per device) or ``"fsdp"`` (fully sharded).
        precision: Lightning's precision: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``, ``"bf16-true"``,
            ``"16-true"``.
        weights_dtype: dtype of the frozen unquantized weights and the trainable parameters
            (``"float32"``, ``"bfloat16"``, ``"float16"``); default: the precision's (fp32 under mixed
            precision, as Lightning keeps it).
        optimizer: ``"adamw"``, ``"paged_adamw"``, ``"adamw8bit"``, ``"paged_adamw8bit"`` or ``"sgd"``.
        gradient_checkpointing: keep only each block's input, and recompute one block at a time in backward.
        fused_loss: the loss upcasts the logits to fp32 one chunk at a time and saves no fp32 copy (torchtune's
            ``CEWithChunkedOutputLoss`` under ``torch.compile``, Liger / Unsloth kernels); default: eager
            cross-entropy over the whole fp32 logits, as transformers computes it.
        quantized_saves_input: each quantized linear keeps its input for backward, as bitsandbytes releases of
            2023 do (0.41, used for LitGPT's published tables); 0.50 keeps only the packed weight.
        unfreeze: modules trained fully beside the strategies, as for ``apply_peft``.
        device: ``"cuda"`` (adds the workspace constant) or ``"cpu"``.
        convention: ``"device"`` (what the allocator holds at the peak) or ``"saved-tensors"`` (what
            ``benchmarks/scaling.py`` counts: the distinct storages autograd saves for backward, plus parameters
            with their quantization constants, gradients and optimizer state; it sees neither the logits the
            loss does not save nor transient buffers nor the CUDA workspace).
        workspace_bytes: the CUDA constant (default 512 MiB, see ``CUDA_WORKSPACE_BYTES``).

    Example:
        >>> est = estimate_memory("llama-2-7b", [LoRA(r=8, target_modules=["q_proj", "v_proj"])],
        ...                       quantize=Quantization("nf4", double_quant=True), batch_size=4, seq_len=512)
        >>> print(est.table())  # doctest: +SKIP
    """
    _check_choice(precision, PRECISIONS, "precision")
    _check_choice(optimizer, OPTIMIZERS, "optimizer")
    _check_choice(device, DEVICES, "device")
    _check_choice(convention, CONVENTIONS, "convention")
    _check_choice(sharding, SHARDINGS, "sharding")
    if weights_dtype is not None:
        _check_choice(weights_dtype, DTYPE_BYTES, "weights_dtype")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("devices", devices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PeftConfigError(f"{name}={value!r} is not valid; expected an integer >= 1")
    if quantize is not None and not isinstance(quantize, Quantization):
        raise PeftConfigError(f"quantize={quantize!r} is not valid; expected a Quantization or None")
    config = resolve_config(model_config)
    census = build_census(config, strategies, unfreeze)
    dtype, act = PRECISIONS[precision]
    dtype = weights_dtype or dtype
    wb = DTYPE_BYTES[dtype]
    shard = devices if sharding == "fsdp" else 1
    parts: dict[str, int] = {}
    notes: list[str] = [] if convention == "device" else [
        "saved-tensors convention: the distinct storages autograd saves (weights it saves are the parameters' own "
        "storages, counted once), plus parameters, quantization constants, gradients and optimizer state"]

    frozen_q, frozen_other = census.frozen["quantizable"], census.frozen["other"]
    if quantize is not None:
        parts[f"weights ({quantize.mode}{' + dq' if quantize.double_quant else ''})"] = int(
            frozen_q * quantized_bits(quantize) / 8) // shard
        if frozen_other:
            parts[f"weights ({dtype}, unquantized)"] = frozen_other * wb // shard
    elif frozen_q + frozen_other:
        parts[f"weights ({dtype}, frozen)"] = (frozen_q + frozen_other) * wb // shard
    n = census.trainable
    parts[f"trainable ({dtype})"] = n * wb // shard
    parts["gradients"] = n * wb // shard
    per_elem, fixed = OPTIMIZERS[optimizer]
    parts[f"optimizer ({optimizer})"] = int(n * (per_elem * wb + fixed)) // shard
    if sharding == "ddp" and devices > 1 and convention == "device":
        parts["DDP gradient buckets"] = n * wb
    # bitsandbytes returns its output in the input's dtype: float32 after a float32 norm under mixed precision
    mlp_act = 4 if quantize is not None and precision.endswith("-mixed") and wb == 4 else act
    acts, logits, recompute = activation_bytes(census, batch_size, seq_len, act, wb, gradient_checkpointing,
                                               convention, device, fused_loss,
                                               quantize is not None and quantized_saves_input, mlp_act)
    parts["activations"] = acts
    parts["logits + loss"] = logits
    if precision.endswith("-mixed") and wb > act and not gradient_checkpointing:  # (checkpointed: none kept)
        parts["autocast weight copies"] = autocast_copy_bytes(census, quantize is not None, act)
    if convention == "device":
        if recompute > logits:  # backward's peak: the logits are freed by the time a block is recomputed
            parts["backward: block recomputed"] = recompute - logits
        if quantize is not None:  # the dequantized weight of the largest linear, forward or backward
            compute = (quantize.compute_dtype or "float32") if quantize.is_4bit else "float16"
            parts["dequantization buffer"] = census.largest_linear * DTYPE_BYTES[compute]
        if sharding == "fsdp" and devices > 1:
            block = sum(i.in_features * i.out_features for i in census.layer_linears)
            parts["FSDP gathered block"] = 2 * block * wb
        if device == "cuda":
            parts["CUDA workspace"] = CUDA_WORKSPACE_BYTES if workspace_bytes is None else int(workspace_bytes)
    settings = dict(model_type=config.model_type, batch_size=batch_size, seq_len=seq_len, devices=devices,
                    sharding=sharding, precision=precision, weights_dtype=dtype, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, fused_loss=fused_loss, device=device,
                    convention=convention, quantize=None if quantize is None else quantize.mode,
                    virtual_tokens=census.virtual_tokens)
    return MemoryEstimate(parts={k: int(v) for k, v in parts.items()}, settings=settings,
                          trainable_parameters=n, frozen_parameters=frozen_q + frozen_other, notes=notes)


def autocast_copy_bytes(census: Census, quantized: bool, act: int) -> int:
    """Under mixed precision with float32 weights, each matmul runs on a 16-bit copy of its weight, which autograd
    saves for the input's gradient until backward: every unquantized linear of the blocks, and the head."""
    cfg = census.config
    block = sum(lin.in_features * lin.out_features for lin in census.layer_linears
                if lin.weight_trainable or not quantized)
    return (cfg.num_hidden_layers * block + cfg.hidden_size * cfg.vocab_size) * act


def quantized_bits(q: Quantization) -> float:
    """Bits per weight of a quantized linear: 4 + a fp32 absmax per 64-block (4.5), or with double quantization
    an 8-bit absmax per 64-block plus a fp32 constant per 256 of them (4.127); int8: 8 + a fp32 scale per row,
    taken at rows of 4096 inputs (0.008 bits)."""
    if not q.is_4bit:
        return 8.0 + 32 / 4096
    return 4 + (8 / 64 + 32 / (64 * 256) if q.double_quant else 32 / 64)


def activation_bytes(census: Census, batch: int, seq: int, act: int, hidden: int, checkpointing: bool,
                     convention: str, device: str, fused_loss: bool = False,
                     quantized_saves_input: bool = False, mlp_act: int | None = None) -> tuple[int, int, int]:
    """(activations of all blocks and the final norm, logits and loss, one block recomputed in backward).

    ``act`` is the bytes of an activation element, ``hidden`` those of the residual stream (the weights' dtype).
    """
    cfg = census.config
    h, i, n_layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    tokens = batch * (seq + census.virtual_tokens)
    block = tokens * block_elements_per_token(census, act, h, i, heads * head_dim, kv, heads, device,
                                              quantized_saves_input, mlp_act or act)
    # the final norm: its fp32 input and rsqrt, its normalized input if it trains, the head's input if it trains
    final = tokens * (h * 4 + 4 + (h * act if census.norms_trainable else 0)
                      + (h * act if census.head_trainable else 0))
    loss_tokens = batch * seq
    if fused_loss:  # the logits (the loss saves them) and one fp32 chunk of 8; their gradient replaces them
        logits = loss_tokens * vocab * act + (loss_tokens * vocab * 4 // 8 if convention == "device" else 0)
    else:
        logits = loss_tokens * vocab * 4  # the fp32 log-softmax the loss saves
        if convention == "device":  # the logits themselves, and backward's first fp32 gradient beside them
            logits += loss_tokens * vocab * (act + 4)
    if checkpointing:
        saved = n_layers * tokens * h * hidden + final
        return saved, logits, block
    return n_layers * block - tokens * first_block_unsaved(census, block // tokens, act, h, i, heads * head_dim,
                                                           kv, heads) + final, logits, 0


def first_block_unsaved(census: Census, block: int, act: int, h: int, i: int, q: int, kv: int, heads: int) -> int:
    """Bytes per token the first block does not save: what it computes before its first trainable parameter
    (no gradient flows there) when neither the embedding nor prompt tokens train."""
    norm, attention, mlp = h * 4 + 4, (2 * q + 2 * kv) * act + heads * 4, 3 * i * act
    return (0, norm, norm + attention, 2 * norm + attention, 2 * norm + attention + mlp, block)[census.first_stage]


def block_elements_per_token(census: Census, act: int, h: int, i: int, q: int, kv: int, heads: int,
                             device: str, quantized_saves_input: bool = False, mlp_act: int = 0) -> int:
    """Bytes one token's activations in one decoder block take (see docs/memory_estimate.md)."""
    total = 2 * h * 4 + 2 * 4  # each RMSNorm's input upcast to fp32 (its pow and mul save it), and its rsqrt
    total += (2 * q + 2 * kv) * act + heads * 4  # SDPA: q, k, v, output; fp32 logsumexp per head
    total += 3 * i * (mlp_act or act)  # MLP: gate and up outputs (for SiLU and the product), SiLU output
    if census.norms_trainable:
        total += 2 * h * act  # the normalized input, for the norm weight's gradient
    needs_input: dict[str, bool] = {}
    for lin in census.layer_linears:
        plain = lin.weight_trainable or any(p == 0 for _, p, _ in lin.low_rank) or lin.scaled_input
        plain = plain or (quantized_saves_input and not lin.weight_trainable)
        needs_input[lin.name] = needs_input.get(lin.name, False) or plain
        for _, p, per_token in lin.low_rank:
            total += per_token * act  # the rank-r intermediate
            if p > 0:  # the dropped-out copy of the input, and the mask (bool on CUDA, input dtype on CPU)
                total += lin.in_features * (act + (1 if device == "cuda" else act))
        if lin.scaled_output:
            total += lin.out_features * act
    groups = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
    widths = {"qkv": h, "gate_up": h, "down": i}
    for group, names in groups.items():
        if any(needs_input.get(name, False) for name in names):
            total += widths[group] * act
    for b in census.bottleneck:
        total += (h + 2 * b) * act
    return total


def _check_choice(value: Any, valid: Any, name: str) -> None:
    if value not in valid:
        raise PeftConfigError(f"{name}={value!r} is not valid; expected one of {list(valid)}")


__all__ = ["CUDA_WORKSPACE_BYTES", "MemoryEstimate", "estimate_memory", "quantized_bits"]
