"""Importing folders that Hugging Face ``peft`` wrote: agreement with ``peft.PeftModel.from_pretrained``, the round
trip ours -> peft -> ours, refusals before the model is touched, ``replace=``, and a user strategy going through the
same protocol as the built-in ones (issue 18, items 1 and 2)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from lightning_peft import AdapterStateError, PeftConfigError, apply_peft, load_adapters, save_adapters
from lightning_peft.core.layer import AdaptedLayer, Delta
from lightning_peft.core.state import get_state
from lightning_peft.methods.base import LayerStrategy, register_strategy, registered_strategies
from lightning_peft.methods.peft_protocol import (
    LOW_RANK_PART,
    LowRankFactors,
    peft_importers,
    register_peft_import,
)
from tests.helpers import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit

peft = pytest.importorskip("peft")

IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _inputs(model: nn.Module) -> dict:
    if model.config.model_type == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    return {"input_ids": IDS}


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**_inputs(model)).logits


def _peft_folder(make, config, tmp_path, name="peft", seed=1, adalora_pattern=False):
    """``peft``'s folder for ``config`` on ``make()``, every trainable tensor moved off its init (seeded)."""
    model = peft.get_peft_model(make(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    if adalora_pattern:  # what peft's allocator leaves: a boolean keep-list per module, here 3 then 1 of 4 kept
        cfg = model.peft_config["default"]
        names = [n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_E")]
        cfg.rank_pattern = {f"{n}.lora_E": ([True, False, True, True] if i % 2 else [False, False, True, False])
                            for i, n in enumerate(names)}
    folder = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder))
    return folder


def _peft_logits(make, folder) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(make(), str(folder))
    return _logits(model)


CASES = {
    "lora-patterns-embedding-dropout": (tiny_llama, lambda: peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 3})),
    "rslora-regex": (tiny_llama, lambda: peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                                                         target_modules=r".*\.(up_proj|o_proj)")),
    "dora": (tiny_llama, lambda: peft.LoraConfig(r=2, lora_alpha=4, use_dora=True,
                                                 target_modules=["q_proj", "down_proj"])),
    "gpt2-fan-in-fan-out": (tiny_gpt2, lambda: peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"],
                                                               fan_in_fan_out=True)),
    "bert-seq-cls-head": (tiny_bert, lambda: peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                             target_modules=["query", "value"])),
    "vit-conv": (tiny_vit, lambda: peft.LoraConfig(r=2, target_modules=["projection", "query"])),
    "adalora-pruned": (tiny_llama, lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=10,
                                                              target_modules=["q_proj", "v_proj"])),
    "ia3": (tiny_llama, lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"])),
    "prompt-tuning": (tiny_llama, lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "bert-seq-cls-prompt": (tiny_bert, lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)),
    "p-tuning": (tiny_llama, lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                              encoder_hidden_size=16)),
}
EXPECTED = {"adalora-pruned": "adalora", "bert-seq-cls-prompt": "prompt_tuning", "ia3": "ia3", "prompt-tuning": "prompt_tuning", "p-tuning": "prompt_tuning"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_peft(case, tmp_path):
    make, config = CASES[case]
    folder = _peft_folder(make, config(), tmp_path, adalora_pattern=case.startswith("adalora"))
    assert not (folder / "lightning_peft.json").exists()
    theirs = _peft_logits(make, folder)
    model = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stack = load_adapters(model, folder, name="imported")
    assert [s.name for s in stack.strategies] == [EXPECTED.get(case, "lora")]
    assert stack.name == "imported"
    ours = _logits(model)
    if case.endswith("tuning"):  # peft's causal LM returns the virtual tokens' logits too
        theirs = theirs[:, -ours.shape[1]:]
        assert any("P_TUNING" in str(w.message) for w in caught) == (case == "p-tuning")
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - _logits(make())).abs().max().item() > 1e-3  # the adapters do change the outputs
    if case.startswith("bert-seq-cls"):  # the head peft saves in full: unfrozen here, with its trained weights
        assert stack.unfreeze == ["classifier"]
        assert all(p.requires_grad for p in model.classifier.parameters())
    if case == "adalora-pruned":  # the triplets peft pruned stay masked, the kept ones are in place
        masks = [m for k, m in stack.adapter_state_dict().items() if k.endswith("adalora_mask")]
        assert sorted(int(m.sum()) for m in masks) == [1, 1, 3, 3]


