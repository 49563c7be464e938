"""Property-based bad input: every strategy config and stack combination either works or is refused cleanly.

For random stacks of registered strategies with random (often invalid) field values, random ``unfreeze`` and
optional quantization, on a tiny BERT or LLaMA:

- either ``apply_peft`` succeeds and a forward and a backward pass work (finite loss, a gradient on every
  trainable parameter that the loss reaches), and ``remove()`` restores the model;
- or it raises the package's errors (``PeftConfigError`` / ``AdapterStateError``) and the model is exactly as it
  was: the same module types, the same state dict (values), the same ``requires_grad`` flags.

No other exception type may escape.
"""

from __future__ import annotations

import copy
import dataclasses
import typing

import pytest
import torch
from helpers import VOCAB, tiny_bert, tiny_llama
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from lightning_peft import AdapterStateError, PeftConfigError, apply_peft, registered_strategies
from lightning_peft.quantization import Quantization

PACKAGE_ERRORS = (PeftConfigError, AdapterStateError)
BASES = {"bert": tiny_bert(), "llama": tiny_llama()}
VALID_TARGETS = {
    "bert": [
        ["query"],
        ["value", "key"],
        "all-linear",
        ["output.dense"],
        ["intermediate.dense"],
        r".*\.query",
        None,
    ],
    "llama": [["q_proj"], ["q_proj", "v_proj"], "all-linear", ["down_proj"], ["gate_proj", "up_proj"], None],
}
BAD_TARGETS = [["nope"], [], "(", 5, ["classifier"], ["lm_head"], "query", ["q_proj"], ["output.dense"]]
VALID = {"int": [1, 2, 4], "float": [0.1, 0.5, 0.85], "bool": [True, False], "str": ["relu", "gelu", None]}
JUNK = {
    "int": [-1, 0, 130, 2.5, "2", None, True],
    "float": [-0.5, 0.0, 1.0, 8.0, float("nan"), "x", None],
    "bool": [1, "yes", None],
    "str": ["bogus", "", 3],
}
UNFREEZE = {"bert": [None, ["classifier"]], "llama": [None, ["lm_head"]]}
BAD_UNFREEZE = [["nothing"], 3, [], "classifier", ["lm_head"], ["norm"]]


def _pool(field: dataclasses.Field, kind: str, junk: bool) -> list:
    if "modules" in field.name:
        return BAD_TARGETS if junk else VALID_TARGETS[kind]
    hint = str(field.type)
    if field.name == "init_token_ids":
        return [[VOCAB + 5], [], ["a"]] if junk else [None, [1, 2]]
    if "Literal" in hint:
        valid = [v for v in typing.get_args(eval(hint, vars(typing))) if v != "text"]
        return ["bogus", None, "text"] if junk else valid
    base = next((t for t in ("int", "float", "bool") if hint.startswith(t)), "str")
    return (JUNK if junk else VALID)[base]


@st.composite
def strategy_configs(draw: st.DrawFn, kind: str) -> dict:
    """A registered strategy with up to 4 fields set; each value is invalid with probability 1/8."""
    registry = registered_strategies()
    name = draw(st.sampled_from(sorted(registry)))
    fields = dataclasses.fields(registry[name])
    config: dict = {"name": name}
    for field in (
        draw(st.lists(st.sampled_from(fields), max_size=4, unique_by=lambda f: f.name)) if fields else []
    ):
        junk = draw(st.integers(0, 7)) == 0
        config[field.name] = draw(st.sampled_from(_pool(field, kind, junk)))
    if draw(st.integers(0, 39)) == 0:
        config["bogus_argument"] = 1
    return config


@st.composite
def cases(draw: st.DrawFn) -> tuple:
    kind = draw(st.sampled_from(sorted(BASES)))
    configs = draw(st.lists(strategy_configs(kind), max_size=3, unique_by=lambda c: c["name"]))
    if draw(st.integers(0, 9)) == 0 and configs:  # the same strategy twice: refused (one prefix per kind)
        configs.append(dict(configs[0]))
    unfreeze = draw(st.sampled_from(BAD_UNFREEZE if draw(st.integers(0, 5)) == 0 else UNFREEZE[kind]))
    quantize = draw(st.sampled_from([None, None, None, "nf4"]))
    return kind, configs, unfreeze, quantize


def _snapshot(model: torch.nn.Module) -> tuple:
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return types, state, grads


def _assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    types, state, grads = _snapshot(model)
    assert types == before[0]
    assert grads == before[2]
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        assert value.dtype == before[1][key].dtype and torch.equal(value, before[1][key]), key


def _loss(kind: str, model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    if kind == "bert":
        return model(input_ids=ids, labels=torch.tensor([0, 1])).loss
    return model(input_ids=ids, labels=ids).loss


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(case=cases())
# found by this test (both fixed): LoRA(target_modules=None) raised TypeError; BitFit/Unfreeze on layers that
# quantize= rebuilds trained orphaned tensors, leaving nothing trainable, or 4-bit weights
@example(case=("bert", [{"name": "lora", "target_modules": None}], None, None))
@example(case=("bert", [{"name": "bitfit", "modules": ["query"]}], None, "nf4"))
@example(case=("bert", [{"name": "unfreeze", "modules": ["query"]}], None, "nf4"))
def test_every_stack_works_or_is_refused_cleanly(case):
    kind, configs, unfreeze, quantize = case
    model = copy.deepcopy(BASES[kind]).train()
    before = _snapshot(model)
    q = Quantization(quantize) if quantize else None
    try:
        stack = apply_peft(model, configs, unfreeze=unfreeze, quantize=q)
    except PACKAGE_ERRORS as err:
        event(f"refused: {type(err).__name__}")
        assert str(err)  # a message, and nothing touched
        _assert_unchanged(model, before)
        return
    event(f"applied: {len(configs)} strategies" + (" + nf4" if q else ""))
    loss = _loss(kind, model)
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert any(p.grad is not None for _, p in trainable)
    for name, p in trainable:
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    if q is None:
        stack.remove()
        model.zero_grad(set_to_none=True)
        _assert_unchanged(model, before)


@pytest.mark.parametrize("kind", sorted(BASES))
def test_failed_apply_after_quantization_leaves_no_half_injected_layers(kind):
    """A stack refused after planning (a bad second strategy) never quantizes: plans are checked first."""
    model = copy.deepcopy(BASES[kind])
    before = _snapshot(model)
    with pytest.raises(PeftConfigError):
        apply_peft(model, [{"name": "lora", "r": 2}, {"name": "lora", "r": 4}], quantize=Quantization("nf4"))
    with pytest.raises(PeftConfigError):
        apply_peft(
            model, [{"name": "lora", "r": 2, "target_modules": ["nope"]}], quantize=Quantization("nf4")
        )
    _assert_unchanged(model, before)
