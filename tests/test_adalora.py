"""AdaLoRA: the delta, orthogonal regularization, and the rank allocator against PEFT's reference."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert, token_batch

from lightning_peft import AdaptedLinear, AdapterStateError, PeftConfigError, apply_peft
from lightning_peft.methods.adalora import (
    AdaLoRA,
    AdaLoRADelta,
    RankAllocator,
    adalora_deltas,
    cubic_budget,
    orthogonal_regularization,
)
from lightning_peft.strategies import LoRA

TARGETS = ["query", "value", "intermediate.dense"]


def peft_adalora(model, **overrides):
    from peft import AdaLoraConfig, get_peft_model

    cfg = dict(
        init_r=6,
        target_r=2,
        lora_alpha=8,
        target_modules=TARGETS,
        tinit=2,
        tfinal=3,
        deltaT=2,
        total_step=16,
        beta1=0.85,
        beta2=0.85,
        orth_reg_weight=0.5,
        lora_dropout=0.0,
    )
    cfg.update(overrides)
    return get_peft_model(model, AdaLoraConfig(**cfg))


def peft_params(peft_model, module_name: str) -> dict[str, torch.nn.Parameter]:
    layer = peft_model.base_model.model.get_submodule(module_name)
    return {"A": layer.lora_A["default"], "E": layer.lora_E["default"], "B": layer.lora_B["default"]}


def ours_params(delta: AdaLoRADelta) -> dict[str, torch.nn.Parameter]:
    return {"A": delta.adalora_A, "E": delta.adalora_E, "B": delta.adalora_B}


def paired_models(seed: int = 0, **peft_overrides):
    """Our AdaLoRA and PEFT's on copies of one tiny BERT, with the same random non-zero P, Lambda, Q."""
    base = tiny_bert(seed=seed)
    pm = peft_adalora(copy.deepcopy(base), **peft_overrides)
    stack = apply_peft(base, [AdaLoRA(init_r=6, target_r=2, alpha=8, target_modules=TARGETS)])
    deltas = adalora_deltas(stack)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, d in deltas.items():
            for key, p in ours_params(d).items():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if key == "E" else 0.1))
                peft_params(pm, name)[key].copy_(p)
    return base, stack, deltas, pm


def test_init_as_peft_and_starts_at_the_base_model():
    base = tiny_bert()
    x = token_batch()
    expected = base(input_ids=x).logits
    stack = apply_peft(base, [AdaLoRA(init_r=12, target_r=4, alpha=16, target_modules=TARGETS)])
    deltas = adalora_deltas(stack)
    assert sorted(deltas) == sorted(
        n
        for n, _ in base.named_modules()
        if n.endswith(tuple(TARGETS)) and isinstance(base.get_submodule(n), AdaptedLinear)
    )
    assert len(deltas) == 6
    a = torch.cat([d.adalora_A.flatten() for d in deltas.values()])
    assert abs(a.std().item() - 0.02) < 0.002 and abs(a.mean().item()) < 0.002
    d0 = next(iter(deltas.values()))
    assert torch.count_nonzero(d0.adalora_E) == 0 and d0.adalora_mask.all() and d0.scaling == 16 / 12
    torch.testing.assert_close(base(input_ids=x).logits, expected, rtol=0, atol=0)
    names = [n for n, p in base.named_parameters() if p.requires_grad]
    assert names and all(n.rsplit(".", 1)[1] in ("adalora_A", "adalora_E", "adalora_B") for n in names)
    keys = stack.adapter_keys()
    assert sum(k.endswith("adalora_mask") for k in keys) == 6


def test_forward_and_merge_match_peft():
    base, stack, deltas, pm = paired_models()
    next(iter(deltas.values())).adalora_mask[1] = False  # a pruned triplet is out of the forward
    name0 = next(iter(deltas))
    with torch.no_grad():
        peft_params(pm, name0)["E"][1] = 0.0
    x = token_batch()
    ours = base(input_ids=x).logits
    ref = pm(input_ids=x).logits
    # PEFT divides by init_r + 1e-5, we by init_r: a relative difference of 1.7e-6 on the update
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    stack.merge()
    torch.testing.assert_close(base(input_ids=x).logits, ours, rtol=1e-5, atol=1e-5)


