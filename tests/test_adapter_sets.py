"""Named adapter sets on one frozen (possibly nf4) base: switching, training one set among others, evaluation,
merging, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    CausalLMModule,
    ClassifierModule,
    classification_data,
    lm_data,
    loader,
    tiny_bert,
    tiny_llama,
    token_batch,
    trainer,
)

from lightning_peft import (
    IA3,
    AdapterStateError,
    LoRA,
    PeftConfigError,
    PromptTuning,
    activate,
    active_adapters,
    apply_peft,
    deactivate,
    disable_adapters,
    list_adapter_sets,
    merge_adapter_set,
    unload,
    unmerge_adapter_set,
)
from lightning_peft.callbacks import PEFT, evaluate_adapter_sets
from lightning_peft.io.adapters import load_adapters, read_adapter_tensors, read_manifest, save_adapters
from lightning_peft.quantization import Quantization, quantize_model
from lightning_peft.stack.sets import get_adapter_set, merged_adapter_set, using_adapter_set

SETS = {
    "sentiment": lambda: [LoRA(r=2, target_modules=["q_proj", "v_proj"])],
    "topic": lambda: [
        LoRA(r=4, target_modules="all-linear"),
        IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ],
    "hybrid": lambda: [
        PromptTuning(num_virtual_tokens=3),
        LoRA(r=2, target_modules=["gate_proj", "up_proj"]),
    ],
}


def _train(model: torch.nn.Module, steps: int = 3, seed: int = 0) -> None:
    """A few real optimizer steps so every adapter tensor moves away from its init."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    (ids,) = lm_data(n=8, seed=seed).tensors
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _base_tensors(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """data_ptr and a copy of every base weight (everything outside the adapter containers)."""
    out = {}
    for name, p in model.state_dict(keep_vars=True).items():
        if ".adapters." in name or "lightning_peft" in name:
            continue
        out[name] = (p.data_ptr(), p.detach().clone())
    return out


@pytest.fixture(scope="module", params=[None, "nf4"])
def trained_sets(request, tmp_path_factory):
    """Three sets, each trained on its own copy of the base, saved; the trainer's outputs on a fixed batch."""
    quantize = Quantization(request.param) if request.param else None
    ids = token_batch(batch=2, length=10, seed=3)
    folders, outputs = {}, {}
    for i, (name, make) in enumerate(SETS.items()):
        model = tiny_llama()
        apply_peft(model, make(), name=name, quantize=quantize)
        _train(model, seed=i)
        with torch.no_grad():
            outputs[name] = model(ids).logits
        folders[name] = save_adapters(model, tmp_path_factory.mktemp(name) / name)
    reference = tiny_llama()
    if quantize is not None:
        quantize_model(reference, quantize)
    with torch.no_grad():
        base_out = reference(ids).logits
    return quantize, ids, folders, outputs, base_out


def test_three_sets_on_one_base_reproduce_their_trainers(trained_sets):
    quantize, ids, folders, outputs, base_out = trained_sets
    model = tiny_llama()
    for name, folder in folders.items():
        load_adapters(model, folder, name=name)
    assert list_adapter_sets(model) == ["sentiment", "topic", "hybrid"]
    distinct = [outputs["sentiment"], outputs["topic"], outputs["hybrid"], base_out]
    for i, x in enumerate(distinct):  # the sets really differ from each other and from the base
        assert all((x - y).abs().max() > 1e-3 for y in distinct[i + 1 :])
    assert active_adapters(model) == ["hybrid"]  # the last one added
    assert all(
        not p.requires_grad for n, p in model.named_parameters() if ".sentiment." in n or ".topic." in n
    )
    before = _base_tensors(model)
    for _ in range(2):  # back and forth: switching leaves no trace
        for name in ["topic", "sentiment", "hybrid"]:
            activate(model, name)
            assert active_adapters(model) == [name]
            with torch.no_grad():
                out = model(ids).logits
            assert out.shape == outputs[name].shape
            torch.testing.assert_close(out, outputs[name], rtol=0, atol=1e-6)
        deactivate(model)
        assert active_adapters(model) == []
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, base_out, rtol=0, atol=1e-6)
    after = _base_tensors(model)
    assert after.keys() == before.keys()
    for key, (ptr, value) in before.items():  # no base weight copied, moved or re-quantized
        if "quant_state." not in key:  # packed quant_state entries are built anew by each state_dict() call
            assert after[key][0] == ptr, key
        assert torch.equal(after[key][1], value), key
    if quantize is not None:
        layer = model.model.layers[0].self_attn.q_proj.base_layer
        assert type(layer).__name__ == "Linear4bit"
        absmax = layer.weight.quant_state.absmax.data_ptr()
        activate(model, "topic")
        deactivate(model)
        assert layer.weight.quant_state.absmax.data_ptr() == absmax
        print(f"\nnf4 base: {len(folders)} sets switched, base data_ptrs unchanged")


