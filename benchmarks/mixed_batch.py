"""One mixed-adapter batch against N per-set batches: inference throughput and peak memory, ours and peft's.

N LoRA sets (r=8 on q/k/v/o, random weights) on one Llama built from a config (about 7M parameters by default,
no download), R rows per set, all rows of one length. Four ways to serve the N x R rows, alternating within every
repeat (one warm-up each, median over repeats):

- ``mixed``: one forward, ``model(input_ids=..., adapter_names=[...])`` (rows interleaved by default);
- ``sequential``: N forwards, ``activate(set)`` then the set's R rows;
- ``peft-mixed`` / ``peft-sequential``: the same with ``peft`` (``adapter_names=``; ``set_adapter`` + forward) on
  the same base and the same sets (saved with ``save_adapters`` and loaded into one ``PeftModel``).

With ``--overhead``, ``one-set`` / ``one-set-unhooked``: a normal forward of all the rows under one set, with the
forward hooks that take ``adapter_names`` on the model and with them taken off (what a model without mixed-batch
support would run), to show what the hooks cost a normal forward.

Peak memory is counted, not sampled (the CPU allocator keeps no peak), as ``speed_memory.py`` counts it: the
bytes of the distinct tensor storages alive at once, here the weights plus every tensor the serving call
creates, tracked from creation to release under a ``TorchDispatchMode`` (a separate pass from the timed ones).
On CUDA, ``torch.cuda.max_memory_allocated`` is reported instead.

    python benchmarks/mixed_batch.py                          # N = 2, 4, 8 sets x 8 rows x 64 tokens, fp32
    python benchmarks/mixed_batch.py --quantize nf4 --order grouped
    python benchmarks/mixed_batch.py --sets 4 --overhead      # + the hooks' cost on a normal forward
    python benchmarks/mixed_batch.py --smoke                  # tiny model, one repeat (CI)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_peft import LoRA, activate, apply_peft, save_adapters
from lightning_peft.core.state import find_state
from lightning_peft.quantization import Quantization, quantize_model
from lightning_peft.stack.mixed import install_router, uninstall_router

MIB = 2**20
METHODS = ("mixed", "sequential", "peft-mixed", "peft-sequential")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(512, args.length))
    return LlamaForCausalLM(config).eval()


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the distinct storages created inside the mode and alive at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [bytes, tensors holding it]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = storage.data_ptr()
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.now += entry[0]
                self.peak = max(self.peak, self.now)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def weight_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    for m in model.modules():  # bitsandbytes' quantization constants live beside the packed weight
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
            if isinstance(t, torch.Tensor):
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    return sum(seen.values())


def peak_bytes(fn: Callable[[], object], model: torch.nn.Module, device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    counter = LiveBytes()
    with counter:
        fn()
    return weight_bytes(model) + counter.peak


def servers(args, n_sets: int, device: torch.device, tmp: str) -> tuple[dict[str, Callable], dict[str, object], int]:
    """The serving calls by method, the model each runs, and the number of rows."""
    base = build(args)
    q = Quantization("nf4") if args.quantize == "nf4" else None
    twin = copy.deepcopy(base)
    ours = base
    names = [f"task{i}" for i in range(n_sets)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        apply_peft(ours, [LoRA(r=8, alpha=16, target_modules=TARGETS, init_weights=False)], name=name,
                   quantize=q if i == 0 else None)
    ours.to(device).eval()
    g = torch.Generator().manual_seed(0)
    rows = n_sets * args.rows
    ids = torch.randint(5, args.vocab, (rows, args.length), generator=g).to(device)
    mask = torch.ones_like(ids)
    if args.order == "grouped":
        row_names = [name for name in names for _ in range(args.rows)]
    else:
        row_names = [names[i % n_sets] for i in range(rows)]
    per_set = {name: torch.tensor([i for i, r in enumerate(row_names) if r == name], device=device) for name in names}

    def mixed():
        return ours(input_ids=ids, attention_mask=mask, adapter_names=row_names).logits

    def sequential():
        out = []
        for name, idx in per_set.items():
            activate(ours, name)
            out.append(ours(input_ids=ids[idx], attention_mask=mask[idx]).logits)
        return out

    calls: dict[str, Callable] = {"mixed": mixed, "sequential": sequential}
    models: dict[str, object] = {"mixed": ours, "sequential": ours}
    if args.overhead:  # the normal forward of one set over all rows, with the router's hooks on and off
        state = find_state(ours)

        def one_set():
            activate(ours, names[0])
            return ours(input_ids=ids, attention_mask=mask).logits

        def one_set_unhooked():
            uninstall_router(state, force=True)
            try:
                return one_set()
            finally:
                install_router(ours, state)

        calls.update({"one-set": one_set, "one-set-unhooked": one_set_unhooked})
        models.update({"one-set": ours, "one-set-unhooked": ours})
    if not args.no_peft:
        import peft

        if q is not None:
            quantize_model(twin, q, skip=[])
        theirs = None
        for name in names:
            folder = save_adapters(ours, os.path.join(tmp, f"{n_sets}-{name}"), name=name)
            if theirs is None:
                theirs = peft.PeftModel.from_pretrained(twin, str(folder), adapter_name=name)
            else:
                theirs.load_adapter(str(folder), adapter_name=name)
        theirs.to(device).eval()

        def peft_mixed():
            return theirs(input_ids=ids, attention_mask=mask, adapter_names=row_names).logits

        def peft_sequential():
            out = []
            for name, idx in per_set.items():
                theirs.set_adapter(name)
                out.append(theirs(input_ids=ids[idx], attention_mask=mask[idx]).logits)
            return out

        calls.update({"peft-mixed": peft_mixed, "peft-sequential": peft_sequential})
        models.update({"peft-mixed": theirs, "peft-sequential": theirs})
        with torch.no_grad():  # the same rows: the comparison is between equal computations
            diff = (mixed() - peft_mixed()).abs().max().item()
        print(f"N={n_sets}: max|ours - peft| over the mixed batch's logits = {diff:.2e}", flush=True)
    return calls, models, rows


def run(args, n_sets: int, device: torch.device, tmp: str) -> list[dict]:
    calls, models, rows = servers(args, n_sets, device, tmp)
    peaks = {}
    with torch.no_grad():
        for m, fn in calls.items():
            fn()  # warm-up
            peaks[m] = peak_bytes(fn, models[m], device)
        times: dict[str, list[float]] = {m: [] for m in calls}
        for _ in range(args.repeats):
            for m, fn in calls.items():  # methods alternate within every repeat
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    return [{"sets": n_sets, "rows": rows, "method": m, "ms": 1000 * med[m], "rows_per_s": rows / med[m],
             "peak_MiB": peaks[m] / MIB, "vs_sequential": med[m.replace("mixed", "sequential")] / med[m]
             if "mixed" in m else float("nan")} for m in calls]


def markdown(rows: list[dict]) -> str:
    out = ["| N sets | rows | method | ms per batch | rows/s | peak MiB | speed-up over sequential |",
           "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        speed = "" if r["vs_sequential"] != r["vs_sequential"] else f"{r['vs_sequential']:.2f}x"
        out.append(f"| {r['sets']} | {r['rows']} | {r['method']} | {r['ms']:.1f} | {r['rows_per_s']:.1f} | "
                   f"{r['peak_MiB']:.2f} | {speed} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--rows", type=int, default=8, help="rows per set")
    ap.add_argument("--length", type=int, default=64, help="tokens per row")
    ap.add_argument("--order", choices=["interleaved", "grouped"], default="interleaved",
                    help="rows of one set scattered through the batch, or side by side")
    ap.add_argument("--quantize", choices=["none", "nf4"], default="none")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-peft", action="store_true", help="skip peft's mixed and sequential rows")
    ap.add_argument("--overhead", action="store_true",
                    help="also time a normal one-set forward of all rows with the adapter_names hooks on and off")
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    ap.add_argument("--smoke", action="store_true", help="tiny model, N = 2, one repeat")
    args = ap.parse_args()
    if args.smoke:
        args.sets, args.rows, args.length, args.repeats = [2], 2, 8, 1
        args.hidden, args.intermediate, args.layers, args.vocab = 64, 128, 2, 256
    if any(n < 1 for n in args.sets) or args.rows < 1:
        sys.exit(f"--sets {args.sets} and --rows {args.rows} must be positive")
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {device}; "
          f"Llama hidden {args.hidden} x {args.layers} layers, vocabulary {args.vocab}, {args.quantize} base; "
          f"LoRA r=8 on {'/'.join(TARGETS)}; {args.rows} rows per set x {args.length} tokens, {args.order}; "
          f"median of {args.repeats}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sets:
            results += run(args, n, device, tmp)
            print(markdown([r for r in results if r["sets"] == n]), flush=True)
    table = markdown(results)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
