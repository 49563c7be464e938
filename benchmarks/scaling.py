"""Cost across model sizes: memory, RSS, step time, trainable parameters, checkpoint and export bytes.

Llama-family models built from ``LlamaConfig`` (random weights; cost does not depend on the values) at about
10M, 30M, 100M, 300M and 1B parameters, shaped like the real family: head dim 64, intermediate about 2.7x
hidden, grouped-query attention, vocabulary 32000 (Llama-2 / TinyLlama tokenizer), tied embeddings (as SmolLM
and Llama-3.2 do). 100M and 300M are SmolLM-135M / SmolLM-360M's shapes, 1B is TinyLlama-1.1B's; 10M and 30M
keep SmolLM's deep-and-thin ratio. fp32 weights and compute, AdamW, on the CPU.

Rows (``METHODS``): full fine-tuning (not at 1B), LoRA r=8 on q/k/v/o, AdaLoRA init_r=12 (target 8) on q/k/v/o,
prompt tuning (20 virtual tokens), the hybrid stack of ``cli_configs/llama_hybrid.yaml`` (10 virtual tokens +
LoRA r=16 on q/k/v/o + AdaLoRA init_r=12 on gate/up/down; fp32 backbone here, the recipe's nf4 is the QLoRA
row's business) and QLoRA (nf4 + double quantization + the LoRA row's adapters). AdaLoRA's allocator updates its
scores every step without pruning (the ranks stay at init_r: the memory maximum).

Per point (size x method x batch x sequence): the counted peak memory of ``speed_memory.py`` (the storages
autograd saves for backward + parameters + gradients + optimizer state; its ``SavedBytes`` / ``tensor_bytes``),
split into its parts, with saved tensors that are parameters counted once (as weights) and bitsandbytes
quantization constants counted with the weights; the peak RSS growth of a training step (``VmHWM`` reset
through ``/proc/self/clear_refs``, after ``malloc_trim`` so memory freed by the last step has left the RSS); the
median step time over repeats, the methods of one size alternating in every repeat (frozen weights are shared
between the methods' models, so all of them fit at once); trainable parameters; checkpoint bytes (the
adapter-only state the PEFT callback saves, ``stack.adapter_state_dict()`` written with safetensors; the whole
model for full fine-tuning) and export bytes (the ``save_adapters`` folder).

    python benchmarks/scaling.py                                  # the study (CSV, Markdown, plots, checks)
    python benchmarks/scaling.py --sizes 10m 30m --methods lora qlora
    python benchmarks/scaling.py --smoke                          # tiny sizes, one setting, one step (CI)
    python benchmarks/scaling_report.py benchmarks/results/scaling.csv   # tables, fits, plots from the CSV
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import ctypes
import gc
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from speed_memory import SavedBytes, tensor_bytes  # the existing benchmark's counting code

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "adalora", "prompt", "hybrid", "qlora")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
VOCAB = 32000
#: name -> (hidden, intermediate, layers, heads, kv heads); head dim 64 everywhere
SIZES = {
    "10m": (192, 512, 10, 3, 1),
    "30m": (384, 1024, 12, 6, 2),
    "100m": (576, 1536, 30, 9, 3),  # SmolLM-135M's shape
    "300m": (960, 2560, 32, 15, 5),  # SmolLM-360M's shape
    "1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape
}
SMOKE_SIZES = {"tiny-a": (64, 192, 2, 2, 1), "tiny-b": (128, 320, 2, 2, 1)}
#: (batch, seq) settings per size: the full grid where time allows, fewer at the largest sizes
SETTINGS = {
    "10m": [(1, 128), (1, 256), (1, 512), (1, 1024), (4, 128), (4, 512)],
    "30m": [(1, 128), (1, 512), (4, 128), (4, 512)],
    "100m": [(1, 128), (1, 512), (4, 128), (4, 512)],
    "300m": [(1, 128), (1, 512), (4, 128)],
    "1b": [(1, 128), (1, 512)],
}
#: timed steps per point after the counted one; 0: the counted step's own time is the step time
REPEATS = {"10m": 3, "30m": 3, "100m": 2, "300m": 2, "1b": 0}
#: full fine-tuning where it fits: not at 1B (16 bytes/param with AdamW, beside the frozen copies)
NO_FULL = {"1b"}


def llama_config(size: str, smoke: bool = False):
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv = (SMOKE_SIZES if smoke else SIZES)[size]
    return LlamaConfig(vocab_size=512 if smoke else VOCAB, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=hidden // heads, tie_word_embeddings=True, max_position_embeddings=2048,
                       attn_implementation="sdpa")


def method_spec(method: str) -> dict:
    """What an estimator needs to know about a row's adapters (also written to the CSV)."""
    spec = {"quantization": "none", "lora_r": 0, "lora_targets": "", "adalora_init_r": 0, "adalora_targets": "",
            "num_virtual_tokens": 0}
    if method in ("lora", "qlora"):
        spec.update(lora_r=8, lora_targets="+".join(ATTN))
    if method == "qlora":
        spec.update(quantization="nf4+dq")
    if method == "adalora":
        spec.update(adalora_init_r=12, adalora_targets="+".join(ATTN))
    if method == "prompt":
        spec.update(num_virtual_tokens=20)
    if method == "hybrid":
        spec.update(lora_r=16, lora_targets="+".join(ATTN), adalora_init_r=12, adalora_targets="+".join(MLP),
                    num_virtual_tokens=10)
    return spec


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters and buffers are the base's own tensors (frozen weights held once)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def make_model(method: str, base):
    """(model, stack or None, per-step hook or None, extra loss or None)."""
    from lightning_peft import AdaLoRA, LoRA, PromptTuning, apply_peft
    from lightning_peft.methods.adalora import RankAllocator, orthogonal_regularization
    from lightning_peft.quantization import Quantization

    if method == "full":
        return copy.deepcopy(base).requires_grad_(True), None, None, None
    model = shared_copy(base)
    q = Quantization("nf4", double_quant=True) if method == "qlora" else None
    strategies = {
        "lora": [LoRA(r=8, alpha=16, dropout=0.05, target_modules=ATTN)],
        "qlora": [LoRA(r=8, alpha=16, dropout=0.05, target_modules=ATTN)],
        "adalora": [AdaLoRA(init_r=12, target_r=8, alpha=16, dropout=0.05, target_modules=ATTN)],
        "prompt": [PromptTuning(num_virtual_tokens=20)],
        "hybrid": [PromptTuning(num_virtual_tokens=10, init="vocab"), LoRA(r=16, alpha=32, target_modules=ATTN),
                   AdaLoRA(init_r=12, target_r=4, alpha=32, target_modules=MLP)],
    }[method]
    stack = apply_peft(model, strategies, quantize=q)
    if any(isinstance(s, AdaLoRA) for s in strategies):
        # scores updated every step, no pruning while measuring (as in the middle of a run's warm-up)
        alloc = RankAllocator.from_model(stack, tinit=10**6, tfinal=0, delta_t=10, total_step=2 * 10**6)
        return model, stack, alloc.step, lambda: orthogonal_regularization(stack)
    return model, stack, None, None


