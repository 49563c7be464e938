"""The MAM and UniPELT presets: ordinary strategy lists, the pieces where the papers put them, on every model family
the pieces support, on nf4, through save/load, and the same lists as the shipped CLI recipes."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, token_batch

from lightning_peft import (
    MAM,
    Adapter,
    Gated,
    LoRA,
    PeftConfigError,
    PrefixTuning,
    Quantization,
    UniPELT,
    apply_peft,
    load_adapters,
    save_adapters,
)
from lightning_peft.core.gate import GatedDelta
from lightning_peft.core.layer import AdaptedLayer
from lightning_peft.methods.bottleneck import CONTAINER
from lightning_peft.methods.presets import QUERY_VALUE


def test_presets_are_plain_strategy_lists():
    mam = MAM()
    assert [type(s) for s in mam] == [PrefixTuning, Adapter]
    assert mam[0].num_virtual_tokens == 30 and mam[0].projection == 512 and not mam[0].gate
    assert (mam[1].placement, mam[1].scaling, mam[1].sublayers) == ("parallel", 4.0, "ffn")
    uni = UniPELT()
    assert [type(s) for s in uni] == [LoRA, PrefixTuning, Adapter]
    assert all(s.gate for s in uni)
    assert uni[0].target_modules == QUERY_VALUE and uni[0].r == 8
    assert uni[1].num_virtual_tokens == 10 and uni[2].placement == "sequential" and uni[2].sublayers == "ffn"
    assert UniPELT() == [Gated(LoRA(r=8, alpha=16, target_modules=QUERY_VALUE)),
                         Gated(PrefixTuning(num_virtual_tokens=10, projection=512)),
                         Gated(Adapter(bottleneck=48, sublayers="ffn"))]
    assert MAM(bottleneck=8, scaling="learned")[1].scaling == "learned"


def _adapter_hosts(model) -> list[str]:
    return [n for n, m in model.named_modules() if CONTAINER in m._modules]


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_presets_put_each_piece_where_the_papers_do(family):
    make = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}[family]
    ffn = {"bert": r".*layer\.\d+\.output", "llama": r".*layers\.\d+\.mlp", "gpt2": r".*h\.\d+\.mlp"}[family]
    model = make()
    apply_peft(model, MAM())
    hosts = _adapter_hosts(model)
    assert hosts and all(re.fullmatch(ffn, h) for h in hosts)  # the feed-forward sublayers only
    assert len(hosts) == model.config.num_hidden_layers

    model = make()
    apply_peft(model, UniPELT(num_virtual_tokens=4, projection=8, bottleneck=4))
    gated = [n for n, m in model.named_modules()
             if isinstance(m, AdaptedLayer) and any(isinstance(d, GatedDelta) for d in m.deltas("default"))]
    qv = {"bert": r".*attention\.self\.(query|value)", "llama": r".*self_attn\.(q|v)_proj",
          "gpt2": r".*attn\.c_attn"}[family]
    assert gated and all(re.fullmatch(qv, n) for n in gated)


@pytest.mark.parametrize("preset", ["mam", "unipelt"])
def test_presets_train_on_nf4_and_reload(preset, tmp_path):
    def build():
        torch.manual_seed(0)
        model = tiny_llama()
        chosen = (MAM(num_virtual_tokens=4, projection=8, bottleneck=4) if preset == "mam"
                  else UniPELT(num_virtual_tokens=4, projection=8, bottleneck=4))
        return model, apply_peft(model, chosen, quantize=Quantization("nf4"))

    model, stack = build()
    assert stack.quantization is not None and stack.quantization.mode == "nf4"
    ids = token_batch(2, 8)
    opt = torch.optim.AdamW(stack.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for p in stack.trainable_parameters())
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapters(stack, tmp_path / "a")
    torch.manual_seed(0)
    fresh = tiny_llama()
    assert load_adapters(fresh, tmp_path / "a").quantization.mode == "nf4"  # the manifest quantizes it again
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_presets_on_an_encoder_decoder():
    model = tiny_t5()
    stack = apply_peft(model, MAM(num_virtual_tokens=4, projection=8, bottleneck=4))
    ids = token_batch(2, 6)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in stack.trainable_parameters())
    # a gated prefix is not built for encoder-decoders: UniPELT is refused by name before the model changes
    model = tiny_t5()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftConfigError, match=r"gate=True is not supported on encoder-decoder models"):
        apply_peft(model, UniPELT(num_virtual_tokens=4, projection=8, bottleneck=4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
