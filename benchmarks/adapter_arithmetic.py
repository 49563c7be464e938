"""Adapter arithmetic: ``combine_adapter_sets`` against ``peft``'s ``add_weighted_adapter``, per method.

Part 1, cost and agreement: a Llama built from a config (random weights) holds N LoRA sets (rank r on every
linear, random non-zero A and B, identical in ``peft`` and in ours). For each method, the time to combine them
(ours and ``peft``'s, alternating, median of the repeats; each call creates the new set, the new adapter's
initialization included), the combined rank, and the largest difference of any adapted layer's update
``s B A`` between ours and ``peft``'s. DARE's masks agree because both draw them from torch's RNG seeded the same
just before the first layer's merge.

Part 2, quality (``--quality``): two LoRA sets trained briefly on disjoint halves of one synthetic task (a tiny
Llama learns ``next token = (token * 5 + 3) mod V``), then each method combines them with weights 0.5 / 0.5; the
table gives each set's and each combination's loss on held-out sequences, and the base model's.

Run:

    python benchmarks/adapter_arithmetic.py                    # hidden 512, 4 layers, 3 sets of r=16, 5 repeats
    python benchmarks/adapter_arithmetic.py --sets 2 4 --quality
    python benchmarks/adapter_arithmetic.py --smoke            # tiny sizes, one repeat (CI)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

METHODS = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.5}),
    ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.5}),
    ("dare_ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.5}),
]
SEED = 1234


def llama(hidden: int, layers: int, vocab: int, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def set_names(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]  # peft warns about names inside "lora_" (e.g. "a")


def pair(base: nn.Module, n: int, rank: int):
    """(peft model, ours): ``n`` LoRA sets of rank ``rank`` on every linear, the same random tensors in both."""
    import peft

    from lightning_peft import LoRA, apply_peft

    ours = copy.deepcopy(base)
    ref = None
    for i, name in enumerate(set_names(n)):
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank + i, target_modules="all-linear", init_lora_weights=False)
        ref = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name) if ref is None else ref
        if name not in ref.peft_config:
            ref.add_adapter(name, config)
        stack = apply_peft(ours, [LoRA(r=rank, alpha=2 * rank + i, target_modules="all-linear")], name=name)
        params = dict(ref.named_parameters())
        with torch.no_grad():
            for layer, delta in zip(stack.applied[0].targets, stack.applied[0].modules):
                delta.lora_A.copy_(params[f"base_model.model.{layer}.lora_A.{name}.weight"])
                delta.lora_B.copy_(params[f"base_model.model.{layer}.lora_B.{name}.weight"])
    return ref.eval(), ours


def seeded_peft(ref, names, weights, new, method, kw) -> float:
    """``ref.add_weighted_adapter`` timed, with torch seeded before its first per-layer merge (as ours is)."""
    from peft.tuners.lora.model import LoraModel

    originals = {}
    seeded = []
    for fn in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        originals[fn] = original = getattr(LoraModel, fn)

        def wrapper(self, *args, _original=original, **kwargs):
            if not seeded:
                torch.manual_seed(SEED)
                seeded.append(True)
            return _original(self, *args, **kwargs)

        setattr(LoraModel, fn, wrapper)
    try:
        start = time.perf_counter()
        ref.add_weighted_adapter(names, weights, new, combination_type=method, **kw)
        return time.perf_counter() - start
    finally:
        for fn, original in originals.items():
            setattr(LoraModel, fn, original)


def timed_ours(ours, weights, new, method, kw) -> float:
    from lightning_peft import combine_adapter_sets

    torch.manual_seed(SEED)
    start = time.perf_counter()
    combine_adapter_sets(ours, weights, name=new, method=method, **kw)
    return time.perf_counter() - start


def max_update_diff(ref, ours, new) -> float:
    from lightning_peft.core.layer import AdaptedLayer

    worst = 0.0
    for layer, module in ours.named_modules():
        if isinstance(module, AdaptedLayer) and new in module.adapters:
            target = ref.base_model.model.get_submodule(layer)
            peft_update = (target.lora_B[new].weight @ target.lora_A[new].weight) * target.scaling[new]
            worst = max(worst, (peft_update - module.adapters[new]["lora"].delta_weight()).abs().max().item())
    return worst


def cost_table(args) -> None:
    from lightning_peft import unload

    base = llama(args.hidden, args.layers, args.vocab)
    print(f"Llama hidden {args.hidden}, {args.layers} layers; sets: LoRA r={args.rank} on every linear, random A "
          f"and B; median of {args.repeats} alternating repeats; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| sets | method | combined rank | ours (ms) | peft (ms) | peft / ours | max abs dW diff vs peft |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.sets:
        ref, ours = pair(base, n, args.rank)
        names = set_names(n)
        weights = [round(1.0 / n + 0.1 * i, 3) for i in range(n)]
        for method, kw in METHODS:
            ours_times, peft_times = [], []
            diff = rank = None
            for rep in range(args.repeats):
                new = f"mix{rep}"
                ours_times.append(timed_ours(ours, dict(zip(names, weights)), new, method, kw))
                peft_times.append(seeded_peft(ref, names, weights, new, method, kw))
                if rep == 0:
                    diff = max_update_diff(ref, ours, new)
                    rank = ref.peft_config[new].r
                unload(ours, new)
                ref.delete_adapter(new)
            ours_ms, peft_ms = 1e3 * statistics.median(ours_times), 1e3 * statistics.median(peft_times)
            print(f"| {n} | {method} | {rank} | {ours_ms:.1f} | {peft_ms:.1f} | {peft_ms / ours_ms:.2f}x | "
                  f"{diff:.1e} |")


# -- quality: two halves of one task ------------------------------------------------------------------------------
def task_batch(n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences following ``next = (token * 5 + 3) mod vocab`` from random starts."""
    rows = [torch.randint(0, vocab, (n,), generator=generator)]
    for _ in range(length - 1):
        rows.append((rows[-1] * 5 + 3) % vocab)
    return torch.stack(rows, dim=1)


