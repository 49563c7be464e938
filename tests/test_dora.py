"""DoRA (``LoRA(use_dora=True)``) against Hugging Face PEFT's ``LoraConfig(use_dora=True)``, the reference:
forward and gradients (full-precision, GPT-2 Conv1D, nf4 and int8 bases), merge, export, checkpoints, refusals.

Every agreement figure is printed (``pytest -s tests/test_dora.py | grep dora-agreement``).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import save_and_reload, tiny_gpt2, tiny_llama, token_batch

from lightning_peft import IA3, AdaLoRA, LoRA, PeftConfigError, apply_peft
from lightning_peft.core.layer import AdaptedLinear
from lightning_peft.io.adapters import NATIVE_WEIGHTS_NAME, load_adapters, save_adapters
from lightning_peft.io.merged import merge_and_export
from lightning_peft.io.peft_layout import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, build_peft_export
from lightning_peft.quantization import Quantization, quantize_model

peft = pytest.importorskip("peft")

TOL = 1e-5  # fp32
BNB_TOL = 1e-4  # the same quantized base on both sides; bitsandbytes kernels
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train mode: only the adapters' dropout


def _snapshot(model) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return [(n, type(m).__name__) for n, m in model.named_modules()], state, [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model, before: tuple) -> None:
    types, state, flags = _snapshot(model)
    assert types == before[0] and flags == before[2] and state.keys() == before[1].keys()
    assert all(v.dtype == before[1][k].dtype and torch.equal(v, before[1][k]) for k, v in state.items())


def build(arch: str):
    return tiny_llama() if arch == "llama" else tiny_gpt2(**NO_DROPOUT_GPT2)


def agree(what: str, diff: float, tol: float) -> None:
    print(f"dora-agreement {what}: max|diff| = {diff:.2e} (limit {tol:g})")
    assert diff <= tol, (what, diff)


def dora(**kw) -> LoRA:
    return LoRA(r=4, alpha=8, use_dora=True, **kw)


def deltas(stack):
    return {n: stack.model.get_submodule(n).adapters[stack.name]["lora"] for n in stack.applied[0].targets}


def pair(ref_base, ours_base, targets, dropout=0.0):
    """peft's DoRA on ``ref_base`` and ours on ``ours_base`` with the same A, B and (trained-looking) magnitude;
    also the largest difference between our initial magnitude on peft's A, B and peft's."""
    ref = peft.get_peft_model(ref_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                                        lora_dropout=dropout, init_lora_weights=False))
    stack = apply_peft(ours_base, [dora(dropout=dropout, target_modules=targets)])
    named = dict(ref.named_parameters())
    g = torch.Generator().manual_seed(3)
    init_diff = 0.0
    for name, delta in deltas(stack).items():
        key = f"base_model.model.{name}"
        magnitude = named[f"{key}.lora_magnitude_vector.default.weight"]
        with torch.no_grad():
            delta.lora_A.copy_(named[f"{key}.lora_A.default.weight"])
            delta.lora_B.copy_(named[f"{key}.lora_B.default.weight"])
            delta.init_magnitude(ours_base.get_submodule(name).base_layer)  # our init, on peft's A and B
            init_diff = max(init_diff, (delta.lora_magnitude - magnitude).abs().max().item())
            magnitude.mul_(1 + 0.3 * torch.randn(magnitude.shape, generator=g))  # as after training
            delta.lora_magnitude.copy_(magnitude)
    return ref, stack, init_diff


def grad_diff(ref, stack) -> float:
    named = dict(ref.named_parameters())
    worst = 0.0
    for name, delta in deltas(stack).items():
        key = f"base_model.model.{name}"
        for ours, theirs in ((delta.lora_A, "lora_A.default.weight"), (delta.lora_B, "lora_B.default.weight"),
                             (delta.lora_magnitude, "lora_magnitude_vector.default.weight")):
            assert ours.grad is not None and ours.grad.abs().sum() > 0
            worst = max(worst, (ours.grad - named[f"{key}.{theirs}"].grad).abs().max().item())
    return worst


def train_step_diff(ref, model, x, seed=0) -> float:
    ref.train()
    model.train()
    torch.manual_seed(seed)
    theirs = ref(input_ids=x, labels=x).loss
    theirs.backward()
    torch.manual_seed(seed)  # the same dropout draws, layer by layer
    ours = model(input_ids=x, labels=x).loss
    ours.backward()
    return (ours - theirs).abs().item()


def eval_diff(ref, model, x) -> float:
    ref.eval()
    model.eval()
    with torch.no_grad():
        return (ref(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_and_gradients_match_peft(arch):
    base = build(arch)
    ours = copy.deepcopy(base)
    ref, stack, init_diff = pair(base, ours, TARGETS[arch])
    agree(f"{arch} initial magnitude", init_diff, TOL)
    x = token_batch()
    agree(f"{arch} eval logits", eval_diff(ref, ours, x), TOL)
    agree(f"{arch} train loss", train_step_diff(ref, ours, x), TOL)
    agree(f"{arch} gradients", grad_diff(ref, stack), TOL)
    with torch.no_grad(), stack.disable_adapters():
        plain = ours(input_ids=x).logits
    assert (plain - ours(input_ids=x).logits).abs().max() > 1e-3  # the adapters really change the output


def test_dropout_recomputes_the_base_part_as_peft_does():
    """In training with dropout, peft computes DoRA's base part on dropout(x): the same draws give the same step."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    ref, stack, _ = pair(base, ours, TARGETS["llama"], dropout=0.3)
    x = token_batch()
    agree("llama dropout=0.3 train loss", train_step_diff(ref, ours, x, seed=5), TOL)
    agree("llama dropout=0.3 gradients", grad_diff(ref, stack), TOL)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_base_matches_peft(mode, recwarn):
    ref_base, ours = tiny_llama(), tiny_llama()
    for model in (ref_base, ours):  # the same weights quantized the same way
        quantize_model(model, Quantization(mode))
    setattr(ref_base, "is_loaded_in_4bit" if mode == "nf4" else "is_loaded_in_8bit", True)  # peft's bnb layers
    ref, stack, init_diff = pair(ref_base, ours, TARGETS["llama"], dropout=0.1)
    assert type(ref.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__module__ == \
        "peft.tuners.lora.bnb"
    agree(f"{mode} initial magnitude", init_diff, BNB_TOL)
    x = token_batch()
    agree(f"{mode} train loss", train_step_diff(ref, ours, x, seed=1), BNB_TOL)
    agree(f"{mode} gradients", grad_diff(ref, stack), BNB_TOL)
    if mode == "nf4":  # peft's int8 DoRA on the CPU fails after switching train/eval (its bnb state); ours does not
        agree(f"{mode} eval logits", eval_diff(ref, ours, x), BNB_TOL)
    else:
        with torch.no_grad():
            assert torch.isfinite(ours.eval()(input_ids=x).logits).all()


@pytest.mark.parametrize("base", ["linear", "conv1d", "nf4", "int8"])
def test_merge_unmerge_round_trip(base, recwarn):
    model = tiny_gpt2() if base == "conv1d" else tiny_llama()
    if base in ("nf4", "int8"):
        quantize_model(model, Quantization(base))
    arch = "gpt2" if base == "conv1d" else "llama"
    stack = apply_peft(model, [dora(target_modules=TARGETS[arch], init_weights=False)])
    with torch.no_grad():
        for delta in deltas(stack).values():
            delta.lora_magnitude.mul_(1.5)  # m != ||W + sBA||: the merge must rescale the rows
    name = stack.applied[0].targets[0]
    before = model.get_submodule(name).base_layer.weight.detach().clone()
    x = token_batch()
    # a merged int8 layer computes in full precision, while LLM.int8() also quantizes the activations
    merged_tol = 1e-2 if base == "int8" else TOL
    with torch.no_grad():
        want = model(input_ids=x).logits
        for _ in range(2):
            stack.merge()
            agree(f"{base} merged vs adapted", (model(input_ids=x).logits - want).abs().max().item(), merged_tol)
            stack.unmerge()
            after = model.get_submodule(name).base_layer.weight
            if base in ("linear", "conv1d"):
                agree(f"{base} unmerged weight", (after - before).abs().max().item(), 1e-6)
            else:
                assert torch.equal(after, before)  # the quantized base is put back as it was
            agree(f"{base} unmerged vs adapted", (model(input_ids=x).logits - want).abs().max().item(), TOL)


def test_merged_export_reloads_as_plain_transformers(tmp_path):
    model, _ = save_and_reload(tiny_llama(), tmp_path)
    stack = apply_peft(model, [dora(target_modules="all-linear", init_weights=False)])
    with torch.no_grad():
        for delta in deltas(stack).values():
            delta.lora_magnitude.mul_(0.7)
    x = token_batch()
    with torch.no_grad():
        want = model(input_ids=x).logits
    folder = merge_and_export(model, tmp_path / "merged")
    merged = type(model).from_pretrained(folder).eval()
    with torch.no_grad():
        agree("merge_and_export", (merged(input_ids=x).logits - want).abs().max().item(), TOL)


def _trained(stack, seed=1):
    """A, B random; the magnitude near its initial norm, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in deltas(stack).values():
            delta.lora_A.copy_(torch.randn(delta.lora_A.shape, generator=g) * 0.2)
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=g) * 0.2)
            delta.lora_magnitude.mul_(1 + 0.3 * torch.randn(delta.lora_magnitude.shape, generator=g))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_loads_in_peft_and_reloads_bit_exact(tmp_path, arch):
    model, base_path = save_and_reload(build(arch), tmp_path)
    stack = apply_peft(model, [dora(target_modules=TARGETS[arch])])
    _trained(stack)
    x = token_batch()
    with torch.no_grad():
        ours = model(input_ids=x).logits
    folder = save_adapters(model, tmp_path / "adapter")
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    assert config["use_dora"] is True and config["fan_in_fan_out"] is (arch == "gpt2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(type(model).from_pretrained(base_path).eval(), str(folder)).eval()
    assert not [w for w in caught if "key" in str(w.message).lower()]
    from safetensors.torch import load_file

    saved = load_file(str(folder / PEFT_WEIGHTS_NAME))
    expected = peft.get_peft_model_state_dict(theirs)
    assert set(saved) == set(expected)  # peft's key names, lora_magnitude_vector included
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == len(stack.applied[0].targets)
    for key, value in saved.items():
        assert torch.equal(value, expected[key]), key
    with torch.no_grad():
        agree(f"{arch} export in peft", (theirs(input_ids=x).logits - ours).abs().max().item(), TOL)
    assert not (folder / NATIVE_WEIGHTS_NAME).exists()  # every tensor stored once, in peft's file

    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, ours)


def test_dora_with_adalora_is_not_folded_into_a_peft_adapter(tmp_path):
    model, base_path = save_and_reload(tiny_llama(), tmp_path)
    stack = apply_peft(model, [dora(target_modules=["q_proj", "v_proj"]),
                               AdaLoRA(init_r=4, target_r=2, target_modules=["q_proj", "down_proj"])])
    _trained(stack)
    export = build_peft_export(stack, stack.adapter_state_dict())
    assert export.parts == []
    assert set(export.skipped) == {"lora", "adalora"}
    assert all("cannot be folded" in why for why in export.skipped.values())
    x = token_batch()
    with torch.no_grad():
        ours = model(input_ids=x).logits
    with pytest.warns(UserWarning, match="cannot be folded"):
        folder = save_adapters(model, tmp_path / "adapter")
    assert not (folder / PEFT_CONFIG_NAME).exists()
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)  # the native files hold everything
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, ours)
        stack.merge()  # on q_proj DoRA's norm is of W + s B A alone; AdaLoRA's update adds to it
        agree("dora + adalora merged", (model(input_ids=x).logits - ours).abs().max().item(), TOL)
        stack.unmerge()
        agree("dora + adalora unmerged", (model(input_ids=x).logits - ours).abs().max().item(), TOL)


def test_dora_and_ia3_on_one_layer_are_refused_before_the_model_changes():
    model = tiny_llama()
    before = _snapshot(model)
    for strategies in ([dora(target_modules=["q_proj", "v_proj"]), IA3(target_modules=["v_proj", "down_proj"])],
                       [IA3(target_modules=["v_proj"]), dora(target_modules=["q_proj", "v_proj"])]):
        with pytest.raises(PeftConfigError, match=r"LoRA with DoRA and IA3 both adapt .*layers\.0\.self_attn\.v_proj"):
            apply_peft(model, strategies, quantize=Quantization("nf4"))
        _assert_unchanged(model, before)  # not even quantized
    # on different layers they compose: DoRA on q_proj, IA3 on v_proj
    stack = apply_peft(model, [dora(target_modules=["q_proj"], init_weights=False), IA3(target_modules=["v_proj"])])
    x = token_batch()
    with torch.no_grad():
        want = model(input_ids=x).logits
        stack.merge()
        agree("dora + ia3 on other layers, merged", (model(input_ids=x).logits - want).abs().max().item(), TOL)
        stack.unmerge()


def test_unsupported_layer_is_refused_before_the_model_changes():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.detach().to(torch.int8), requires_grad=False)  # not float, not bnb
    before = _snapshot(model)
    with pytest.raises(PeftConfigError, match=r"'model\.layers\.0\.self_attn\.q_proj' \(Linear with a torch\.int8 weight\)"):
        apply_peft(model, [dora(target_modules=["q_proj"])])
    _assert_unchanged(model, before)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    apply_peft(model, [LoRA(target_modules=["v_proj"], use_dora=True)])  # the supported layers are fine

    # a layer kind LoRA adapts but DoRA does not
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(PeftConfigError, match=r"'model\.embed_tokens' \(Embedding\), which LoRA\(use_dora=True\) "
                                              r"cannot adapt: it adapts linear layers only"):
        apply_peft(model, [dora(target_modules=["embed_tokens"])])
    _assert_unchanged(model, before)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(use_dora=1), r"use_dora=1 is not valid; expected True or False"),
    (dict(use_dora="yes"), r"use_dora='yes' is not valid"),
    (dict(use_dora=True, shared_dropout=True), r"use_dora=True with shared_dropout=True is not supported"),
    (dict(use_dora=True, init_weights="pissa"), r"use_dora=True with init_weights='pissa' is not supported"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(PeftConfigError, match=match):
        LoRA(**kwargs)


def test_config_round_trips():
    config = dora(target_modules=["q_proj"]).config()
    assert config["use_dora"] is True
    assert LoRA(**{k: v for k, v in config.items() if k != "name"}) == dora(target_modules=["q_proj"])


def test_bf16_autocast_step_with_dropout():
    model = tiny_llama()
    stack = apply_peft(model, [dora(dropout=0.1, target_modules="all-linear", init_weights=False)])
    model.train()
    x = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in stack.trainable_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(d.lora_magnitude.grad.abs().sum() > 0 for d in deltas(stack).values())


def test_norm_gets_no_gradient():
    """Section 4.3: ||W + sBA|| is a constant for backward; only m / ||.|| carries the magnitude's gradient."""
    layer_model = tiny_llama()
    stack = apply_peft(layer_model, [dora(target_modules=["q_proj"], init_weights=False)])
    name, delta = next(iter(deltas(stack).items()))
    layer = layer_model.get_submodule(name)
    x = torch.randn(3, layer.in_features)
    layer(x).sum().backward()
    # d/dB of sum(m/n * s B A x) with n constant: s * (m/n) outer (A x summed over the batch)
    w = layer.base_layer.weight
    n = torch.linalg.norm(w + delta.scaling * delta.lora_B.detach() @ delta.lora_A.detach(), dim=1)
    expected = delta.scaling * (delta.lora_magnitude.detach() / n).view(-1, 1) * (x @ delta.lora_A.detach().t()).sum(0)
    agree("dL/dB with the norm detached", (delta.lora_B.grad - expected).abs().max().item(), 1e-5)


def test_compiled_forward_has_no_graph_break():
    """Both paths (base output reused; base recomputed on the dropped-out input) trace in one graph each."""
    import torch._dynamo

    model = tiny_llama(num_hidden_layers=1)
    apply_peft(model, [dora(dropout=0.1, target_modules="all-linear")])
    x = token_batch()
    for training in (False, True):
        model.train(training)
        torch._dynamo.reset()
        breaks = len(torch._dynamo.explain(lambda ids: model(input_ids=ids).logits)(x).break_reasons)
        print(f"dora-compile training={training}: {breaks} graph breaks in the forward")
        assert breaks == 0


def test_resume_from_saved_state_equals_uninterrupted():
    """The magnitude is a trainable parameter like A and B: the stack's description rebuilds DoRA, its adapter
    state dict and the optimizer state hold the magnitude, and training resumes exactly (what a Lightning
    checkpoint of the PEFT callback stores)."""
    x = token_batch(batch=2, length=8)

    def steps(model, opt, n):
        for _ in range(n):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model = tiny_llama()
    stack = apply_peft(model, [dora(dropout=0.0, target_modules=["q_proj", "v_proj"])])
    opt = torch.optim.AdamW(stack.trainable_parameters(), lr=1e-2)
    model.train()
    steps(model, opt, 2)
    saved = {"stack": stack.describe(), "adapters": {k: v.clone() for k, v in stack.adapter_state_dict().items()},
             "optimizer": copy.deepcopy(opt.state_dict())}
    assert sum(k.endswith("lora.lora_magnitude") for k in saved["adapters"]) == 4
    steps(model, opt, 2)

    fresh = tiny_llama()
    restored = apply_peft(fresh, saved["stack"]["strategies"])
    restored.load_adapter_state_dict(saved["adapters"])
    opt2 = torch.optim.AdamW(restored.trainable_parameters(), lr=1e-2)
    opt2.load_state_dict(saved["optimizer"])
    fresh.train()
    steps(fresh, opt2, 2)
    want, got = stack.adapter_state_dict(), restored.adapter_state_dict()
    assert want.keys() == got.keys()
    agree("resumed vs uninterrupted adapters", max((want[k] - got[k]).abs().max().item() for k in want), 0.0)
