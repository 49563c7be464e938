"""IA3: agreement with peft, composition with LoRA on one layer, merge, defaults and errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_bert, tiny_llama, token_batch
from torch import nn

from lightning_peft import IA3, LoRA, PeftConfigError, apply_peft
from lightning_peft.core.layer import AdaptedLinear

LLAMA_TARGETS = ["k_proj", "v_proj", "down_proj"]


def peft_ia3(model: nn.Module, targets: list[str], ff: list[str]):
    from peft import IA3Config, get_peft_model

    return get_peft_model(
        model, IA3Config(target_modules=targets, feedforward_modules=ff, init_ia3_weights=False)
    )


def ours_vectors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n.replace(".adapters.default.ia3", ""): p for n, p in model.named_parameters() if n.endswith("ia3_l")
    }


def copy_vectors_to_peft(ours: nn.Module, ref: nn.Module) -> int:
    mine = ours_vectors(ours)
    copied = 0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "ia3_l" in name:
                key = name.removeprefix("base_model.model.").replace(".ia3_l.default", ".ia3_l")
                assert p.shape == mine[key].shape, key  # same (1, in) / (out, 1) layout as peft
                p.copy_(mine[key])
                copied += 1
    return copied


@pytest.mark.parametrize(
    ("build", "targets", "ff", "task"),
    [
        (tiny_llama, LLAMA_TARGETS, ["down_proj"], "causal"),
        (tiny_bert, ["key", "value", "output.dense"], ["output.dense"], "cls"),
    ],
)
def test_matches_peft_ia3(build, targets, ff, task):
    ours = build()
    apply_peft(ours, [IA3(target_modules=targets, feedforward_modules=ff, init_weights=False)])
    ref = peft_ia3(build(), targets, ff)
    assert copy_vectors_to_peft(ours, ref) == len(ours_vectors(ours)) > 0
    ids = token_batch(3, 8)
    labels = ids if task == "causal" else torch.tensor([0, 1, 0])
    out, exp = ours(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    assert (out.logits - exp.logits).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - exp.loss.item()) <= 1e-5
    # merged models agree as well
    merged_ref = ref.merge_and_unload()
    stack = ours.__dict__["_lightning_peft_state"].stacks["default"]
    stack.merge()
    assert (ours(input_ids=ids).logits - merged_ref(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_defaults_follow_peft_per_model_type():
    model = tiny_llama()
    stack = apply_peft(model, [IA3()])
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    assert adapted == set(LLAMA_TARGETS)
    shapes = {n.split(".")[-5]: tuple(p.shape) for n, p in stack.named_trainable_parameters()}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 64)}  # ff scales the input


def test_starts_as_identity_and_disable_gives_base():
    model, base = tiny_llama(), tiny_llama()
    stack = apply_peft(model, [IA3()])
    ids = token_batch(2, 6)
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.uniform_(0.5, 1.5)
    assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    with stack.disable_adapters():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("feedforward", [True, False])
def test_composes_with_lora_on_one_layer(feedforward):
    """y = base(x * s_in) * s_out + B A x: the scale acts on the base path, LoRA reads the layer's own input."""
    model = nn.Sequential(nn.Linear(6, 5))
    ff = ["0"] if feedforward else None
    stack = apply_peft(
        model,
        [
            LoRA(r=2, target_modules=["0"], init_weights=False),
            IA3(target_modules=["0"], feedforward_modules=ff, init_weights=False),
        ],
    )
    layer = model[0]
    lora, ia3 = layer.adapters["default"]["lora"], layer.adapters["default"]["ia3"]
    x = torch.randn(4, 6)
    base = layer.base_layer
    scale = ia3.ia3_l.view(-1)
    expected = base(x * scale) if feedforward else base(x) * scale
    expected = expected + (x @ lora.lora_A.T @ lora.lora_B.T) * lora.scaling
    assert torch.allclose(model(x), expected, atol=1e-6)
    before = model(x)
    stack.merge()
    assert torch.allclose(model(x), before, atol=1e-5)
    stack.unmerge()
    assert torch.allclose(model(x), before, atol=1e-5)


def test_gradients_and_trainable_names():
    model = tiny_bert()
    stack = apply_peft(model, [IA3()], unfreeze=["classifier"])
    names = [n for n, _ in stack.named_trainable_parameters()]
    assert all(n.endswith("ia3_l") or n.startswith("classifier.") for n in names)
    assert (
        sum(n.endswith("ia3_l") for n in names) == 2 * 4
    )  # key, value, attention.output.dense, output.dense
    model(input_ids=token_batch(2, 6), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is not None for _, p in stack.named_trainable_parameters())


def test_errors():
    with pytest.raises(PeftConfigError, match="feedforward_modules must be a subset"):
        apply_peft(
            tiny_llama(),
            [IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj", "up_proj"])],
        )
    with pytest.raises(PeftConfigError, match="matched none of the IA3 target layers"):
        apply_peft(tiny_llama(), [IA3(target_modules=["k_proj"], feedforward_modules=["down_proj"])])
    with pytest.raises(PeftConfigError, match="no default for Sequential"):
        apply_peft(nn.Sequential(nn.Linear(2, 2)), [IA3()])
    with pytest.raises(PeftConfigError, match="target_modules=\\['nope'\\] matched no linear layer"):
        apply_peft(tiny_llama(), [IA3(target_modules=["nope"])])
    with pytest.raises(PeftConfigError, match="feedforward_modules=5"):
        IA3(feedforward_modules=5)
