"""Adapter arithmetic: ``combine_adapter_sets`` against ``peft``'s ``add_weighted_adapter`` on identical adapters
(per-module updates and logits), the result as an ordinary set (merge, save, peft load, load_adapters), and the
refusals, which leave the model as it was."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama, token_batch

from lightning_peft import (
    IA3,
    AdaLoRA,
    AdapterStateError,
    LoRA,
    PeftConfigError,
    PromptTuning,
    activate,
    active_adapters,
    apply_peft,
    combine_adapter_sets,
    deactivate,
    list_adapter_sets,
    load_adapters,
    merge_adapter_set,
    save_adapters,
    unmerge_adapter_set,
)
from lightning_peft.core.layer import AdaptedLayer
from lightning_peft.ops.merging import dare_linear, magnitude_prune, ties

peft = pytest.importorskip("peft")
from peft.tuners.lora.model import LoraModel  # noqa: E402

TOL = 1e-5
SEED = 1234

# three LoRA sets on a tiny Llama: different alphas, targets and (for cat / svd) ranks
LLAMA_SETS = {
    "news": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "chat": dict(r=4, alpha=16, targets=["q_proj", "k_proj", "down_proj"], rslora=True),
    "code": dict(r=4, alpha=4, targets=["v_proj", "up_proj"]),
}
LLAMA_WEIGHTS = {"news": 0.7, "chat": -0.4, "code": 0.5}
# GPT-2: Conv1D layers and the word embedding
GPT2_SETS = {
    "news": dict(r=4, alpha=8, targets=["c_attn", "c_proj"]),
    "chat": dict(r=4, alpha=4, targets=["c_attn", "wte"]),
}
GPT2_WEIGHTS = {"news": 0.6, "chat": 0.9}

METHODS = [
    ("linear", {}),
    ("cat", {}),
    ("svd", {}),
    ("svd", {"svd_rank": 2, "svd_clamp": 0.9}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("dare_linear", {"density": 0.6}),
    ("dare_ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.4}),
    ("ties_svd", {"density": 0.5}),
    ("dare_linear_svd", {"density": 0.7}),
    ("dare_ties_svd", {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", {"density": 0.5}),
]


# -- identical adapters in peft and in ours ------------------------------------------------------------------------
def _pair(build, sets):
    """(peft model, our model): the same base, the same named LoRA adapters with random non-zero A and B."""
    base = build()
    ours = copy.deepcopy(base)
    ref = None
    for name, c in sets.items():
        config = peft.LoraConfig(r=c["r"], lora_alpha=c["alpha"], target_modules=c["targets"], lora_dropout=0.0,
                                 init_lora_weights=False, use_rslora=c.get("rslora", False))
        if ref is None:
            ref = peft.get_peft_model(base, config, adapter_name=name)
        else:
            ref.add_adapter(name, config)
        stack = apply_peft(ours, [LoRA(r=c["r"], alpha=c["alpha"], target_modules=c["targets"],
                                       use_rslora=c.get("rslora", False))], name=name)
        params = dict(ref.named_parameters())
        for layer, delta in zip(stack.applied[0].targets, stack.applied[0].modules):
            a, b = _peft_factors(params, f"base_model.model.{layer}", name)
            with torch.no_grad():
                delta.lora_A.copy_(a)
                delta.lora_B.copy_(b)
    return ref.eval(), ours


def _ours(sets):
    """Our model alone with the LoRA sets (random non-zero A and B), for tests that need no peft."""
    model = tiny_llama()
    for name, c in sets.items():
        apply_peft(model, [LoRA(r=c["r"], alpha=c["alpha"], target_modules=c["targets"], init_weights=False,
                                use_rslora=c.get("rslora", False))], name=name)
    return model


def _peft_factors(params, key, name):
    if f"{key}.lora_A.{name}.weight" in params:
        return params[f"{key}.lora_A.{name}.weight"], params[f"{key}.lora_B.{name}.weight"]
    return params[f"{key}.lora_embedding_A.{name}"], params[f"{key}.lora_embedding_B.{name}"]


def _product(a, b):
    """B A as an (out, in) matrix, or a conv's (out, in, *kernel) weight."""
    return torch.einsum("ok,ki...->oi...", b.flatten(1), a) if a.dim() > 2 else b @ a