def test_unload_keeps_the_others(trained_sets):
    _, ids, folders, outputs, base_out = trained_sets
    model = tiny_llama()
    for name, folder in folders.items():
        load_adapters(model, folder, name=name)
    unload(model, "hybrid")  # the active one: none is active afterwards
    assert list_adapter_sets(model) == ["sentiment", "topic"] and active_adapters(model) == []
    assert not any("hybrid" in n for n in model.state_dict())
    activate(model, "sentiment")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outputs["sentiment"], rtol=0, atol=1e-6)
    unload(model, "topic")  # an inactive one
    assert active_adapters(model) == ["sentiment"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outputs["sentiment"], rtol=0, atol=1e-6)
    with pytest.raises(
        AdapterStateError, match=r"name='topic' is not an adapter set.*loaded sets: sentiment"
    ):
        activate(model, "topic")
    unload(model, "sentiment")
    assert list_adapter_sets(model) == [] and active_adapters(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_out, rtol=0, atol=1e-6)


def test_errors_unknown_duplicate_and_incompatible_base(tmp_path):
    model = tiny_llama()
    apply_peft(model, [LoRA(r=2, target_modules=["q_proj"])], name="a")
    apply_peft(model, [LoRA(r=2, target_modules=["v_proj"])], name="b")
    with pytest.raises(
        AdapterStateError, match=r"name='c' is not an adapter set of this model; loaded sets: a, b"
    ):
        activate(model, "c")
    with pytest.raises(AdapterStateError, match="loaded sets: a, b"):
        unload(model, "c")
    with pytest.raises(PeftConfigError, match="already has an adapter set named 'a'"):
        apply_peft(model, [LoRA(r=2, target_modules=["k_proj"])], name="a")
    folder = save_adapters(model, tmp_path / "a", name="a")
    with pytest.raises(PeftConfigError, match="already has an adapter set named 'a'"):
        load_adapters(model, folder)  # same name as a loaded set
    assert list_adapter_sets(model) == ["a", "b"]
    # the export's fingerprint check: a set saved from another base refuses to load, the others stay as they were
    other = tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    apply_peft(other, [LoRA(r=2, target_modules=["q_proj"])], name="wide")
    wide = save_adapters(other, tmp_path / "wide")
    activate(model, "a")
    with pytest.raises(AdapterStateError, match="base model mismatch"):
        load_adapters(model, wide, name="wide")
    assert list_adapter_sets(model) == ["a", "b"] and active_adapters(model) == ["a"]
    # a failure after the new set was applied (here: its strategies adapt other modules than the saved ones)
    # takes it off again and gives the previously active set back
    manifest = json.loads((folder / "lightning_peft.json").read_text())
    manifest["stack"]["strategies"][0]["target_modules"] = ["k_proj"]
    (folder / "lightning_peft.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterStateError, match="adapt other modules"):
        load_adapters(model, folder, name="c")
    assert list_adapter_sets(model) == ["a", "b"] and active_adapters(model) == ["a"]
    with pytest.raises(AdapterStateError, match="has no adapter sets"):
        activate(tiny_llama(), "a")
    assert list_adapter_sets(tiny_llama()) == [] and active_adapters(tiny_llama()) == []


def test_in_place_trained_tensors_are_swapped_per_set():
    """Sets that train base tensors in place (an unfrozen head, BitFit's biases, overlapping) each keep their
    own values; with no set active the model has the original ones."""
    from lightning_peft import BitFit

    model = tiny_bert()
    ids = token_batch(seed=1)
    with torch.no_grad():
        base_out = model(ids).logits
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    outs = {}
    specs = {
        "a": dict(
            strategies=[LoRA(r=2, target_modules=["query"], init_weights=False)], unfreeze=["classifier"]
        ),
        "b": dict(
            strategies=[LoRA(r=2, target_modules=["key"], init_weights=False)], unfreeze=["classifier"]
        ),
        "c": dict(strategies=[BitFit()]),  # every bias, the classifier's included
    }
    for i, (name, spec) in enumerate(specs.items()):
        apply_peft(model, spec["strategies"], unfreeze=spec.get("unfreeze"), name=name)
        for n, p in model.named_parameters():  # a new set starts from the base values
            if n in originals:
                assert torch.equal(p, originals[n]), (name, n)
        with torch.no_grad():
            for p in get_adapter_set(model, name).trainable_parameters():
                p.add_(0.1 * (i + 1))
            outs[name] = model(ids).logits
    for name in ["a", "c", "b", "a", "c"]:
        activate(model, name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, outs[name], rtol=0, atol=1e-6)
    with disable_adapters(model), torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_out, rtol=0, atol=1e-6)
    assert active_adapters(model) == ["c"]
    unload(model, "a")  # an inactive set
    activate(model, "c")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outs["c"], rtol=0, atol=1e-6)
    unload(model, "c")  # the active one, whose BitFit restores biases on removal
    assert active_adapters(model) == []
    for n, p in model.named_parameters():
        if n in originals:
            assert torch.equal(p, originals[n]), n
    activate(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, outs["b"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True])
