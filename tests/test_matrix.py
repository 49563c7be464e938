"""The combination matrix (see tests/matrix.py): every covered cell works and agrees with a reference, or is
refused with a PeftConfigError before the model is touched.

Tolerances, all on logits, relative to their largest magnitude:
- fp32: 1e-5. A merge on a quantized base dequantizes the very weights the quantized forward dequantizes
  (bitsandbytes computes ``x @ dequantize(W).T`` in the compute dtype), so a merged 4-/8-bit layer differs from
  the adapted one by float rounding only; the dequantization error itself (against the unquantized model) is
  not part of the comparison, and 1e-5 is asserted there too. Except int8: LLM.int8() also quantizes each row of
  the layer's *input* to int8 (absmax / 127), which a merged full-precision layer does not, so a merged int8
  base differs by that activation rounding (up to 1/254 of a row's largest value per element): 2e-2.
- bf16 (``bf16-true`` and ``bf16-mixed``): 4e-2 against the same model in fp32. bf16 keeps 8 bits of mantissa
  (relative rounding 2^-9 = 2e-3 per operation); a 2-layer model's logits accumulate a few dozen roundings.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from lightning_peft import (
    IA3,
    MAM,
    AdaLoRA,
    Adapter,
    LoRA,
    PeftConfigError,
    PrefixTuning,
    PromptTuning,
    Quantization,
    UniPELT,
    apply_peft,
    load_adapters,
    merge_and_export,
    quantize_model,
    save_adapters,
)
from tests.helpers import tiny_gpt2, tiny_llama, tiny_vit, token_batch
from tests.matrix import REFUSED, Cell, applicable, cells, refusal

QUANT = {
    "nf4": Quantization("nf4"), "nf4-dq": Quantization("nf4", double_quant=True), "fp4": Quantization("fp4"),
    "fp4-dq": Quantization("fp4", double_quant=True), "int8": Quantization("int8"),
}
TARGETS = {  # attention, feed-forward, bottleneck-adapter sites, IA3 (targets, feed-forward subset)
    "llama": (["q_proj", "v_proj"], ["up_proj", "down_proj"], ["self_attn.o_proj", "mlp.down_proj"],
              (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    "gpt2": (["c_attn"], ["mlp.c_fc", "mlp.c_proj"], ["attn.c_proj", "mlp.c_proj"],
             (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])),
    "vit": (["q_proj", "v_proj"], ["fc1", "fc2"], None, (["k_proj", "v_proj", "fc2"], ["fc2"])),
}
#: the embedding or conv a layer-level strategy adapts besides the linears, on those bases
EXTRA = {"embedding": ["embed_tokens"], "conv2d": ["patch_embeddings.projection"]}
LORA_VARIANTS = {"lora-rslora": dict(use_rslora=True), "lora-dropout": dict(dropout=0.1),
                 "lora-shared-dropout": dict(dropout=0.1, shared_dropout=True), "lora-dora": dict(use_dora=True),
                 "lora-pissa": dict(init_weights="pissa"), "lora-loftq": dict(init_weights="loftq"),
                 "lora-gated": dict(gate=True)}


def family(cell: Cell) -> str:
    return {"conv1d": "gpt2", "conv2d": "vit"}.get(cell.base, "llama")


def strategies(cell: Cell) -> list:
    attn, mlp, sites, (ia3_t, ia3_ff) = TARGETS[family(cell)]
    extra = EXTRA.get(cell.base, [])
    s = cell.strategy
    if s.startswith("lora"):
        return [LoRA(r=4, alpha=8, target_modules=attn + mlp + extra, **LORA_VARIANTS.get(s, {}))]
    if s == "adalora":
        return [AdaLoRA(init_r=4, target_r=2, alpha=8, target_modules=attn + mlp + extra)]
    if s == "ia3":
        return [IA3(target_modules=ia3_t + extra, feedforward_modules=ia3_ff)]
    if s == "adapter":
        return [Adapter(bottleneck=4, target_modules=sites)]
    if s == "adapter-parallel":  # beside the attention and MLP blocks: the defaults per model type
        return [Adapter(bottleneck=4, placement="parallel", scaling="learned")]
    if s == "prefix":
        return [PrefixTuning(num_virtual_tokens=4, projection=8)]
    if s == "mam":
        return MAM(num_virtual_tokens=4, projection=8, bottleneck=4)
    if s == "unipelt":
        return UniPELT(r=4, alpha=8, lora_targets=attn, num_virtual_tokens=4, projection=8, bottleneck=4)
    return [PromptTuning(num_virtual_tokens=4), LoRA(r=4, alpha=8, target_modules=attn + extra),
            AdaLoRA(init_r=4, target_r=2, alpha=8, target_modules=mlp)]


def base_model(cell: Cell, seed: int = 0):
    return {"gpt2": tiny_gpt2, "vit": tiny_vit, "llama": tiny_llama}[family(cell)](seed=seed)


def inputs(cell: Cell, precision: str | None = None) -> dict:
    """The model's inputs (token ids, or images for the ViT), in the dtype a bf16-true model expects."""
    if family(cell) != "vit":
        return {"input_ids": token_batch(2, 8)}
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixels.to(torch.bfloat16) if (precision or cell.precision) == "bf16-true" else pixels}


