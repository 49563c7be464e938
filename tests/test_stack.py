"""The stack on plain models: freezing, state dicts, merge, disable, errors."""

import re

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_llama, token_batch

from lightning_peft import AdaptedLinear, AdapterStateError, LoRA, PeftConfigError, apply_peft, get_stack
from lightning_peft.methods.base import Strategy, register_strategy
from lightning_peft.strategies import registered_strategies, strategy_from_config


def test_trainable_names_llama():
    model = tiny_llama()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["q_proj", "v_proj"])])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"model.layers.{i}.self_attn.{proj}.adapters.default.lora.lora_{ab}"
        for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"
    }
    assert names == expected
    assert {n for n, _ in stack.named_trainable_parameters()} == expected


def test_trainable_names_bert_with_head():
    model = tiny_bert()
    apply_peft(model, [LoRA(r=2, target_modules=r".*attention\.self\.(query|key)")], unfreeze=["classifier"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"bert.encoder.layer.{i}.attention.self.{proj}.adapters.default.lora.lora_{ab}"
        for i in range(2) for proj in ("query", "key") for ab in "AB"
    } | {"classifier.weight", "classifier.bias"}
    assert names == expected


def test_trainable_names_gpt2_conv1d():
    model = tiny_gpt2()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["c_attn"])])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"transformer.h.{i}.attn.c_attn.adapters.default.lora.lora_{ab}" for i in range(2) for ab in "AB"
    }
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, AdaptedLinear) and (layer.in_features, layer.out_features) == (32, 96)
    assert stack.applied[0].targets == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_init_leaves_model_unchanged_and_gradients_reach_adapters():
    model = tiny_llama()
    x = token_batch()
    with torch.no_grad():
        before = model(input_ids=x).logits
    stack = apply_peft(model, [LoRA(r=4, dropout=0.1)])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)  # B = 0 at init
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    for name, p in stack.named_trainable_parameters():
        if name.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_shared_dropout_mask_across_siblings():
    """Opt-in sharing: q, k and v read one hidden-states tensor and see one dropout mask."""
    from lightning_peft.ops.dropout import shared_dropout

    x = torch.randn(4, 8, requires_grad=True)
    a = shared_dropout(x, 0.5, torch.float32)
    assert shared_dropout(x, 0.5, torch.float32) is a
    assert shared_dropout(x.clone(), 0.5, torch.float32) is not a
    assert ((a == 0) | (a == x)).all()


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_projection_is_torch_dropout(p):
    """The default branch dropout is F.dropout on the input, drawn per layer: peft's arithmetic and stream."""
    from lightning_peft.ops.dropout import project

    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(0)
    h = project(x, w, p, True, scale=2.0)
    (h * torch.arange(4.0)).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.manual_seed(0)
    ref = torch.nn.functional.linear(torch.nn.functional.dropout(x2, p, True), w2) * 2.0
    (ref * torch.arange(4.0)).sum().backward()
    assert torch.equal(h, ref)
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)
    assert torch.equal(project(x, w, p, False), torch.nn.functional.linear(x, w))


def test_dropout_is_independent_per_layer_unless_shared():
    """Two branches reading one input draw two masks by default, one with shared=True (gradients then add)."""
    from lightning_peft.ops.dropout import project

    x = torch.randn(64, 64, requires_grad=True)
    eye = torch.eye(64)
    torch.manual_seed(0)
    first, second = project(x, eye, 0.5, True), project(x, eye, 0.5, True)
    assert not torch.equal(first == 0, second == 0)
    shared_a, shared_b = project(x, eye, 0.5, True, shared=True), project(x, eye, 0.5, True, shared=True)
    assert torch.equal(shared_a == 0, shared_b == 0)
    keep = shared_a != 0
    assert torch.allclose(shared_a, x * keep * 2.0)
    (shared_a.sum() + 3 * shared_b.sum()).backward()
    assert torch.allclose(x.grad, keep * 8.0)


