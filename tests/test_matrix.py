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

import pytest
import torch

from lightning_peft import (
    IA3,
    AdaLoRA,
    Adapter,
    LoRA,
    PeftConfigError,
    PromptTuning,
    Quantization,
    apply_peft,
    load_adapters,
    merge_and_export,
    quantize_model,
    save_adapters,
)
from tests.helpers import tiny_gpt2, tiny_llama, token_batch
from tests.matrix import REFUSED, Cell, cells, refusal

QUANT = {
    "nf4": Quantization("nf4"), "nf4-dq": Quantization("nf4", double_quant=True), "fp4": Quantization("fp4"),
    "fp4-dq": Quantization("fp4", double_quant=True), "int8": Quantization("int8"),
}
TARGETS = {  # attention, feed-forward, bottleneck-adapter sites, IA3 (targets, feed-forward subset)
    "llama": (["q_proj", "v_proj"], ["up_proj", "down_proj"], ["self_attn.o_proj", "mlp.down_proj"],
              (["k_proj", "v_proj", "down_proj"], ["down_proj"])),
    "gpt2": (["c_attn"], ["mlp.c_fc", "mlp.c_proj"], ["attn.c_proj", "mlp.c_proj"],
             (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])),
}


def family(cell: Cell) -> str:
    return "gpt2" if cell.base == "conv1d" else "llama"


def strategies(cell: Cell) -> list:
    attn, mlp, sites, (ia3_t, ia3_ff) = TARGETS[family(cell)]
    s = cell.strategy
    if s.startswith("lora"):
        return [LoRA(r=4, alpha=8, target_modules=attn + mlp, use_rslora=s == "lora-rslora",
                     dropout=0.1 if s.endswith("dropout") else 0.0, shared_dropout=s == "lora-shared-dropout")]
    if s == "adalora":
        return [AdaLoRA(init_r=4, target_r=2, alpha=8, target_modules=attn + mlp)]
    if s == "ia3":
        return [IA3(target_modules=ia3_t, feedforward_modules=ia3_ff)]
    if s == "adapter":
        return [Adapter(bottleneck=4, target_modules=sites)]
    return [PromptTuning(num_virtual_tokens=4), LoRA(r=4, alpha=8, target_modules=attn),
            AdaLoRA(init_r=4, target_r=2, alpha=8, target_modules=mlp)]


def base_model(cell: Cell, seed: int = 0):
    return (tiny_gpt2 if family(cell) == "gpt2" else tiny_llama)(seed=seed)


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


def logits(model, precision: str, x=None) -> torch.Tensor:
    x = token_batch(2, 8) if x is None else x
    with torch.no_grad(), precision_context(precision):
        return model(input_ids=x).logits.float()


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
    x = token_batch(2, 8)
    with precision_context(cell.precision):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    for strategy, applied in zip(stack.strategies, stack.applied):
        owned = [p for m in applied.modules for p in m.parameters() if p.requires_grad]
        owned += [p for p in applied.parameters if p.requires_grad]
        assert owned and all(p.grad is not None and torch.isfinite(p.grad).all() for p in owned), strategy.name
        assert any(p.grad.abs().sum() > 0 for p in owned), f"no gradient reaches {strategy.name}"
    model.eval()
    ours = logits(model, cell.precision)
    if cell.precision != "fp32":  # reference: the same weights in fp32
        close(ours, logits(build(cell, "fp32")[0], "fp32"), cell.precision)
    else:  # reference: the deltas folded into the (dequantized) base weights
        stack.merge()
        close(logits(model, "fp32"), ours, "fp32", fp32_tol(cell))


def op_merge(cell: Cell, tmp_path) -> None:
    model, stack = build(cell)
    before = logits(model, cell.precision)
    stack.merge()
    close(logits(model, cell.precision), before, cell.precision, fp32_tol(cell))
    stack.unmerge()
    after = logits(model, cell.precision)
    if cell.precision == "fp32":
        close(after, before, "fp32", fp32_tol(cell))
    else:  # bf16 weights: merge then unmerge rounds twice
        close(after, before, cell.precision)


