"""Quantized backbones (bitsandbytes 4-bit / 8-bit) under the stack, on the CPU with real bnb layers."""

import os

import bitsandbytes as bnb
import pytest
import torch
from helpers import CausalLMModule, lm_data, loader, tiny_bert, tiny_gpt2, tiny_llama, token_batch, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_peft import LoRA, PeftConfigError, apply_peft, get_stack
from lightning_peft.callbacks import PEFT
from lightning_peft.core.backend import base_weight
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.quantization import (
    Quantization,
    bnb_config,
    detect_quantization,
    memory_report,
    prepare_for_kbit_training,
    quantize_model,
)

BNB_TYPES = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
LLAMA_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays in full precision
# Rows are 64 wide or more: bitsandbytes 0.50's CPU 4-bit dequantization is wrong for rows that are not a multiple
# of the 64-element block (e.g. 0.41 instead of 0.09 relative error at 16 x 32); real models are not affected.
WIDE = dict(hidden_size=64, intermediate_size=128)
# measured relative Frobenius errors against fp32 (logits / worst layer weight): nf4 0.117 / 0.093,
# fp4 0.145 / 0.125, int8 0.0092 / 0.0065
LOGIT_TOL = {"nf4": 0.14, "fp4": 0.17, "int8": 0.012}
WEIGHT_TOL = {"nf4": 0.10, "fp4": 0.14, "int8": 0.008}


def llama(**kw):
    return tiny_llama(**WIDE, **kw)


