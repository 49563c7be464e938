"""Regression tests for defects found by trying the package as a new user (each failed before its fix)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_peft import Adapter, LoRA, Unfreeze, apply_peft
from tests.helpers import (
    ClassifierModule,
    classification_data,
    loader,
    tiny_bert,
    tiny_llama,
    token_batch,
    trainer,
)


def test_bf16_autocast_with_lora_dropout_on_cpu():
    """bf16-mixed on the CPU crashed with dropout in (0, 0.25] (a sparse kernel without bf16 support)."""
    model = tiny_llama()
    apply_peft(model, [LoRA(r=4, dropout=0.05, target_modules="all-linear", init_weights=False)])
    model.train()
    x = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bf16_mixed_trainer_fits_with_lora_dropout(tmp_path):
    from lightning_peft.callbacks import PEFT

    module = ClassifierModule(model=tiny_bert())
    t = trainer(tmp_path, max_steps=3, precision="bf16-mixed",
                callbacks=[PEFT([LoRA(r=4, dropout=0.1, target_modules=["query", "value"])], unfreeze=["classifier"],
                                model_attr="model")])
    t.fit(module, loader(classification_data(n=16)))
    assert torch.isfinite(t.callback_metrics["train_loss"])


def _graph_breaks(model, x) -> int:
    import torch._dynamo

    torch._dynamo.reset()

    def step(ids):  # a training step: forward, loss, backward
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    return len(torch._dynamo.explain(step)(x).break_reasons)


@pytest.mark.parametrize(("dropout", "shared"), [(0.0, False), (0.1, False), (0.1, True)])  # 0.0: the fused node
def test_compiled_step_breaks_the_graph_no_more_than_peft(dropout, shared):
    """torch.compile of a step with LoRA dropout broke the graph 27 times (peft: 1) on the CPU."""
    peft = pytest.importorskip("peft")
    x = token_batch()
    ours = tiny_llama()
    apply_peft(ours, [LoRA(r=4, alpha=8, dropout=dropout, target_modules="all-linear", shared_dropout=shared)])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                               target_modules="all-linear"))
    ours_breaks = _graph_breaks(ours.train(), x)
    theirs_breaks = _graph_breaks(theirs.train(), x)
    assert ours_breaks <= theirs_breaks, (ours_breaks, theirs_breaks)


def test_unfreeze_regex_never_takes_a_bottleneck_adapter_of_another_set():
    """selective.py spelled the bottleneck container differently from adapter.py, so Unfreeze took it over."""
    model = tiny_bert()
    first = apply_peft(model, [Adapter(bottleneck=4, target_modules=["attention.output.dense"])], name="a")
    adapter_params = {id(p) for p in first.trainable_parameters()}
    assert len(adapter_params) == 8
    second = apply_peft(model, [Unfreeze(modules=r".*attention\.output.*")], name="b")
    taken = [n for n, p in second.named_trainable_parameters() if id(p) in adapter_params]
    assert not taken, taken
    assert any(n.endswith("output.LayerNorm.weight") for n, _ in second.named_trainable_parameters())


def test_torch_floor_covers_what_the_code_uses():
    """pyproject said torch>=2.2 while the code needs nn.RMSNorm (torch 2.4)."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert floor is not None
    uses_rmsnorm = any("RMSNorm" in p.read_text() for p in (Path(__file__).resolve().parents[1] / "lightning_peft")
                       .rglob("*.py"))
    assert not uses_rmsnorm or (int(floor[1]), int(floor[2])) >= (2, 4)