def op_export_merged(cell: Cell, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model, _ = build(cell)
    ours = logits(model, cell.precision)
    with warnings_allowed():
        merge_and_export(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    if cell.strategy == "stack":  # prompts cannot merge: saved beside the model as a peft prompt adapter
        import peft

        reloaded = peft.PeftModel.from_pretrained(reloaded, str(tmp_path / "merged" / "prompt")).eval()
    if cell.precision == "bf16-true":
        assert next(reloaded.parameters()).dtype == torch.bfloat16
    theirs = logits(reloaded, cell.precision)[:, -ours.shape[1]:]  # peft's prompted logits keep virtual rows
    close(theirs, ours, cell.precision, fp32_tol(cell))


def op_peft_load(cell: Cell, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model, _ = build(cell)
    ours = logits(model, cell.precision)
    save_adapters(model, tmp_path / "adapters")
    base = base_model(cell)
    if cell.base in QUANT:
        quantize_model(base, QUANT[cell.base])
    if cell.precision == "bf16-true":
        base.to(torch.bfloat16)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapters")).eval()
    close(logits(theirs, cell.precision), ours, cell.precision, fp32_tol(cell))


def op_reload_renamed(cell: Cell, tmp_path) -> None:
    model, _ = build(cell)
    ours = logits(model, cell.precision)
    save_adapters(model, tmp_path / "adapters")
    fresh = base_model(cell)
    stack = load_adapters(fresh, tmp_path / "adapters", name="other")
    assert stack.name == "other"
    if cell.precision == "bf16-true":
        fresh.to(torch.bfloat16)
    close(logits(fresh.eval(), cell.precision), ours, cell.precision, fp32_tol(cell))


def op_resume(cell: Cell, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft.callbacks import PEFT
    from tests.helpers import CausalLMModule, lm_data, loader, trainer

    data = loader(lm_data(n=8, length=8), batch_size=4)  # 2 steps an epoch: resume at an epoch boundary

    def run(epochs: int, ckpt_path=None, save_dir=None):
        torch.manual_seed(0)
        module = CausalLMModule(model=base_model(cell), lr=1e-2)
        callbacks = [PEFT(strategies(cell), quantize=QUANT.get(cell.base), model_attr="model")]
        if save_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=save_dir, save_last=True))
        t = trainer(tmp_path, max_steps=-1, max_epochs=epochs, precision=cell.precision.replace("fp32", "32-true"),
                    callbacks=callbacks, enable_checkpointing=save_dir is not None)
        t.fit(module, data, ckpt_path=ckpt_path)
        return module, t

    straight, _ = run(2)
    half, first = run(1, save_dir=tmp_path / "ck")
    resumed, _ = run(2, ckpt_path=first.checkpoint_callback.last_model_path)
    a, b, h = ({n: p for n, p in m.named_parameters() if p.requires_grad} for m in (straight, resumed, half))
    assert a.keys() == b.keys() == h.keys() and a
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    assert any(not torch.equal(a[n], h[n]) for n in a)  # the second epoch changed the adapters


OPERATIONS = {
    "train": op_train, "merge": op_merge, "export-merged": op_export_merged, "peft-load": op_peft_load,
    "reload-renamed": op_reload_renamed, "resume": op_resume,
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
    ours = logits(model, cell.precision)
    folder = save_adapters(model, tmp_path / "adapters")
    assert not (folder / "adapter_config.json").exists()
    fresh = base_model(cell)
    load_adapters(fresh, folder)
    if cell.precision == "bf16-true":
        fresh.to(torch.bfloat16)
    close(logits(fresh.eval(), cell.precision), ours, cell.precision, fp32_tol(cell))


def refused(cell: Cell, tmp_path, reason: str) -> None:
    """The PeftConfigError comes before anything is written or changed."""
    assert cell.operation == "export-merged", "only merge_and_export refuses so far"
    model, _ = build(cell)
    before = logits(model, cell.precision)
    with pytest.raises(PeftConfigError, match=r"cannot be folded into the base weights.*save_adapters"):
        merge_and_export(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert torch.equal(logits(model, cell.precision), before)
    assert reason.startswith("a bottleneck adapter cannot be folded")


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
    names = list(FACTORS)
    for a, b in combinations(names, 2):
        want = {(x, y) for x in FACTORS[a] for y in FACTORS[b]}
        got = {(getattr(c, a), getattr(c, b)) for c in chosen}
        assert want <= got, (a, b, want - got)


def test_readme_table_is_generated_from_the_matrix() -> None:
    from pathlib import Path

    from tests.matrix import table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table() in readme, "regenerate the README table with: python -m tests.matrix"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed and CUDA bitsandbytes need a CUDA device")
@pytest.mark.parametrize("strategy", ["lora", "adalora", "ia3", "stack"])
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