def _updates(ref, ours, name):
    """Per adapted layer: (peft's update of set ``name``, ours) as (out, in) weights."""
    out = {}
    for layer, module in ours.named_modules():
        if isinstance(module, AdaptedLayer) and name in module.adapters:
            target = ref.base_model.model.get_submodule(layer)
            a, b = _peft_factors(dict(target.named_parameters(prefix=f"base_model.model.{layer}")),
                                 f"base_model.model.{layer}", name)
            out[layer] = (_product(a, b) * target.scaling[name], module.adapters[name]["lora"].delta_weight())
    return out


def _max_diff(updates):
    return max((p - o).abs().max().item() for p, o in updates.values())


def _peft_combine(ref, monkeypatch, weights, name, method, **kw):
    """peft's add_weighted_adapter with torch seeded right before its first per-layer merge (after it has drawn
    its new adapter's init), where ours draws its first mask: DARE then sees the same random numbers."""
    seeded = []
    for fn in ("_generalized_task_arithmetic_weighted_adapter", "_svd_generalized_task_arithmetic_weighted_adapter"):
        original = getattr(LoraModel, fn)

        def wrapper(self, *args, _original=original, **kwargs):
            if not seeded:
                torch.manual_seed(SEED)
                seeded.append(True)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LoraModel, fn, wrapper)
    ref.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type=method, **kw)
    monkeypatch.undo()


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# -- agreement with peft -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "sets", "weights"), [(tiny_llama, LLAMA_SETS, LLAMA_WEIGHTS),
                                                         (tiny_gpt2, GPT2_SETS, GPT2_WEIGHTS)], ids=["llama", "gpt2"])
@pytest.mark.parametrize(("method", "kw"), METHODS, ids=[m + "-" + "-".join(map(str, k.values())) for m, k in METHODS])
def test_agrees_with_peft(build, sets, weights, method, kw, monkeypatch):
    ref, ours = _pair(build, sets)
    x = token_batch()
    _peft_combine(ref, monkeypatch, weights, "mix", method, **kw)
    torch.manual_seed(SEED)
    stack = combine_adapter_sets(ours, weights, name="mix", method=method, **kw)
    updates = _updates(ref, ours, "mix")
    expected_layers = {n for n, m in ref.base_model.model.named_modules() if hasattr(m, "lora_A") and "mix" in
                       {**m.lora_A, **m.lora_embedding_A}}
    assert set(updates) == expected_layers  # the union of the sets' layers, as peft's
    diff = _max_diff(updates)
    print(f"{build.__name__} {method} {kw}: max |dW ours - peft| = {diff:.2e}")
    assert diff <= TOL
    assert max(o.abs().max().item() for _, o in updates.values()) > 1e-2  # a real update, not zeros
    lora = stack.strategies[0]
    assert lora.r == lora.alpha == ref.peft_config["mix"].r == ref.peft_config["mix"].lora_alpha
    assert active_adapters(ours) == ["mix"]
    ref.set_adapter("mix")
    got = _logits(ours, x)
    assert (got - _logits(ref, x)).abs().max().item() <= TOL
    deactivate(ours)
    assert (got - _logits(ours, x)).abs().max().item() > 1e-3  # the combined set changes the output


def test_conv_and_different_ranks_agree_with_peft(monkeypatch):
    """A Conv2d (ViT's patch embedding) and sets of ranks 2 and 6: cat has rank 8, svd the largest (6) or
    svd_rank; linear refuses different ranks, as peft does."""
    from helpers import tiny_vit

    sets = {"news": dict(r=2, alpha=4, targets=["projection", "query"]), "chat": dict(r=6, alpha=3, targets=["projection"])}
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for method, kw, rank in [("cat", {}, 8), ("svd", {}, 6), ("svd", {"svd_rank": 3}, 3),
                             ("dare_ties_svd", {"density": 0.5}, 6)]:
        ref, ours = _pair(tiny_vit, sets)
        _peft_combine(ref, monkeypatch, {"news": 1.5, "chat": -0.5}, "mix", method, **kw)
        torch.manual_seed(SEED)
        stack = combine_adapter_sets(ours, {"news": 1.5, "chat": -0.5}, name="mix", method=method, **kw)
        assert stack.strategies[0].r == rank == ref.peft_config["mix"].r
        updates = _updates(ref, ours, "mix")
        assert any(u.dim() == 4 for u, _ in updates.values())
        assert _max_diff(updates) <= TOL, method
        ref.set_adapter("mix")
        with torch.no_grad():
            assert (ours(pixel_values=pixels).logits - ref(pixel_values=pixels).logits).abs().max() <= TOL
    with pytest.raises(ValueError, match="same r"):
        ref.add_weighted_adapter(["news", "chat"], [1.0, 1.0], "lin", combination_type="linear")
    with pytest.raises(PeftConfigError, match=r"every set needs one rank; got ranks \{'news': 2, 'chat': 6\}"):
        combine_adapter_sets(ours, {"news": 1.0, "chat": 1.0}, name="lin", method="linear")


