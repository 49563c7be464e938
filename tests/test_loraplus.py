"""LoRA+: the B-type factors get ratio x the learning rate, in the helper, the mixin and the CLI."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_peft import (
    AdaLoRA,
    Adapter,
    LoRA,
    PeftConfigError,
    PromptTuning,
    apply_peft,
    create_loraplus_optimizer,
    loraplus_param_groups,
)
from tests.helpers import tiny_bert


def _stacked():
    model = tiny_bert()
    apply_peft(model, [PromptTuning(num_virtual_tokens=3), LoRA(r=4, target_modules=["query", "value"]),
                       AdaLoRA(init_r=4, target_r=2, target_modules=["key"]), Adapter(bottleneck=4)],
               unfreeze=["classifier"])
    return model


def test_groups_hold_exactly_the_b_factors_at_ratio_times_lr():
    model = _stacked()
    groups = loraplus_param_groups(model, lr=1e-3, ratio=16, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["loraplus_a", "loraplus_b"]
    a, b = groups
    assert a["lr"] == 1e-3 and b["lr"] == pytest.approx(16e-3)
    assert a["weight_decay"] == b["weight_decay"] == 0.01
    name_of = {id(p): n for n, p in model.named_parameters()}
    b_names = {name_of[id(p)] for p in b["params"]}
    a_names = {name_of[id(p)] for p in a["params"]}
    expected_b = {n for n, p in model.named_parameters()
                  if p.requires_grad and n.rpartition(".")[2] in ("lora_B", "adalora_B", "adapter_up")}
    assert b_names == expected_b
    assert len([n for n in b_names if n.endswith(".lora_B")]) == 4  # query, value x 2 layers
    assert any(n.endswith("adalora_B") for n in b_names) and any(n.endswith("adapter_up") for n in b_names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert a_names | b_names == trainable and not a_names & b_names
    assert any("classifier" in n for n in a_names) and any(n.endswith("lora_A") for n in a_names)


def test_b_factors_step_ratio_times_further_with_sgd():
    torch.manual_seed(0)
    model = tiny_bert()
    apply_peft(model, [LoRA(r=4, target_modules=["query"], init_weights=False)])
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, ratio=4)
    x = torch.randint(0, 100, (2, 6))
    model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in model.named_parameters():
        if n in before:
            lr = 0.4 if n.endswith("lora_B") else 0.1
            torch.testing.assert_close(p.detach(), before[n] - lr * grads[n])


def test_lora_factors_split_as_peft_splits_them():
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    ours = tiny_bert()
    apply_peft(ours, [LoRA(r=4, target_modules=["query", "value"])])
    ref = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    ref_opt = peft_loraplus(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8)
    ref_lr = {}
    for n, p in ref.named_parameters():
        for g in ref_opt.param_groups:
            if any(p is q for q in g["params"]):
                ref_lr[re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", n).removeprefix("base_model.model.")] = g["lr"]
    ours_lr = {}
    for g in loraplus_param_groups(ours, lr=1e-3, ratio=8):
        for p in g["params"]:
            n = next(k for k, q in ours.named_parameters() if q is p)
            layer, _, leaf = n.partition(".adapters.")
            ours_lr[f"{layer}.{leaf.rpartition('.')[2]}"] = g["lr"]
    lora_keys = {k for k in ref_lr if k.endswith(("lora_A", "lora_B"))}
    assert lora_keys and {k: ref_lr[k] for k in lora_keys} == {k: ours_lr[k] for k in lora_keys}


def test_bad_ratio_and_a_stack_without_b_factors_are_refused():
    model = tiny_bert()
    apply_peft(model, [PromptTuning(num_virtual_tokens=2)])
    with pytest.raises(PeftConfigError, match=r"loraplus_lr_ratio=0 .*expected a number > 0"):
        loraplus_param_groups(model, lr=1e-3, ratio=0)
    with pytest.raises(PeftConfigError, match=r"loraplus_lr_ratio=16 needs a strategy with B-type factors.*prompt"):
        loraplus_param_groups(model, lr=1e-3, ratio=16)


def test_mixin_and_cli_option_build_the_groups(tmp_path):
    pytest.importorskip("lightning")
    from lightning_peft.cli.command import run_cli
    from tests.tiny_hf import tiny_bert_dir

    path = tiny_bert_dir(tmp_path)
    cli = run_cli([
        "--model=lightning_peft.tasks.SequenceClassification", f"--model.model_name_or_path={path}",
        "--model.strategies=[{class_path: LoRA, init_args: {r: 4, target_modules: [query, value]}}]",
        "--model.loraplus_lr_ratio=16", "--model.lr=2e-4", "--data=lightning_peft.data.TextDataModule",
        "--data.train_path=demo:train", "--trainer.accelerator=cpu", "--trainer.logger=false",
    ], run=False)
    model = cli.model
    model.configure_model()
    optimizer = model.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"loraplus_a": 2e-4, "loraplus_b": pytest.approx(32e-4)}
    b = {id(p) for g in optimizer.param_groups if g["name"] == "loraplus_b" for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in b} == {
        n for n, p in model.named_parameters() if n.endswith("lora_B")}
    with pytest.raises(PeftConfigError, match="loraplus_lr_ratio=-1"):
        type(model)(model_name_or_path=path, loraplus_lr_ratio=-1)


def test_mixin_ratio_applies_to_a_user_optimizer_lr(tmp_path):
    pytest.importorskip("lightning")
    from lightning_peft.tasks import SequenceClassification
    from tests.tiny_hf import tiny_bert_dir

    module = SequenceClassification(model_name_or_path=tiny_bert_dir(tmp_path), loraplus_lr_ratio=4,
                                    optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    module.configure_model()
    optimizer = module.configure_optimizers()
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"loraplus_a": 0.5, "loraplus_b": 2.0}
