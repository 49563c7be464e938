"""Mixed-adapter batches: ``model(**inputs, adapter_names=[...])`` and ``with mixed_batch(model, names):``.

Every row of one mixed forward must equal that row alone under its own set (``activate(set)``, or the base under
``disable_adapters``), to 1e-5 in fp32; LoRA rows must also equal ``peft``'s mixed batch on the same weights.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import save_and_reload, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, token_batch
from test_export import agree, peft_load, randomize

from lightning_peft import (
    IA3,
    AdaLoRA,
    Adapter,
    AdapterStateError,
    BitFit,
    LoRA,
    PeftConfigError,
    PromptTuning,
    PTuning,
    Quantization,
    activate,
    active_adapters,
    apply_peft,
    disable_adapters,
    merge_adapter_set,
    mixed_batch,
    save_adapters,
    unload,
    unmerge_adapter_set,
)
from lightning_peft.core.state import find_state

TOL = 1e-5
BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
LORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"],
                "gpt2": ["c_attn", "mlp.c_proj"]}
IA3_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "bert": (["key", "value", "output.dense"], ["output.dense"]),
               "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])}


def layer_sets(arch: str) -> dict[str, list]:
    targets, ff = IA3_TARGETS[arch]
    return {
        "lora": [LoRA(r=4, alpha=8, target_modules=LORA_TARGETS[arch])],
        "rslora": [LoRA(r=2, alpha=4, use_rslora=True, target_modules=LORA_TARGETS[arch][:1])],
        "ia3": [IA3(target_modules=targets, feedforward_modules=ff)],
        "both": [LoRA(r=2, target_modules=LORA_TARGETS[arch][1:]), IA3(target_modules=targets, feedforward_modules=ff)],
    }


def build(model, sets: dict[str, list], **kw):
    for i, (name, strategies) in enumerate(sets.items()):
        randomize(apply_peft(model, strategies, name=name, **kw), seed=i + 1)
    return model


def padded(batch: int, length: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with left padding on odd rows and right padding on every third row."""
    x = token_batch(batch, length, seed)
    mask = torch.ones_like(x)
    for i in range(batch):
        if i % 2:
            mask[i, : 1 + i % 4] = 0
        elif i % 3 == 2:
            mask[i, -2:] = 0
    return x, mask


def output(model, **inputs) -> torch.Tensor:
    out = model(**inputs, output_hidden_states=True)
    return torch.cat([out.logits.flatten(1), out.hidden_states[-1].flatten(1)], dim=1)  # logits and last states


def own_rows(model, names, **inputs) -> torch.Tensor:
    """Each row alone, under its own set (or the base), as a user would compute it without mixed batches."""
    rows = []
    for i, name in enumerate(names):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "__base__":
            with disable_adapters(model):
                rows.append(output(model, **row))
        else:
            activate(model, name)
            rows.append(output(model, **row))
    return torch.cat(rows)


def assert_rows_agree(model, names, label: str, **inputs) -> None:
    active = active_adapters(model)
    with torch.no_grad():
        mixed = output(model, **inputs, adapter_names=names)
        assert find_state(model).route is None  # the routing lasted one forward
        assert active_adapters(model) == active
        with mixed_batch(model, names):
            again = output(model, **inputs)
        own = own_rows(model, names, **inputs)
    assert torch.equal(mixed, again)
    diff = (mixed - own).abs().max().item()
    print(f"mixed-agreement {label}: max|row - own forward| = {diff:.2e}")
    assert diff <= TOL, diff
    with torch.no_grad(), disable_adapters(model):  # the routing is real: every adapted row differs from the base
        base = output(model, **inputs)
    changed = [(mixed[i] - base[i]).abs().max().item() > 1e-4 for i, n in enumerate(names) if n != "__base__"]
    assert all(changed), changed


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_layer_sets_rows_equal_their_own_forward(arch):
    model = build(BUILDERS[arch](), layer_sets(arch))
    names = ["lora", "__base__", "ia3", "both", "rslora", "lora", "__base__", "ia3"]
    x, mask = padded(len(names))
    assert_rows_agree(model, names, f"{arch} LoRA/rsLoRA/IA3 + base", input_ids=x, attention_mask=mask)
    # rows grouped (contiguous slices) and scattered (index tensors) take both paths of the routing
    names = sorted(names)
    assert_rows_agree(model, names, f"{arch} grouped rows", input_ids=x, attention_mask=mask)


