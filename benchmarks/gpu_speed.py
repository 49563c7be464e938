"""Speed and peak memory on a GPU: ours against Hugging Face PEFT on a ~1B Llama, QLoRA, LoRA and the hybrid stack.

The issue #19 targets, measured side by side in one process: QLoRA tokens/s at least 1.2x peft's, QLoRA peak
memory at most 0.9x peft's, and the hybrid stack (prompt tuning + LoRA + AdaLoRA) at most 1.15x the step time of
LoRA alone on the same input length (the prompt's virtual tokens added to LoRA's input). Where a target is missed,
a ``torch.profiler`` summary of the rows involved (top kernels by device time) goes to ``--profile-out``.

Rows share one bf16 backbone (TinyLlama-1.1B's shape, random weights), data, AdamW and seed. Every row is built
and warmed up once, then the rows alternate within every repeat; the median over repeats is reported. All steps
run under ``torch.autocast(bfloat16)``, as ``precision="bf16-mixed"``. QLoRA: nf4 + double quantization with bf16
compute, each library's k-bit preparation (norms, embeddings and head upcast to fp32, no gradient
checkpointing); LoRA r=16 on all seven linears of every block.

Peak memory (CUDA): the row's resident bytes (weights, quantization states, adapters, optimizer state; measured
as ``torch.cuda.memory_allocated`` grown by building and warming it up) plus the most a training step allocates
beyond that (``max_memory_allocated`` over one step after ``reset_peak_memory_stats``). Rows stay resident while
the others run, so this is what the row alone would peak at. On the CPU (``--smoke``) memory is not measured.

    python benchmarks/gpu_speed.py --device cuda              # llama1b, batch 4 x 512, median of 5 x 3 steps
    python benchmarks/gpu_speed.py --smoke                    # a tiny Llama on the CPU, one repeat (CI)
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time

import torch

#: TinyLlama-1.1B's shape (1.10B parameters); "tiny" is the smoke model
CONFIGS = {
    "llama1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qlora_tps": 1.2, "qlora_mem": 0.9, "hybrid": 1.15}


def build_base(name: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[name]))
    return model.to(torch.bfloat16)


def qlora():
    from lightning_peft import Quantization

    return Quantization("nf4", double_quant=True, compute_dtype="bfloat16")


def make_row(row: str, base, n_virtual: int):
    """(model, per-step hook or None, extra loss or None) for one row."""
    from lightning_peft import AdaLoRA, LoRA, PromptTuning, apply_peft
    from lightning_peft.quantization import prepare_for_kbit_training, quantize_model

    model = copy.deepcopy(base)
    kind, impl = row.split("/")
    if impl == "peft":
        import peft

        if kind == "qlora":
            quantize_model(model, qlora())
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
        return peft.get_peft_model(model, cfg), None, None
    lora = LoRA(r=16, alpha=32, dropout=0.05, target_modules=ALL_LINEAR)
    if kind == "qlora":
        apply_peft(model, [lora], quantize=qlora())
        prepare_for_kbit_training(model)
        return model, None, None
    if kind == "hybrid":
        from lightning_peft.methods.adalora import RankAllocator, orthogonal_regularization

        stack = apply_peft(model, [
            PromptTuning(num_virtual_tokens=n_virtual),
            LoRA(r=16, alpha=32, dropout=0.05, target_modules=ALL_LINEAR[:4]),
            AdaLoRA(init_r=24, target_r=16, alpha=32, dropout=0.05, target_modules=ALL_LINEAR[4:]),
        ])
        # mid-training: scores are updated every step, ranks are not being pruned yet (as hybrid_overhead.py)
        alloc = RankAllocator.from_model(stack, tinit=10**6, tfinal=0, delta_t=10, total_step=2 * 10**6)
        return model, alloc.step, lambda: orthogonal_regularization(stack)
    apply_peft(model, [lora])  # "lora", and "lora+N" (the same on the input the hybrid stack's prompt makes)
    return model, None, None


def make_step(model, hook, extra, batch: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    mask = torch.ones_like(batch)
    count = [0]

    def step() -> None:
        with torch.autocast(batch.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, attention_mask=mask, labels=batch).loss
            if extra is not None:
                loss = loss + extra()
        loss.backward()
        opt.step()
        count[0] += 1
        if hook is not None:
            hook(count[0])
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rows_for(args) -> list[str]:
    return ["qlora/ours", "qlora/peft", "lora/ours", "lora/peft", "hybrid/ours", f"lora+{args.virtual}/ours"]


def run(args) -> tuple[dict, dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    base = build_base(args.model, device)
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    short = torch.randint(5, vocab, (args.batch, args.length), generator=g).to(device)
    longer = torch.randint(5, vocab, (args.batch, args.length + args.virtual), generator=g).to(device)
    steps, info = {}, {}
    if cuda:  # cuBLAS handles and workspaces, allocated once per process, must not count against the first row
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.ones(64, 64, device=device, dtype=dtype, requires_grad=True)
            (w @ w).sum().backward()
        del w
    for row in rows_for(args):
        gc.collect()
        sync(device)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        model, hook, extra = make_row(row, base, args.virtual)
        step, trainable = make_step(model, hook, extra, longer if row.startswith("lora+") else short)
        try:
            step()  # warm-up: kernels chosen, optimizer state allocated
        except Exception as err:  # a row that fails is reported, the others still run
            info[row] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
            print(f"{row} fails: {info[row]['error']}", flush=True)
            del model, step
            continue
        sync(device)
        info[row] = {"trainable": trainable, "model": model}
        if cuda:
            resident = torch.cuda.memory_allocated(device) - before
            torch.cuda.reset_peak_memory_stats(device)
            at = torch.cuda.memory_allocated(device)
            step()
            sync(device)
            transient = torch.cuda.max_memory_allocated(device) - at
            info[row].update(resident=resident, transient=transient, peak=resident + transient)
        steps[row] = step
    bnb_bits(info)
    del base
    times: dict[str, list[float]] = {r: [] for r in steps}
    for _ in range(args.repeats):
        for row, step in steps.items():  # alternate: drift hits every row alike
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            times[row].append((time.perf_counter() - t0) / args.steps)
    for row, ts in times.items():
        med = statistics.median(ts)
        info[row].update(step_s=med, tokens_s=args.batch * args.length / med)
    return steps, info


def bnb_bits(info: dict) -> None:
    """Bits per parameter of the quantized linears of our QLoRA row: packed weights, absmax and nested absmax (the
    codebooks, 16 + 256 floats per layer whatever its size, are left out)."""
    model = info.get("qlora/ours", {}).get("model")
    if model is None:
        return
    import bitsandbytes as bnb

    n, nbytes = 0, 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = m.weight
            n += w.quant_state.shape.numel()
            nbytes += w.numel() * w.element_size()
            qs = w.quant_state
            for t in (qs.absmax, getattr(getattr(qs, "state2", None), "absmax", None)):  # codebooks: per layer
                if torch.is_tensor(t):
                    nbytes += t.numel() * t.element_size()
    info["qlora/ours"]["bits_per_param"] = 8 * nbytes / n if n else float("nan")


def ratios(info: dict, virtual: int) -> list[tuple[str, float, str, float]]:
    """(what, value, comparison, target) for the issue's targets and LoRA's own ours/peft figures."""
    out = []

    def get(row, key):
        return info.get(row, {}).get(key, float("nan"))

    out.append(("QLoRA tokens/s, ours / peft", get("qlora/ours", "tokens_s") / get("qlora/peft", "tokens_s"),
                ">=", TARGETS["qlora_tps"]))
    out.append(("QLoRA peak memory, ours / peft", get("qlora/ours", "peak") / get("qlora/peft", "peak"),
                "<=", TARGETS["qlora_mem"]))
    out.append((f"hybrid step / LoRA alone on the same input (+{virtual} tokens)",
                get("hybrid/ours", "step_s") / get(f"lora+{virtual}/ours", "step_s"), "<=", TARGETS["hybrid"]))
    out.append(("LoRA (bf16) tokens/s, ours / peft", get("lora/ours", "tokens_s") / get("lora/peft", "tokens_s"),
                "", float("nan")))
    out.append(("LoRA (bf16) peak memory, ours / peft", get("lora/ours", "peak") / get("lora/peft", "peak"),
                "", float("nan")))
    return out


def verdict(value: float, cmp: str, target: float) -> str:
    if not cmp:
        return "(no target)"
    if value != value:
        return "NOT MEASURED"
    ok = value >= target if cmp == ">=" else value <= target
    return "met" if ok else "MISSED"


def markdown(info: dict, args) -> str:
    mib = 2**20
    lines = [f"model {args.model} ({args.params / 1e9:.2f}B parameters), device {args.device_name}, batch "
             f"{args.batch} x {args.length} tokens (+{args.virtual} virtual tokens for the hybrid stack), bf16 autocast, "
             f"median of {args.repeats} repeats x {args.steps} steps, rows alternating", "",
             "| row | trainable | step (ms) | tokens/s | resident MiB | step transient MiB | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows_for(args):
        r = info.get(row, {})
        if "error" in r:
            lines.append(f"| {row} | fails: {r['error']} | | | | | |")
            continue

        def f(key, scale=1.0, fmt=".0f", r=r):
            v = r.get(key, float("nan"))
            return "n/a" if v != v else format(v / scale, fmt)

        lines.append(f"| {row} | {r.get('trainable', 0):,} | {f('step_s', 1e-3, '.1f')} | {f('tokens_s')} | "
                     f"{f('resident', mib)} | {f('transient', mib)} | {f('peak', mib)} |")
    lines += ["", "| target | value | goal | verdict |", "|---|---:|---:|---|"]
    for what, value, cmp, target in ratios(info, args.virtual):
        goal = f"{cmp} {target}" if cmp else ""
        lines.append(f"| {what} | {'n/a' if value != value else format(value, '.3f')} | {goal} | "
                     f"{verdict(value, cmp, target)} |")
    bits = info.get("qlora/ours", {}).get("bits_per_param")
    if bits is not None:
        lines += ["", f"QLoRA backbone on {args.device}: {bits:.3f} bits per quantized parameter (nf4 + double quantization; "
                  "4 + 32/64 = 4.5 without double quantization, 4 + 8/64 + 32/(64 x 256) = 4.127 with it)"]
    return "\n".join(lines)


def profile(info: dict, steps: dict, args) -> str:
    """Top kernels by device time (CPU time on the CPU) of the rows behind each missed target."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    missed = {what for what, value, cmp, target in ratios(info, args.virtual) if verdict(value, cmp, target) != "met"
              and cmp}
    rows = []
    if any(w.startswith("QLoRA") for w in missed):
        rows += ["qlora/ours", "qlora/peft"]
    if any(w.startswith("hybrid") for w in missed):
        rows += ["hybrid/ours", f"lora+{args.virtual}/ours"]
    cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"  # kernels (leaf events) by their own time
    out = [f"Missed: {', '.join(sorted(missed)) or 'none'}"]
    for row in rows:
        if row not in steps:
            continue
        with torch_profile(activities=activities, profile_memory=cuda) as prof:
            for _ in range(2 if cuda else 1):
                steps[row]()
            sync(torch.device(args.device))
        out += ["", f"## {row}: {2 if cuda else 1} step(s), top 15 by {sort}", "",
                prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)]
        if cuda and "QLoRA peak memory, ours / peft" in missed:
            out += [f"## {row}: top 10 by self CUDA memory", "",
                    prof.key_averages().table(sort_by="self_cuda_memory_usage", row_limit=10,
                                              max_name_column_width=60)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--model", default="llama1b", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--virtual", type=int, default=20, help="the hybrid stack's virtual tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    ap.add_argument("--out", default=None, help="write the Markdown tables here too")
    ap.add_argument("--profile-out", default=None, help="where a missed target's profile goes (default: stdout)")
    ap.add_argument("--smoke", action="store_true", help="a tiny Llama, batch 2 x 16, one repeat (CI, on the CPU)")
    args = ap.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    if args.smoke:
        args.model, args.batch, args.length, args.virtual, args.repeats, args.steps = "tiny", 2, 16, 4, 1, 1
    args.device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    from transformers import LlamaConfig

    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        args.params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**CONFIGS[args.model])).parameters())
    print(f"torch {torch.__version__}, {args.device_name}; config {args.model}: {CONFIGS[args.model]}", flush=True)
    steps, info = run(args)
    table = markdown(info, args)
    print("\n" + table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    try:
        prof = profile(info, steps, args)
    except Exception as err:  # the tables above stand without it
        prof = f"the profiler failed: {type(err).__name__}: {err}"
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            f.write(prof + "\n")
        print(f"\nprofile: {args.profile_out}")
    else:
        print("\n" + prof)


if __name__ == "__main__":
    main()