def test_adapter_state_dict_roundtrip_and_errors():
    model = tiny_llama()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["q_proj"], init_weights=False)])
    sd = stack.adapter_state_dict()
    assert set(sd) == {f"model.layers.{i}.self_attn.q_proj.adapters.default.lora.lora_{ab}"
                       for i in range(2) for ab in "AB"}
    other = tiny_llama(seed=1)
    stack2 = apply_peft(other, [LoRA(r=2, target_modules=["q_proj"])])
    stack2.load_adapter_state_dict(sd)
    assert all(torch.equal(sd[k], v) for k, v in stack2.adapter_state_dict().items())

    missing = dict(sd)
    missing.pop(next(iter(missing)))
    with pytest.raises(AdapterStateError, match="missing adapter keys: model.layers.0.self_attn.q_proj"):
        stack2.load_adapter_state_dict(missing)
    wrong = {k: torch.zeros(3, 3) for k in sd}
    with pytest.raises(AdapterStateError, match=r"wrong shapes: .*checkpoint \(3, 3\) vs model \(2, 32\)"):
        stack2.load_adapter_state_dict(wrong)
    with pytest.raises(AdapterStateError, match="unexpected keys: extra.lora_A"):
        stack2.load_adapter_state_dict({**sd, "extra.lora_A": torch.zeros(1)})


def test_disable_merge_unmerge_and_remove():
    model = tiny_llama()
    x = token_batch()
    with torch.no_grad():
        base = model(input_ids=x).logits
    stack = apply_peft(model, [LoRA(r=4, target_modules="all-linear", init_weights=False)])
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        assert (adapted - base).abs().max() > 1e-3
        with stack.disable_adapters():
            assert torch.equal(model(input_ids=x).logits, base)
        stack.merge()
        assert stack.merged
        assert (model(input_ids=x).logits - adapted).abs().max() < 1e-5
        stack.unmerge()
        assert (model(input_ids=x).logits - adapted).abs().max() < 1e-5
    stack.remove()
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert get_stack(model) is None
    with torch.no_grad():
        assert (model(input_ids=x).logits - base).abs().max() < 1e-5


def test_summary_lists_strategy_and_module_type():
    model = tiny_bert()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["query"])], unfreeze=["classifier"])
    text = stack.summary()
    assert re.search(r"^lora\s+2\s+256\s", text, re.M)  # 2 layers x (2*32 + 32*2)
    assert re.search(r"^unfreeze\s+1\s+66\s", text, re.M)
    assert "trainable / total" in text and "322" in text
    rows = stack.summary_rows()
    assert ("lora", 2, 256) in rows["strategy"]


def test_errors_name_the_argument():
    model = tiny_bert()
    with pytest.raises(PeftConfigError, match=r"target_modules=\['q_proj'\] matched no linear layer of "
                                              r"BertForSequenceClassification; linear layers include: "
                                              r"bert.encoder.layer.0.attention.self.query"):
        apply_peft(model, [LoRA(target_modules=["q_proj"])])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(PeftConfigError, match=rf"r={bad!r} is not valid; expected an integer > 0"):
            LoRA(r=bad)
    with pytest.raises(PeftConfigError, match=r"dropout=1.5 is not valid"):
        LoRA(dropout=1.5)
    with pytest.raises(PeftConfigError, match=r"unknown strategy name='loar'; registered strategies: .*lora"):
        strategy_from_config({"name": "loar", "r": 4})
    with pytest.raises(PeftConfigError, match=r"strategy 'lora' got unknown arguments \['rank'\]"):
        strategy_from_config({"name": "lora", "rank": 4})
    with pytest.raises(PeftConfigError, match="unfreeze='clasifier' matched no module"):
        apply_peft(model, [LoRA(target_modules=["query"])], unfreeze=["clasifier"])
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())  # failed applies left no trace
    assert all(p.requires_grad for p in model.parameters())


def test_applying_twice_and_duplicate_prefixes_are_errors():
    model = tiny_bert()
    apply_peft(model, [LoRA(target_modules=["query"])])
    with pytest.raises(PeftConfigError, match="already has an adapter set named 'default'"):
        apply_peft(model, [LoRA(target_modules=["value"])])
    with pytest.raises(PeftConfigError, match="both claim the parameter prefix 'lora_'"):
        apply_peft(tiny_bert(), [LoRA(target_modules=["query"]), LoRA(target_modules=["value"])])