def test_orthogonal_regularization_matches_peft_term():
    base, stack, deltas, pm = paired_models()
    x = token_batch()
    labels = torch.tensor([0, 1, 1, 0])
    out = pm.base_model(input_ids=x, labels=labels)  # AdaLoraModel.forward adds the term to .loss
    peft_term = out.loss - F.cross_entropy(out.logits, labels)
    ours = orthogonal_regularization(base)
    torch.testing.assert_close(ours, peft_term.detach(), rtol=1e-5, atol=1e-6)
    assert ours.item() > 0.1
    # the same value from the stack, and from a wrapper module containing the model
    wrapper = torch.nn.ModuleDict({"model": base})
    torch.testing.assert_close(orthogonal_regularization(stack), ours)
    torch.testing.assert_close(orthogonal_regularization(wrapper, weight=1.0), ours / 0.5)
    # the paper's convention: sum over layers of squared Frobenius norms
    manual = sum(
        ((d.adalora_A @ d.adalora_A.T - torch.eye(6)) ** 2).sum()
        + ((d.adalora_B.T @ d.adalora_B - torch.eye(6)) ** 2).sum()
        for d in deltas.values()
    )
    torch.testing.assert_close(orthogonal_regularization(base, weight=0.1, convention="paper"), 0.1 * manual)
    ours.backward()
    assert all(d.adalora_A.grad is not None and d.adalora_A.grad.abs().sum() > 0 for d in deltas.values())


def test_cubic_budget_matches_peft_schedule():
    from peft.tuners.adalora import RankAllocator as PeftRankAllocator

    model = peft_adalora(tiny_bert(), total_step=40, tinit=5, tfinal=7, deltaT=3)
    ref = PeftRankAllocator(model, model.peft_config["default"], "default")
    for step in range(0, 41):
        budget = cubic_budget(step, ref.init_bgt, ref.target_bgt, 5, 7, 40)
        if step <= 40 - 7:  # PEFT's allocator is only asked up to T - tfinal
            assert budget == ref.budget_schedule(step)[0], step
    assert cubic_budget(6, 36, 12, 5, 7, 40) == int(24 * (1 - 1 / 28) ** 3 + 12) == 33


@pytest.mark.parametrize("delta_t", [1, 2])
def test_allocator_agrees_with_peft_update_and_allocate(delta_t):
    """Same P, Lambda, Q, same gradients, same updates: same scores, masks and final rank pattern as PEFT."""
    total, tinit, tfinal = 16, 2, 3
    _, stack, deltas, pm = paired_models(deltaT=delta_t, total_step=total, tinit=tinit, tfinal=tfinal)
    allocator = RankAllocator.from_model(stack, tinit=tinit, tfinal=tfinal, delta_t=delta_t, total_step=total)
    peft_alloc = pm.base_model.rankallocator
    assert (
        (allocator.init_budget, allocator.target_budget)
        == (peft_alloc.init_bgt, peft_alloc.target_bgt)
        == (36, 12)
    )
    labels = torch.tensor([0, 1, 1, 0])
    lr = 0.05
    realloc_steps = []
    for step in range(1, total + 3):
        pm.zero_grad()
        out = pm(input_ids=token_batch(seed=step), labels=labels)
        out.loss.backward()
        with torch.no_grad():  # identical gradients and identical SGD updates on both sides
            for name, d in deltas.items():
                for key, p in ours_params(d).items():
                    q = peft_params(pm, name)[key]
                    p.grad = q.grad.clone()
                    q -= lr * q.grad
                    p -= lr * p.grad
        pm.base_model.update_and_allocate(step)
        reallocated = allocator.step(step)
        if reallocated:
            realloc_steps.append(step)
        if step < total - tfinal:
            # sensitivity and uncertainty averages are identical, entry by entry
            for name in deltas:
                for key in "AEB":
                    pname = f"{name}.lora_{key}.default"
                    assert torch.equal(allocator.exp_avg_ipt[name][key], peft_alloc.exp_avg_ipt[pname])
                    assert torch.equal(allocator.exp_avg_unc[name][key], peft_alloc.exp_avg_unc[pname])
            # triplet scores, computed PEFT's way from PEFT's averages
            ours_scores = allocator.triplet_scores()
            for name in deltas:
                pn = f"{name}.lora_%s.default"
                s_a = peft_alloc._element_score(pn % "A").mean(dim=1, keepdim=True)
                s_b = peft_alloc._element_score(pn % "B").mean(dim=0).view(-1, 1)
                ref = peft_alloc._combine_ipt(peft_alloc._element_score(pn % "E"), torch.cat([s_a, s_b], 1))
                assert torch.equal(ours_scores[name], ref)
        # masks and the singular values themselves agree at every step
        for name, d in deltas.items():
            q = peft_params(pm, name)["E"]
            assert torch.equal(d.adalora_E, q), (step, name)
            if reallocated:
                assert torch.equal(d.adalora_mask, q.view(-1) != 0), (step, name)
    expected = [s for s in range(tinit + 1, total - tfinal) if s % delta_t == 0] + [total - tfinal]
    assert realloc_steps == expected
    # the final rank pattern is PEFT's, matrix by matrix
    rank_pattern = pm.peft_config["default"].rank_pattern
    ours_final = allocator.final_rank_pattern()
    assert ours_final == {n: rank_pattern[f"{n}.lora_E.default"] for n in deltas}
    assert sum(map(sum, ours_final.values())) == allocator.target_budget == 12
    assert len(set(allocator.rank_pattern().values())) > 1  # the allocation is not uniform
    assert allocator.exp_avg_ipt == {} and allocator.finalized


