"""Tables, fitted log-log exponents, theory checks and plots of the model-size study (``scaling.py``'s CSV).

    python benchmarks/scaling_report.py benchmarks/results/scaling.csv            # print, and plots in docs/
    python benchmarks/scaling_report.py benchmarks/results/scaling.csv --plots ''  # print only
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # nf4 + double quantization, QLoRA Section 3
ORDER = ("full", "lora", "adalora", "prompt", "hybrid", "qlora")
INTS = ("params", "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "batch", "seq", "tokens",
        "lora_r", "num_virtual_tokens", "trainable_params", "peak_counted_bytes", "weights_bytes",
        "quant_constants_bytes", "quantized_linear_params", "trainable_bytes", "grad_bytes", "optimizer_bytes",
        "activation_bytes", "saved_weight_bytes", "rss_step_growth_bytes", "checkpoint_bytes")


def load(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in INTS:
            r[k] = int(r[k])
        r["step_s"] = float(r["step_s"])
    return rows


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x) (NaN under two distinct points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def methods(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in ORDER if m in present]


def curves_vs_params(rows: list[dict], batch: int, seq: int) -> dict[str, list[dict]]:
    pts = [r for r in rows if r["batch"] == batch and r["seq"] == seq]
    return {m: sorted((r for r in pts if r["method"] == m), key=lambda r: r["params"]) for m in methods(rows)}


def curves_vs_seq(rows: list[dict], size: str, batch: int) -> dict[str, list[dict]]:
    pts = [r for r in rows if r["size"] == size and r["batch"] == batch]
    return {m: sorted((r for r in pts if r["method"] == m), key=lambda r: r["seq"]) for m in methods(rows)}


def mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def points_table(rows: list[dict]) -> str:
    out = ["| size | params | method | batch x seq | trainable | counted peak MiB | weights | grads + optim | "
           "activations | RSS step growth MiB | step (ms) | checkpoint B | export B |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['size']} | {r['params'] / 1e6:,.1f}M | {r['method']} | {r['batch']} x {r['seq']} | "
                   f"{r['trainable_params']:,} | {mib(r['peak_counted_bytes'])} | {mib(r['weights_bytes'])} | "
                   f"{mib(r['grad_bytes'] + r['optimizer_bytes'])} | {mib(r['activation_bytes'])} | "
                   f"{mib(r['rss_step_growth_bytes'])} | {1000 * r['step_s']:,.0f} | {r['checkpoint_bytes']:,} | "
                   f"{r['export_bytes'] or '-'} |")
    return "\n".join(out)


def summary_table(rows: list[dict], batch: int = 1, seq: int = 128) -> str:
    """One setting, every size and method: the table for BENCHMARKS.md."""
    out = [f"| size | method | trainable | trainable % | counted peak MiB (batch {batch} x {seq}) | "
           "of it activations | RSS step growth MiB | step (ms) | checkpoint | export |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if (r["batch"], r["seq"]) != (batch, seq):
            continue
        export = f"{int(r['export_bytes']) / 2**10:,.0f} KiB" if r["export_bytes"] not in ("", None) else "-"
        out.append(f"| {r['size']} ({r['params'] / 1e6:,.1f}M) | {r['method']} | {r['trainable_params']:,} | "
                   f"{100 * r['trainable_params'] / r['params']:.3f} | {mib(r['peak_counted_bytes'])} | "
                   f"{mib(r['activation_bytes'])} | {mib(r['rss_step_growth_bytes'])} | {1000 * r['step_s']:,.0f} | "
                   f"{r['checkpoint_bytes'] / 2**10:,.0f} KiB | {export} |")
    return "\n".join(out)


def exponents(rows: list[dict]) -> tuple[str, dict]:
    """The fitted exponents of every curve, as a Markdown table and a dict."""
    fits: dict = {}
    out = ["| curve | setting | " + " | ".join(methods(rows)) + " |", "|---|---|" + "---:|" * len(methods(rows))]
    for b, s in sorted({(r["batch"], r["seq"]) for r in rows}):
        curves = curves_vs_params(rows, b, s)
        if max((len(c) for c in curves.values()), default=0) < 2:
            continue
        for key, label in (("peak_counted_bytes", "counted peak vs params"), ("step_s", "step time vs params"),
                           ("rss_step_growth_bytes", "RSS step growth vs params")):
            vals = {m: slope([r["params"] for r in c], [r[key] for r in c]) for m, c in curves.items()}
            fits[(key, "params", b, s)] = vals
            out.append(f"| {label} | {b} x {s} | " + " | ".join(_f(vals[m]) for m in methods(rows)) + " |")
    for size in dict.fromkeys(r["size"] for r in rows):
        curves = curves_vs_seq(rows, size, 1)
        if max((len(c) for c in curves.values()), default=0) < 2:
            continue
        for key, label in (("activation_bytes", "activations vs seq"), ("peak_counted_bytes", "counted peak vs seq"),
                           ("step_s", "step time vs seq")):
            vals = {m: slope([r["seq"] for r in c], [r[key] for r in c]) for m, c in curves.items()}
            fits[(key, "seq", size)] = vals
            out.append(f"| {label} | {size}, batch 1 | " + " | ".join(_f(vals[m]) for m in methods(rows)) + " |")
    return "\n".join(out), fits


def _f(x: float) -> str:
    return "" if x != x else f"{x:.2f}"


def checks(rows: list[dict]) -> str:
    """The three theory checks: LoRA's trainable share ~ 1/d, QLoRA bits/param -> 4.127, activations ~ tokens."""
    out = []
    lora = sorted({r["size"]: r for r in rows if r["method"] == "lora"}.values(), key=lambda r: r["params"])
    if len(lora) >= 2:
        emb = [r["vocab"] * r["hidden"] for r in lora]
        share = [r["trainable_params"] / r["params"] for r in lora]
        share_body = [r["trainable_params"] / (r["params"] - e) for r, e in zip(lora, emb)]
        d = [r["hidden"] for r in lora]
        out.append(f"LoRA trainable share vs hidden size d: slope {slope(d, share):.3f} of the whole model, "
                   f"{slope(d, share_body):.3f} of the non-embedding parameters (theory: -1)")
        for r, s, sb in zip(lora, share, share_body):
            out.append(f"  {r['size']:>5} d={r['hidden']:<5} share {100 * s:.3f}% (non-embedding {100 * sb:.3f}%), "
                       f"share x d = {s * r['hidden']:.3f} (non-embedding {sb * r['hidden']:.3f})")
    q = sorted({r["size"]: r for r in rows if r["method"] == "qlora"}.values(), key=lambda r: r["params"])
    for r in q:
        full = next(x for x in rows if x["size"] == r["size"] and x["method"] == "lora")
        qbytes = r["weights_bytes"] - (full["weights_bytes"] - 4 * r["quantized_linear_params"]) - \
            (r["trainable_bytes"] - full["trainable_bytes"])
        bits = 8 * qbytes / r["quantized_linear_params"]
        n_linear = 7 * r["layers"]  # q, k, v, o, gate, up, down per layer
        excess = (qbytes - QLORA_BITS / 8 * r["quantized_linear_params"]) / n_linear
        out.append(f"QLoRA {r['size']:>5}: {bits:.4f} bits per quantized linear parameter "
                   f"({r['quantized_linear_params']:,} parameters; {bits / QLORA_BITS:.4f}x the 4.127 of QLoRA; "
                   f"{excess:,.0f} B above it per quantized layer), whole model "
                   f"{8 * r['weights_bytes'] / r['params']:.2f} bits/param")
    for size in dict.fromkeys(r["size"] for r in rows):
        for m in methods(rows):
            pts = [r for r in rows if r["size"] == size and r["method"] == m]
            if len({r["tokens"] for r in pts}) < 2:
                continue
            s = slope([r["tokens"] for r in pts], [r["activation_bytes"] for r in pts])
            per_tok = [r["activation_bytes"] / r["tokens"] for r in sorted(pts, key=lambda r: r["tokens"])]
            line = (f"activations vs tokens {size:>5} {m:>8}: slope {s:.3f} (theory 1); bytes/token "
                    f"{per_tok[0] / 1024:.1f} KiB at {min(r['tokens'] for r in pts)} tokens, "
                    f"{per_tok[-1] / 1024:.1f} KiB at {max(r['tokens'] for r in pts)}")
            if pts[0]["num_virtual_tokens"]:  # the model sees batch x (seq + virtual) tokens
                seen = [r["batch"] * (r["seq"] + r["num_virtual_tokens"]) for r in pts]
                line += f"; against batch x (seq + {pts[0]['num_virtual_tokens']} virtual) tokens: slope " + \
                    f"{slope(seen, [r['activation_bytes'] for r in pts]):.3f}"
            out.append(line)
    return "\n".join(out)