# -- the round trip ours -> peft -> ours ---------------------------------------------------------------------------
def _perturbed(strategies, make=tiny_llama):
    model = make()
    stack = apply_peft(model, strategies)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, stack


def _through_peft(model, tmp_path) -> object:
    save_adapters(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"))
        theirs.save_pretrained(str(tmp_path / "theirs"))
    return tmp_path / "theirs"


ROUND_TRIPS = {
    "lora": lambda: [__import__("lightning_peft").LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                       rank_pattern={"v_proj": 2})],
    "dora": lambda: [__import__("lightning_peft").LoRA(r=2, target_modules=["q_proj"], use_dora=True)],
    "ia3": lambda: [__import__("lightning_peft").IA3(target_modules=["k_proj", "down_proj"],
                                                     feedforward_modules=["down_proj"])],
    "prompt_tuning": lambda: [__import__("lightning_peft").PromptTuning(num_virtual_tokens=3)],
}


@pytest.mark.parametrize("kind", sorted(ROUND_TRIPS))
def test_round_trip_ours_peft_ours_gives_identical_tensors(kind, tmp_path):
    model, stack = _perturbed(ROUND_TRIPS[kind]())
    folder = _through_peft(model, tmp_path)
    fresh = tiny_llama()
    back = load_adapters(fresh, folder)
    saved, loaded = stack.adapter_state_dict(), back.adapter_state_dict()
    assert saved.keys() == loaded.keys() and saved
    assert all(torch.equal(saved[k], loaded[k]) for k in saved), [k for k in saved if not torch.equal(saved[k],
                                                                                                      loaded[k])]
    assert torch.equal(_logits(fresh), _logits(model))


def test_round_trip_of_adalora_comes_back_as_lora_with_equal_logits(tmp_path):
    from lightning_peft import AdaLoRA

    model, stack = _perturbed([AdaLoRA(init_r=4, target_r=2, target_modules=["q_proj", "v_proj"])])
    deltas = stack.applied[0].modules
    with torch.no_grad():  # pruned as an allocator would: 3 and 1 triplets kept
        for i, d in enumerate(deltas):
            d.adalora_mask.copy_(torch.tensor([True, False, True, True] if i % 2 else [False, True, False, False]))
    folder = _through_peft(model, tmp_path)
    fresh = tiny_llama()
    back = load_adapters(fresh, folder)
    # our export folds AdaLoRA's kept triplets into plain LoRA (per-module ranks in rank_pattern): so it returns
    assert [s.name for s in back.strategies] == ["lora"] and back.strategies[0].rank_pattern
    assert (_logits(fresh) - _logits(model)).abs().max().item() <= 1e-5


def test_our_own_folders_still_load_through_the_manifest(tmp_path):
    from lightning_peft import IA3, LoRA, PromptTuning

    model, stack = _perturbed([PromptTuning(num_virtual_tokens=2), LoRA(r=2, target_modules=["q_proj"]),
                               IA3(target_modules=["k_proj"])])
    folder = save_adapters(model, tmp_path / "nested")
    assert (folder / "lora" / "adapter_config.json").exists()  # a multi-part folder with PEFT parts
    back = load_adapters(tiny_llama(), folder)
    assert [s.name for s in back.strategies] == ["prompt_tuning", "lora", "ia3"]
    assert all(torch.equal(v, back.adapter_state_dict()[k]) for k, v in stack.adapter_state_dict().items())