def _quant_constant_tensors(model) -> list[torch.Tensor]:
    from lightning_peft.quantization.memory import _quant_state_tensors

    out = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            out += _quant_state_tensors(state)
    return out


class Runner:
    """One method's model, optimizer and step; counts the memory of a step and its RSS growth."""

    def __init__(self, method: str, base) -> None:
        self.method = method
        self.model, self.stack, self.hook, self.extra = make_model(method, base)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.model.train()
        self.n_step = 0
        self.step(torch.full((1, 8), 5, dtype=torch.long))  # lazy state (AdamW's moments) exists before counting

    def step(self, ids: torch.Tensor, count: bool = False) -> dict:
        """One optimizer step. ``count``: also count its memory parts and its peak RSS growth (after a trim)."""
        saved = SavedBytes()
        hooks = torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if count else contextlib.nullcontext()
        if count:
            gc.collect()
            _trim()
            rss0 = _rss("VmRSS")
            _reset_hwm()
        t0 = time.perf_counter()
        with hooks:
            loss = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            if self.extra is not None:
                loss = loss + self.extra()
        loss.backward()
        self.opt.step()
        self.n_step += 1
        if self.hook is not None:
            self.hook(self.n_step)
        out = {"seconds": time.perf_counter() - t0}
        if count:
            out.update(self.parts(saved), rss_growth=_rss("VmHWM") - rss0)
        self.opt.zero_grad(set_to_none=True)
        return out

    def parts(self, saved: SavedBytes) -> dict:
        weights = list(self.model.parameters()) + list(self.model.buffers())
        own = {t.untyped_storage().data_ptr() for t in weights if t.device.type != "meta"}
        consts = _quant_constant_tensors(self.model)
        return {
            "weights_bytes": tensor_bytes(weights) + tensor_bytes(consts),
            "quant_constants_bytes": tensor_bytes(consts),
            "trainable_bytes": tensor_bytes(self.params),
            "grad_bytes": tensor_bytes(p.grad for p in self.params),
            "optimizer_bytes": tensor_bytes(v for s in self.opt.state.values() for v in s.values()
                                            if torch.is_tensor(v)),
            "activation_bytes": sum(n for ptr, n in saved.seen.items() if ptr not in own),
            "saved_weight_bytes": sum(n for ptr, n in saved.seen.items() if ptr in own),
        }

    def file_bytes(self) -> tuple[int, int | None]:
        """(checkpoint bytes, export folder bytes): adapter-only state with safetensors, and save_adapters."""
        from safetensors.torch import save_file, save_model

        from lightning_peft import save_adapters

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state.safetensors")
            if self.stack is None:
                save_model(self.model, path)
                return os.path.getsize(path), None
            save_file({k: v.detach().contiguous() for k, v in self.stack.adapter_state_dict().items()}, path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                folder = save_adapters(self.stack, os.path.join(tmp, "export"))
            return os.path.getsize(path), sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")


def _trim() -> None:
    """Give the memory freed since the last step back to the OS (glibc keeps it), so the RSS starts low."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def config_fields(cfg, size: str) -> dict:
    return {"size": size, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "tied_embeddings": cfg.tie_word_embeddings}


FIELDS = ["size", "params", "hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab",
          "tied_embeddings", "method", "batch", "seq", "tokens", "quantization", "lora_r", "lora_targets",
          "adalora_init_r", "adalora_targets", "num_virtual_tokens", "dtype", "optimizer", "trainable_params",
          "peak_counted_bytes", "weights_bytes", "quant_constants_bytes", "quantized_linear_params",
          "trainable_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "saved_weight_bytes",
          "rss_step_growth_bytes", "rss_after_bytes", "step_s", "step_s_all", "step_from", "threads", "checkpoint_bytes", "export_bytes"]


def run_size(size: str, methods: list[str], settings, args, writer, fh) -> list[dict]:
    from transformers import LlamaForCausalLM

    from lightning_peft.quantization import memory_report

    cfg = llama_config(size, args.smoke)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).requires_grad_(False)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"\n== {size}: {n_params:,} parameters; {cfg.hidden_size} hidden, {cfg.intermediate_size} intermediate, "
          f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} kv, head dim "
          f"{cfg.head_dim}), vocab {cfg.vocab_size}, tied embeddings", flush=True)
    runners = {}
    for m in methods:
        if m == "full" and size in NO_FULL:
            continue
        runners[m] = Runner(m, base)
    files = {m: r.file_bytes() for m, r in runners.items()}
    qparams = {m: memory_report(r.model)["quantized"][1] for m, r in runners.items()}
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch, seq in settings:
        ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
        counted = {m: r.step(ids, count=True) for m, r in runners.items()}  # warm-up, counted
        times: dict[str, list[dict]] = {m: [] for m in runners}
        repeats = args.repeats if args.repeats is not None else REPEATS.get(size, 1)
        for _ in range(repeats):
            for m, r in runners.items():  # methods alternate within every repeat
                times[m].append(r.step(ids))
        for m, r in runners.items():
            c = counted[m]
            peak = c["weights_bytes"] + c["grad_bytes"] + c["optimizer_bytes"] + c["activation_bytes"]
            secs = [t["seconds"] for t in times[m]] or [c["seconds"]]
            row = {**config_fields(cfg, size), "params": n_params, "method": m, "batch": batch, "seq": seq,
                   "tokens": batch * seq, **method_spec(m), "dtype": "float32", "optimizer": "AdamW",
                   "trainable_params": sum(p.numel() for p in r.params), "peak_counted_bytes": peak,
                   **{k: c[k] for k in FIELDS if k in c}, "quantized_linear_params": qparams[m],
                   "rss_step_growth_bytes": c["rss_growth"],
                   "rss_after_bytes": _rss("VmRSS"), "step_s": statistics.median(secs),
                   "step_s_all": " ".join(f"{s:.4f}" for s in secs), "threads": torch.get_num_threads(),
                   "step_from": "timed" if times[m] else "counted",
                   "checkpoint_bytes": files[m][0], "export_bytes": "" if files[m][1] is None else files[m][1]}
            writer.writerow(row)
            fh.flush()
            rows.append(row)
            print(f"{size:>5} {m:>8} b{batch} s{seq:<5} trainable {row['trainable_params']:>12,}  counted "
                  f"{peak / 2**20:9.1f} MiB (act {c['activation_bytes'] / 2**20:8.1f})  RSS step "
                  f"{row['rss_step_growth_bytes'] / 2**20:8.1f} MiB  step {1000 * row['step_s']:9.1f} ms", flush=True)
    del runners, base
    gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="*", default=list(SIZES))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    ap.add_argument("--settings", nargs="*", default=None, help="BxS pairs for every size, e.g. 1x128 4x512")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed steps per point after the counted one (default: REPEATS per size)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared cores stall 2 threads)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.csv"))
    ap.add_argument("--plots", default=str(ROOT / "docs"), help="folder for the PNG plots ('' for none)")
    ap.add_argument("--append", action="store_true", help="add rows to an existing CSV (another run's sizes)")
    ap.add_argument("--smoke", action="store_true", help="two tiny sizes, one setting, one step")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.sizes, args.repeats, args.settings, args.plots = list(SMOKE_SIZES), 1, ["1x16"], ""
        if args.out == ap.get_default("out"):
            args.out = "scaling_smoke.csv"
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings] if args.settings else None
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; fp32, AdamW; "
          f"median of {args.repeats or REPEATS} steps after one counted step; CSV {args.out}", flush=True)
    rows = []
    append = args.append and pathlib.Path(args.out).exists()
    with open(args.out, "a" if append else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if not append:
            writer.writeheader()
        fh.flush()
        for size in args.sizes:
            rows += run_size(size, args.methods, settings or SETTINGS.get(size, [(1, 16)]), args, writer, fh)
    from scaling_report import report

    if append:
        from scaling_report import load

        rows = load(args.out)
    report(rows, plots=args.plots)


if __name__ == "__main__":
    main()