def test_nf4_base():
    model = tiny_llama(hidden_size=64, intermediate_size=128)  # rows of whole 64-element 4-bit blocks
    build(model, {"lora": layer_sets("llama")["lora"]}, quantize=Quantization("nf4"))
    build(model, {k: v for k, v in layer_sets("llama").items() if k != "lora"})
    names = ["ia3", "lora", "__base__", "both", "rslora", "lora"]
    x, mask = padded(len(names))
    assert_rows_agree(model, names, "llama nf4 base", input_ids=x, attention_mask=mask)
    build(model, {"p1": [PromptTuning(num_virtual_tokens=3)], "p2": [PromptTuning(num_virtual_tokens=3),
                                                                     LoRA(r=2, target_modules=["o_proj"])]})
    names = ["p2", "p1", "p1", "p2", "p1", "p2"]
    assert_rows_agree(model, names, "llama nf4 base, prompt sets", input_ids=x, attention_mask=mask)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_prompt_sets_rows_equal_their_own_forward(arch):
    n = 4
    sets = {
        "prompt": [PromptTuning(num_virtual_tokens=n)],
        "ptuning": [PTuning(num_virtual_tokens=n, encoder="mlp")],
        "hybrid": [PromptTuning(num_virtual_tokens=n), LoRA(r=2, target_modules=LORA_TARGETS[arch][:2])],
    }
    model = build(BUILDERS[arch](), sets)
    names = ["hybrid", "prompt", "ptuning", "prompt", "hybrid"]
    x, mask = padded(len(names))
    assert_rows_agree(model, names, f"{arch} prompt sets", input_ids=x, attention_mask=mask)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask, adapter_names=names).logits
    assert logits.shape[0] == len(names) and (arch == "bert" or logits.shape[1] == x.shape[1])  # caller's positions


def test_dora_adalora_adapter_and_embedding_sets():
    sets = {
        "dora": [LoRA(r=4, use_dora=True, target_modules=["q_proj", "up_proj"], init_weights=False)],
        "adalora": [AdaLoRA(init_r=4, target_r=2, target_modules=["v_proj"])],
        "adapter": [Adapter(bottleneck=4, target_modules=["o_proj", "down_proj"], init_weights=False)],
        "embed": [LoRA(r=4, target_modules=["embed_tokens", "q_proj"])],
    }
    model = build(tiny_llama(), sets)
    names = ["dora", "adalora", "__base__", "adapter", "embed", "dora", "adapter"]
    x, mask = padded(len(names))
    assert_rows_agree(model, names, "llama DoRA/AdaLoRA/bottleneck/embedding", input_ids=x, attention_mask=mask)


def test_conv_lora_on_vit():
    model = tiny_vit()
    for i, name in enumerate(["a", "b"]):
        randomize(apply_peft(model, [LoRA(r=2, target_modules=["patch_embeddings.projection", "query"])], name=name),
                  seed=i + 3)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(pixel_values=pixels, adapter_names=names).logits
        own = []
        for i, name in enumerate(names):
            if name == "__base__":
                with disable_adapters(model):
                    own.append(model(pixel_values=pixels[i : i + 1]).logits)
            else:
                activate(model, name)
                own.append(model(pixel_values=pixels[i : i + 1]).logits)
    diff = (mixed - torch.cat(own)).abs().max().item()
    print(f"mixed-agreement vit conv LoRA: {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_lora_rows_agree_with_peft_mixed_batch(tmp_path, arch):
    model, base_path = save_and_reload(BUILDERS[arch](), tmp_path)
    sets = {k: v for k, v in layer_sets(arch).items() if k in ("lora", "rslora")}
    build(model, sets)
    theirs = None
    for name in sets:
        folder = save_adapters(model, tmp_path / name, name=name)
        if theirs is None:
            theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder, adapter_name=name)
        else:
            theirs.load_adapter(str(folder), adapter_name=name)
    theirs.eval()
    names = ["rslora", "__base__", "lora", "lora", "__base__", "rslora"]
    x, mask = padded(len(names))
    with torch.no_grad():
        ours = output(model, input_ids=x, attention_mask=mask, adapter_names=names)
        ref = output(theirs, input_ids=x, attention_mask=mask, adapter_names=names)
        with theirs.disable_adapter():
            base = output(theirs, input_ids=x, attention_mask=mask)
    agree((ours - ref).abs().max().item(), TOL)
    changed = [(ref[i] - base[i]).abs().max().item() for i, n in enumerate(names)]
    assert all((d > 1e-4) == (n != "__base__") for d, n in zip(changed, names)), changed  # only adapted rows change