def test_allocator_state_dict_resumes_exactly():
    base, stack, deltas, _ = paired_models()
    kwargs = dict(tinit=1, tfinal=2, delta_t=1, total_step=10)
    allocator = RankAllocator.from_model(base, **kwargs)

    def feed(step, ds):
        g = torch.Generator().manual_seed(100 + step)
        for d in ds.values():
            for p in ours_params(d).values():
                p.grad = torch.randn(p.shape, generator=g)

    for step in range(1, 5):
        feed(step, deltas)
        allocator.step(step)
    state = copy.deepcopy(allocator.state_dict())
    weights = copy.deepcopy(stack.adapter_state_dict())
    for step in range(5, 11):
        feed(step, deltas)
        allocator.step(step)
    expected_masks, expected_e = (
        allocator.masks(),
        {n: d.adalora_E.detach().clone() for n, d in deltas.items()},
    )

    _, stack2, deltas2, _ = paired_models()
    stack2.load_adapter_state_dict(weights)
    allocator2 = RankAllocator.from_model(stack2, **kwargs)
    allocator2.load_state_dict(state)
    assert allocator2.last_step == 4 and allocator2.budget == state["budget"] < allocator2.init_budget
    for step in range(5, 11):
        feed(step, deltas2)
        allocator2.step(step)
    for name in deltas:
        assert torch.equal(allocator2.masks()[name], expected_masks[name])
        assert torch.equal(deltas2[name].adalora_E, expected_e[name])
    assert allocator2.final_rank_pattern() == allocator.final_rank_pattern()
    # the state holds nothing that grows: after the final step the score averages are gone
    assert allocator.state_dict()["exp_avg_ipt"] == {}
    n_params = sum(p.numel() for d in deltas.values() for p in ours_params(d).values())
    assert sum(t.numel() for t in state["exp_avg_ipt"].values()) == n_params
    # a state from another set of layers is refused, naming the problem
    other = RankAllocator(dict(list(deltas2.items())[:2]), 2, **kwargs)
    with pytest.raises(AdapterStateError, match="missing"):
        other.load_state_dict(state)