def _logits(model, x=None):
    model.eval()
    with torch.no_grad():
        return model(token_batch() if x is None else x).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _packed(model):
    """Every quantized weight's raw bytes and quantization constants, by parameter name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BNB_TYPES):
            w = module.weight
            out[name] = [w.data.view(torch.uint8).clone()]
            if isinstance(w, bnb.nn.Params4bit):
                qs = w.quant_state
                out[name] += [qs.absmax.clone()] + ([qs.state2.absmax.clone()] if qs.nested else [])
            else:
                out[name].append((w.SCB if w.SCB is not None else module.state.SCB).clone())
    return out


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="nf8"), "mode='nf8' is not valid"),
        (dict(mode="int8", double_quant=True), "double_quant=True applies to the 4-bit modes only"),
        (dict(mode="int8", compute_dtype="bfloat16"), "compute_dtype='bfloat16' applies to the 4-bit modes"),
        (dict(mode="int8", quant_storage="float32"), "quant_storage='float32' applies to the 4-bit modes"),
        (dict(mode="nf4", compute_dtype="float64"), "compute_dtype='float64' is not valid"),
        (dict(mode="nf4", quant_storage="int4"), "quant_storage='int4' is not valid"),
        (dict(mode="nf4", int8_threshold=6.0), "int8_threshold=6.0 applies to mode='int8' only"),
        (dict(mode="int8", int8_threshold=-1), "int8_threshold=-1 is not valid"),
        (dict(double_quant="yes"), "double_quant='yes' is not valid"),
        (dict(skip_modules=[""]), "skip_modules=['']"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(PeftConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Quantization(**kwargs)


def test_config_normalizes_dtypes_and_round_trips():
    q = Quantization("nf4", double_quant=True, compute_dtype=torch.bfloat16, quant_storage="torch.float32")
    assert (q.compute_dtype, q.quant_storage) == ("bfloat16", "float32")
    assert Quantization(**q.config()) == q
    assert Quantization("int8").threshold == 6.0


def test_skip_name_matching_nothing_and_wrong_order_are_errors():
    with pytest.raises(PeftConfigError, match="skip_modules='nope' matched no module of LlamaForCausalLM"):
        quantize_model(llama(), Quantization("nf4", skip_modules=["nope"]))
    model = llama()
    apply_peft(model, [LoRA(r=2)])
    with pytest.raises(PeftConfigError, match="already carries adapters; quantize the backbone before"):
        quantize_model(model, Quantization("nf4"))
    model = llama()
    quantize_model(model, Quantization("nf4"))
    assert quantize_model(model, Quantization("nf4")) == []  # same settings: nothing to do
    with pytest.raises(PeftConfigError, match="already quantized differently"):
        quantize_model(model, Quantization("int8"))


# -- in place ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_in_place_quantization_is_close_to_full_precision(mode, capsys):
    reference = _logits(llama())
    model = llama()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    names = quantize_model(model, Quantization(mode))
    assert len(names) == LLAMA_LINEARS and "lm_head" not in names
    assert type(model.lm_head) is nn.Linear
    cls = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(model.get_submodule(n), cls) for n in names)
    weight_err = max(_rel(base_weight(model.get_submodule(n)), originals[n]) for n in names)
    err = _rel(_logits(model), reference)
    with capsys.disabled():
        print(
            f"\n[{mode}] logits rel. error vs fp32 {err:.4f} (tolerance {LOGIT_TOL[mode]}); "
            f"worst layer weight rel. error {weight_err:.4f}"
        )
    assert 0 < err < LOGIT_TOL[mode]
    assert weight_err < WEIGHT_TOL[mode]


def test_gpt2_conv1d_is_transposed_into_4bit():
    reference = tiny_gpt2(n_embd=64)
    model = tiny_gpt2(n_embd=64)
    conv = model.transformer.h[0].attn.c_attn
    original = conv.weight.detach().t().clone()  # Conv1D keeps (in, out)
    quantize_model(model, Quantization("nf4"))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, bnb.nn.Linear4bit) and (layer.in_features, layer.out_features) == (64, 192)
    assert _rel(base_weight(layer), original) < WEIGHT_TOL["nf4"]
    assert _rel(_logits(model), _logits(reference)) < LOGIT_TOL["nf4"]


def test_stack_skips_unfrozen_head_and_skip_modules():
    model = tiny_bert(**WIDE)
    stack = apply_peft(
        model,
        [LoRA(r=2, target_modules=["query", "value"])],
        unfreeze=["classifier"],
        quantize=Quantization("nf4", skip_modules=["pooler"]),
    )
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query.base_layer, bnb.nn.Linear4bit)
    assert isinstance(model.bert.encoder.layer[0].output.dense, bnb.nn.Linear4bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("classifier.")}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)
    assert stack.describe()["quantization"]["skip_modules"] == ["pooler"]


# -- load time ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q",
    [
        Quantization("nf4", double_quant=True),
        Quantization("fp4"),
        Quantization("int8"),
        Quantization("nf4", quant_storage="bfloat16", skip_modules=["mlp", "layers.1.self_attn.q_proj"]),
    ],
    ids=["nf4-dq", "fp4", "int8", "nf4-storage-skip"],
)
def test_bitsandbytes_config_load_equals_in_place(q, tmp_path):
    from transformers import LlamaForCausalLM

    llama().save_pretrained(tmp_path)
    in_place = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    quantize_model(in_place, q)
    loaded = LlamaForCausalLM.from_pretrained(
        tmp_path, quantization_config=bnb_config(q), device_map="cpu", dtype=torch.float32
    ).eval()
    kinds = {n: type(m) for n, m in in_place.named_modules()}
    assert kinds == {n: type(m) for n, m in loaded.named_modules()}
    a, b = in_place.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for key in a:  # raw bytes: packed weights stored as bfloat16 may hold NaN patterns
        assert (
            torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8))
            if a[key].is_floating_point()
            else torch.equal(a[key], b[key])
        ), key
    # the stack takes the loaded model as it is and records its settings
    stack = apply_peft(loaded, [LoRA(r=2)])
    assert detect_quantization(loaded).mode == q.mode and stack.describe()["quantization"]["mode"] == q.mode
    with stack.disable_adapters():
        assert torch.equal(_logits(loaded), _logits(in_place))


# -- training ------------------------------------------------------------------------------------------------------
class _Snapshot(Callback):
    """Records packed weights and every parameter once the stack is in place (after PEFT.setup)."""

    def on_fit_start(self, trainer, pl_module):
        self.packed = _packed(pl_module)
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize(
    "q", [Quantization("nf4", double_quant=True), Quantization("int8")], ids=["nf4-dq", "int8"]
)
def test_qlora_trainer_run_trains_only_adapters(q, tmp_path, capsys):
    module = CausalLMModule(model=llama().train(), lr=1e-2)
    batch = lm_data().tensors[0][:8]  # a training batch
    snap = _Snapshot()
    t = trainer(
        tmp_path, max_steps=24, callbacks=[PEFT([LoRA(r=8, alpha=16)], model_attr="model", quantize=q), snap]
    )

    def loss():
        module.eval()
        with torch.no_grad():
            return module.model(input_ids=batch, labels=batch).loss.item()

    t.fit(module, loader(lm_data(), shuffle=True))
    after = loss()
    with get_stack(module.model).disable_adapters():
        before = loss()  # adapters off = the quantized model before training (lora_B starts at zero)
    with capsys.disabled():
        print(f"\n[{q.mode}] QLoRA loss {before:.3f} -> {after:.3f} after 24 steps")
    assert after < 0.9 * before
    packed = _packed(module)
    assert len(packed) == LLAMA_LINEARS
    for name, tensors in snap.packed.items():
        assert all(torch.equal(x, y) for x, y in zip(tensors, packed[name])), name
    now = dict(module.named_parameters())
    changed = {
        n
        for n, p in snap.params.items()
        if not torch.equal(p.view(torch.uint8), now[n].detach().view(torch.uint8))
    }
    lora = {n for n in now if ".lora_" in n}
    assert changed == lora and len(lora) == 2 * LLAMA_LINEARS


# -- merge -------------------------------------------------------------------------------------------------------------
def _adapted(mode, seed=0, scale_b=1.0):
    model = llama(seed=seed)
    stack = apply_peft(model, [LoRA(r=4, alpha=8, init_weights=False)], quantize=Quantization(mode))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.mul_(scale_b)
    return model, stack


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_merge_into_full_precision_reproduces_adapted_quantized_model(mode, capsys):
    model, stack = _adapted(mode)
    adapted, base = _logits(model), _base(model, stack)
    bases = {n: m.base_layer for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    packed = _packed(model)
    # reference: every quantized base replaced by its dequantized weights, plus the deltas (no merging)
    reference_model, _ = _adapted(mode)
    for layer in (m for m in reference_model.modules() if isinstance(m, AdaptedLinear)):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=False)
        plain.weight.data = base_weight(layer.base_layer).clone()
        layer.base_layer = plain
    dequantized = _logits(reference_model)

    errors = stack.merge()
    assert set(errors) == set(bases) and set(errors.values()) == {0.0}
    assert all(type(m.base_layer) is nn.Linear for m in model.modules() if isinstance(m, AdaptedLinear))
    merged = _logits(model)
    to_reference = (merged - dequantized).abs().max().item()
    to_adapted = (merged - adapted).abs().max().item()
    with capsys.disabled():
        print(
            f"\n[{mode}] merged fp32 vs dequantized reference max |diff| {to_reference:.2e}, "
            f"vs adapted quantized model {to_adapted:.2e} (adapter effect {(adapted - base).abs().max():.3f})"
        )
    assert to_reference < 1e-5
    # 4-bit: the quantized forward is the dequantized matmul, so the merge is exact up to float rounding;
    # int8 also quantizes the activations (LLM.int8()), which the merged full-precision layer does not
    assert to_adapted < (1e-5 if mode == "nf4" else 1e-2)

    stack.unmerge()  # puts back the very same quantized layers, bits untouched
    assert all(m.base_layer is bases[n] for n, m in model.named_modules() if isinstance(m, AdaptedLinear))
    assert all(all(torch.equal(x, y) for x, y in zip(v, _packed(model)[k])) for k, v in packed.items())
    assert torch.equal(_logits(model), adapted)


def _base(model, stack):
    with stack.disable_adapters():
        return _logits(model)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_requantized_merge_error_is_reported(mode, capsys):
    # lora_B scaled down so the update is a few percent of the weights, as after real fine-tuning
    model, stack = _adapted(mode, scale_b=0.02)
    adapted, base = _logits(model), _base(model, stack)
    effect = (adapted - base).norm().item()
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    update = sum(
        (m.merged_weight("default")[0] - base_weight(m.base_layer)).norm() / base_weight(m.base_layer).norm()
        for m in layers
    ).item() / len(layers)
    errors = stack.merge(requantize=True)
    cls = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(m.base_layer, cls) for m in model.modules() if isinstance(m, AdaptedLinear))
    requantized = _logits(model)
    logit_err = (requantized - adapted).norm().item()
    worst = max(errors.values())
    with capsys.disabled():
        print(
            f"\n[{mode}] re-quantized merge: weight rel. error mean {sum(errors.values()) / len(errors):.4f}, "
            f"worst {worst:.4f}; logits error {logit_err / adapted.norm().item():.4f} of the logits, "
            f"{logit_err / effect:.2f} x the adapter's own effect (update {update:.3f} of the weights)"
        )
    assert 0 < worst < WEIGHT_TOL[mode]
    assert logit_err > 0
    stack.unmerge()
    assert torch.equal(_logits(model), adapted)


# -- memory, description ---------------------------------------------------------------------------------------------
def test_summary_reports_quantized_frozen_and_trainable_bytes():
    fp_total = sum(p.numel() for p in llama().parameters())
    model = llama()
    stack = apply_peft(model, [LoRA(r=2)], quantize=Quantization("nf4"))
    report = memory_report(model)
    q_bytes, q_params = report["quantized"]
    linear_params = (
        sum(m.in_features * m.out_features for m in llama().modules() if type(m) is nn.Linear) - 64 * 128
    )  # lm_head stays fp32
    assert q_params == linear_params
    # nf4 without double quantization: 4 bits + one fp32 absmax per 64 weights + a 16-entry fp32 code per layer
    assert q_bytes == linear_params // 2 + 4 * linear_params // 64 + 64 * LLAMA_LINEARS
    trainable = sum(p.numel() for p in stack.trainable_parameters())
    assert report["trainable"] == (4 * trainable, trainable)
    assert report["frozen"][1] == fp_total - linear_params
    assert (
        q_params + report["frozen"][1] + trainable == fp_total + trainable
    )  # packed params counted as params
    text = stack.summary()
    assert f"of {fp_total + trainable:,}" in text
    assert "quantized" in text and f"{8 * q_bytes / q_params:.3f}" in text
    assert stack.describe()["quantization"] == Quantization("nf4").config()


# -- Lightning -------------------------------------------------------------------------------------------------------
def _fit(tmp_path, epochs, quantize, ckpt_path=None, save_dir=None):
    torch.manual_seed(0)
    module = CausalLMModule(model=llama().train(), lr=1e-2)
    callbacks = [PEFT([LoRA(r=4, alpha=8)], model_attr="model", quantize=quantize)]
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, save_last=True))
    t = trainer(
        tmp_path,
        max_steps=-1,
        max_epochs=epochs,
        callbacks=callbacks,
        enable_checkpointing=save_dir is not None,
    )
    t.fit(module, loader(lm_data()), ckpt_path=ckpt_path)  # 4 steps per epoch
    return module, t


def test_qlora_checkpoint_is_adapter_only_and_resumes(tmp_path, capsys):
    q = Quantization("nf4", double_quant=True)
    straight, _ = _fit(tmp_path / "a", 2, q)
    module, first = _fit(tmp_path / "b", 1, q, save_dir=tmp_path / "ck")
    path = first.checkpoint_callback.last_model_path
    _, fp_run = _fit(tmp_path / "c", 1, None, save_dir=tmp_path / "fp")
    size, fp_size = os.path.getsize(path), os.path.getsize(fp_run.checkpoint_callback.last_model_path)
    state = torch.load(path, weights_only=True)
    assert set(state["state_dict"]) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert state["lightning_peft"]["stack"]["quantization"] == q.config()
    backbone = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    with capsys.disabled():
        print(
            f"\nQLoRA checkpoint {size:,} B; same run on the fp32 backbone {fp_size:,} B; "
            f"frozen backbone in memory {backbone:,} B"
        )
    assert abs(size - fp_size) < 2048  # the same adapter tensors; only the recorded description differs

    resumed, t = _fit(tmp_path / "d", 2, q, ckpt_path=path)
    assert t.global_step == 8
    want = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    got = dict(resumed.named_parameters())
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    assert worst <= 1e-6, worst


def _checkpointing(model):
    return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = llama()
        apply_peft(model, [LoRA(r=4, init_weights=False)], quantize=Quantization("nf4"))
        prepare_for_kbit_training(model, gradient_checkpointing=checkpointing)
        model.train()
        x = token_batch()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, model

    plain, _ = grads(False)
    checkpointed, model = grads(True)
    assert _checkpointing(model) and model.config.use_cache is False
    assert set(plain) == set(checkpointed) and all(g.abs().sum() > 0 for g in checkpointed.values())
    assert max((plain[n] - checkpointed[n]).abs().max().item() for n in plain) < 1e-6


def test_callback_gradient_checkpointing_and_errors(tmp_path):
    module = CausalLMModule(model=llama().train(), lr=1e-2)
    callback = PEFT(
        [LoRA(r=4)], model_attr="model", quantize=Quantization("nf4"), gradient_checkpointing=True
    )
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, loader(lm_data()))
    assert _checkpointing(module.model)
    assert all(p.grad is not None for p in get_stack(module.model).trainable_parameters())
    wrapped = CausalLMModule(model=llama())
    with pytest.raises(PeftConfigError, match="gradient_checkpointing=True needs a model with"):
        trainer(tmp_path, max_steps=1, callbacks=[PEFT([LoRA(r=4)], gradient_checkpointing=True)]).fit(
            wrapped, loader(lm_data())
        )


def test_prepare_upcasts_half_precision_weights_but_not_quantized_ones():
    model = llama().to(torch.bfloat16)
    stack = apply_peft(model, [LoRA(r=4)], quantize=Quantization("nf4", compute_dtype="bfloat16"))
    assert all(p.dtype == torch.float32 for p in stack.trainable_parameters())  # adapters are fp32 anyway
    cast = prepare_for_kbit_training(model)
    # 2 x 2 layer norms, the final norm, the embeddings and the head; not the 14 packed 4-bit weights
    assert len(cast) == 7 and {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"} <= set(
        cast
    )
    assert all(
        p.dtype == torch.float32
        for n, p in model.named_parameters()
        if ".lora_" not in n and not isinstance(p, bnb.nn.Params4bit)
    )
    assert model.model.layers[0].mlp.up_proj.base_layer.compute_dtype == torch.bfloat16
    x = token_batch()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in stack.trainable_parameters())


def test_lightning_bitsandbytes_plugin(tmp_path):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from lightning_peft.lightning.precision import quantization_from_precision, resolve_quantization

    with pytest.raises(RuntimeError, match="only supported on CUDA"):  # Lightning's own check on the CPU
        trainer(tmp_path, plugins=[BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16)])
    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16, ignore_modules={"model.lm_head"})
    q = quantization_from_precision(plugin, "model")
    assert (q.mode, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")
    model = llama()
    quantize_model(model, q)  # the prefix, made relative to model_attr, matches the head
    assert type(model.lm_head) is nn.Linear
    assert quantization_from_precision(BitsandbytesPrecision("int8")).mode == "int8"
    assert resolve_quantization(Quantization("nf4", double_quant=True), plugin).compute_dtype == "bfloat16"
    assert resolve_quantization(Quantization("fp4"), None) == Quantization("fp4")
    with pytest.raises(PeftConfigError, match="disagrees with the Trainer's BitsandbytesPrecision plugin"):
        resolve_quantization(Quantization("fp4"), plugin)
    with pytest.raises(PeftConfigError, match="mode='int8-training'"):
        quantization_from_precision(BitsandbytesPrecision("int8-training"))


def test_quantize_on_a_given_device_then_stack_goes_on():
    from lightning_peft.lightning.precision import quantize_on_device

    model = tiny_bert(**WIDE)
    names = quantize_on_device(model, Quantization("nf4"), ["classifier"], torch.device("cpu"))
    assert "classifier" not in names and len(names) == 13  # 2 x (q, k, v, o, in, out) + pooler
    stack = apply_peft(
        model, [LoRA(r=2, target_modules=["query"])], unfreeze=["classifier"], quantize=Quantization("nf4")
    )
    assert type(model.classifier) is nn.Linear and model.classifier.weight.requires_grad
    assert stack.describe()["quantization"]["mode"] == "nf4"


def test_memory_benchmark_smoke(monkeypatch, capsys):
    import runpy

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quant_memory.py")
    monkeypatch.setattr("sys.argv", ["quant_memory.py", "--smoke"])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"fp32", "bf16", "nf4", "nf4 + double quant", "fp4", "int8"} <= set(rows)
    assert float(rows["fp32"].split("|")[2]) == 4.0
