"""Regressions in the public API: named sets on load, re-fitting with another callback, several PEFT callbacks,
one ``disable_adapters``, adapter-only checkpoints and validation messages."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import (
    ClassifierModule,
    classification_data,
    loader,
    tiny_bert,
    tiny_llama,
    token_batch,
    trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import (
    Adapter,
    AdapterStateError,
    BitFit,
    LoRA,
    PeftConfigError,
    PromptTuning,
    activate,
    apply_peft,
    disable_adapters,
    list_adapter_sets,
    load_adapters,
    save_adapters,
)
from lightning_peft.callbacks import PEFT, AdapterExport
from lightning_peft.io.adapters import read_manifest

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora_ranks(model: torch.nn.Module) -> set[int]:
    return {p.shape[0] for n, p in model.named_parameters() if n.endswith("lora_A")}


# -- A: load_adapters(..., name=X) loads any saved set under X -----------------------------------------------------
def _callback_export(tmp_path, seed: int, targets: list[str], **peft_kwargs):
    """Fit a plain module with the PEFT callback and AdapterExport (final/ only); return (module, folder)."""
    torch.manual_seed(seed)
    module = ClassifierModule(tiny_bert(**NO_DROPOUT), lr=5e-2)
    peft_cb = PEFT([LoRA(r=2, target_modules=targets)], unfreeze=["classifier"], model_attr="model", **peft_kwargs)
    export = AdapterExport(dirpath=str(tmp_path), every_checkpoint=False)
    trainer(tmp_path, max_steps=3, callbacks=[peft_cb, export]).fit(module, loader(classification_data(n=24, seed=seed)))
    return module.eval(), tmp_path / "final"


def test_two_callback_exports_load_side_by_side_under_new_names(tmp_path):
    trained_a, folder_a = _callback_export(tmp_path / "a", 1, ["query"])
    trained_b, folder_b = _callback_export(tmp_path / "b", 2, ["value"])
    assert read_manifest(folder_a)["stack"]["name"] == read_manifest(folder_b)["stack"]["name"] == "default"
    ids = token_batch(seed=3)
    model = tiny_bert(**NO_DROPOUT)
    load_adapters(model, folder_a, name="task_a")
    load_adapters(model, folder_b, name="task_b")
    assert list_adapter_sets(model) == ["task_a", "task_b"]
    for name, trained in [("task_a", trained_a), ("task_b", trained_b), ("task_a", trained_a)]:
        activate(model, name)
        torch.testing.assert_close(_logits(model, ids), _logits(trained.model, ids), rtol=0, atol=1e-6)
    # a taken name is refused before the model is touched, naming the argument and what to do
    with pytest.raises(PeftConfigError, match=r"name='task_a' is taken: BertForSequenceClassification already "
                                              r"has an adapter set named 'task_a'.*another name.*"
                                              r"unload\(model, 'task_a'\)"):
        load_adapters(model, folder_b, name="task_a")
    assert list_adapter_sets(model) == ["task_a", "task_b"]


def test_peft_callback_name_is_the_exported_set_name(tmp_path):
    trained, folder = _callback_export(tmp_path, 1, ["query"], name="sentiment")
    assert read_manifest(folder)["stack"]["name"] == "sentiment"
    model = tiny_bert(**NO_DROPOUT)
    load_adapters(model, folder)
    assert list_adapter_sets(model) == ["sentiment"]
    ids = token_batch(seed=3)
    torch.testing.assert_close(_logits(model, ids), _logits(trained.model, ids), rtol=0, atol=1e-6)


def test_load_adapters_renames_every_container(tmp_path):
    """Prompt, bottleneck-adapter and LoRA tensors (native file + PEFT files) all follow the new name."""
    trained = tiny_llama()
    stack = apply_peft(trained, [PromptTuning(num_virtual_tokens=2), Adapter(bottleneck=4, init_weights=False),
                                 LoRA(r=2, target_modules=["q_proj"], init_weights=False)])
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    with pytest.warns(UserWarning):  # the bottleneck adapter has no PEFT form
        save_adapters(trained, tmp_path / "hybrid")
    ids = token_batch(batch=2, length=6)
    model = tiny_llama()
    load_adapters(model, tmp_path / "hybrid", name="other")
    assert list_adapter_sets(model) == ["other"]
    keys = [n for n, _ in model.named_parameters() if "default" in n]
    assert not keys, keys
    torch.testing.assert_close(_logits(model, ids), _logits(trained, ids), rtol=0, atol=1e-6)


# -- B: fit again with another PEFT configuration ------------------------------------------------------------------
def test_fit_again_with_another_config_is_refused_unless_replace(tmp_path):
    module = ClassifierModule(tiny_bert(), lr=1e-2)
    data = loader(classification_data(n=16))
    first = PEFT([LoRA(r=4, target_modules=["query"])], model_attr="model")
    trainer(tmp_path, max_steps=2, callbacks=[first]).fit(module, data)
    old_stack = first.stack
    bigger = [LoRA(r=16, target_modules="all-linear")]
    with pytest.raises(PeftConfigError) as info:
        trainer(tmp_path, max_steps=2, callbacks=[PEFT(bigger, model_attr="model")]).fit(module, data)
    message = str(info.value)
    assert "already has adapter set 'default'" in message
    assert "r=4" in message and "target_modules=['query']" in message  # the stack on the module
    assert "r=16" in message and "target_modules='all-linear'" in message  # the callback's
    assert "replace=True" in message and "fresh module" in message
    assert _lora_ranks(module) == {4}  # refused before the model was touched
    replacing = PEFT(bigger, model_attr="model", replace=True)
    t = trainer(tmp_path, max_steps=2, callbacks=[replacing])
    t.fit(module, data)
    assert replacing.stack is not old_stack and _lora_ranks(module) == {16}
    assert replacing.stack.describe()["strategies"] == [s.config() for s in bigger]
    t.save_checkpoint(tmp_path / "replaced.ckpt")
    state = torch.load(tmp_path / "replaced.ckpt", weights_only=True)["state_dict"]
    assert set(state) == set(replacing.stack.adapter_keys(root=module))  # the new stack's keys, not the old one's


def test_fit_twice_with_the_same_config_keeps_the_stack(tmp_path):
    module = ClassifierModule(tiny_bert(), lr=1e-2)
    data = loader(classification_data(n=16))
    first = PEFT([LoRA(r=4, target_modules=["query"])], unfreeze=["classifier"], model_attr="model")
    trainer(tmp_path, max_steps=2, callbacks=[first]).fit(module, data)
    again = PEFT([LoRA(r=4, target_modules=["query"])], unfreeze=["classifier"], model_attr="model")
    trainer(tmp_path, max_steps=4, callbacks=[again]).fit(module, data)
    assert again.stack is first.stack


def test_replace_must_be_a_bool():
    with pytest.raises(PeftConfigError, match=r"replace='yes' is not valid; expected True or False"):
        PEFT([LoRA()], replace="yes")


# -- C: several PEFT callbacks in one Trainer ----------------------------------------------------------------------
class TwoModels(L.LightningModule):
    """Two backbones, each adapted by its own PEFT callback; the logits are summed."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert(0, **NO_DROPOUT)
        self.other = tiny_bert(1, **NO_DROPOUT)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits + self.other(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return torch.nn.functional.cross_entropy(self(ids), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-2)


def _two_callbacks():
    return [PEFT([LoRA(r=2, target_modules=["query"])], model_attr="model", name="task_a"),
            PEFT([LoRA(r=2, target_modules=["value"])], unfreeze=["classifier"], model_attr="other", name="task_b")]


def test_two_peft_callbacks_fit_checkpoint_and_resume(tmp_path):
    data = loader(classification_data(n=16))
    module = TwoModels()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    export = AdapterExport(dirpath=str(tmp_path / "b"), every_checkpoint=False, name="task_b")
    t = trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[*_two_callbacks(), ckpt, export])
    t.fit(module, data)
    assert read_manifest(tmp_path / "b" / "final")["stack"]["name"] == "task_b"  # the set asked for
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert any(".task_a." in n for n in trained) and any(".task_b." in n for n in trained)
    checkpoint = torch.load(ckpt.last_model_path, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(trained)  # both sets, no backbone
    states = [k for k in checkpoint["callbacks"] if k.startswith("PEFT")]
    assert len(states) == 2 and any("task_a" in k for k in states) and any("task_b" in k for k in states)

    resumed = TwoModels()
    callbacks = _two_callbacks()
    t2 = trainer(tmp_path, max_steps=3, enable_checkpointing=False, callbacks=callbacks)
    t2.fit(resumed, data, ckpt_path=ckpt.last_model_path)
    got = dict(resumed.named_parameters())
    for n, p in trained.items():
        assert torch.equal(got[n], p), n
    assert [cb.stack.name for cb in callbacks] == ["task_a", "task_b"]

    from lightning_peft.callbacks import restore_from_checkpoint

    fresh = TwoModels()
    restore_from_checkpoint(fresh, ckpt.last_model_path)
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids), module.eval()(ids), rtol=0, atol=0)