def test_registry_refuses_duplicates():
    from dataclasses import dataclass

    assert registered_strategies()["lora"] is LoRA

    @dataclass
    class Other(Strategy):
        name = "lora"
        prefix = "other_"

    with pytest.raises(ValueError, match="strategy name 'lora' of Other is already registered by LoRA"):
        register_strategy(Other)

    @dataclass
    class Other2(Strategy):
        name = "other2"
        prefix = "lora_"

    with pytest.raises(ValueError, match="parameter prefix 'lora_' of Other2 is already used by LoRA"):
        register_strategy(Other2)


def test_config_roundtrip():
    lora = LoRA(r=3, alpha=6, target_modules=["q_proj"], use_rslora=True)
    assert strategy_from_config(lora.config()) == lora


def test_injected_modules_follow_the_models_mode():
    model = tiny_bert().eval()
    apply_peft(model, [LoRA(r=2, dropout=0.5, target_modules=["query"])])
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("p", [0.0, 0.05])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_fused_lora_linear_matches_composed_path(p, bias, kind):
    """LoRA (or AdaLoRA) alone on a frozen nn.Linear runs as one fused node: same outputs and gradients as the
    composed path (base layer, then the branch added), which a forward hook on the base layer forces."""
    from lightning_peft import AdaLoRA

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(24, 16, bias=bias), torch.nn.GELU(), torch.nn.Linear(16, 8))
        if kind == "lora":
            strategy = LoRA(r=4, alpha=8, dropout=p, target_modules=["0", "2"], init_weights=False)
        else:
            strategy = AdaLoRA(init_r=4, target_r=2, dropout=p, target_modules=["0", "2"])
        apply_peft(model, [strategy])
        with torch.no_grad():
            for name, q in model.named_parameters():
                if name.endswith("adalora_E"):
                    q.copy_(torch.randn(q.shape))
                    model.get_submodule(name.rsplit(".", 1)[0]).adalora_mask[0] = False  # one pruned triplet
        return model.train()

    fused, composed = build(), build()
    for name in ("0", "2"):
        composed.get_submodule(name).base_layer.register_forward_hook(lambda *a: None)
    x = torch.randn(3, 5, 24)
    results = []
    for model in (fused, composed):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        out = model(xi)
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        grads = {n: q.grad for n, q in model.named_parameters() if q.requires_grad}
        results.append((out, xi.grad, grads, type(out.grad_fn).__name__))
    (out_f, gx_f, g_f, fn_f), (out_c, gx_c, g_c, fn_c) = results
    assert ("_LowRankLinear" in fn_f) == (p == 0.0) and "_LowRankLinear" not in fn_c  # dropout: composed
    assert torch.allclose(out_f, out_c, atol=1e-5)
    assert torch.allclose(gx_f, gx_c, atol=1e-5)
    assert g_f.keys() == g_c.keys() and len(g_f) == (4 if kind == "lora" else 6)
    assert all(torch.allclose(g_f[k], g_c[k], atol=1e-5) for k in g_f)


def test_fused_lora_linear_falls_back_where_it_does_not_apply():
    """A trainable base bias (BitFit), a second delta on the layer, or a base in another dtype than the
    adapters take the composed path."""
    from lightning_peft import IA3, BitFit

    def grad_fn(strategies, x, dtype=torch.float32):
        model = torch.nn.Sequential(torch.nn.Linear(24, 16).to(dtype))
        apply_peft(model, strategies)
        return type(model(x.to(dtype)).grad_fn).__name__

    x = torch.randn(2, 24)
    assert "_LowRankLinear" in grad_fn([LoRA(r=2, target_modules=["0"])], x)
    assert "_LowRankLinear" not in grad_fn([LoRA(r=2, target_modules=["0"]), BitFit()], x)
    assert "_LowRankLinear" not in grad_fn([LoRA(r=2, target_modules=["0"]), IA3(target_modules=["0"])], x)
    assert "_LowRankLinear" not in grad_fn([LoRA(r=2, target_modules=["0"])], x, torch.bfloat16)
