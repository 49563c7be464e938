"""Regressions on quantized backbones: GPT-2 ``Conv1D`` layout in merged exports, and transformers'
``_keep_in_fp32_modules`` under in-place quantization.

Every model is built from a tiny transformers config, saved with ``save_pretrained`` and loaded back with
``from_pretrained`` (the real loading path), and quantized by real bitsandbytes layers on the CPU.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from helpers import CausalLMModule, lm_data, loader, save_and_reload, tiny_gpt2, tiny_t5, token_batch, trainer
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_peft import LoRA, apply_peft
from lightning_peft.callbacks import PEFT
from lightning_peft.core.backend import base_weight, is_quantized
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.io.merged import merge_and_export
from lightning_peft.quantization import Quantization, bnb_config, quantize_model

BNB_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
# 64-wide rows: bitsandbytes 0.50's CPU 4-bit kernels are only accurate for rows that are a multiple of 64
GPT2 = dict(n_embd=64)
T5 = dict(d_model=64, d_ff=128, d_kv=16)
#: float32 rounding: the same products summed in another order (a fused W + BA against W x + B(A x))
ROUNDING = 1e-5


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits


def _quantized_gpt2(tmp_path, mode: str) -> tuple[nn.Module, object, str]:
    """A saved and reloaded tiny GPT-2, quantized in place, with a non-zero LoRA on every Conv1D."""
    model, path = save_and_reload(tiny_gpt2(**GPT2), tmp_path)
    stack = apply_peft(model, [LoRA(r=4, alpha=8, init_weights=False)], quantize=Quantization(mode))
    return model, stack, path


def _dequantized_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s logits with every adapted layer's base replaced by a full-precision Conv1D holding its
    dequantized weights (the same adapters, no merging); the model is put back as it was."""
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    originals = [layer.base_layer for layer in layers]
    try:
        for layer in layers:
            weight = base_weight(layer.base_layer).float()
            conv = Conv1D(layer.out_features, layer.in_features)
            conv.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
            conv.bias = nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
            layer.base_layer = conv
        return _logits(model, x)
    finally:
        for layer, original in zip(layers, originals):
            layer.base_layer = original


def _adapted_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]


