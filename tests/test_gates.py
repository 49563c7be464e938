"""UniPELT gates (lightning_peft.core.gate, Gated): the math against a hand-written reference, what they refuse
(non-additive strategies, DoRA, merge, peft export, arithmetic), and that everything touching deltas still works
with a gated one (AdaLoRA's allocator, LoRA+, save/load, mixed batches, nf4 and bf16 autocast)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_mixed_rows_match, tiny_llama, token_batch

from lightning_peft import (
    IA3,
    AdaLoRA,
    Adapter,
    BitFit,
    LoRA,
    PeftConfigError,
    PromptTuning,
    Quantization,
    apply_peft,
    combine_adapter_sets,
    load_adapters,
    loraplus_param_groups,
    merge_and_export,
    save_adapters,
)
from lightning_peft.core.gate import GATE_INIT_STD, Gate, GatedDelta
from lightning_peft.methods import AdaLoRADelta, Gated, LoRADelta, Unfreeze
from lightning_peft.methods.adalora import adalora_deltas, orthogonal_regularization


def randomize(stack, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def gated_lora(**kwargs) -> LoRA:
    return Gated(LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], **kwargs))


def test_gate_init_and_shape():
    torch.manual_seed(0)
    gate = Gate(512)
    assert gate.bias.item() == 0.0
    assert abs(gate.weight.std().item() - GATE_INIT_STD) < 0.005
    x = torch.randn(2, 5, 512)
    g = gate(x)
    assert g.shape == (2, 5, 1)
    torch.testing.assert_close(g, torch.sigmoid(x @ gate.weight.T + gate.bias))


def test_gated_lora_is_base_plus_gate_times_lora_by_hand():
    model = tiny_llama()
    stack = apply_peft(model, [gated_lora(init_weights=False)])
    assert stack.strategies[0].gate is True
    layer = model.model.layers[0].self_attn.q_proj
    delta = layer.adapters["default"]["lora"]
    assert isinstance(delta, GatedDelta) and isinstance(delta.inner, LoRADelta)
    lora, gate = delta.inner, delta.gate
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        g = torch.sigmoid(x @ gate.weight.T + gate.bias)  # per token: (2, 5, 1)
        expected = x @ layer.base_layer.weight.T + g * ((x @ lora.lora_A.T @ lora.lora_B.T) * 2.0)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
        # per token: a token's output does not depend on the others (cached generation computes the same)
        torch.testing.assert_close(layer(x[:, 2:3]), expected[:, 2:3], rtol=0, atol=1e-6)


def test_gated_lora_starts_as_the_base_model_and_trains_the_gate():
    model, base = tiny_llama(), tiny_llama()
    stack = apply_peft(model, [gated_lora()])
    x = token_batch(2, 8)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)
    randomize(stack)
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    gates = [p for n, p in model.named_parameters() if n.endswith("lora.gate.weight")]
    assert len(gates) == 6 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)


def test_gated_adalora_by_hand_and_its_allocator_finds_the_deltas():
    from lightning_peft import RankAllocator

    model = tiny_llama()
    stack = apply_peft(model, [Gated(AdaLoRA(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"]))])
    randomize(stack)
    deltas = adalora_deltas(model)
    assert len(deltas) == 4 and all(type(d) is AdaLoRADelta for d in deltas.values())
    layer = model.model.layers[1].self_attn.v_proj
    gated = layer.adapters["default"]["adalora"]
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        g = torch.sigmoid(x @ gated.gate.weight.T + gated.gate.bias)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + g * gated.inner(x), rtol=0, atol=1e-6)
    allocator = RankAllocator.from_model(model, tinit=0, tfinal=0, delta_t=1, total_step=2)
    model.train()
    ids = token_batch(2, 8)
    loss = model(input_ids=ids, labels=ids).loss + orthogonal_regularization(model)
    loss.backward()
    allocator.step(1)
    assert sum(d.rank for d in deltas.values()) < 16  # the budget fell below 4 x init_r: triplets were pruned


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (IA3(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
         "Gated(IA3(...)) is not supported: IA3 scales the layer's activations"),
        (PromptTuning(num_virtual_tokens=2), "Gated(PromptTuning(...)) is not supported: PromptTuning prepends"),
        (BitFit(), "Gated(BitFit(...)) is not supported: BitFit trains the base model's own biases"),
        (Unfreeze(modules=["lm_head"]), "Gated(Unfreeze(...)) is not supported"),
        (LoRA(use_dora=True), "Gated(LoRA(use_dora=True)) is not supported: DoRA rescales the base weight"),
    ],
)
def test_gated_refuses_non_additive_strategies(strategy, message):
    with pytest.raises(PeftConfigError, match=re.escape(message) + ".*gates apply to AdaLoRA, Adapter, LoRA"):
        Gated(strategy)


def test_gated_returns_a_copy_and_gate_field_refusals():
    lora = LoRA(r=4)
    assert Gated(lora) == LoRA(r=4, gate=True) and lora.gate is False
    assert Gated(Adapter(bottleneck=4)).gate and Gated(AdaLoRA(init_r=4, target_r=2)).gate
    with pytest.raises(PeftConfigError, match=r"use_dora=True with gate=True is not supported: DoRA rescales"):
        LoRA(use_dora=True, gate=True)
    with pytest.raises(PeftConfigError, match=r"gate=True with init_weights='pissa' is not supported"):
        LoRA(init_weights="pissa", gate=True)
    for cls in (LoRA, AdaLoRA):
        with pytest.raises(PeftConfigError, match=r"gate=1 is not valid; expected True or False"):
            cls(gate=1)
    with pytest.raises(PeftConfigError, match=r"'model\.embed_tokens' \(Embedding\), which LoRA\(gate=True\) cannot "
                                              r"adapt: it adapts linear layers only"):
        apply_peft(tiny_llama(), [Gated(LoRA(target_modules=["embed_tokens"]))])


def test_gated_merge_is_refused_per_layer_and_nothing_changes(tmp_path):
    model = tiny_llama()
    stack = apply_peft(model, [gated_lora()])
    randomize(stack)
    x = token_batch(2, 8)
    with torch.no_grad():
        before = model(input_ids=x).logits
    with pytest.raises(PeftConfigError, match=r"cannot merge adapter set 'default': 'model\.layers\.0\.self_attn\."
                                              r"q_proj': a gated delta depends on the input"):
        stack.merge()
    with pytest.raises(PeftConfigError, match=r"lora \(LoRA\(gate=True\): a gated update depends on the input\) "
                                              r"cannot be folded into the base weights.*save_adapters"):
        merge_and_export(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not stack.merged
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


def test_gated_peft_export_is_native_only_and_round_trips(tmp_path):
    model = tiny_llama()
    stack = apply_peft(model, [gated_lora()])
    randomize(stack)
    x = token_batch(2, 8)
    with torch.no_grad():
        ours = model(input_ids=x).logits
    with pytest.warns(UserWarning, match=r"lora: peft has no gates: LoRA\(gate=True\) multiplies its update"):
        folder = save_adapters(model, tmp_path / "a")
    assert not (folder / "adapter_config.json").exists()  # peft could only half-load it: no peft files at all
    for name in (None, "renamed"):
        fresh = tiny_llama()
        loaded = load_adapters(fresh, folder, name=name)
        assert loaded.strategies[0].gate is True
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=x).logits, ours)


def test_arithmetic_refuses_gated_sets():
    model = tiny_llama()
    apply_peft(model, [gated_lora()], name="a")
    apply_peft(model, [gated_lora()], name="b")
    with pytest.raises(PeftConfigError, match=r"set 'a' holds LoRA\(gate=True\): a gated update depends on the input"):
        combine_adapter_sets(model, {"a": 1.0, "b": 1.0}, name="c", method="linear")


def test_loraplus_keeps_the_gate_out_of_the_b_group():
    model = tiny_llama()
    apply_peft(model, [gated_lora()])
    groups = {g["name"]: g["params"] for g in loraplus_param_groups(model, lr=1e-3, ratio=16)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[1] for p in groups["loraplus_b"]} == {"lora_B"}
    assert any(names[id(p)].endswith("gate.weight") for p in groups["loraplus_a"])


def test_mixed_batch_with_gated_sets():
    model = tiny_llama()
    for name, seed in (("default", 1), ("b", 2)):
        randomize(apply_peft(model, [gated_lora()], name=name), seed)
    names = ["b", "__base__", "default", "b"]
    x = token_batch(4, 8)
    assert_mixed_rows_match(model, x, names)


def test_nf4_backbone_with_gated_lora_and_parallel_adapter_forward_backward():
    model = tiny_llama()
    stack = apply_peft(model, [gated_lora(), Adapter(bottleneck=4, placement="parallel", scaling="learned", gate=True)],
                       quantize=Quantization("nf4"))
    randomize(stack)
    model.train()
    x = token_batch(2, 8)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    for strategy, applied in zip(stack.strategies, stack.applied):
        params = [p for m in applied.modules for p in m.parameters()]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params), strategy.name
        assert any(p.grad.abs().sum() > 0 for p in params), strategy.name
    model.eval()
    with torch.no_grad():
        full = model(input_ids=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(input_ids=x).logits.float()
    assert (mixed - full).abs().max() / full.abs().max() < 4e-2
