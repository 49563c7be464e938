"""Selective strategies: exactly which existing parameters train, merge/remove semantics, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert, tiny_llama, token_batch
from torch import nn

from lightning_peft import BitFit, LayerNormTuning, LoRA, PeftConfigError, Unfreeze, apply_peft


def trainable(stack) -> set[str]:
    return {n for n, _ in stack.named_trainable_parameters()}


def test_bitfit_trains_exactly_the_biases():
    model = tiny_bert()
    expected = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    stack = apply_peft(model, [BitFit()])
    assert trainable(stack) == expected
    assert set(stack.adapter_keys()) == expected  # they are in the adapter state / checkpoints
    only_attention = apply_peft(tiny_bert(), [BitFit(modules=r".*attention.*")])
    assert trainable(only_attention) and all("attention" in n for n in trainable(only_attention))


def test_bitfit_with_lora_owns_the_wrapped_bias():
    model = tiny_bert()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["query"]), BitFit()])
    names = trainable(stack)
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in names
    assert not any(".adapters." in n and n.endswith("bias") for n in names)


def test_layernorm_tuning_bert_and_llama():
    bert = tiny_bert()
    expected = {n for n, _ in bert.named_parameters() if "LayerNorm" in n}
    assert trainable(apply_peft(bert, [LayerNormTuning()])) == expected
    llama = tiny_llama()
    names = trainable(apply_peft(llama, [LayerNormTuning()]))
    assert names == {n for n, _ in llama.named_parameters() if "norm" in n}  # RMSNorm gains
    assert len(names) == 2 * 2 + 1
    first_layer = trainable(apply_peft(tiny_bert(), [LayerNormTuning(modules=["layer.0"])]))
    assert first_layer and all(".layer.0." in n for n in first_layer)


def test_unfreeze_by_name_and_regex():
    stack = apply_peft(tiny_bert(), [LoRA(r=2, target_modules=["query"]), Unfreeze(modules=["classifier"])])
    assert {"classifier.weight", "classifier.bias"} <= trainable(stack)
    stack = apply_peft(tiny_bert(), [Unfreeze(modules=r"bert\.pooler\..*")])
    assert trainable(stack) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    stack = apply_peft(tiny_bert(), [Unfreeze(modules=["bert.embeddings.word_embeddings.weight"])])
    assert trainable(stack) == {"bert.embeddings.word_embeddings.weight"}


def test_merge_leaves_and_remove_restores_values():
    model = tiny_bert()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stack = apply_peft(
        model, [LoRA(r=2, target_modules=["query"]), BitFit(), Unfreeze(modules=["classifier"])]
    )
    ids = token_batch(2, 6)
    opt = torch.optim.SGD(stack.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
    trained_bias = model.classifier.bias.detach().clone()
    assert not torch.equal(trained_bias, original["classifier.bias"])
    out = model(input_ids=ids).logits
    stack.merge()
    assert torch.equal(model.classifier.bias, trained_bias)  # nothing to fold: left as it is
    assert torch.allclose(model(input_ids=ids).logits, out, atol=1e-5)
    stack.unmerge()
    stack.remove()
    state = model.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.allclose(state[k], original[k], atol=1e-6) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_quantized_selection_is_refused():
    from lightning_peft.quantization import Quantization, quantize_model

    model = tiny_llama()
    quantize_model(model, Quantization("nf4"))
    with pytest.raises(PeftConfigError, match="quantized"):
        apply_peft(model, [Unfreeze(modules=["q_proj"])])


def test_errors():
    with pytest.raises(PeftConfigError, match="no bias parameter"):
        apply_peft(tiny_llama(), [BitFit()])
    with pytest.raises(PeftConfigError, match="no LayerNorm/RMSNorm"):
        apply_peft(nn.Sequential(nn.Linear(2, 2)), [LayerNormTuning()])
    with pytest.raises(PeftConfigError, match="modules='head' matched no module"):
        apply_peft(tiny_bert(), [Unfreeze(modules="head")])
    with pytest.raises(PeftConfigError, match="modules=''"):
        Unfreeze()
    with pytest.raises(PeftConfigError, match="modules=\\[\\] is empty"):
        BitFit(modules=[])