def test_bad_input_messages():
    with pytest.raises(PeftConfigError, match=r"target_r=8 is larger than init_r=4"):
        AdaLoRA(init_r=4, target_r=8)
    with pytest.raises(PeftConfigError, match=r"beta1=1.0 is not valid"):
        AdaLoRA(beta1=1.0)
    with pytest.raises(PeftConfigError, match="orth_reg_weight"):
        AdaLoRA(orth_reg_weight=-1.0)
    base = tiny_bert()
    apply_peft(base, [AdaLoRA(init_r=4, target_r=2, target_modules=TARGETS)])
    with pytest.raises(PeftConfigError, match=r"tinit=6 \+ tfinal=4 >= total_step=10"):
        RankAllocator.from_model(base, tinit=6, tfinal=4, delta_t=1, total_step=10)
    with pytest.raises(PeftConfigError, match=r"delta_t=0 is not valid"):
        RankAllocator.from_model(base, tinit=1, tfinal=1, delta_t=0, total_step=10)
    plain = tiny_bert()
    apply_peft(plain, [LoRA(r=2, target_modules=TARGETS)])
    with pytest.raises(PeftConfigError, match="no AdaLoRA strategy"):
        RankAllocator.from_model(plain, tinit=1, tfinal=1, delta_t=1, total_step=10)
    with pytest.raises(PeftConfigError, match="no AdaLoRA strategy"):
        orthogonal_regularization(plain)


def test_warns_once_when_training_without_an_allocator():
    base = tiny_bert()
    apply_peft(base, [AdaLoRA(init_r=4, target_r=2, target_modules=TARGETS)])
    base.train()
    with pytest.warns(UserWarning, match="RankBudgetScheduler") as record:
        base(input_ids=token_batch()).logits.sum().backward()
        base(input_ids=token_batch()).logits.sum().backward()
    assert sum("RankBudgetScheduler" in str(w.message) for w in record) == 1
    other = tiny_bert()
    apply_peft(other, [AdaLoRA(init_r=4, target_r=2, target_modules=TARGETS)])
    RankAllocator.from_model(other, tinit=1, tfinal=1, delta_t=1, total_step=10)
    other.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other(input_ids=token_batch()).logits.sum().backward()


def _nf4_bert(seed: int = 0):
    import bitsandbytes as bnb

    model = tiny_bert(seed=seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "classifier":
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4")
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], q.to("cpu"))
    return model


@pytest.mark.parametrize("quantized", [False, True])
def test_lora_and_adalora_on_the_same_module_train(quantized):
    import bitsandbytes as bnb

    model = _nf4_bert() if quantized else tiny_bert()
    stack = apply_peft(
        model,
        [
            LoRA(r=4, target_modules=["query", "value"]),
            AdaLoRA(init_r=6, target_r=2, target_modules=["query", "key", "intermediate.dense"]),
        ],
        unfreeze=["classifier"],
    )
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert sorted(layer.adapters["default"]) == ["adalora", "lora"]
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) == quantized
    summary = stack.summary()
    assert "lora" in summary and "adalora" in summary and ("Linear4bit" in summary) == quantized
    rows = dict((label, (count, n)) for label, count, n in stack.summary_rows()["strategy"])
    assert rows["adalora"] == (
        6,
        2 * (6 * 32 + 6 + 32 * 6) + 2 * (6 * 32 + 6 + 32 * 6) + 2 * (6 * 32 + 6 + 64 * 6),
    )
    allocator = RankAllocator.from_model(model, tinit=1, tfinal=2, delta_t=1, total_step=8)
    opt = torch.optim.AdamW(stack.trainable_parameters(), lr=1e-2)
    data = token_batch(8, seed=3)
    labels = (data[:, 0] % 2).long()
    model.train()
    losses = []
    for step in range(1, 9):
        loss = F.cross_entropy(model(input_ids=data).logits, labels) + orthogonal_regularization(model)
        loss.backward()
        opt.step()
        allocator.step(step)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora = layer.adapters["default"]["lora"]
    assert lora.lora_B.abs().sum() > 0  # LoRA trained alongside
    assert allocator.kept() == allocator.target_budget == 12
    for d in adalora_deltas(model).values():
        assert torch.count_nonzero(d.singular_values()[~d.adalora_mask]) == 0
        assert torch.count_nonzero(d.adalora_E[~d.adalora_mask]) == 0
