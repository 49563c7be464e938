"""Bytes per parameter of a quantized Llama's linear weights: nf4, nf4 + double quantization, fp4, int8.

Builds a Llama-family model from a config (random weights; memory does not depend on the values), quantizes
a copy in place for each mode with :func:`lightning_peft.quantization.quantize_model`, and counts the bytes
the quantized weights really hold (packed data plus every quantization constant and code table), against
the same weights in fp32 and bf16. QLoRA (Dettmers et al. 2023, Section 3) puts NF4 with double quantization
at 4 + 8/64 + 32/(64 * 256) = 4.127 bits per parameter. Run:

    python benchmarks/quant_memory.py            # ~134M parameters (hidden 768, 12 layers, vocab 32000)
    python benchmarks/quant_memory.py --smoke    # a tiny model (CI)
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def build(smoke: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if smoke:
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            tie_word_embeddings=False,
        )
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    from lightning_peft.quantization import Quantization, memory_report, quantize_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*64-element.*")  # the smoke model's rows are fine anyway

    model = build(args.smoke)
    total = sum(p.numel() for p in model.parameters())
    linears = [m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    n_linear = sum(m.weight.numel() for m in linears)
    print(
        f"Llama from config: {total / 1e6:.1f}M parameters, {n_linear / 1e6:.1f}M in the {len(linears)} "
        f"quantizable linear weights (lm_head and embeddings stay in full precision)\n"
    )
    rows = [("fp32", 4.0 * n_linear, 4.0 * total), ("bf16", 2.0 * n_linear, 2.0 * total)]
    for label, q in [
        ("nf4", Quantization("nf4")),
        ("nf4 + double quant", Quantization("nf4", double_quant=True)),
        ("fp4", Quantization("fp4")),
        ("int8", Quantization("int8")),
    ]:
        quantized = copy.deepcopy(model)
        quantize_model(quantized, q)
        report = memory_report(quantized)
        q_bytes, q_params = report["quantized"]
        assert q_params == n_linear
        rows.append((label, q_bytes, q_bytes + report["frozen"][0] + report["trainable"][0]))
        del quantized

    header = (
        f"| {'weights':<19}| {'bytes/param':>11} | {'bits/param':>10} | {'vs 4.127 bits':>13} | "
        f"{'linear MiB':>10} | {'whole model MiB':>15} |"
    )
    print("whole model: the quantized rows keep embeddings, norms and lm_head in fp32\n")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, linear_bytes, model_bytes in rows:
        bpp = linear_bytes / n_linear
        model_mib = model_bytes / 2**20
        print(
            f"| {label:<19}| {bpp:>11.4f} | {8 * bpp:>10.3f} | {8 * bpp / QLORA_BITS:>13.4f} | "
            f"{linear_bytes / 2**20:>10.1f} | {model_mib:>15.1f} |"
        )


if __name__ == "__main__":
    main()