def test_two_peft_callbacks_on_one_model_are_refused(tmp_path):
    module = ClassifierModule(tiny_bert())
    callbacks = [PEFT([LoRA(r=2, target_modules=["query"])], model_attr="model", name="task_a"),
                 PEFT([LoRA(r=2, target_modules=["value"])], model_attr="model", name="task_b")]
    t = trainer(tmp_path, max_steps=1, callbacks=callbacks)
    with pytest.raises(PeftConfigError, match=r"PEFT\(name='task_a', model_attr='model'\).*"
                                              r"PEFT\(name='task_b', model_attr='model'\).*one adapter set"):
        t.fit(module, loader(classification_data(n=8)))
    assert list_adapter_sets(module) == []  # refused before the model was touched


# -- D: one disable_adapters -----------------------------------------------------------------------------------
@pytest.mark.parametrize("strategies", [[LoRA(r=2, target_modules=["query"], init_weights=False)], [BitFit()]],
                         ids=["lora", "bitfit"])
def test_both_disable_adapters_give_the_base_models_output(strategies):
    model, base = tiny_bert(), tiny_bert()
    stack = apply_peft(model, strategies, unfreeze=["classifier"])
    with torch.no_grad():
        for p in stack.trainable_parameters():  # trained: the head and the strategy's tensors moved
            p.add_(0.1)
    ids = token_batch()
    adapted, expected = _logits(model, ids), _logits(base, ids)
    assert not torch.allclose(adapted, expected)
    with stack.disable_adapters():
        from_stack = _logits(model, ids)
    with disable_adapters(model):
        from_function = _logits(model, ids)
    torch.testing.assert_close(from_stack, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_function, from_stack, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)  # the set is back after
    # a reference pass without adapters between an adapted forward and its backward (DPO-style), as with peft
    for disabled in (stack.disable_adapters, lambda: disable_adapters(model)):
        loss = model(input_ids=ids).logits.square().sum()
        with torch.no_grad(), disabled():
            model(input_ids=ids)
        loss.backward()
        assert all(p.grad is not None for p in stack.trainable_parameters())
    if not stack.adapted_layers():
        return  # nothing to merge (BitFit)
    stack.merge()
    for disabled in (stack.disable_adapters, lambda: disable_adapters(model)):
        with pytest.raises(AdapterStateError, match="merged into the base weights; call unmerge"), disabled():
            pass


