"""Agreement with Hugging Face PEFT's LoRA, the reference implementation."""

import copy

import pytest
import torch
from helpers import save_and_reload, tiny_bert, tiny_gpt2, tiny_llama, token_batch

from lightning_peft import LoRA, apply_peft

peft = pytest.importorskip("peft")


def _peft_lora(model, targets, task_type, r=4, alpha=8, use_rslora=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False, task_type=task_type, use_rslora=use_rslora)
    return peft.get_peft_model(model, cfg)


def _copy_ab(peft_model, stack):
    named = dict(peft_model.named_parameters())
    for layer_name in stack.applied[0].targets:
        delta = stack.model.get_submodule(layer_name).adapters["default"]["lora"]
        key = f"base_model.model.{layer_name}"
        with torch.no_grad():
            delta.lora_A.copy_(named[f"{key}.lora_A.default.weight"])
            delta.lora_B.copy_(named[f"{key}.lora_B.default.weight"])


CASES = [
    ("llama", tiny_llama, ["q_proj", "v_proj"], "CAUSAL_LM", False),
    ("llama-rslora", tiny_llama, "all-linear", "CAUSAL_LM", True),
    ("bert", tiny_bert, ["query", "value", "dense"], "SEQ_CLS", False),
    ("gpt2-conv1d", tiny_gpt2, ["c_attn", "c_proj"], "CAUSAL_LM", False),
]


@pytest.mark.parametrize(("label", "build", "targets", "task", "rslora"), CASES, ids=[c[0] for c in CASES])
def test_logits_match_peft(tmp_path, label, build, targets, task, rslora):
    base, _ = save_and_reload(build(), tmp_path)
    ours_model = copy.deepcopy(base)
    ref = _peft_lora(base, targets, task, use_rslora=rslora).eval()
    stack = apply_peft(ours_model, [LoRA(r=4, alpha=8, target_modules=targets, use_rslora=rslora)])
    assert sorted(stack.applied[0].targets) == sorted(ref.targeted_module_names)
    _copy_ab(ref, stack)
    x = token_batch()
    with torch.no_grad():
        expected = ref(input_ids=x).logits
        got = ours_model(input_ids=x).logits
    diff = (expected - got).abs().max().item()
    print(f"{label}: max |ours - peft| = {diff:.2e}")
    assert diff <= 1e-5
    with torch.no_grad(), stack.disable_adapters():
        plain = ours_model(input_ids=x).logits
    assert (plain - got).abs().max().item() > 1e-3  # the copied adapters really change the output

    # merge / unmerge / merge again reproduce the adapted output
    for _ in range(2):
        stack.merge()
        with torch.no_grad():
            merged = ours_model(input_ids=x).logits
        assert (merged - got).abs().max().item() <= 1e-5
        stack.unmerge()
        with torch.no_grad():
            assert (ours_model(input_ids=x).logits - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("build", "task"), [(tiny_llama, "CAUSAL_LM"), (tiny_bert, "SEQ_CLS"), (tiny_gpt2, "CAUSAL_LM")])
def test_all_linear_selects_same_modules_as_peft(build, task):
    base = build()
    ours = apply_peft(copy.deepcopy(base), [LoRA(target_modules="all-linear")])
    ref = _peft_lora(base, "all-linear", task)
    assert sorted(ours.applied[0].targets) == sorted(ref.targeted_module_names)
