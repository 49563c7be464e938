"""Parallel and scaled bottleneck adapters (He et al. ICLR 2022): the math against hand-written references (the
post-LN BERT variant included), learned scaling, default placements per model type, refusals, routing, reload."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_mixed_rows_match, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, token_batch
from torch import nn

from lightning_peft import Adapter, PeftConfigError, apply_peft, load_adapters, save_adapters
from lightning_peft.methods.bottleneck import CONTAINER


def adapter_of(module: nn.Module, set_name: str = "default") -> nn.Module:
    return getattr(module, CONTAINER)[set_name]


def bottleneck(adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """up(relu(down(x))) by hand, no scale."""
    z = F.relu(x @ adapter.adapter_down.T + adapter.adapter_down_bias)
    return z @ adapter.adapter_up.T + adapter.adapter_up_bias


def randomize(stack, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_parallel_on_a_hidden_state_module_is_output_plus_scaled_adapter_of_input():
    model = tiny_llama()
    stack = apply_peft(model, [Adapter(bottleneck=4, placement="parallel", scaling=4.0, init_weights=False)])
    mlp = model.model.layers[0].mlp
    a = adapter_of(mlp)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        base = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), base + 4.0 * bottleneck(a, x), rtol=0, atol=1e-6)
        # a tuple output, called with keywords (as the decoder layer calls its attention): the first element
        attn = model.model.layers[0].self_attn
        pos = torch.arange(5).unsqueeze(0).expand(2, -1)
        cos_sin = model.model.rotary_emb(x, pos)
        with torch.no_grad(), stack.disable_adapters():
            plain = attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0]
        out = attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)[0]
        torch.testing.assert_close(out, plain + 4.0 * bottleneck(adapter_of(attn), x), rtol=0, atol=1e-6)


def test_parallel_on_post_ln_bert_block_adds_to_the_residual_before_layernorm():
    model = tiny_bert()
    apply_peft(model, [Adapter(bottleneck=4, placement="parallel", scaling=2.0, init_weights=False)])
    block = model.bert.encoder.layer[0].attention.output  # BertSelfOutput: LayerNorm(dense(h) + r)
    a = adapter_of(block)
    assert a.mode == "residual"
    h, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = block.LayerNorm(block.dense(h) + r + 2.0 * bottleneck(a, r))
        torch.testing.assert_close(block(h, r), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(block(h, input_tensor=r), expected, rtol=0, atol=1e-6)
        ffn = model.bert.encoder.layer[1].output  # BertOutput: dense is intermediate -> hidden, r is hidden
        hi = torch.randn(2, 5, 64)
        expected = ffn.LayerNorm(ffn.dense(hi) + r + 2.0 * bottleneck(adapter_of(ffn), r))
        torch.testing.assert_close(ffn(hi, r), expected, rtol=0, atol=1e-6)


def test_sequential_scaled_and_parallel_start_as_the_base_model():
    x = token_batch(2, 8)
    for placement, scaling in (("parallel", "learned"), ("sequential", 4.0), ("parallel", 0.5)):
        model, base = tiny_gpt2(), tiny_gpt2()
        apply_peft(model, [Adapter(bottleneck=4, placement=placement, scaling=scaling)])
        with torch.no_grad():
            assert torch.equal(model(input_ids=x).logits, base(input_ids=x).logits)


def test_sequential_with_fixed_scaling_scales_the_contribution():
    model = nn.Sequential(nn.Linear(6, 8))
    apply_peft(model, [Adapter(bottleneck=3, target_modules=["0"], scaling=4.0, init_weights=False)])
    a = adapter_of(model[0])
    x = torch.randn(4, 6)
    with torch.no_grad():
        h = model[0].base_layer(x)
        torch.testing.assert_close(model(x), h + 4.0 * bottleneck(a, h), rtol=0, atol=1e-6)


def test_learned_scaling_starts_at_one_and_trains():
    model = tiny_llama()
    stack = apply_peft(model, [Adapter(bottleneck=4, placement="parallel", scaling="learned")])
    scales = [m.adapter_scale for m in stack.applied[0].modules]
    assert len(scales) == 4 and all(s.shape == (1,) and s.item() == 1.0 and s.requires_grad for s in scales)
    x = token_batch(2, 8)
    opt = torch.optim.Adam(stack.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(3):  # step 1 moves the zero-initialized up-projection, then the scale has a gradient
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(s.item() != 1.0 for s in scales)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (tiny_bert, [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output", "output")]),
        (tiny_llama, [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]),
        (tiny_gpt2, [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn", "mlp")]),
    ],
)
def test_default_parallel_targets(make, expected):
    stack = apply_peft(make(), [Adapter(bottleneck=4, placement="parallel")])
    assert stack.applied[0].targets == expected


def test_default_parallel_targets_t5():
    model = tiny_t5()
    stack = apply_peft(model, [Adapter(bottleneck=4, placement="parallel", init_weights=False)])
    kinds = sorted({t.rsplit(".", 1)[1] for t in stack.applied[0].targets})
    assert kinds == ["DenseReluDense", "EncDecAttention", "SelfAttention"]
    assert len(stack.applied[0].targets) == 2 * 2 + 2 * 3  # encoder: 2 per block, decoder: 3 per block
    x = token_batch(2, 6)
    with torch.no_grad():
        adapted = model(input_ids=x, decoder_input_ids=x).logits
        with stack.disable_adapters():
            plain = model(input_ids=x, decoder_input_ids=x).logits
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, plain)


def test_parallel_target_that_changes_width_is_refused_before_touching_the_model():
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(PeftConfigError, match=r"'model\.layers\.0\.mlp\.up_proj'.*input width 32 differs from its "
                                              r"output width 64"):
        apply_peft(model, [Adapter(placement="parallel", target_modules=["mlp.up_proj"])])
    assert [type(m) for m in model.modules()] == before
    with pytest.raises(PeftConfigError, match=r"intermediate' \(BertIntermediate\): its input width 32 differs from "
                                              r"its output width 64"):
        apply_peft(tiny_bert(), [Adapter(placement="parallel", target_modules=["intermediate"])])
    with pytest.raises(PeftConfigError, match=r"beside 'model\.embed_tokens' \(Embedding\): its input is token ids"):
        apply_peft(model, [Adapter(placement="parallel", target_modules=["embed_tokens"])])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"placement": "diagonal"}, "placement='diagonal' is not valid; expected 'sequential'"),
        ({"scaling": 0}, "scaling=0 is not valid; expected a positive number"),
        ({"scaling": -2.0}, "scaling=-2.0 is not valid"),
        ({"scaling": "learnt"}, "scaling='learnt' is not valid; expected a positive number (e.g. 4.0) or 'learned'"),
        ({"scaling": True}, "scaling=True is not valid"),
        ({"scaling": float("nan")}, "scaling=nan is not valid"),
        ({"gate": "yes"}, "gate='yes' is not valid; expected True or False"),
    ],
)
def test_config_refusals_name_the_argument_and_value(kwargs, message):
    with pytest.raises(PeftConfigError, match=re.escape(message)):
        Adapter(**kwargs)


def test_no_parallel_default_for_unknown_model():
    with pytest.raises(PeftConfigError, match=r"placement='parallel'\) has no default for Sequential"):
        apply_peft(nn.Sequential(nn.Linear(4, 4)), [Adapter(placement="parallel")])


def test_parallel_on_square_linear_reads_its_input():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    apply_peft(model, [Adapter(bottleneck=3, target_modules=["0"], placement="parallel", init_weights=False)])
    a = adapter_of(model[0])
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tanh(model[0].base_layer(x) + bottleneck(a, x)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_mixed_batch_rows_equal_their_own_forward(make):
    model = make()
    for name, seed in (("default", 1), ("b", 2)):
        randomize(apply_peft(model, [Adapter(bottleneck=4, placement="parallel", scaling="learned", gate=True)],
                             name=name), seed)
    names = ["default", "__base__", "b", "default"]
    x = token_batch(4, 8)
    assert_mixed_rows_match(model, x, names)


def test_save_load_and_rename_round_trip(tmp_path):
    model = tiny_bert()
    stack = apply_peft(model, [Adapter(bottleneck=4, placement="parallel", scaling="learned", gate=True)],
                       unfreeze=["classifier"])
    randomize(stack)
    x = token_batch(2, 8)
    with torch.no_grad():
        ours = model(input_ids=x).logits
    with pytest.warns(UserWarning, match="adapter: peft has no gates: Adapter"):
        folder = save_adapters(model, tmp_path / "a")
    assert not (folder / "adapter_config.json").exists()
    for name in (None, "other"):
        fresh = tiny_bert()
        loaded = load_adapters(fresh, folder, name=name)
        assert loaded.strategies[0] == stack.strategies[0]
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=x).logits, ours)