def test_merge_is_explicit_reversible_and_pins_the_set(quantized):
    model = tiny_llama()
    quantize = Quantization("nf4") if quantized else None
    apply_peft(
        model,
        [LoRA(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)],
        name="a",
        quantize=quantize,
    )
    apply_peft(model, [LoRA(r=4, target_modules=["o_proj"], init_weights=False)], name="b")
    ids = token_batch(batch=2, length=8)
    with torch.no_grad():
        expected = {n: (activate(model, n), model(ids).logits)[1] for n in ["a", "b"]}
    base_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    saved = base_weight.detach().clone()
    errors = merge_adapter_set(model, "a")
    assert merged_adapter_set(model) == "a" and active_adapters(model) == ["a"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected["a"], rtol=0, atol=1e-5)
    for switch in (lambda: activate(model, "b"), lambda: deactivate(model)):
        with pytest.raises(AdapterStateError, match="set 'a' is merged into the base weights; call unmerge"):
            switch()
    with pytest.raises(AdapterStateError, match="set 'a' is merged"):
        apply_peft(model, [LoRA(r=2, target_modules=["k_proj"])], name="c")
    with pytest.raises(AdapterStateError, match="'a' is already merged"):
        merge_adapter_set(model, "b")
    assert unmerge_adapter_set(model) == "a" and merged_adapter_set(model) is None
    restored = model.model.layers[0].self_attn.q_proj.base_layer.weight
    if quantized:  # the quantized original was kept aside: back bit for bit, no re-quantization
        assert set(errors.values()) == {0.0}
        assert restored is base_weight and torch.equal(restored, saved)
    else:
        assert errors == {}
        assert restored.data_ptr() == saved.data_ptr() or restored is base_weight
        torch.testing.assert_close(restored, saved, rtol=0, atol=1e-6)
    for name in ["b", "a"]:
        activate(model, name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected[name], rtol=0, atol=1e-5)
    if quantized:  # re-quantizing the merged weights is lossy, and says how much
        lossy = merge_adapter_set(model, "a", requantize=True)
        assert lossy and all(e > 0 for e in lossy.values())
        unmerge_adapter_set(model)
        assert model.model.layers[0].self_attn.q_proj.base_layer.weight is base_weight


def test_training_one_set_among_others_checkpoint_and_export_hold_only_it(tmp_path):
    module = CausalLMModule(tiny_llama(), lr=5e-2)
    apply_peft(
        module.model, [LoRA(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)], name="sentiment"
    )
    sentiment = {n: p.detach().clone() for n, p in module.named_parameters() if ".sentiment." in n}
    callback = PEFT([LoRA(r=4, target_modules=["o_proj", "down_proj"])], model_attr="model", name="topic")
    fit = trainer(tmp_path, max_steps=3, callbacks=[callback])
    fit.fit(module, loader(lm_data(n=16)))
    assert active_adapters(module) == ["topic"]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".topic." in n for n in trainable)
    for n, p in module.named_parameters():  # the other set was frozen and did not move
        if n in sentiment:
            assert not p.requires_grad and torch.equal(p, sentiment[n]), n
    topic_keys = set(get_adapter_set(module, "topic").adapter_keys(root=module))
    path = tmp_path / "topic.ckpt"
    fit.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["state_dict"]) == topic_keys
    assert checkpoint["lightning_peft"]["stack"]["name"] == "topic"
    folder = save_adapters(module, tmp_path / "export")  # the active set: the one trained
    manifest = read_manifest(folder)
    assert manifest["stack"]["name"] == "topic"
    tensors = read_adapter_tensors(folder)
    assert tensors and all(".topic." in k for k in tensors), sorted(tensors)
    # the exported set alone reproduces the trained one on a fresh base
    ids = token_batch(batch=2, length=8)
    with torch.no_grad():
        trained = module.model(ids).logits
    fresh = tiny_llama()
    load_adapters(fresh, folder)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained, rtol=0, atol=1e-6)


