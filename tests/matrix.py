"""The combination matrix: base layer x strategy x precision x operation, as a pairwise covering array.

The full product (7 bases x 8 strategies x 4 precisions x 6 operations = 1,344 cells) does not fit the
suite's time budget, so :func:`cells` returns a covering array of strength 2: every pair of values of any two
factors (every base with every strategy, every strategy with every operation, every precision with every
operation, ...) appears in at least one cell. It is generated greedily with a fixed seed, so the cell list is
stable. ``python -m tests.matrix`` prints the README's "what works together" table from the same definitions
and outcomes that ``tests/test_matrix.py`` asserts.

A cell either works and agrees with a reference, or is refused before the model is touched with a
:class:`~lightning_peft.errors.PeftConfigError` naming the combination; :func:`refusal` says which cells are
refused and why (the test checks the package raises exactly there).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

BASES = ["linear", "conv1d", "nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]
STRATEGIES = ["lora", "lora-rslora", "lora-dropout", "lora-shared-dropout", "adalora", "ia3", "adapter", "stack"]
PRECISIONS = ["fp32", "bf16-true", "bf16-mixed", "16-mixed"]  # 16-mixed: fp16 autocast, on the CPU too
OPERATIONS = ["train", "merge", "export-merged", "peft-load", "reload-renamed", "resume"]
FACTORS = {"base": BASES, "strategy": STRATEGIES, "precision": PRECISIONS, "operation": OPERATIONS}

STRATEGY_TITLES = {
    "lora": "LoRA", "lora-rslora": "LoRA (rsLoRA)", "lora-dropout": "LoRA (dropout 0.1)",
    "lora-shared-dropout": "LoRA (shared dropout 0.1)", "adalora": "AdaLoRA",
    "ia3": "IA3", "adapter": "bottleneck adapter", "stack": "prompt + LoRA + AdaLoRA",
}
BASE_TITLES = {
    "linear": "`nn.Linear`", "conv1d": "GPT-2 `Conv1D`", "nf4": "`Linear4bit` nf4", "nf4-dq": "nf4 + double quant",
    "fp4": "`Linear4bit` fp4", "fp4-dq": "fp4 + double quant", "int8": "`Linear8bitLt`",
}
OPERATION_TITLES = {
    "train": "forward + backward", "merge": "merge / unmerge", "export-merged": "`merge_and_export` → reload",
    "peft-load": "`save_adapters` → `peft`", "reload-renamed": "`load_adapters` under another name",
    "resume": "checkpoint → resume",
}


@dataclass(frozen=True)
class Cell:
    base: str
    strategy: str
    precision: str
    operation: str

    @property
    def id(self) -> str:
        return f"{self.base}-{self.strategy}-{self.precision}-{self.operation}"


#: what ``refusal`` returns for a cell that is not a plain ✓: (kind, text shown in the README). ``refused`` cells
#: raise a PeftConfigError matching the text's first words; ``native only`` cells write no ``peft`` files and
#: load back with ``load_adapters``.
REFUSED, NATIVE_ONLY = "refused", "native only"


def refusal(base: str, strategy: str, operation: str) -> tuple[str, str] | None:
    """Why this combination (whatever the precision) is not a plain ✓, or ``None`` when it must work.

    With the ``stack`` (prompt + LoRA + AdaLoRA), ``merge`` folds the LoRA/AdaLoRA parts and the prompt stays
    active, and ``merge_and_export`` saves the prompt beside the merged model as a ``peft`` prompt adapter.
    """
    if strategy == "adapter" and operation == "export-merged":
        return REFUSED, "a bottleneck adapter cannot be folded into the base weights; use save_adapters"
    if strategy == "adapter" and operation == "peft-load":
        return NATIVE_ONLY, "peft has no bottleneck adapter"
    if strategy == "stack" and operation == "peft-load":
        return NATIVE_ONLY, "peft cannot stack prompt tuning with LoRA"
    return None


def _pairs(cell: tuple[str, ...]) -> set[tuple[int, str, int, str]]:
    return {(i, cell[i], j, cell[j]) for i, j in itertools.combinations(range(len(cell)), 2)}


def cells(seed: int = 0) -> list[Cell]:
    """A strength-2 covering array over :data:`FACTORS` (greedy: each new cell covers the most open pairs)."""
    values = list(FACTORS.values())
    uncovered = set().union(*(_pairs(c) for c in itertools.product(*values)))
    rng = random.Random(seed)
    chosen: list[tuple[str, ...]] = []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(60):
            i, a, j, b = rng.choice(sorted(uncovered))
            candidate = [rng.choice(v) for v in values]
            candidate[i], candidate[j] = a, b
            for k in rng.sample(range(len(values)), len(values)):  # greedy per factor
                if k in (i, j):
                    continue
                candidate[k] = max(values[k], key=lambda v, k=k: len(
                    _pairs((*candidate[:k], v, *candidate[k + 1:])) & uncovered))
            gain = len(_pairs(tuple(candidate)) & uncovered)
            if gain > best_gain:
                best, best_gain = tuple(candidate), gain
        chosen.append(best)
        uncovered -= _pairs(best)
    return [Cell(*c) for c in chosen]


def table() -> str:
    """The README's table: strategy x base, and strategy x operation, from :func:`refusal` (the tests
    check every covered cell agrees with it)."""
    lines = ["| strategy | " + " | ".join(BASE_TITLES[b] for b in BASES) + " |",
             "|---|" + "---|" * len(BASES)]
    for s in STRATEGIES:
        lines.append(f"| {STRATEGY_TITLES[s]} | " + " | ".join("✓" for _ in BASES) + " |")
    lines += ["", "| strategy | " + " | ".join(OPERATION_TITLES[o] for o in OPERATIONS) + " |",
              "|---|" + "---|" * len(OPERATIONS)]
    for s in STRATEGIES:
        marks = [refusal("linear", s, o) for o in OPERATIONS]
        lines.append(f"| {STRATEGY_TITLES[s]} | " + " | ".join("✓" if m is None else f"{m[0]}: {m[1]}"
                                                               for m in marks) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"{len(cells())} cells cover every pair of factor values\n")
    print(table())