# -- E: adapter-only checkpoints of plain modules -------------------------------------------------------------------
def test_adapter_only_checkpoint_names_how_to_load_it(tmp_path):
    from lightning_peft.callbacks import load_peft_checkpoint

    module = ClassifierModule(tiny_bert(**NO_DROPOUT))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    peft_cb = PEFT([LoRA(r=2, target_modules=["query"])], unfreeze=["classifier"], model_attr="model")
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[peft_cb, ckpt]).fit(
        module, loader(classification_data(n=16)))
    checkpoint = torch.load(ckpt.last_model_path, weights_only=True)
    meta = checkpoint["lightning_peft"]
    assert meta["adapter_only"] is True
    assert "load_peft_checkpoint(ClassifierModule, path" in meta["load_with"]
    # Lightning's own loader runs no lightning_peft code for a class that knows nothing of PEFT: it fails
    with pytest.raises(RuntimeError, match="Missing key"):
        ClassifierModule.load_from_checkpoint(ckpt.last_model_path, model=tiny_bert(**NO_DROPOUT))
    # the helper named in the checkpoint does the right thing in one call
    loaded = load_peft_checkpoint(ClassifierModule, ckpt.last_model_path, model=tiny_bert(**NO_DROPOUT))
    x = token_batch(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), module.eval()(x))


# -- F: validation messages ------------------------------------------------------------------------------------------
def test_positive_number_messages():
    with pytest.raises(PeftConfigError, match=r"^alpha=-1 is not valid; expected a number > 0$"):
        LoRA(alpha=-1)
    with pytest.raises(PeftConfigError, match=r"^alpha='16' is not valid; expected a number > 0$"):
        LoRA(alpha="16")
    with pytest.raises(PeftConfigError, match=r"^r=0 is not valid; expected an integer > 0$"):
        LoRA(r=0)
