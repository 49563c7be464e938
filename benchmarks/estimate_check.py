"""The memory estimator against measurements and published figures.

    python benchmarks/estimate_check.py benchmarks/results/scaling.csv   # every row of a scaling CSV
    python benchmarks/estimate_check.py --measure                        # a few small Llama points, measured here
    python benchmarks/estimate_check.py --published                      # LitGPT, torchtune, QLoRA paper + table
    python benchmarks/estimate_check.py --smoke                          # tiny configs (CI)

A scaling CSV (``benchmarks/scaling.py``) holds, per row, the model shape, the method and its adapters, batch,
sequence and ``peak_counted_bytes``: the distinct storages autograd saves for backward plus parameters (with
quantization constants), gradients and AdamW state, in float32 on the CPU. The estimate is asked for the same
thing (``convention="saved-tensors"``, ``precision="32-true"``, ``device="cpu"``). ``--measure`` counts the same
way on models built here.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def strategies_for(method: str, r: int = 8) -> tuple[list, object]:
    """(strategies, quantization) of a scaling-study method (as benchmarks/scaling.py builds them)."""
    from lightning_peft import IA3, AdaLoRA, Adapter, LoRA, PromptTuning, Quantization

    q = Quantization("nf4", double_quant=True) if method == "qlora" else None
    return {
        "full": [],
        "lora": [LoRA(r=r, alpha=16, dropout=0.05, target_modules=ATTN)],
        "qlora": [LoRA(r=r, alpha=16, dropout=0.05, target_modules=ATTN)],
        "adalora": [AdaLoRA(init_r=12, target_r=8, alpha=16, dropout=0.05, target_modules=ATTN)],
        "prompt": [PromptTuning(num_virtual_tokens=20)],
        "hybrid": [PromptTuning(num_virtual_tokens=10), LoRA(r=16, alpha=32, target_modules=ATTN),
                   AdaLoRA(init_r=12, target_r=4, alpha=32, target_modules=MLP)],
        # beyond the scaling study: IA3 (k, v, down) and bottleneck adapters after each MLP
        "ia3": [IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])],
        "adapter": [Adapter(bottleneck=16, target_modules=["mlp"])],
    }[method], q


def predict(config: dict, method: str, batch: int, seq: int, precision: str = "32-true") -> int:
    from lightning_peft import estimate_memory

    strategies, q = strategies_for(method)
    return estimate_memory(config, strategies, quantize=q, batch_size=batch, seq_len=seq, precision=precision,
                           device="cpu", convention="saved-tensors").total


def config_of_row(row: dict) -> dict:
    return dict(model_type="llama", hidden_size=int(row["hidden"]), intermediate_size=int(row["intermediate"]),
                num_hidden_layers=int(row["layers"]), num_attention_heads=int(row["heads"]),
                num_key_value_heads=int(row["kv_heads"]), head_dim=int(row["head_dim"]),
                vocab_size=int(row["vocab"]), tie_word_embeddings=row["tied_embeddings"] == "True")


def check_csv(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for row in csv.DictReader(f):
            measured = int(float(row["peak_counted_bytes"]))
            pred = predict(config_of_row(row), row["method"], int(row["batch"]), int(row["seq"]))
            out.append({"case": f"{row['size']} {row['method']} b{row['batch']} s{row['seq']}",
                        "measured": measured, "predicted": pred})
    return out


def measure(config: dict, method: str, batch: int, seq: int, precision: str = "32-true") -> int:
    """Peak counted as benchmarks/scaling.py counts it, after one warm-up step. ``precision``: ``"32-true"``,
    ``"bf16-true"`` (the model and adapters in bfloat16) or ``"bf16-mixed"`` (float32 weights, CPU autocast)."""
    from speed_memory import SavedBytes, tensor_bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_peft import apply_peft

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    strategies, q = strategies_for(method)
    if strategies:
        apply_peft(model, strategies, quantize=q)
    if precision == "bf16-true":
        model.to(torch.bfloat16)  # the adapters too, as Lightning's bf16-true
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(5, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    for count in (False, True):
        saved = SavedBytes()
        mixed = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), mixed:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        if count:
            weights = list(model.parameters()) + list(model.buffers())
            own = {t.untyped_storage().data_ptr() for t in weights}
            consts = _quant_constants(model)
            total = (tensor_bytes(weights) + tensor_bytes(consts) + tensor_bytes(p.grad for p in params)
                     + tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
                     + sum(n for ptr, n in saved.seen.items() if ptr not in own))
        opt.zero_grad(set_to_none=True)
    return total


def _quant_constants(model) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            out += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None),
                                getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return out


SMALL = {  # Llama-family shapes, head dim 64
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1),
    "8m": dict(model_type="llama", vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2),
    "40m": dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8),
}


def check_measured(sizes: list[str], methods: list[str], settings: list[tuple[int, int]]) -> list[dict]:
    out = []
    for size in sizes:
        for method in methods:
            for batch, seq in settings:
                m = measure(SMALL[size], method, batch, seq)
                p = predict(SMALL[size], method, batch, seq)
                out.append({"case": f"{size} {method} b{batch} s{seq}", "measured": m, "predicted": p})
                print(_row(out[-1]), flush=True)
    return out


def _row(r: dict) -> str:
    err = r["predicted"] / r["measured"] - 1
    return f"| {r['case']} | {r['measured'] / 2**20:.1f} | {r['predicted'] / 2**20:.1f} | {100 * err:+.1f}% |"


def table(rows: list[dict]) -> str:
    head = ["| case | measured MiB | predicted MiB | error |", "|---|---:|---:|---:|"]
    worst = max((abs(r["predicted"] / r["measured"] - 1) for r in rows), default=0.0)
    return "\n".join(head + [_row(r) for r in rows] + [f"\nworst |error| {100 * worst:.1f}% over {len(rows)} rows"])


#: published figures: (name, source, preset, strategies spec, estimate kwargs, published bytes, comparison)
def published_cases() -> list[dict]:
    from lightning_peft import LoRA, Quantization

    nf4 = Quantization("nf4", double_quant=True, compute_dtype="bfloat16")
    all_linear = ATTN + MLP
    return [
        dict(name="LitGPT Llama-2-7B QLoRA, micro-batch 4 (finetune_lora.md)", preset="llama-2-7b",
             strategies=[LoRA(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])],
             kwargs=dict(quantize=nf4, batch_size=4, seq_len=1304, precision="bf16-true",
                         optimizer="paged_adamw", quantized_saves_input=True), published=13.15e9, unit="GB"),
        dict(name="LitGPT Llama-2-7B QLoRA, micro-batch 1 (resource-tables.md)", preset="llama-2-7b",
             strategies=[LoRA(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])],
             kwargs=dict(quantize=nf4, batch_size=1, seq_len=1304, precision="bf16-true",
                         quantized_saves_input=True), published=13.84e9,
             unit="GB"),
        dict(name="LitGPT Llama-2-7B LoRA bf16, micro-batch 1 (resource-tables.md)", preset="llama-2-7b",
             strategies=[LoRA(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])],
             kwargs=dict(batch_size=1, seq_len=1304, precision="bf16-true"), published=21.30e9, unit="GB"),
        dict(name="LitGPT Llama-2-7B LoRA bf16, micro-batch 2 (resource-tables.md)", preset="llama-2-7b",
             strategies=[LoRA(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])],
             kwargs=dict(batch_size=2, seq_len=1304, precision="bf16-true"), published=29.07e9, unit="GB"),
        dict(name="torchtune Llama-3.1-8B QLoRA, batch 2, packed 2048 (README)", preset="llama-3.1-8b",
             strategies=[LoRA(r=8, alpha=16, dropout=0.0, target_modules=all_linear)],
             kwargs=dict(quantize=nf4, batch_size=2, seq_len=2048, precision="bf16-true",
                         gradient_checkpointing=True, fused_loss=True), published=7.4 * 2**30, unit="GiB"),
        dict(name="QLoRA paper, Guanaco-65B (under 48 GB)", preset="llama-65b",
             strategies=[LoRA(r=64, alpha=16, dropout=0.05, target_modules=all_linear)],
             kwargs=dict(quantize=nf4, batch_size=4, seq_len=528, precision="bf16-true", gradient_checkpointing=True,
                         optimizer="paged_adamw"), published=48e9, unit="GB"),
    ]


def method_table(sizes: list[str], batch: int = 1, seq: int = 2048) -> str:
    """Predicted peak per device (GiB) of each method at each size: bf16, one device, gradient checkpointing."""
    from lightning_peft import AdaLoRA, LoRA, PromptTuning, Quantization, estimate_memory

    nf4 = Quantization("nf4", double_quant=True, compute_dtype="bfloat16")
    methods = {
        "full fine-tuning (bf16, AdamW)": ([], None),
        "LoRA r=16 all linear (bf16)": ([LoRA(r=16, alpha=32, target_modules="all-linear")], None),
        "QLoRA r=16 all linear (nf4 + dq)": ([LoRA(r=16, alpha=32, target_modules="all-linear")], nf4),
        "prompt tuning, 20 tokens (bf16)": ([PromptTuning(num_virtual_tokens=20)], None),
        "hybrid: prompt 10 + LoRA attn + AdaLoRA MLP (nf4)": (
            [PromptTuning(num_virtual_tokens=10), LoRA(r=16, alpha=32, target_modules=ATTN),
             AdaLoRA(init_r=12, target_r=4, alpha=32, target_modules=MLP)], nf4),
    }
    lines = ["| method | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name, (strategies, q) in methods.items():
        cells = [estimate_memory(size, strategies, quantize=q, batch_size=batch, seq_len=seq, precision="bf16-true",
                                 gradient_checkpointing=True).total_gib for size in sizes]
        lines.append(f"| {name} | " + " | ".join(f"{c:,.1f} GiB" for c in cells) + " |")
    return "\n".join(lines)


def published_main(smoke: bool = False) -> list[dict]:
    from lightning_peft import estimate_memory

    rows = []
    print("| published figure | published | predicted | error |\n|---|---:|---:|---:|")
    for case in published_cases()[: 1 if smoke else None]:
        est = estimate_memory(case["preset"], case["strategies"], **case["kwargs"])
        scale = 2**30 if case["unit"] == "GiB" else 1e9
        err = est.total / case["published"] - 1
        rows.append({**case, "predicted": est.total, "error": err})
        print(f"| {case['name']} | {case['published'] / scale:.2f} {case['unit']} | "
              f"{est.total / scale:.2f} {case['unit']} | {100 * err:+.1f}% |", flush=True)
    sizes = ["llama-2-7b"] if smoke else ["llama-2-7b", "llama-2-13b", "llama-2-70b"]
    print("\nPredicted peak per device, batch 1 x 2048 tokens, bf16-true, gradient checkpointing, AdamW, CUDA:")
    print(method_table(sizes))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="?", help="a scaling CSV (benchmarks/scaling.py)")
    ap.add_argument("--measure", action="store_true", help="measure small Llama points here")
    ap.add_argument("--published", action="store_true", help="published figures and the 7B/13B/70B table")
    ap.add_argument("--smoke", action="store_true", help="tiny configs only (CI)")
    args = ap.parse_args()
    if args.csv:
        print(table(check_csv(args.csv)))
    if args.measure or args.smoke:
        sizes = ["tiny"] if args.smoke else ["8m", "40m"]
        methods = ["full", "lora", "qlora", "prompt"] if args.smoke else ["full", "lora", "qlora", "adalora",
                                                                          "prompt", "hybrid", "ia3", "adapter"]
        settings = [(2, 16)] if args.smoke else [(1, 64), (4, 128), (1, 256)]
        print(table(check_measured(sizes, methods, settings)))
    if args.published or args.smoke:
        published_main(smoke=args.smoke)