def test_evaluate_adapter_sets_logs_each_set_under_its_name(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = ClassifierModule(tiny_bert())
    for i, name in enumerate(["sentiment", "topic"]):
        torch.manual_seed(i)
        apply_peft(
            module.model,
            [LoRA(r=2, target_modules=["query", "value"], init_weights=False)],
            unfreeze=["classifier"],
            name=name,
        )
        with torch.no_grad():
            module.model.classifier.weight.mul_(1 + i)
    activate(module, "sentiment")
    data = loader(classification_data(n=16))
    expected = {}
    for name in ["sentiment", "topic"]:
        with using_adapter_set(module, name), torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(module(x), y, reduction="sum") for x, y in data]
        expected[f"{name}/val_loss"] = float(sum(losses) / 16)
    assert active_adapters(module) == ["sentiment"]
    logger = CSVLogger(str(tmp_path), name="eval")
    run = trainer(tmp_path, logger=logger)
    metrics = evaluate_adapter_sets(run, module, ["topic", "sentiment"], data)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5)
    assert expected["sentiment/val_loss"] != pytest.approx(expected["topic/val_loss"], rel=1e-3)
    assert active_adapters(module) == ["sentiment"]  # restored
    logger.save()
    logged = (tmp_path / "eval" / "version_0" / "metrics.csv").read_text()
    assert "sentiment/val_loss" in logged and "topic/val_loss" in logged
    test_metrics = evaluate_adapter_sets(run, module, stage="validate", dataloaders=data)
    assert set(test_metrics) == set(expected)  # names=None: every set
    with pytest.raises(AdapterStateError, match="loaded sets: sentiment, topic"):
        evaluate_adapter_sets(run, module, ["nope"], data)
    with pytest.raises(PeftConfigError, match="stage='fit' is not valid"):
        evaluate_adapter_sets(run, module, ["topic"], data, stage="fit")  # type: ignore[arg-type]


def test_deepcopy_keeps_sets_independent():
    model = tiny_llama()
    apply_peft(model, [LoRA(r=2, target_modules=["q_proj"], init_weights=False)], name="a")
    apply_peft(model, [LoRA(r=2, target_modules=["v_proj"], init_weights=False)], name="b")
    clone = copy.deepcopy(model)
    activate(clone, "a")
    assert active_adapters(model) == ["b"] and active_adapters(clone) == ["a"]


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import pathlib
    import re
    import runpy

    root = pathlib.Path(__file__).resolve().parents[1]
    section = (root / "docs" / "adapter_sets.md").read_text()
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = root / "examples" / "adapter_sets.py"
    assert block.strip() in example.read_text()
    monkeypatch.chdir(tmp_path)  # the example writes adapters/<name>/
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["['sentiment', 'topic', 'hybrid'] ['hybrid']", "['sentiment', 'hybrid'] []"]


def test_any_sequence_of_switches_gives_each_sets_outputs():
    """Property: after any sequence of activate / deactivate / disable blocks, the output is the active set's."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from lightning_peft import BitFit

    model = tiny_bert()
    ids = token_batch(batch=2, length=6, seed=2)
    with torch.no_grad():
        expected = {None: model(ids).logits}
    specs = {
        "a": ([LoRA(r=2, target_modules=["query"], init_weights=False)], ["classifier"]),
        "b": (
            [
                IA3(
                    target_modules=["key", "output.dense"],
                    feedforward_modules=["output.dense"],
                    init_weights=False,
                )
            ],
            None,
        ),
        "c": ([BitFit()], ["classifier"]),
    }
    for i, (name, (strategies, unfreeze)) in enumerate(specs.items()):
        torch.manual_seed(i)
        apply_peft(model, strategies, unfreeze=unfreeze, name=name)
        with torch.no_grad():
            for p in get_adapter_set(model, name).trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
            expected[name] = model(ids).logits

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(["a", "b", "c", None, "disable"]), min_size=1, max_size=8))
    def check(ops: list[str | None]) -> None:
        for op in ops:
            if op == "disable":
                before = active_adapters(model)
                with disable_adapters(model), torch.no_grad():
                    torch.testing.assert_close(model(ids).logits, expected[None], rtol=0, atol=1e-6)
                assert active_adapters(model) == before
                continue
            if op is None:
                deactivate(model)
            else:
                activate(model, op)
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, expected[op], rtol=0, atol=1e-6)

    check()