# -- refusals -------------------------------------------------------------------------------------------------------
def _edited(tmp_path, **changes):
    folder = _peft_folder(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _untouched(model, before):
    assert get_state(model) is None
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("changes, match", [
    ({"bias": "all"}, r"peft_type='LORA': bias='all' is not supported for import; supported values: 'none'"),
    ({"layers_to_transform": [0]}, r"option layers_to_transform=\[0\] is not supported"),
    ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported for import"),
    ({"use_qalora": True}, r"option use_qalora=True is not supported"),
    ({"peft_type": "LOHA"}, r"peft_type='LOHA' is not supported for import; supported: ADALORA, IA3, LORA"),
])
def test_unsupported_types_and_options_are_refused_by_name_before_the_model_changes(changes, match, tmp_path):
    folder = _edited(tmp_path, **changes)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftConfigError, match=match):
        load_adapters(model, folder)
    _untouched(model, before)


def test_tensors_that_do_not_fit_the_model_are_refused_naming_the_module_and_shapes(tmp_path):
    folder = _peft_folder(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), tmp_path)
    model = tiny_llama(intermediate_size=48)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match=r"lora_A.weight of 'model.layers.0.mlp.down_proj' has shape "
                                                r"\(2, 64\), the model needs \(2, 48\)"):
        load_adapters(model, folder)
    _untouched(model, before)
    with pytest.raises(AdapterStateError, match=r"'model.layers.0.mlp.down_proj', which does not exist"):
        load_adapters(tiny_llama(num_hidden_layers=1, seed=0).model.layers[0], folder)


def test_a_pickle_is_never_loaded(tmp_path):
    folder = _edited(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterStateError, match="adapter_model.bin is a pickle, which is never loaded"):
        load_adapters(tiny_llama(), folder)


def test_replace(tmp_path):
    a = _peft_folder(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path, "a", seed=1)
    b = _peft_folder(tiny_llama, peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]), tmp_path, "b")
    model = tiny_llama()
    load_adapters(model, a, name="task")
    first = _logits(model)
    with pytest.raises(PeftConfigError, match="name='task' is taken.*pass replace=True"):
        load_adapters(model, b, name="task")
    assert torch.equal(_logits(model), first)
    stack = load_adapters(model, b, name="task", replace=True)
    assert list(get_state(model).stacks) == ["task"] and stack.strategies[0].name == "ia3"
    assert (_logits(model) - _peft_logits(tiny_llama, b)).abs().max().item() <= 1e-5
    # our own folders too
    save_adapters(model, tmp_path / "ours")
    again = load_adapters(model, tmp_path / "ours", name="task", replace=True)
    assert list(get_state(model).stacks) == ["task"] and again.strategies[0].name == "ia3"


# -- a strategy a user registers: the same protocol, both ways -----------------------------------------------------
class _HalfDelta(Delta):
    def __init__(self, n_in: int, n_out: int, r: int) -> None:
        super().__init__()
        self.half_A = nn.Parameter(torch.randn(r, n_in) * 0.1)
        self.half_B = nn.Parameter(torch.randn(n_out, r) * 0.1)

    def forward(self, x):
        return 0.5 * (x @ self.half_A.T) @ self.half_B.T

    def delta_weight(self):
        return 0.5 * self.half_B @ self.half_A


@dataclass
class HalfLoRA(LayerStrategy):
    """A user's low-rank strategy: ``W + 0.5 B A``, with its own parameter names."""

    name = "half_lora_test"
    prefix = "half_"
    peft_part = LOW_RANK_PART
    peft_suffixes = ("lora_A.weight", "lora_B.weight")

    r: int = 2
    target_modules: list[str] = field(default_factory=lambda: ["q_proj"])

    def make_delta(self, layer, name, applied):
        return _HalfDelta(layer.in_features, layer.out_features, self.r)

    def peft_factors(self, delta):
        return LowRankFactors(delta.half_A.detach(), delta.half_B.detach(), 0.5, ("half_A", "half_B"))

    @classmethod
    def from_peft(cls, config, tensors, prefix=""):
        return cls(r=config["r"], target_modules=[prefix + m for m in sorted(tensors)])

    def peft_state(self, module, base, tensors, config):
        scale = config["lora_alpha"] / config["r"]
        return {"half_A": tensors["lora_A.weight"], "half_B": tensors["lora_B.weight"] * (scale / 0.5)}