def loss(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def quality_table(args) -> None:
    from lightning_peft import LoRA, activate, apply_peft, combine_adapter_sets, deactivate

    vocab, length = 64, 16
    model = llama(64, 2, vocab, seed=1)
    g = torch.Generator().manual_seed(0)
    train = task_batch(2 * args.train_rows, length, vocab, g)
    halves = {"half0": train[: args.train_rows], "half1": train[args.train_rows:]}
    held_out = task_batch(256, length, vocab, g)
    for i, (name, rows) in enumerate(halves.items()):
        stack = apply_peft(model, [LoRA(r=8, alpha=16, target_modules="all-linear")], name=name)
        torch.manual_seed(i)
        opt = torch.optim.AdamW(stack.trainable_parameters(), lr=args.lr)
        model.train()
        for _ in range(args.steps):
            batch = rows[torch.randint(0, len(rows), (16,))]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    deactivate(model)
    print(f"\nquality: tiny Llama (hidden 64, 2 layers, vocabulary {vocab}); two LoRA sets (r=8, every linear) trained "
          f"{args.steps} steps each on disjoint halves ({args.train_rows} sequences each) of next = (5 t + 3) mod "
          f"{vocab}; combined with weights 0.5 / 0.5 (density 0.5 where used); loss on 256 held-out sequences\n")
    print("| adapter | rank | held-out loss |")
    print("|---|---:|---:|")
    print(f"| base model | - | {loss(model, held_out):.4f} |")
    for name in halves:
        activate(model, name)
        print(f"| {name} alone | 8 | {loss(model, held_out):.4f} |")
    for method, kw in METHODS:
        torch.manual_seed(SEED)
        stack = combine_adapter_sets(model, {"half0": 0.5, "half1": 0.5}, name=f"q_{method}", method=method, **kw)
        print(f"| {method} | {stack.strategies[0].r} | {loss(model, held_out):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--sets", type=int, nargs="+", default=[3])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quality", action="store_true", help="also train two sets and compare the combinations")
    parser.add_argument("--steps", type=int, default=150, help="training steps per set (quality)")
    parser.add_argument("--train-rows", type=int, default=256, help="sequences per half (quality)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, a few steps (CI)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.rank, args.repeats = 32, 1, 64, 4, 1
        args.sets, args.quality, args.steps, args.train_rows = [2], True, 3, 16
    cost_table(args)
    if args.quality:
        quality_table(args)


if __name__ == "__main__":
    main()