def labels(cell: Cell, batch: dict) -> torch.Tensor:
    return torch.tensor([0, 2]) if family(cell) == "vit" else batch["input_ids"]


def build(cell: Cell, precision: str | None = None):
    """The base model with the cell's stack, every trainable tensor moved off its identity init (seeded), in
    the cell's precision (``bf16-true``: the whole model cast after applying, as Lightning does)."""
    model = base_model(cell)
    stack = apply_peft(model, strategies(cell), quantize=QUANT.get(cell.base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
    if (precision or cell.precision) == "bf16-true":
        model.to(torch.bfloat16)
    return model.eval(), stack


def precision_context(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast("cpu", dtype=torch.float16)
    return contextlib.nullcontext()


def logits(model, precision: str, cell: Cell) -> torch.Tensor:
    with torch.no_grad(), precision_context(precision):
        return model(**inputs(cell, precision)).logits.float()


def close(a: torch.Tensor, b: torch.Tensor, precision: str, fp32_tol: float = 1e-5) -> None:
    tol = fp32_tol if precision == "fp32" else 4e-2
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
    assert err <= tol, f"relative logits error {err:.2e} > {tol:g} ({precision})"


def fp32_tol(cell: Cell) -> float:
    return 2e-2 if cell.base == "int8" else 1e-5


# -- operations ----------------------------------------------------------------------------------------------
def op_train(cell: Cell, tmp_path) -> None:
    model, stack = build(cell)
    model.train()
    batch = inputs(cell)
    with precision_context(cell.precision):
        loss = model(**batch, labels=labels(cell, batch)).loss
    loss.backward()
    assert torch.isfinite(loss)
    for strategy, applied in zip(stack.strategies, stack.applied):
        owned = [p for m in applied.modules for p in m.parameters() if p.requires_grad]
        owned += [p for p in applied.parameters if p.requires_grad]
        assert owned and all(p.grad is not None and torch.isfinite(p.grad).all() for p in owned), strategy.name
        assert any(p.grad.abs().sum() > 0 for p in owned), f"no gradient reaches {strategy.name}"
    model.eval()
    ours = logits(model, cell.precision, cell)
    if cell.precision != "fp32":  # reference: the same weights in fp32
        close(ours, logits(build(cell, "fp32")[0], "fp32", cell), cell.precision)
    elif any(getattr(s, "gate", False) for s in stack.strategies):  # cannot merge: each gated layer by hand
        with gated_by_hand(model):
            close(logits(model, "fp32", cell), ours, "fp32", fp32_tol(cell))
    else:  # reference: the deltas folded into the (dequantized) base weights
        stack.merge()
        close(logits(model, "fp32", cell), ours, "fp32", fp32_tol(cell))


@contextlib.contextmanager
def gated_by_hand(model):
    """Every gated LoRA layer computed by hand from its (dequantized) base weight: ``x W^T + b + sigmoid(x w^T + c)
    * (x A^T B^T) * scaling``."""
    from lightning_peft.core.backend import base_weight
    from lightning_peft.core.gate import GatedDelta
    from lightning_peft.core.layer import AdaptedLayer

    def reference(layer):
        w, b = base_weight(layer.base_layer).float(), layer.bias
        (d,) = layer.deltas("default")
        lora, gate = d.inner, d.gate

        def forward(x, *args, **kwargs):
            g = torch.sigmoid(x @ gate.weight.T + gate.bias)
            y = x @ w.T + (0.0 if b is None else b.float())
            return y + g * (x @ lora.lora_A.T @ lora.lora_B.T) * lora.scaling

        return forward

    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)
              and any(isinstance(d, GatedDelta) for d in m.deltas("default"))]
    assert layers
    for layer in layers:
        layer.forward = reference(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def op_merge(cell: Cell, tmp_path) -> None:
    model, stack = build(cell)
    before = logits(model, cell.precision, cell)
    stack.merge()
    close(logits(model, cell.precision, cell), before, cell.precision, fp32_tol(cell))
    stack.unmerge()
    after = logits(model, cell.precision, cell)
    if cell.precision == "fp32":
        close(after, before, "fp32", fp32_tol(cell))
    else:  # bf16 weights: merge then unmerge rounds twice
        close(after, before, cell.precision)


def op_export_merged(cell: Cell, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    model, _ = build(cell)
    ours = logits(model, cell.precision, cell)
    with warnings_allowed():
        merge_and_export(model, tmp_path / "merged")
    auto = AutoModelForImageClassification if family(cell) == "vit" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path / "merged").eval()
    if cell.strategy in ("stack", "prefix"):  # prompts / prefixes cannot merge: saved beside it as a peft adapter
        import peft

        reloaded = peft.PeftModel.from_pretrained(reloaded, str(tmp_path / "merged" / "prompt")).eval()
    if cell.precision == "bf16-true":
        assert next(reloaded.parameters()).dtype == torch.bfloat16
    theirs = logits(reloaded, cell.precision, cell)[:, -ours.shape[1]:]  # peft's prompted logits keep virtual rows
    close(theirs, ours, cell.precision, fp32_tol(cell))


def op_peft_load(cell: Cell, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model, _ = build(cell)
    ours = logits(model, cell.precision, cell)
    save_adapters(model, tmp_path / "adapters")
    base = base_model(cell)
    if cell.base in QUANT:
        quantize_model(base, QUANT[cell.base])
    if cell.precision == "bf16-true":
        base.to(torch.bfloat16)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapters")).eval()
    close(logits(theirs, cell.precision, cell), ours, cell.precision, fp32_tol(cell))


def op_peft_import(cell: Cell, tmp_path) -> None:
    """Ours -> peft -> peft's save_pretrained -> load_adapters: the logits are ours again."""
    peft = pytest.importorskip("peft")
    model, _ = build(cell)
    ours = logits(model, cell.precision, cell)
    save_adapters(model, tmp_path / "adapters")
    theirs = peft.PeftModel.from_pretrained(base_model(cell), str(tmp_path / "adapters"))
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert not (tmp_path / "peft" / "lightning_peft.json").exists()
    fresh = base_model(cell)
    if cell.base in QUANT:
        quantize_model(fresh, QUANT[cell.base])
    load_adapters(fresh, tmp_path / "peft")
    if cell.precision == "bf16-true":
        fresh.to(torch.bfloat16)
    close(logits(fresh.eval(), cell.precision, cell), ours, cell.precision, fp32_tol(cell))


def op_reload_renamed(cell: Cell, tmp_path) -> None:
    model, _ = build(cell)
    ours = logits(model, cell.precision, cell)
    save_adapters(model, tmp_path / "adapters")
    fresh = base_model(cell)
    stack = load_adapters(fresh, tmp_path / "adapters", name="other")
    assert stack.name == "other"
    if cell.precision == "bf16-true":
        fresh.to(torch.bfloat16)
    close(logits(fresh.eval(), cell.precision, cell), ours, cell.precision, fp32_tol(cell))


def ImageClassifierModule(model, lr: float):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            pixels, target = batch
            return self.model(pixel_values=pixels, labels=target).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    return Module()


def op_resume(cell: Cell, tmp_path) -> None:
    from torch.utils.data import TensorDataset

    from lightning_peft.callbacks import PEFT
    from tests.helpers import CausalLMModule, lm_data, loader, straight_and_resumed

    if family(cell) == "vit":  # images and class labels
        g = torch.Generator().manual_seed(0)
        dataset = TensorDataset(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g))
        module_cls = ImageClassifierModule
    else:
        dataset, module_cls = lm_data(n=8, length=8), CausalLMModule
    data = loader(dataset, batch_size=4)  # 2 steps an epoch: resume at an epoch boundary

    straight, resumed, half, _ = straight_and_resumed(
        tmp_path, lambda: module_cls(model=base_model(cell), lr=1e-2),
        lambda: [PEFT(strategies(cell), quantize=QUANT.get(cell.base), model_attr="model")], data,
        precision=cell.precision.replace("fp32", "32-true"))
    a, b, h = ({n: p for n, p in m.named_parameters() if p.requires_grad} for m in (straight, resumed, half))
    assert a.keys() == b.keys() == h.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    assert any(not torch.equal(a[n], h[n]) for n in a)  # the second epoch changed the adapters


def op_mixed_batch(cell: Cell, tmp_path) -> None:
    """Two sets of the cell's strategies (one when it rewrites the base: PiSSA, LoftQ) and base rows in one
    forward: each row equals that row alone under its own set, or the base (prompt rows: no base rows)."""
    from lightning_peft import activate, disable_adapters, mixed_batch

    model, stack = build(cell)
    names = ["default", "__base__", "default", "__base__"]
    if not any(s.changes_base for s in stack.strategies):  # a second set, with other values
        other = apply_peft(model, strategies(cell), quantize=QUANT.get(cell.base), name="b")
        with torch.no_grad():
            for p in other.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)).to(p.dtype) * 0.2)
        if cell.precision == "bf16-true":
            model.to(torch.bfloat16)
        names = ["default", "__base__", "b", "default"]
    if cell.strategy == "stack":  # rows with and without virtual tokens cannot share a forward
        with pytest.raises(PeftConfigError, match="as many virtual tokens"), mixed_batch(model, names):
            pass
        names = [n if n != "__base__" else "b" for n in names]
    batch = {k: torch.cat([v, v.flip(0)]) for k, v in inputs(cell).items()}  # 4 rows
    with torch.no_grad(), precision_context(cell.precision):
        mixed = model(**batch, adapter_names=names).logits.float()
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            with disable_adapters(model) if name == "__base__" else contextlib.nullcontext():
                if name != "__base__":
                    activate(model, name)
                close(mixed[i : i + 1], model(**row).logits.float(), cell.precision, fp32_tol(cell))