def test_a_user_strategy_exports_and_imports_through_the_protocol(tmp_path):
    register_strategy(HalfLoRA)
    lora = peft_importers()["LORA"]
    try:
        model, _ = _perturbed([HalfLoRA(r=2, target_modules=["q_proj", "v_proj"])])
        folder = _through_peft(model, tmp_path)  # exported by its peft_factors: peft reproduces it
        assert (_peft_logits(tiny_llama, tmp_path / "ours") - _logits(model)).abs().max().item() <= 1e-5
        register_peft_import("LORA", HalfLoRA, replace=True)  # and it imports peft's LoRA folders
        fresh = tiny_llama()
        stack = load_adapters(fresh, folder)
        assert type(stack.strategies[0]) is HalfLoRA
        assert (_logits(fresh) - _logits(model)).abs().max().item() <= 1e-5
        with pytest.raises(PeftConfigError, match="already imported by HalfLoRA; pass replace=True"):
            register_peft_import("LORA", lora)
    finally:
        register_peft_import("LORA", lora, replace=True)
        from lightning_peft.methods import base

        base._REGISTRY.pop(HalfLoRA.name, None)
    assert "half_lora_test" not in registered_strategies()


# -- continue training under Lightning ------------------------------------------------------------------------------
def test_peft_from_pretrained_continues_training_a_peft_folder_and_resumes(tmp_path):
    from lightning_peft.callbacks import PEFT
    from tests.helpers import CausalLMModule, lm_data, loader, straight_and_resumed, trainer

    folder = _peft_folder(tiny_llama, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                          tmp_path)
    saved = load_adapters(tiny_llama(), folder).adapter_state_dict()
    module = CausalLMModule(model=tiny_llama(), lr=1e-2)
    callback = PEFT.from_pretrained(folder, model_attr="model")
    data = loader(lm_data(n=16, length=8), batch_size=4)
    t = trainer(tmp_path, max_steps=8, callbacks=[callback])
    start = {}

    class Record(__import__("lightning").pytorch.Callback):
        def on_train_start(self, trainer, pl_module):
            start.update({k: v.clone() for k, v in callback.stack.adapter_state_dict().items()})
            batch = next(iter(data))[0]
            with torch.no_grad():
                start["loss"] = pl_module.model(input_ids=batch, labels=batch).loss

    t.callbacks.append(Record())
    t.fit(module, data)
    trained = callback.stack.adapter_state_dict()
    # the loaded tensors are the folder's when training starts, and training changes them
    assert trained.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in saved)
    assert all(not torch.equal(trained[k], saved[k]) for k in saved if k.endswith("lora_B"))
    batch = next(iter(data))[0]
    with torch.no_grad():
        assert module.model(input_ids=batch, labels=batch).loss < start["loss"]
    # a second fit of the same module keeps the loaded (and trained) set
    t2 = trainer(tmp_path, max_steps=1, callbacks=[callback])
    t2.fit(module, data)
    assert callback.stack.adapter_state_dict().keys() == trained.keys()

    # adapter-only checkpoints and resume work as with fresh strategies
    straight, resumed, half, _ = straight_and_resumed(
        tmp_path / "resume", lambda: CausalLMModule(model=tiny_llama(), lr=1e-2),
        lambda: [PEFT.from_pretrained(folder, model_attr="model")], loader(lm_data(n=8, length=8), batch_size=4))
    a, b, h = ({n: p for n, p in m.named_parameters() if p.requires_grad} for m in (straight, resumed, half))
    assert a.keys() == b.keys() and a and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], h[n]) for n in a)