def draw_plots(rows: list[dict], folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    base = sorted({(r["batch"], r["seq"]) for r in rows})[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "peak_counted_bytes", "counted peak memory (MiB)"),
                           (axes[1], "step_s", "step time (s)")):
        for m, c in curves_vs_params(rows, *base).items():
            if not c:
                continue
            ys = [r[key] / (2**20 if key.endswith("bytes") else 1) for r in c]
            ax.plot([r["params"] for r in c], ys, "o-", label=f"{m} (slope {_f(slope([r['params'] for r in c], ys))})")
        ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel=label, title=f"{label}, batch {base[0]} x {base[1]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, folder, "scaling_params.png"))
    plt.close(fig)
    sizes = [s for s in dict.fromkeys(r["size"] for r in rows)
             if len({r["seq"] for r in rows if r["size"] == s and r["batch"] == 1}) >= 3]
    every = [s for s in dict.fromkeys(r["size"] for r in rows)
             if len({r["seq"] for r in rows if r["size"] == s and r["batch"] == 1}) >= 2]
    if sizes or every:
        panels = [(size, curves_vs_seq(rows, size, 1)) for size in sizes[:1]]
        panels += [("lora, every size", {s: curves_vs_seq(rows, s, 1).get("lora", []) for s in every})]
        fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
        for row_axes, (title, curves) in zip(axes, panels):
            for ax, key, label in ((row_axes[0], "activation_bytes", "saved activations (MiB)"),
                                   (row_axes[1], "step_s", "step time (s)")):
                for name, c in curves.items():
                    if not c:
                        continue
                    ys = [r[key] / (2**20 if key.endswith("bytes") else 1) for r in c]
                    ax.plot([r["seq"] for r in c], ys, "o-",
                            label=f"{name} (slope {_f(slope([r['seq'] for r in c], ys))})")
                ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label,
                       title=f"{title}: {label}, batch 1")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, folder, "scaling_seq.png"))
        plt.close(fig)
    return written


def _save(fig, folder: str, name: str) -> str:
    path = pathlib.Path(folder) / name
    fig.savefig(path, dpi=110)
    return str(path)


def report(rows: list[dict], plots: str | None = None) -> None:
    """Print the points, the fitted exponents and the theory checks; draw the plots into ``plots``."""
    folder = plots
    print("\n" + points_table(rows))
    print("\n" + summary_table(rows))
    table, _ = exponents(rows)
    print("\nfitted log-log exponents (least-squares slope)\n\n" + table)
    print("\ntheory checks\n" + checks(rows))
    if folder:
        for path in draw_plots(rows, folder):
            print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--plots", default=str(ROOT / "docs"))
    args = ap.parse_args()
    report(load(args.csv), plots=args.plots)


if __name__ == "__main__":
    main()
