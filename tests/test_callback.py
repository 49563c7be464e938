"""The PEFT callback on an unmodified Trainer and LightningModule."""

import os

import pytest
import torch
from helpers import ClassifierModule, classification_data, loader, straight_and_resumed, tiny_bert, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import LoRA, PeftConfigError
from lightning_peft.callbacks import PEFT, restore_from_checkpoint

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _peft(**kw):
    return PEFT([LoRA(r=4, alpha=8, target_modules=["query", "value"])], unfreeze=["classifier"],
                model_attr="model", **kw)


def _losses_module(**kw):
    class Recording(ClassifierModule):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.item())
            return loss

    return Recording(**kw)


def test_fit_trains_only_adapters(tmp_path):
    module = _losses_module(model=tiny_bert(**NO_DROPOUT), lr=5e-2)
    backbone = {k: v.clone() for k, v in module.state_dict().items()}
    t = trainer(tmp_path, max_steps=48, callbacks=[_peft()])
    t.fit(module, loader(classification_data(), shuffle=True))
    first, last = sum(module.losses[:5]) / 5, sum(module.losses[-5:]) / 5
    print(f"loss: first 5 steps {first:.3f} -> last 5 steps {last:.3f}")
    assert last < 0.7 * first
    after = module.state_dict()
    changed = {k for k in backbone if not torch.equal(backbone[k], after[k.replace(".query.", ".query.base_layer.")
                                                                       .replace(".value.", ".value.base_layer.")])}
    assert changed == {"model.classifier.weight", "model.classifier.bias"}
    lora_changed = [k for k in after if ".lora." in k and k not in backbone]
    assert len(lora_changed) == 8


def _ckpt_bytes(path):
    return os.path.getsize(path)


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoint_holds_adapters_only(tmp_path, weights_only, capsys):
    data = loader(classification_data(n=32))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=weights_only, save_last=True)
    module = ClassifierModule(model=tiny_bert())
    t = trainer(tmp_path, max_steps=4, callbacks=[_peft(), ckpt], enable_checkpointing=True)
    t.fit(module, data)
    adapter = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    opt_state = 0 if weights_only else 2 * adapter  # AdamW: exp_avg and exp_avg_sq
    size = _ckpt_bytes(ckpt.last_model_path)
    limit = 1.2 * (adapter + opt_state) + 64 * 1024
    manual = tmp_path / "manual.ckpt"
    t.save_checkpoint(manual)

    plain_module = ClassifierModule(model=tiny_bert())
    plain = trainer(tmp_path / "plain", max_steps=4, enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=tmp_path / "plain_ckpt", save_weights_only=weights_only,
                                               save_last=True)])
    plain.fit(plain_module, data)
    plain_size = _ckpt_bytes(plain.checkpoint_callback.last_model_path)
    with capsys.disabled():
        print(f"\n[weights_only={weights_only}] checkpoint with PEFT: {size:,} B (limit {limit:,.0f} B; "
              f"adapters {adapter:,} B); without the plugin: {plain_size:,} B")
    assert size <= limit
    assert _ckpt_bytes(manual) <= 1.2 * (adapter + 2 * adapter) + 64 * 1024
    state = torch.load(ckpt.last_model_path, weights_only=True)["state_dict"]
    assert set(state) == {n for n, p in module.named_parameters() if p.requires_grad}
    full = torch.load(plain.checkpoint_callback.last_model_path, weights_only=True)["state_dict"]
    assert set(full) == set(plain_module.state_dict())
    assert plain_size > 3 * size


def test_resume_equals_uninterrupted(tmp_path):
    data = classification_data(n=64)  # 8 steps per epoch at batch 8

    straight, resumed, _, t = straight_and_resumed(
        tmp_path, lambda: ClassifierModule(model=tiny_bert(**NO_DROPOUT), lr=1e-2), lambda: [_peft()], loader(data))
    assert t.global_step == 16
    want = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    got = dict(resumed.named_parameters())
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    print(f"resume vs uninterrupted: max |diff| = {worst:.2e}")
    assert worst <= 1e-6


def test_load_from_checkpoint_restores_adapters(tmp_path):
    module = ClassifierModule(model=tiny_bert(**NO_DROPOUT))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    t = trainer(tmp_path, max_steps=6, callbacks=[_peft(), ckpt], enable_checkpointing=True)
    t.fit(module, loader(classification_data()))
    x = classification_data(n=4).tensors[0]
    module.eval()
    with torch.no_grad():
        want = module(x)
    loaded = ClassifierModule.load_from_checkpoint(ckpt.last_model_path, strict=False, model=tiny_bert(**NO_DROPOUT))
    restore_from_checkpoint(loaded, ckpt.last_model_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_optimizer_over_wrong_parameters_is_caught(tmp_path):
    class Stale(ClassifierModule):
        def __init__(self):
            super().__init__(model=tiny_bert())
            self.captured = list(self.model.parameters())  # built before the callback adds adapters

        def configure_optimizers(self):
            return torch.optim.AdamW(self.captured, lr=1e-3)

    t = trainer(tmp_path, max_steps=2, callbacks=[_peft()])
    with pytest.raises(PeftConfigError, match=r"trainable parameter\(s\) are in no optimizer.*lora_A.*"
                                              r"LightningCLI's --optimizer"):
        t.fit(Stale(), loader(classification_data(n=16)))


def test_validate_after_fit_is_idempotent(tmp_path):
    module = ClassifierModule(model=tiny_bert())
    cb = _peft()
    t = trainer(tmp_path, max_steps=2, callbacks=[cb])
    t.fit(module, loader(classification_data(n=16)), loader(classification_data(n=8)))
    stack = cb.stack
    t.validate(module, loader(classification_data(n=8)))
    assert cb.stack is stack
    assert sum(1 for n, _ in module.named_parameters() if ".lora." in n) == 8


def test_bad_model_attr(tmp_path):
    t = trainer(tmp_path, max_steps=1, callbacks=[PEFT([LoRA()], model_attr="backbone")])
    with pytest.raises(PeftConfigError, match="model_attr='backbone': ClassifierModule has no attribute 'backbone'; "
                                              "its child modules are: model"):
        t.fit(ClassifierModule(), loader(classification_data(n=8)))