def test_eval_mode_gradients_flow_to_each_rows_set():
    model = build(tiny_llama(), {k: v for k, v in layer_sets("llama").items() if k in ("lora", "ia3")})
    names = ["lora", "__base__", "lora"]
    x, mask = padded(3)
    for n, p in model.named_parameters():  # apply_peft trains the last set only: let both take gradients
        p.requires_grad_(".adapters." in n)
    model(input_ids=x, attention_mask=mask, adapter_names=names).logits[[0, 2]].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".adapters." in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".lora." in n)
    assert all(g is None for n, g in grads.items() if ".ia3." in n)  # no row used that set


def test_in_place_head_of_the_active_set_is_off_for_mixed_rows():
    """The active set trains a head in place (unfreeze): the mixed rows (base and other sets) see the base head."""
    model = tiny_bert()
    randomize(apply_peft(model, [LoRA(r=2, target_modules=["query"])], name="a"), seed=1)
    randomize(apply_peft(model, [LoRA(r=2, target_modules=["value"])], unfreeze=["classifier"], name="head"), seed=2)
    head = model.classifier.weight.detach().clone()
    x, mask = padded(2)
    with torch.no_grad():
        mixed = model(input_ids=x, attention_mask=mask, adapter_names=["a", "__base__"]).logits
    assert active_adapters(model) == ["head"] and torch.equal(model.classifier.weight, head)
    with torch.no_grad():
        own = own_rows(model, ["a", "__base__"], input_ids=x, attention_mask=mask)
    assert (mixed - own[:, : mixed.shape[1]]).abs().max() <= TOL


def refused(model, exc, match, names, **inputs):
    state = find_state(model)
    active = state.active
    with pytest.raises(exc, match=match):
        model(**inputs, adapter_names=names)
    assert state.route is None and state.active == active


def test_refusals_name_the_problem_before_anything_runs():
    model = build(tiny_llama(), {"a": layer_sets("llama")["lora"], "b": layer_sets("llama")["ia3"]})
    x, mask = padded(3)
    inputs = dict(input_ids=x, attention_mask=mask)
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    refused(model, AdapterStateError, r"'c', which is not an adapter set.*loaded sets: a, b", ["a", "c", "b"], **inputs)
    refused(model, PeftConfigError, r"adapter_names has 2 entries but the batch has 3 rows", ["a", "b"], **inputs)
    refused(model, PeftConfigError, r"adapter_names='a' is not valid", "a", **inputs)
    refused(model, PeftConfigError, r"adapter_names=\[\] is empty", [], **inputs)
    model.train()
    refused(model, AdapterStateError, r"training mode; call model.eval\(\)", ["a", "b", "a"], **inputs)
    model.eval()
    merge_adapter_set(model, "a")
    refused(model, AdapterStateError, r"set 'a' is merged.*unmerge_adapter_set", ["a", "b", "__base__"], **inputs)
    with pytest.raises(AdapterStateError, match="is merged"), mixed_batch(model, ["a", "b", "a"]):
        pass
    unmerge_adapter_set(model)
    with mixed_batch(model, ["a", "b", "a"]):
        with pytest.raises(AdapterStateError, match="already a mixed-adapter batch"):
            model(**inputs, adapter_names=["a", "b", "a"])
        with pytest.raises(PeftConfigError, match="3 entries but the batch has 2 rows"):
            model(input_ids=x[:2])
        calls.clear()
        with pytest.raises(PeftConfigError, match=r"3 entries but a Linear layer got an input of shape \(2, 10, 32\)"):
            model.model(input_ids=x[:2])  # a submodule called alone: its first adapted layer refuses the rows
        calls.clear()
    assert not calls  # every refusal came before the model ran
    handle.remove()
    assert find_state(model).route is None