def _expected_merge(model: nn.Module, alpha: float = 8.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted layer, ``deq(W) + B A alpha / r`` (out, in) and the bias, from the parameters alone."""
    out = {}
    for name in _adapted_names(model):
        layer = model.get_submodule(name)
        lora = layer.adapters["default"]["lora"]
        a, b = lora.lora_A.detach().float(), lora.lora_B.detach().float()
        delta = b @ a * (alpha / a.shape[0])
        out[name] = (base_weight(layer.base_layer).float() + delta, layer.bias.detach().float().clone())
    return out


# -- 1. GPT-2 Conv1D layout in merged exports ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_merged_export_of_quantized_gpt2_writes_conv1d_layout(tmp_path, mode):
    """A quantized GPT-2 with LoRA, merged and exported, loads in plain transformers with the adapted logits.

    The export holds ``deq(W) + BA`` in fp32 for every layer, written in Conv1D's (in, out) layout; so its
    ``c_attn`` / ``c_proj`` weights equal the dequantized base, transposed, plus the delta up to fp32
    rounding (1e-6), and its logits equal those of the adapted model over a full-precision copy of the
    dequantized bases up to fp32 rounding (``ROUNDING``; measured 2e-6). Against the adapted *quantized*
    model the only further difference is how the bitsandbytes forward uses its dequantized weights: 4-bit on
    the CPU dequantizes and multiplies in fp32 (so ``ROUNDING`` again); LLM.int8() also rounds the
    activations (to fp16, then int8 per row), which the exported fp32 model does not, so the bound there is
    that activation error, measured on this very batch as the distance between the quantized model and its
    dequantized reference, plus ``ROUNDING``. A transposed square ``attn.c_proj`` (the bug) moves the logits
    by O(1).
    """
    from transformers import AutoModelForCausalLM

    model, _, _ = _quantized_gpt2(tmp_path, mode)
    assert all(is_quantized(model.get_submodule(n).base_layer) for n in _adapted_names(model))
    x = token_batch()
    adapted = _logits(model, x)
    expected = _expected_merge(model)

    folder = merge_and_export(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    for name, (weight, bias) in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is Conv1D, name
        torch.testing.assert_close(layer.weight, weight.t(), rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(layer.bias, bias, rtol=0, atol=1e-6, msg=name)
    exported = _logits(merged, x)

    reference = _dequantized_logits(model, x)
    assert (exported - reference).abs().max().item() < ROUNDING
    activation_error = 0.0 if mode != "int8" else (reference - adapted).abs().max().item()
    assert activation_error < 0.05  # measured 1.8e-2 for int8 (logits up to 0.65); the bug moves them by O(1)
    assert (exported - adapted).abs().max().item() < activation_error + ROUNDING


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("requantize", [False, True])
def test_in_memory_merge_of_quantized_gpt2_keeps_conv1d_layout(tmp_path, mode, requantize):
    """``PeftStack.merge()`` on a quantized GPT-2 keeps the layers' Conv1D origin, so a merged export after it
    still loads, and ``unmerge`` restores the quantized layers.

    Without re-quantization the merged base is a full-precision Conv1D (the model's own layer type): the
    in-memory model and the export then both compute ``deq(W) + BA`` in fp32 (``ROUNDING``). Re-quantized, the
    export holds ``deq(Q(deq(W) + BA))``, exactly what the re-quantized layers compute with for 4-bit
    (``ROUNDING``); for int8 the in-memory layers also round activations, bounded as in the test above.
    """
    from transformers import AutoModelForCausalLM

    model, stack, _ = _quantized_gpt2(tmp_path, mode)
    x = token_batch()
    adapted = _logits(model, x)
    quantized_bases = {n: model.get_submodule(n).base_layer for n in _adapted_names(model)}

    stack.merge(requantize=requantize)
    in_memory = _logits(model, x)
    expected = {n: base_weight(model.get_submodule(n).base_layer).float() for n in quantized_bases}

    folder = merge_and_export(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    for name in quantized_bases:
        base = model.get_submodule(name).base_layer
        if requantize:
            assert isinstance(base, BNB_TYPES) and issubclass(base.source_cls, Conv1D), name
        else:
            assert type(base) is Conv1D and base.weight.dtype == torch.float32, name
    for name, weight in expected.items():
        torch.testing.assert_close(merged.get_submodule(name).weight, weight.t(), rtol=0, atol=1e-6, msg=name)
    exported = _logits(merged, x)
    bound = ROUNDING
    if requantize and mode == "int8":
        bound += (_dequantized_logits(model, x) - in_memory).abs().max().item()
    assert (exported - in_memory).abs().max().item() < bound

    stack.unmerge()
    assert all(model.get_submodule(n).base_layer is b for n, b in quantized_bases.items())
    assert torch.equal(_logits(model, x), adapted)


def test_adapted_linear_merge_refuses_an_int8_conv1d_base(tmp_path):
    """``AdaptedLinear.merge`` never writes into a quantized base (it would write (out, in) into bitsandbytes'
    packed int8 rows); the stack's merge is the way, and it keeps the Conv1D layout (test above)."""
    model, stack, _ = _quantized_gpt2(tmp_path, "int8")
    layer = model.transformer.h[0].attn.c_proj
    base = layer.base_layer
    assert isinstance(base, bnb.nn.Linear8bitLt) and issubclass(base.source_cls, Conv1D)
    with pytest.raises(NotImplementedError, match="quantized base"):
        layer.merge(stack.name)
    assert stack.name not in layer.merged


# -- 2. transformers' _keep_in_fp32_modules ------------------------------------------------------------------
def _t5(tmp_path, cls=None) -> nn.Module:
    model, _ = save_and_reload(tiny_t5(**T5), tmp_path, cls=cls)
    return model


def _wo_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n.endswith(".wo")]


def _check_t5_quantized(model: nn.Module, mode: str, kept: tuple[str, ...] = ("wo",)) -> None:
    """``kept`` modules hold full-precision fp32 weights, every other linear (but the head) is quantized."""
    cls = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    n_kept = n_quantized = 0
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, AdaptedLinear) else module
        # the head stays in full precision; an adapted layer counts once, under its own name
        if name == "lm_head" or name.endswith(".base_layer"):
            continue
        if not (type(base) is nn.Linear or isinstance(base, BNB_TYPES)):
            continue
        if any(name.endswith("." + k) for k in kept):
            assert type(base) is nn.Linear and base.weight.dtype == torch.float32, name
            n_kept += 1
        else:
            assert isinstance(base, cls), name
            n_quantized += 1
    assert n_kept > 0 and n_quantized > 0


