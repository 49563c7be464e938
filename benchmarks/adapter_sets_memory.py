"""Memory of one base holding N adapter sets against N separate adapted copies (a memory count, not a timing).

Builds a Llama-family model from a config (about 134M parameters: hidden 768, 12 layers, vocabulary 32000, no
download), adds N LoRA sets (r=8 on q_proj and v_proj, as many deployments do) under their own names, and counts
the bytes of every distinct tensor the model holds (parameters, buffers and bitsandbytes quantization constants).
"N separate adapted copies" is N times the bytes of one copy holding one set, measured the same way. With
``--quantize nf4`` the base is quantized once and the sets stay in fp32. Also times one ``activate`` call.

    python benchmarks/adapter_sets_memory.py --quantize none nf4
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lightning_peft import LoRA, activate, apply_peft, get_stack
from lightning_peft.quantization import Quantization, is_bnb_layer, quantized_weight_bytes

MIB = 2**20


SMOKE = False  # --smoke: a tiny Llama, so CI can run the script in seconds


def build(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    size = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2) if SMOKE else dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12
    )
    heads = 4 if SMOKE else 12
    config = LlamaConfig(
        **size, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512
    )
    return LlamaForCausalLM(config).eval()


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds (4-bit weights with their quantization state)."""
    seen: dict[int, int] = {}
    done: set[int] = set()
    for module in model.modules():
        if is_bnb_layer(module):
            nbytes, _ = quantized_weight_bytes(module)
            seen[module.weight.data_ptr()] = nbytes
            done.add(id(module.weight))
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in done:
            continue
        seen.setdefault(t.data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def add_set(model: nn.Module, i: int, quantize: Quantization | None) -> None:
    lora = LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"], init_weights=False)
    apply_peft(model, [lora], name=f"task{i}", quantize=quantize if i == 0 else None)


def run(mode: str, counts: list[int]) -> list[tuple[str, int, float, float, float, float]]:
    quantize = None if mode == "none" else Quantization(mode)
    model = build()
    params = sum(p.numel() for p in model.parameters())
    bare = tensor_bytes(model)
    add_set(model, 0, quantize)
    one_copy = tensor_bytes(model)  # what each separate adapted copy holds: base + one set
    rows = []
    have = 1
    for n in counts:
        while have < n:
            add_set(model, have, None)
            have += 1
        shared = tensor_bytes(model)
        switch_us = float("nan")
        if n > 1:  # activating the active set returns at once: time real switches only
            start = time.perf_counter()
            for k in range(100):
                activate(model, f"task{k % n}")
            switch_us = (time.perf_counter() - start) / 100 * 1e6
        rows.append((mode, n, shared / MIB, n * one_copy / MIB, n * one_copy / shared, switch_us))
    set_bytes = sum(t.numel() * t.element_size() for t in get_stack(model, "task0").owned_tensors())
    print(
        f"base={mode}: {params / 1e6:.1f}M parameters, float model {bare / MIB:.1f} MiB, one adapted copy "
        f"{one_copy / MIB:.1f} MiB, one LoRA set {set_bytes / MIB:.2f} MiB"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quantize", nargs="+", default=["none", "nf4"], choices=["none", "nf4", "fp4", "int8"]
    )
    parser.add_argument("--sets", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--smoke", action="store_true", help="a tiny model (CI)")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    rows = []
    for mode in args.quantize:
        rows += run(mode, sorted(args.sets))
    print()
    print("| base | N sets | one base + N sets (MiB) | N adapted copies (MiB) | ratio | activate() (µs) |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, n, shared, separate, ratio, switch_us in rows:
        label = "fp32" if mode == "none" else mode
        timing = "-" if switch_us != switch_us else f"{switch_us:.0f}"
        print(f"| {label} | {n} | {shared:,.1f} | {separate:,.1f} | {ratio:.1f}x | {timing} |")


if __name__ == "__main__":
    main()
