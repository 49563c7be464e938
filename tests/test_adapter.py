"""Bottleneck adapters: the formula, identity at init, composition with LoRA, removal, active set, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert, tiny_llama, token_batch
from torch import nn

from lightning_peft import Adapter, LoRA, PeftConfigError, apply_peft
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.core.state import get_state
from lightning_peft.methods.bottleneck import CONTAINER


def adapters_of(model: nn.Module, set_name: str = "default") -> dict[str, nn.Module]:
    return {
        n.removesuffix("." + CONTAINER): getattr(m, CONTAINER)[set_name]
        for n, m in model.named_modules()
        if CONTAINER in m._modules and set_name in getattr(m, CONTAINER)
    }


def test_formula_on_one_layer():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    apply_peft(model, [Adapter(bottleneck=3, target_modules=["0"], nonlinearity="gelu", init_weights=False)])
    adapter = adapters_of(model)["0"]
    x = torch.randn(4, 6)
    h = model[0].base_layer(x)
    z = F.gelu(h @ adapter.adapter_down.T + adapter.adapter_down_bias)
    expected = torch.tanh(h + z @ adapter.adapter_up.T + adapter.adapter_up_bias)
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_identity_at_init_and_default_placement():
    model, base = tiny_bert(), tiny_bert()
    stack = apply_peft(model, [Adapter(bottleneck=4)], unfreeze=["classifier"])
    targets = stack.applied[0].targets
    assert len(targets) == 4 and all(
        t.endswith("output.dense") for t in targets
    )  # attention out + FFN out x 2
    ids = token_batch(2, 6)
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    llama = tiny_llama()
    targets = apply_peft(llama, [Adapter(bottleneck=4)]).applied[0].targets
    assert sorted(t.rsplit(".", 1)[-1] for t in targets) == ["down_proj", "down_proj", "o_proj", "o_proj"]


def test_disable_and_inactive_set():
    model, base = tiny_llama(), tiny_llama()
    stack = apply_peft(model, [Adapter(bottleneck=4, init_weights=False)])
    ids = token_batch(2, 6)
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with stack.disable_adapters():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    get_state(model).active = "other"
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_order_with_lora_does_not_matter_and_merge_keeps_output():
    ids = token_batch(2, 6)
    outputs = []
    for order in ("adapter_first", "lora_first"):
        torch.manual_seed(1)
        model = tiny_llama()
        lora = LoRA(r=2, target_modules=["o_proj"], init_weights=False)
        adapter = Adapter(bottleneck=4, target_modules=["o_proj"], init_weights=False)
        strategies = [adapter, lora] if order == "adapter_first" else [lora, adapter]
        torch.manual_seed(2)
        stack = apply_peft(model, strategies)
        # same weights in both orders: overwrite from a fixed generator
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in sorted(stack.named_trainable_parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        assert all(isinstance(model.get_submodule(t), AdaptedLinear) for t in stack.applied[0].targets)
        out = model(input_ids=ids).logits
        stack.merge()  # LoRA folds into o_proj; the adapter still follows the merged layer
        assert torch.allclose(model(input_ids=ids).logits, out, atol=1e-5)
        stack.unmerge()
        outputs.append(out)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6)


def test_remove_restores_model_exactly():
    model = tiny_bert()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    stack = apply_peft(
        model, [Adapter(bottleneck=4, init_weights=False), LoRA(r=2, target_modules=["query"])]
    )
    assert any(CONTAINER in k for k in stack.adapter_keys())
    stack.remove()
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(not m._forward_hooks for m in model.modules())
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


def test_another_sets_removal_keeps_the_hooked_layer():
    """Removing set b's LoRA must not unwrap the layer that carries set a's adapter hook."""
    model = tiny_bert()
    apply_peft(
        model,
        [Adapter(bottleneck=4, target_modules=["attention.output.dense"], init_weights=False)],
        name="a",
    )
    stack_b = apply_peft(model, [LoRA(r=2, target_modules=["attention.output.dense"])], name="b")
    get_state(model).active = "a"
    ids = token_batch(2, 6)
    before = model(input_ids=ids).logits
    stack_b.remove()
    get_state(model).active = "a"
    assert torch.equal(model(input_ids=ids).logits, before)


def test_all_linear_never_adapts_the_adapters():
    model = tiny_bert()
    apply_peft(model, [Adapter(bottleneck=4)], name="a")
    stack = apply_peft(model, [LoRA(r=2)], name="b")
    assert not any(CONTAINER in t for t in stack.applied[0].targets)


def test_gradients_reach_adapter_parameters():
    model = tiny_bert()
    stack = apply_peft(model, [Adapter(bottleneck=4, init_weights=False)], unfreeze=["classifier"])
    model(input_ids=token_batch(2, 6), labels=torch.tensor([0, 1])).loss.backward()
    adapter_params = [(n, p) for n, p in stack.named_trainable_parameters() if CONTAINER in n]
    assert len(adapter_params) == 4 * 4
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in adapter_params)


def test_non_linear_targets_use_hidden_size():
    model = tiny_bert()
    stack = apply_peft(
        model, [Adapter(bottleneck=4, target_modules=r".*layer\.\d+\.output", init_weights=False)]
    )
    assert len(stack.applied[0].targets) == 2  # BertOutput modules (dense + dropout + LayerNorm)
    assert model(input_ids=token_batch(2, 6)).logits.shape == (2, 2)


def test_errors():
    with pytest.raises(PeftConfigError, match="bottleneck=0"):
        Adapter(bottleneck=0)
    with pytest.raises(PeftConfigError, match="nonlinearity='swish'"):
        Adapter(nonlinearity="swish")
    with pytest.raises(PeftConfigError, match="target_modules=\\['nope'\\] matched no module"):
        apply_peft(tiny_bert(), [Adapter(target_modules=["nope"])])
    with pytest.raises(PeftConfigError, match="no default for Sequential"):
        apply_peft(nn.Sequential(nn.Linear(2, 2)), [Adapter()])
    with pytest.raises(PeftConfigError, match="pass dim="):
        apply_peft(nn.Sequential(nn.LayerNorm(2)), [Adapter(target_modules=["0"])])
    with pytest.raises(PeftConfigError, match="Sequential container"):
        apply_peft(nn.Sequential(nn.Sequential(nn.Linear(2, 2))), [Adapter(target_modules=["0"], dim=2)])