def test_peft_from_pretrained_loads_our_own_folders_under_its_name(tmp_path):
    from lightning_peft import IA3
    from lightning_peft.callbacks import PEFT
    from tests.helpers import CausalLMModule, lm_data, loader, trainer

    model, stack = _perturbed([IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])])
    save_adapters(model, tmp_path / "ours")
    module = CausalLMModule(model=tiny_llama(), lr=1e-2)
    callback = PEFT([], model_attr="model", name="task", pretrained=str(tmp_path / "ours"))  # a config's spelling
    trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, loader(lm_data(n=8, length=8), batch_size=4))
    assert callback.stack.name == "task" and list(get_state(module.model).stacks) == ["task"]
    saved = stack.adapter_state_dict()
    trained = {k.replace(".task.", ".default."): v for k, v in callback.stack.adapter_state_dict().items()}
    assert trained.keys() == saved.keys() and any(not torch.equal(trained[k], saved[k]) for k in saved)


def test_peft_from_pretrained_errors_come_before_the_model_changes(tmp_path):
    from lightning_peft import IA3
    from lightning_peft.callbacks import PEFT
    from tests.helpers import CausalLMModule, lm_data, loader, trainer

    folder = _edited(tmp_path, bias="all")
    module = CausalLMModule(model=tiny_llama())
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    t = trainer(tmp_path, max_steps=1, callbacks=[PEFT.from_pretrained(folder, model_attr="model")])
    with pytest.raises(PeftConfigError, match="bias='all'"):
        t.fit(module, loader(lm_data(n=4, length=8), batch_size=4))
    _untouched(module.model, before)
    with pytest.raises(PeftConfigError, match="dirpath=3 is not valid"):
        PEFT.from_pretrained(3)
    with pytest.raises(PeftConfigError, match="pretrained=3 is not valid"):
        PEFT([], pretrained=3)
    with pytest.raises(PeftConfigError, match=r"pretrained='ad' loads the folder's own strategies.*strategies=\[\]"):
        PEFT([IA3()], pretrained="ad")


def test_import_onto_a_lightning_module_finds_the_transformers_model_inside(tmp_path):
    from tests.helpers import CausalLMModule

    folder = _peft_folder(tiny_llama, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                      rank_pattern={"layers.1.self_attn.q_proj": 1}), tmp_path)
    module = CausalLMModule(model=tiny_llama())
    stack = load_adapters(module, folder)
    assert stack.unfreeze == ["model.lm_head"]
    assert all(t.startswith("model.model.layers.") for t in stack.applied[0].targets)
    assert (_logits(module.model) - _peft_logits(tiny_llama, folder)).abs().max().item() <= 1e-5


def test_lora_rank_and_alpha_patterns_are_validated_and_follow_peft_rule():
    from lightning_peft import LoRA

    with pytest.raises(PeftConfigError, match=r"rank_pattern\['v_proj'\]=0 is not valid; expected an integer > 0"):
        LoRA(rank_pattern={"v_proj": 0})
    with pytest.raises(PeftConfigError, match="alpha_pattern=\\['v_proj'\\] is not valid; expected a dict"):
        LoRA(alpha_pattern=["v_proj"])
    with pytest.raises(PeftConfigError, match="rank_pattern=.* with init_weights='pissa' is not supported"):
        LoRA(rank_pattern={"v_proj": 2}, init_weights="pissa")
    lora = LoRA(r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.0.self_attn.v_proj": 6})
    assert lora.rank_of("model.model.layers.0.self_attn.v_proj") == 2  # a dotted suffix, under any prefix
    assert lora.rank_of("model.layers.0.self_attn.xv_proj") == 4  # not a dotted suffix
    assert lora.scaling_of("model.layers.0.self_attn.v_proj") == 3.0 and lora.scaling_of("x.q_proj") == 2.0