def test_rslora_first_set_has_scaling_one():
    """peft 0.21 copies use_rslora from the first set into the combined config (r == alpha), so its combined
    set scales by sqrt(r) on top of the folded scalings (fixed upstream, peft PR #3449). Ours has scaling 1: the
    factors equal peft's, and the output equals peft's once its combined scaling is set to 1."""
    sets = {"chat": LLAMA_SETS["chat"], "news": LLAMA_SETS["news"]}  # the rsLoRA set first
    ref, ours = _pair(tiny_llama, sets)
    ref.add_weighted_adapter(["chat", "news"], [0.5, 0.5], "mix", combination_type="cat")
    combine_adapter_sets(ours, {"chat": 0.5, "news": 0.5}, name="mix", method="cat")
    assert ref.peft_config["mix"].use_rslora and ref.peft_config["mix"].r == 8
    updates = _updates(ref, ours, "mix")
    assert all(torch.allclose(p / math.sqrt(8), o, atol=TOL) for p, o in updates.values())
    for module in ref.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "mix" in module.scaling:
            module.scaling["mix"] = 1.0  # the upstream fix
    ref.set_adapter("mix")
    x = token_batch()
    assert (_logits(ours, x) - _logits(ref, x)).abs().max().item() <= TOL
    # one rsLoRA set with weight 1 gives itself back
    combine_adapter_sets(ours, {"chat": 1.0}, name="itself", method="svd")
    for module in ours.modules():
        if isinstance(module, AdaptedLayer) and "chat" in module.adapters:
            want = module.adapters["chat"]["lora"].delta_weight()
            assert (module.adapters["itself"]["lora"].delta_weight() - want).abs().max() <= TOL


def test_dare_generator_and_rng():
    """DARE's masks come from the generator given (the same draws as the global RNG seeded alike)."""
    ours = _ours(LLAMA_SETS)
    weights, kw = LLAMA_WEIGHTS, {"method": "dare_ties", "density": 0.5}
    torch.manual_seed(7)
    combine_adapter_sets(ours, weights, name="global", **kw)
    combine_adapter_sets(ours, weights, name="seeded", generator=torch.Generator().manual_seed(7), **kw)
    combine_adapter_sets(ours, weights, name="other", generator=torch.Generator().manual_seed(8), **kw)
    q = ours.model.layers[0].self_attn.q_proj.adapters
    assert torch.equal(q["global"]["lora"].lora_A, q["seeded"]["lora"].lora_A)
    assert not torch.equal(q["global"]["lora"].lora_A, q["other"]["lora"].lora_A)