OPERATIONS = {
    "train": op_train, "merge": op_merge, "export-merged": op_export_merged, "peft-load": op_peft_load,
    "peft-import": op_peft_import, "reload-renamed": op_reload_renamed, "resume": op_resume,
    "mixed-batch": op_mixed_batch,
}


@contextlib.contextmanager
def warnings_allowed():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def native_only(cell: Cell, tmp_path) -> None:
    """No ``peft`` files are written (so ``peft`` cannot half-load the folder); the native files load back."""
    model, _ = build(cell)
    ours = logits(model, cell.precision, cell)
    folder = save_adapters(model, tmp_path / "adapters")
    if cell.strategy == "mam":  # peft's files hold the prefix alone (peft has no bottleneck adapter)
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    else:
        assert not (folder / "adapter_config.json").exists()
    fresh = base_model(cell)
    load_adapters(fresh, folder)
    if cell.precision == "bf16-true":
        fresh.to(torch.bfloat16)
    close(logits(fresh.eval(), cell.precision, cell), ours, cell.precision, fp32_tol(cell))


#: what the PeftConfigError of each refusal in tests/matrix.py says
REFUSAL_ERRORS = {
    "a bottleneck adapter cannot be folded": r"cannot be folded into the base weights.*save_adapters",
    "DoRA, the PiSSA and LoftQ inits": r"matches '[\w.]+' \((Embedding|Conv2d)\), which \w+(\(.*\))? cannot adapt: it "
                                       r"adapts linear layers only",
    "LoftQ fits the adapter": r"init_weights='loftq' cannot initialize .* is not quantized by this apply_peft call",
    "a gated LoRA depends on the input": r"a gated (delta|update) depends on the input",
    "a mixed-adapter batch cannot hold a prefix": r"holds PrefixTuning, an input-level strategy that mixed batches do "
                                                   r"not know",
}
#: the refusals raised while applying (the others come from merging an applied stack)
APPLY_TIME = ("DoRA, the PiSSA and LoftQ inits", "LoftQ fits the adapter")