def test_sets_that_cannot_be_mixed_are_refused_naming_them():
    model = tiny_bert()
    build(model, {"lora": layer_sets("bert")["lora"]})
    build(model, {"head": [LoRA(r=2, target_modules=["value"])]}, unfreeze=["classifier"])
    build(model, {"bitfit": [BitFit()]})
    build(model, {"p4": [PromptTuning(num_virtual_tokens=4)], "p2": [PromptTuning(num_virtual_tokens=2)]})
    x, mask = padded(2)
    inputs = dict(input_ids=x, attention_mask=mask)
    refused(model, PeftConfigError, r"set 'head' trains classifier in place", ["lora", "head"], **inputs)
    refused(model, PeftConfigError, r"set 'bitfit' holds BitFit", ["bitfit", "lora"], **inputs)
    refused(model, PeftConfigError, r"'p4': 4, '__base__': 0", ["p4", "__base__"], **inputs)
    refused(model, PeftConfigError, r"'p4': 4, 'p2': 2", ["p4", "p2"], **inputs)
    refused(model, PeftConfigError, r"'p2': 2, 'lora': 0", ["p2", "lora"], **inputs)


def test_exception_in_forward_ends_the_routing_and_hooks_go_with_the_last_set():
    model = build(tiny_llama(), {"a": layer_sets("llama")["lora"], "b": layer_sets("llama")["ia3"]})
    with pytest.raises(IndexError):
        model(input_ids=torch.full((2, 3), 10_000), adapter_names=["a", "b"])  # out-of-range ids fail inside
    assert find_state(model).route is None
    x, mask = padded(2)
    assert_rows_agree(model, ["b", "a"], "after a failed forward", input_ids=x, attention_mask=mask)
    twin = copy.deepcopy(model)  # the copy routes through its own state
    with torch.no_grad():
        out = twin(input_ids=x, attention_mask=mask, adapter_names=["b", "a"]).logits
        assert (out - model(input_ids=x, attention_mask=mask, adapter_names=["b", "a"]).logits).abs().max() == 0
    for m in (model, twin):
        unload(m, "a")
        unload(m, "b")
        assert not m._forward_pre_hooks and not m._forward_hooks  # the model as it was before any set
        assert "generate" not in m.__dict__  # and generate is the class's again
    assert twin.__dict__ is not model.__dict__


def each_row_alone(model, names: list[str], x: torch.Tensor, **kw) -> torch.Tensor:
    """``generate`` of each row alone under its own set (or the base), concatenated."""
    own = []
    for i, name in enumerate(names):
        with disable_adapters(model) if name == "__base__" else contextlib.nullcontext():
            if name != "__base__":
                activate(model, name)
            own.append(model.generate(input_ids=x[i : i + 1], **kw))
    return torch.cat(own)


def test_generate_takes_adapter_names_with_beams_and_a_wrapper_takes_the_context():
    model = build(tiny_llama(), {k: v for k, v in layer_sets("llama").items() if k in ("lora", "ia3")})
    names = ["ia3", "lora", "__base__"]
    x = token_batch(3, 6)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # no row stops early
    with torch.no_grad():
        with mixed_batch(model, names):
            expected = model.generate(input_ids=x, **kw)
        assert torch.equal(expected, each_row_alone(model, names, x, **kw))
        # generate() takes the names itself, as peft's does
        assert torch.equal(model.generate(input_ids=x, adapter_names=names, **kw), expected)
        # beams and returned sequences: generate() repeats each row k times in place, and they keep its set
        beams = dict(kw, num_beams=2, num_return_sequences=2)
        mixed = model.generate(input_ids=x, adapter_names=names, **beams)
        assert mixed.shape[0] == 2 * len(names)
        assert torch.equal(mixed, each_row_alone(model, names, x, **beams))
        assert find_state(model).route is None
        with pytest.raises(PeftConfigError, match="3 entries but the batch has 6 rows"):  # a plain call: no repeat
            model(input_ids=torch.cat([x, x]), adapter_names=names)

    class Wrapper(torch.nn.Module):  # a LightningModule-like module whose forward cannot take adapter_names
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(input_ids=ids).logits

    wrapper = Wrapper()
    with torch.no_grad(), mixed_batch(wrapper, names):
        logits = wrapper(x)
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=x, adapter_names=names).logits)