def test_ia3_sets_agree_with_peft(tmp_path):
    """IA3 sets combine as peft's IA3 add_weighted_adapter: sum_i w_i l_i per layer (from zero)."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    specs = {"news": (["k_proj", "down_proj"], ["down_proj"]), "chat": (["k_proj", "v_proj"], [])}
    ref = None
    for name, (targets, ff) in specs.items():
        config = peft.IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)
        if ref is None:
            ref = peft.get_peft_model(base, config, adapter_name=name)
        else:
            ref.add_adapter(name, config)
        stack = apply_peft(ours, [IA3(target_modules=targets, feedforward_modules=ff or None)], name=name)
        params = dict(ref.named_parameters())
        for layer, delta in zip(stack.applied[0].targets, stack.applied[0].modules):
            with torch.no_grad():
                delta.ia3_l.copy_(params[f"base_model.model.{layer}.ia3_l.{name}"])
    ref.add_weighted_adapter(["news", "chat"], [0.6, 0.8], "mix")
    combine_adapter_sets(ours, {"news": 0.6, "chat": 0.8}, name="mix", method="linear")
    ref.set_adapter("mix")
    params = dict(ref.named_parameters())
    vectors = {n: p for n, p in ours.named_parameters() if ".adapters.mix." in n}
    assert len(vectors) == 6  # k_proj, down_proj, v_proj in two layers
    for n, p in vectors.items():
        assert torch.equal(p, params["base_model.model." + n.replace(".adapters.mix.ia3.ia3_l", ".ia3_l.mix")])
    x = token_batch()
    combined = _logits(ours, x)
    assert (combined - _logits(ref, x)).abs().max().item() <= TOL
    save_adapters(ours, tmp_path / "mix", name="mix")  # an ordinary IA3 set: peft loads it
    from_peft = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "mix")).eval()
    assert (_logits(from_peft, x) - combined).abs().max().item() <= TOL
    with pytest.raises(PeftConfigError, match="IA3 sets combine as a weighted sum .* pass method='linear'"):
        combine_adapter_sets(ours, {"news": 0.6, "chat": 0.8}, name="mix2", method="ties", density=0.5)


# -- the result is an ordinary set ---------------------------------------------------------------------------------
def test_combined_set_merges_saves_exports_and_loads(tmp_path):
    ours = _ours(LLAMA_SETS)
    x = token_batch()
    combine_adapter_sets(ours, LLAMA_WEIGHTS, name="mix", method="cat")
    combined = _logits(ours, x)
    activate(ours, "news")
    assert (_logits(ours, x) - combined).abs().max() > 1e-3
    merge_adapter_set(ours, "mix")
    assert (_logits(ours, x) - combined).abs().max().item() <= TOL
    unmerge_adapter_set(ours)
    save_adapters(ours, tmp_path / "mix", name="mix")
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 12 and not config["use_rslora"]
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")

    fresh = tiny_llama()  # the same base (seed 0)
    from_peft = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path / "mix")).eval()
    assert (_logits(from_peft, x) - combined).abs().max().item() <= TOL
    stack = load_adapters(fresh, tmp_path / "mix", name="served")
    assert stack.strategies[0].r == 12
    assert (_logits(fresh, x) - combined).abs().max().item() <= TOL

    # replace=True swaps the set in place, even when it is one of the inputs
    combine_adapter_sets(ours, {"mix": 2.0}, name="mix", method="linear", replace=True)
    assert list_adapter_sets(ours) == ["news", "chat", "code", "mix"]
    assert ours.model.layers[0].self_attn.q_proj.adapters["mix"]["lora"].r == 12


# -- refusals ------------------------------------------------------------------------------------------------------
def _snapshot(model):
    return list_adapter_sets(model), active_adapters(model), {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    sets, active, tensors = _snapshot(model)
    assert (sets, active) == before[:2]
    assert tensors.keys() == before[2].keys() and all(torch.equal(tensors[k], before[2][k]) for k in tensors)


REFUSALS = [
    ({"news": 1.0, "zz": 1.0}, {}, AdapterStateError, r"'zz'.*loaded sets: news, chat, code"),
    ({}, {}, PeftConfigError, r"weights=\{\} is not valid.*non-empty mapping"),
    ({"news": float("nan")}, {}, PeftConfigError, r"weights\['news'\]=nan is not valid"),
    ({"news": 1, "chat": 1}, {"method": "mean"}, PeftConfigError, r"method='mean' is not valid; expected one of linear, cat"),
    ({"news": 1, "chat": 1}, {"method": "ties", "density": -0.1}, PeftConfigError, r"density=-0.1 is not valid.*\(0, 1\]"),
    ({"news": 1, "chat": 1}, {"method": "dare_ties", "density": 1.5}, PeftConfigError, r"density=1.5 is not valid"),
    ({"news": 1, "chat": 1}, {"method": "ties"}, PeftConfigError, r"density=None is not valid for method='ties'"),
    ({"news": 1, "chat": 1}, {"method": "linear", "density": 0.5}, PeftConfigError, r"density=0.5 is not used by method"),
    ({"news": 1, "chat": 1}, {"method": "ties", "density": 0.5, "majority_sign_method": "max"}, PeftConfigError,
     r"majority_sign_method='max' is not valid; expected one of total, frequency"),
    ({"news": 1, "chat": 1}, {"method": "cat", "svd_rank": 2}, PeftConfigError, r"svd_rank is not used by method='cat'"),
    ({"news": 1, "chat": 1}, {"method": "svd", "svd_clamp": 2}, PeftConfigError, r"svd_clamp=2 is not valid"),
    ({"news": 1, "chat": 1}, {"name": "news"}, PeftConfigError, r"name='news' is already an adapter set.*replace=True"),
    ({"news": 1, "chat": 1}, {"name": "not valid"}, PeftConfigError, r"name='not valid' is not valid"),
]


@pytest.mark.parametrize(("weights", "kw", "error", "match"), REFUSALS, ids=[r[3][:28] for r in REFUSALS])
def test_refusals_leave_the_model_unchanged(weights, kw, error, match):
    ours = _ours(LLAMA_SETS)
    before = _snapshot(ours)
    kw = {"name": "mix", **kw}
    with pytest.raises(error, match=match):
        combine_adapter_sets(ours, weights, **kw)
    _unchanged(ours, before)


@pytest.mark.parametrize(("strategies", "match"), [
    ([LoRA(r=4, target_modules=["q_proj"], use_dora=True)], r"set 'x' holds LoRA\(use_dora=True\)"),
    ([AdaLoRA(init_r=4, target_r=2, target_modules=["q_proj"])], r"set 'x' holds \[AdaLoRA\]"),
    ([PromptTuning(num_virtual_tokens=2)], r"set 'x' holds \[PromptTuning\]"),
    ([LoRA(r=4, target_modules=["q_proj"]), IA3(target_modules=["k_proj"])], r"set 'x' holds \[LoRA, IA3\]"),
    ([IA3(target_modules=["k_proj"])], r"mixes LoRA and IA3 sets \(news: lora, x: ia3\)"),
])
def test_refuses_sets_it_cannot_combine(strategies, match):
    ours = _ours({"news": LLAMA_SETS["news"]})
    apply_peft(ours, strategies, name="x")
    before = _snapshot(ours)
    with pytest.raises(PeftConfigError, match=match):
        combine_adapter_sets(ours, {"news": 0.5, "x": 0.5}, name="mix", method="cat")
    _unchanged(ours, before)


def test_refuses_unfreeze_and_merged_sets():
    ours = _ours({"news": LLAMA_SETS["news"], "chat": LLAMA_SETS["chat"]})
    merge_adapter_set(ours, "news")
    before = _snapshot(ours)
    with pytest.raises(AdapterStateError, match="set 'news' is merged into the base weights"):
        combine_adapter_sets(ours, {"news": 0.5, "chat": 0.5}, name="mix", method="cat")
    _unchanged(ours, before)
    unmerge_adapter_set(ours)
    apply_peft(ours, [LoRA(r=4, target_modules=["q_proj"])], name="head", unfreeze=["lm_head"])
    with pytest.raises(PeftConfigError, match=r"set 'head' trains modules in place \(unfreeze=\['lm_head'\]\)"):
        combine_adapter_sets(ours, {"news": 0.5, "head": 0.5}, name="mix", method="cat")


# -- the merges, by hand -------------------------------------------------------------------------------------------
def test_merges_by_hand():
    t = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, -1.5, 1.0, 4.0])]
    w = torch.tensor([1.0, 1.0])
    # density 1: no pruning; signs elected by the sums [0, -3.5, 4, 4.5] -> [+, -, +, +]; agreeing entries averaged
    assert torch.equal(ties(t, w, 1.0), torch.tensor([1.0, -1.75, 2.0, 2.25]))
    # density 0.5 keeps the two largest magnitudes of each: [0, -2, 3, 0] and [0, -1.5, 0, 4]
    assert torch.equal(magnitude_prune(t, w, 0.5), torch.tensor([0.0, -3.5, 3.0, 4.0]))
    # "frequency" elects by the number of signs: [0, -2, 2, 2] -> [+, -, +, +]; the same here
    assert torch.equal(ties(t, w, 1.0, "frequency"), torch.tensor([1.0, -1.75, 2.0, 2.25]))
    # "total" elects + for [3, -1, -1] (sum 1), "frequency" elects - (two of three)
    three = [torch.tensor([3.0]), torch.tensor([-1.0]), torch.tensor([-1.0])]
    assert ties(three, torch.ones(3), 1.0).item() == 3.0
    assert ties(three, torch.ones(3), 1.0, "frequency").item() == -1.0
    # DARE keeps each entry with probability density and rescales by 1/density: unbiased
    big = [torch.ones(200_000)]
    assert abs(dare_linear(big, torch.tensor([1.0]), 0.25, torch.Generator().manual_seed(0)).mean() - 1) < 0.02
