"""The combination matrix: base layer x strategy x precision x operation, as a pairwise covering array.

The full product (9 bases x 16 strategies x 4 precisions x 8 operations = 4,608 cells) does not fit the
suite's time budget, so :func:`cells` returns a covering array of strength 2: every pair of values of any two
factors (every base with every strategy, every strategy with every operation, every precision with every
operation, ...) appears in at least one cell. The few (base, strategy) pairs that do not apply are left out
(:func:`applicable`: a bottleneck adapter sits after a sublayer, not on a layer kind, and the ViT that carries
the ``conv2d`` base has no token embeddings for prompt tuning nor a cache for prefix tuning; a prefix adapts no
embedding). It is generated greedily with a fixed seed, so the cell list is
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

#: the kind of base layer adapted: ``embedding`` is a Llama's ``embed_tokens``, ``conv2d`` a ViT's patch embedding
#: (each next to the attention and feed-forward linears the strategy targets)
BASES = ["linear", "conv1d", "nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "embedding", "conv2d"]
STRATEGIES = ["lora", "lora-rslora", "lora-dropout", "lora-shared-dropout", "lora-dora", "lora-pissa", "lora-loftq",
              "lora-gated", "adalora", "ia3", "adapter", "adapter-parallel", "stack", "prefix", "mam", "unipelt"]
PRECISIONS = ["fp32", "bf16-true", "bf16-mixed", "16-mixed"]  # 16-mixed: fp16 autocast, on the CPU too
OPERATIONS = ["train", "merge", "export-merged", "peft-load", "peft-import", "reload-renamed", "resume", "mixed-batch"]
FACTORS = {"base": BASES, "strategy": STRATEGIES, "precision": PRECISIONS, "operation": OPERATIONS}

STRATEGY_TITLES = {
    "lora": "LoRA", "lora-rslora": "LoRA (rsLoRA)", "lora-dropout": "LoRA (dropout 0.1)",
    "lora-shared-dropout": "LoRA (shared dropout 0.1)", "lora-dora": "DoRA", "lora-pissa": "LoRA (PiSSA init)",
    "lora-loftq": "LoRA (LoftQ init)", "lora-gated": "gated LoRA (UniPELT)", "adalora": "AdaLoRA",
    "ia3": "IA3", "adapter": "bottleneck adapter", "adapter-parallel": "parallel adapter (learned scaling)",
    "stack": "prompt + LoRA + AdaLoRA", "prefix": "prefix tuning", "mam": "MAM (prefix + parallel adapter)",
    "unipelt": "UniPELT (gated LoRA + prefix + adapter)",
}
BASE_TITLES = {
    "linear": "`nn.Linear`", "conv1d": "GPT-2 `Conv1D`", "nf4": "`Linear4bit` nf4", "nf4-dq": "nf4 + double quant",
    "fp4": "`Linear4bit` fp4", "fp4-dq": "fp4 + double quant", "int8": "`Linear8bitLt`",
    "embedding": "`nn.Embedding`", "conv2d": "`nn.Conv2d`",
}
#: the operations that go through peft's files: ours read by peft, and peft's (written from ours) read by us
PEFT_OPERATIONS = ("peft-load", "peft-import")
QUANTIZED = {"nf4", "nf4-dq", "fp4", "fp4-dq", "int8"}
#: strategies whose deltas sit on linears only (told to adapt an embedding or a conv, they refuse)
LINEAR_ONLY = {"lora-dora", "lora-pissa", "lora-loftq", "lora-gated", "adalora", "ia3"}
#: the bottleneck adapters (sequential, and parallel with a learned scale): they sit after or beside sublayers
ADAPTERS = {"adapter", "adapter-parallel"}
OPERATION_TITLES = {
    "train": "forward + backward", "merge": "merge / unmerge", "export-merged": "`merge_and_export` → reload",
    "peft-load": "`save_adapters` → `peft`",
    "peft-import": "`peft` `save_pretrained` → `load_adapters`", "reload-renamed": "`load_adapters` under another name",
    "resume": "checkpoint → resume", "mixed-batch": "mixed-adapter batch",
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
#: the strategies with a prefix in the attention cache (prefix tuning alone and the two presets holding it)
PREFIXED = ("prefix", "mam", "unipelt")


def applicable(base: str, strategy: str) -> bool:
    """Whether the pair means anything (the covering array leaves the others out)."""
    if strategy in ADAPTERS:
        return base not in ("embedding", "conv2d")
    if strategy in PREFIXED:  # in the attention cache: a base is the (quantized) model around it, not a layer kind
        return base not in ("embedding", "conv2d")
    return not (strategy == "stack" and base == "conv2d")


def refusal(base: str, strategy: str, operation: str) -> tuple[str, str] | None:
    """Why this combination (whatever the precision) is not a plain ✓, or ``None`` when it must work.

    With the ``stack`` (prompt + LoRA + AdaLoRA), ``merge`` folds the LoRA/AdaLoRA parts and the prompt stays
    active, and ``merge_and_export`` saves the prompt beside the merged model as a ``peft`` prompt adapter; the
    same for ``prefix`` (prefix tuning alone, on a plain, GPT-2 or quantized model), saved as ``PREFIX_TUNING``.
    ``apply``-time refusals hold for every operation: the stack cannot be built.
    """
    if base in ("embedding", "conv2d") and strategy in LINEAR_ONLY:
        return REFUSED, "DoRA, the PiSSA and LoftQ inits, gated LoRA, AdaLoRA and IA3 adapt linear layers only"
    if strategy == "lora-loftq" and base not in QUANTIZED:
        return REFUSED, "LoftQ fits the adapter to the error of the quantization apply_peft does: it needs quantize="
    if strategy == "lora-pissa" and base in QUANTIZED and operation in PEFT_OPERATIONS:
        return NATIVE_ONLY, "PiSSA on a quantized base has no exact peft form (the residual's quantization error)"
    if strategy in ADAPTERS and operation == "export-merged":
        return REFUSED, "a bottleneck adapter cannot be folded into the base weights; use save_adapters"
    if strategy in ADAPTERS and operation in PEFT_OPERATIONS:
        return NATIVE_ONLY, "peft has no bottleneck adapter"
    if strategy in ("lora-gated", "unipelt") and operation in ("merge", "export-merged"):
        return REFUSED, "a gated LoRA depends on the input: it cannot be folded into the base weights"
    if strategy == "mam" and operation == "export-merged":
        return REFUSED, "a bottleneck adapter cannot be folded into the base weights; use save_adapters"
    if strategy == "mam" and operation in PEFT_OPERATIONS:
        return NATIVE_ONLY, "peft has no bottleneck adapter: its files hold the prefix alone"
    if strategy in ("lora-gated", "unipelt") and operation in PEFT_OPERATIONS:
        return NATIVE_ONLY, "peft has no gates"
    if strategy == "stack" and operation in PEFT_OPERATIONS:
        return NATIVE_ONLY, "peft cannot stack prompt tuning with LoRA"
    if strategy in PREFIXED and operation == "mixed-batch":
        return REFUSED, "a mixed-adapter batch cannot hold a prefix set (rows would need their own caches)"
    return None


def _pairs(cell: tuple[str, ...]) -> set[tuple[int, str, int, str]]:
    return {(i, cell[i], j, cell[j]) for i, j in itertools.combinations(range(len(cell)), 2)}


def cells(seed: int = 0) -> list[Cell]:
    """A strength-2 covering array over :data:`FACTORS` (greedy: each new cell covers the most open pairs)."""
    values = list(FACTORS.values())
    names = list(FACTORS)

    def ok(c) -> bool:
        return applicable(c[names.index("base")], c[names.index("strategy")])

    uncovered = set().union(*(_pairs(c) for c in itertools.product(*values) if ok(c)))
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
                candidate[k] = max(values[k], key=lambda v, k=k: (ok((*candidate[:k], v, *candidate[k + 1:])), len(
                    _pairs((*candidate[:k], v, *candidate[k + 1:])) & uncovered)))
            gain = len(_pairs(tuple(candidate)) & uncovered) if ok(candidate) else -1
            if gain > best_gain:
                best, best_gain = tuple(candidate), gain
        chosen.append(best)
        uncovered -= _pairs(best)
    return [Cell(*c) for c in chosen]


def _mark(base: str, strategy: str, operation: str) -> str:
    if not applicable(base, strategy):
        return "—"
    why = refusal(base, strategy, operation)
    return "✓" if why is None else f"{why[0]}: {why[1]}"


def table() -> str:
    """The README's tables: strategy x base, and strategy x operation (on ``nn.Linear``, or nf4 for LoftQ), from
    :func:`applicable` and :func:`refusal` (the tests check every covered cell agrees with them); ``—`` marks a
    pair that does not apply."""
    lines = ["| strategy | " + " | ".join(BASE_TITLES[b] for b in BASES) + " |",
             "|---|" + "---|" * len(BASES)]
    for s in STRATEGIES:
        marks = [_mark(b, s, "train") for b in BASES]
        lines.append(f"| {STRATEGY_TITLES[s]} | " + " | ".join(m.partition(":")[0] for m in marks) + " |")
    lines += ["", "| strategy | " + " | ".join(OPERATION_TITLES[o] for o in OPERATIONS) + " |",
              "|---|" + "---|" * len(OPERATIONS)]
    for s in STRATEGIES:
        base = "nf4" if s == "lora-loftq" else "linear"
        lines.append(f"| {STRATEGY_TITLES[s]} | " + " | ".join(_mark(base, s, o) for o in OPERATIONS) + " |")
    reasons = sorted({refusal(b, s, "train")[1] for b in BASES for s in STRATEGIES
                      if applicable(b, s) and refusal(b, s, "train") is not None})
    lines += ["", "Refused before the model is touched: " + "; ".join(reasons) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"{len(cells())} cells cover every pair of factor values\n")
    print(table())
