"""Graph breaks of a compiled training step, and step time / peak memory under bf16-mixed: ours against peft.

For each method (LoRA and AdaLoRA with dropout 0.05, prompt tuning), on the same model, weights and batch:

- ``torch._dynamo.explain`` of one training step (forward, loss, backward): the graph breaks Dynamo reports.
- Step time (median over alternating repeats, one warm-up step excluded) and peak memory (counted as in
  ``speed_memory.py``: saved activations + parameters + gradients + optimizer state) in fp32 and under
  ``torch.autocast(dtype=torch.bfloat16)``, which is what Lightning's ``precision="bf16-mixed"`` runs.

    python benchmarks/compile_precision.py --repeats 3       # MiniLM (16 x 64) and the 134M Llama (4 x 128)
    python benchmarks/compile_precision.py --smoke           # tiny models, one repeat (CI)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_memory import build_model, make_model, make_step

METHODS = ("lora", "peft-lora", "adalora", "peft-adalora", "prompt", "peft-prompt")


def graph_breaks(train_step) -> tuple[int, list[str]]:
    import torch._dynamo

    torch._dynamo.reset()
    explained = torch._dynamo.explain(train_step)()
    reasons = sorted({str(b.reason).splitlines()[0][:80] for b in explained.break_reasons})
    return len(explained.break_reasons), reasons


def run_case(model_name: str, args) -> list[dict]:
    base, task = build_model(model_name, args.smoke)
    g = torch.Generator().manual_seed(0)
    size = (args.batch or (16 if model_name == "minilm" else 4), args.length or (64 if model_name == "minilm" else 128))
    batch = torch.randint(5, base.config.vocab_size, size, generator=g)
    labels = torch.randint(0, 2, (size[0],), generator=g)
    rows, timed = {}, {}
    for m in args.methods:
        for autocast in (False, True):
            model, hook, extra = make_model(m, base, model_name, task, "none", 1)
            step, peak, train_step = make_step(model, hook, extra, task, batch, labels, autocast)
            key = (m, autocast)
            row = rows.setdefault(m, {"model": model_name, "method": m.removeprefix("peft-"),
                                      "impl": "peft" if m.startswith("peft-") else "ours"})
            if not autocast:
                row["breaks"], row["reasons"] = graph_breaks(train_step)
                model.zero_grad(set_to_none=True)
            step()  # warm-up
            row["peak_bf16" if autocast else "peak_fp32"] = peak() / 2**20
            timed[key] = step
    times: dict[tuple, list[float]] = {k: [] for k in timed}
    for _ in range(args.repeats):
        for k, fn in timed.items():
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[k].append((time.perf_counter() - t0) / args.steps)
    for (m, autocast), v in times.items():
        rows[m]["ms_bf16" if autocast else "ms_fp32"] = 1000 * statistics.median(v)
    return list(rows.values())


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | impl | graph breaks | fp32 ms/step | bf16-mixed ms/step | fp32 peak MiB | "
             "bf16-mixed peak MiB | bf16-mixed time ours/peft | bf16-mixed memory ours/peft |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = next((p for p in rows if p["impl"] == "peft" and p["model"] == r["model"]
                    and p["method"] == r["method"]), None)
        ratio_t = f"{r['ms_bf16'] / ref['ms_bf16']:.2f}" if ref and r["impl"] == "ours" else ""
        ratio_m = f"{r['peak_bf16'] / ref['peak_bf16']:.2f}" if ref and r["impl"] == "ours" else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {r['breaks']} | {r['ms_fp32']:.0f} | "
                     f"{r['ms_bf16']:.0f} | {r['peak_fp32']:.1f} | {r['peak_bf16']:.1f} | {ratio_t} | {ratio_m} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["minilm", "llama"], choices=["minilm", "llama"])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="default: 16 for minilm, 4 for llama")
    ap.add_argument("--length", type=int, default=None, help="default: 64 for minilm, 128 for llama")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.steps, args.batch, args.length = 1, 1, 2, 8
        args.models, args.methods = args.models[-1:], [m for m in args.methods if m.endswith("lora")][:2]
    torch.manual_seed(0)
    rows = [r for name in args.models for r in run_case(name, args)]
    print(markdown(rows))
    print("\nGraph-break reasons:")
    for r in rows:
        print(f"- {r['model']} {r['method']} {r['impl']}: {'; '.join(r['reasons']) or 'none'}")



if __name__ == "__main__":
    main()