def refused(cell: Cell, tmp_path, reason: str) -> None:
    """The PeftConfigError comes before anything is written or changed."""
    (pattern,) = [v for k, v in REFUSAL_ERRORS.items() if reason.startswith(k)]
    if cell.operation == "mixed-batch" and not reason.startswith(APPLY_TIME):  # refused when the batch is routed
        model, _ = build(cell)
        apply_peft(model, strategies(cell), quantize=QUANT.get(cell.base), name="b")
        if cell.precision == "bf16-true":
            model.to(torch.bfloat16)
        batch = {k: torch.cat([v, v]) for k, v in inputs(cell).items()}
        with torch.no_grad():
            before = model(**batch).logits
            with pytest.raises(PeftConfigError, match=pattern):
                model(**batch, adapter_names=["default", "b", "__base__", "b"])
            assert torch.equal(model(**batch).logits, before)
        return
    if reason.startswith(APPLY_TIME):
        model = base_model(cell)  # refused while applying: the model stays as it was
        before = {k: v.clone() for k, v in model.state_dict().items()}
        modules = [type(m) for m in model.modules()]
        with pytest.raises(PeftConfigError, match=pattern):
            build(cell)  # builds its own model: check this one with the same strategies
        with pytest.raises(PeftConfigError, match=pattern):
            apply_peft(model, strategies(cell), quantize=QUANT.get(cell.base))
        assert [type(m) for m in model.modules()] == modules
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        return
    model, stack = build(cell)
    before = logits(model, cell.precision, cell)
    if cell.operation == "merge":
        with pytest.raises(PeftConfigError, match=pattern):
            stack.merge()
        assert not stack.merged
    else:
        with pytest.raises(PeftConfigError, match=pattern):
            merge_and_export(model, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
    assert torch.equal(logits(model, cell.precision, cell), before)


@pytest.mark.parametrize("cell", cells(), ids=lambda c: c.id)
def test_cell(cell: Cell, tmp_path) -> None:
    reason = refusal(cell.base, cell.strategy, cell.operation)
    if reason is None:
        OPERATIONS[cell.operation](cell, tmp_path)
    elif reason[0] == REFUSED:
        refused(cell, tmp_path, reason[1])
    else:
        native_only(cell, tmp_path)


def test_covering_array_covers_every_pair() -> None:
    from itertools import combinations

    from tests.matrix import FACTORS

    chosen = cells()
    assert all(applicable(c.base, c.strategy) for c in chosen)
    names = list(FACTORS)
    for a, b in combinations(names, 2):
        want = {(x, y) for x in FACTORS[a] for y in FACTORS[b]}
        if (a, b) == ("base", "strategy"):
            want = {(x, y) for x, y in want if applicable(x, y)}
        got = {(getattr(c, a), getattr(c, b)) for c in chosen}
        assert want <= got, (a, b, want - got)


def test_readme_table_is_generated_from_the_matrix() -> None:
    from pathlib import Path

    from tests.matrix import table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table() in readme, "regenerate the README table with: python -m tests.matrix"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed and CUDA bitsandbytes need a CUDA device")
@pytest.mark.parametrize("strategy", ["lora", "lora-dora", "adalora", "ia3", "stack"])
@pytest.mark.parametrize("base", ["linear", "nf4", "int8"])
def test_cuda_cells(base: str, strategy: str) -> None:
    """16-mixed (fp16 autocast) on CUDA: forward and backward reach every strategy; logits agree with fp32."""
    cell = Cell(base, strategy, "fp32", "train")
    model, stack = build(cell)
    model.cuda().train()
    x = token_batch(2, 8).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in stack.trainable_parameters())
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        half = model(input_ids=x).logits.float()
    with torch.no_grad():
        full = model(input_ids=x).logits.float()
    close(half, full, "16-mixed")