def _seq2seq_batch() -> dict[str, torch.Tensor]:
    x = token_batch()
    return {"input_ids": x, "labels": x.flip(-1)}


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_t5_keep_in_fp32_modules_stay_unquantized_with_apply_peft(tmp_path, mode):
    """Lightning-free: ``apply_peft(..., quantize=...)`` on T5 leaves ``wo`` (T5's ``_keep_in_fp32_modules``)
    in fp32, as loading with transformers' ``BitsAndBytesConfig`` does; forward and backward then work
    (T5 casts the hidden states to ``wo.weight.dtype``, which must not be uint8/int8)."""
    model = _t5(tmp_path)
    assert "wo" in model._keep_in_fp32_modules
    stack = apply_peft(model, [LoRA(r=4, alpha=8, init_weights=False)], quantize=Quantization(mode))
    model.train()
    loss = model(**_seq2seq_batch()).loss
    loss.backward()
    assert set(_wo_names(model)) <= set(_adapted_names(model))  # wo is adapted, over a full-precision base
    _check_t5_quantized(model, mode)
    assert torch.isfinite(loss)
    grads = [p.grad for p in stack.trainable_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_t5_quantize_model_matches_bitsandbytes_config_load(tmp_path, mode):
    """``quantize_model`` quantizes exactly the layers transformers quantizes when loading with the
    equivalent ``BitsAndBytesConfig``, with and without a user skip list (merged with the model's list)."""
    from transformers import T5ForConditionalGeneration

    _, path = save_and_reload(tiny_t5(**T5), tmp_path)
    for skip in (None, ["q"]):
        q = Quantization(mode, skip_modules=skip)
        fresh = T5ForConditionalGeneration.from_pretrained(path).eval()
        names = quantize_model(fresh, q)
        loaded = T5ForConditionalGeneration.from_pretrained(
            path, quantization_config=bnb_config(q), device_map="cpu"
        ).eval()
        expected = {n for n, m in loaded.named_modules() if isinstance(m, BNB_TYPES)}
        assert set(names) == expected, skip
        _check_t5_quantized(fresh, mode, ("wo", "q") if skip else ("wo",))
        fresh(**_seq2seq_batch()).loss.backward()


def test_keep_in_fp32_modules_strict_also_stays_unquantized(tmp_path):
    """``_keep_in_fp32_modules_strict`` (always upcast to fp32 by transformers) is never quantized either."""
    from transformers import T5ForConditionalGeneration

    class StrictT5(T5ForConditionalGeneration):
        _keep_in_fp32_modules_strict = ["o"]

    from lightning_peft.quantization import keep_in_fp32_names

    model = _t5(tmp_path, cls=StrictT5)
    names = keep_in_fp32_names(model)
    assert names == {n for n, _ in model.named_modules() if n.endswith((".o", ".wo"))}
    assert keep_in_fp32_names(model, torch.bfloat16) == {n for n in names if n.endswith(".o")}
    assert keep_in_fp32_names(model, torch.float32) == set()
    apply_peft(model, [LoRA(r=4, init_weights=False)], quantize=Quantization("nf4"))
    _check_t5_quantized(model, "nf4", ("wo", "o"))
    model(**_seq2seq_batch()).loss.backward()


def test_t5_keep_in_fp32_modules_with_the_peft_callback(tmp_path):
    """``PEFT(quantize=...)`` on a LightningModule around T5 (the stack on the module itself, so the lists are
    found on the submodule) keeps ``wo`` unquantized and trains."""
    module = CausalLMModule(_t5(tmp_path))
    callback = PEFT([LoRA(r=4)], quantize=Quantization("int8"))
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, loader(lm_data()))
    _check_t5_quantized(module.model, "int8")
    assert callback.stack is not None and callback.stack.quantization.mode == "int8"


def test_merged_export_of_quantized_fp16_t5_keeps_wo_in_fp32(tmp_path):
    """A merged export of an fp16 T5 (``wo`` upcast to fp32 by transformers, the other layers quantized)
    writes ``wo`` in fp32 as ``save_pretrained`` of the model itself would, and loads back with the adapted
    logits.

    The export rounds the merged fp32 weights of the other layers to fp16, as the base model's own fp16
    weights are: the logits agree to fp16 precision (relative 1e-2)."""
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    _, path = save_and_reload(tiny_t5(**T5), tmp_path)
    model = T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float16).eval()
    assert all(model.get_submodule(n).weight.dtype == torch.float32 for n in _wo_names(model))
    apply_peft(model, [LoRA(r=4, alpha=8, init_weights=False)], quantize=Quantization("nf4"))
    _check_t5_quantized(model, "nf4")
    batch = _seq2seq_batch()
    with torch.no_grad():
        adapted = model(**batch).logits.float()
    folder = merge_and_export(model, tmp_path / "merged")
    saved = load_file(folder / "model.safetensors")
    wo = {k for k in saved if k.endswith(".wo.weight")}
    assert wo and all(saved[k].dtype == torch.float32 for k in wo)
    assert saved["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float16
    merged = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float16).eval()
    with torch.no_grad():
        exported = merged(**batch).logits.float()
    assert ((exported - adapted).norm() / adapted.norm()).item() < 1e-2
