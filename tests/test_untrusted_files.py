"""Untrusted files: PEFT checkpoints load with ``weights_only=True``; adapter folders are safetensors + JSON only,
and a pickle in place of an adapter file is refused without being unpickled."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
from helpers import ClassifierModule, classification_data, loader, tiny_bert, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import AdaLoRA, AdapterStateError, LoRA, PromptTuning
from lightning_peft.callbacks import PEFT, RankBudgetScheduler, restore_from_checkpoint
from lightning_peft.io.adapters import MANIFEST_NAME, NATIVE_WEIGHTS_NAME, load_adapters, save_adapters

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Payload:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _stack():
    return [
        PromptTuning(num_virtual_tokens=2),
        LoRA(r=2, target_modules=["query"]),
        AdaLoRA(init_r=4, target_r=2, target_modules=["intermediate.dense"]),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    module = ClassifierModule(model=tiny_bert(**NO_DROPOUT))
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", save_last=True)
    callbacks = [
        PEFT(_stack(), unfreeze=["classifier"], model_attr="model"),
        RankBudgetScheduler(tinit=1, tfinal=1, delta_t=1, total_step=6, heatmap=False),
        ckpt,
    ]
    t = trainer(tmp, max_steps=6, callbacks=callbacks, enable_checkpointing=True)
    t.fit(module, loader(classification_data(n=48)))
    save_adapters(module, tmp / "adapters")
    return tmp, module


def test_peft_checkpoint_is_tensors_and_plain_data(trained):
    tmp, module = trained
    state = torch.load(tmp / "ckpt" / "last.ckpt", weights_only=True)  # would raise on any other object
    assert state["state_dict"].keys() == {
        k
        for k in module.state_dict()
        if ".adalora_mask" in k or k in dict((n, p) for n, p in module.named_parameters() if p.requires_grad)
    }
    assert any(k.endswith("adalora_mask") for k in state["state_dict"])
    fresh = ClassifierModule(model=tiny_bert(**NO_DROPOUT))
    restore_from_checkpoint(fresh, str(tmp / "ckpt" / "last.ckpt"))  # loads with weights_only=True itself
    x = classification_data(n=4).tensors[0]
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), module(x))


def test_pickled_checkpoint_is_refused_on_resume(trained, tmp_path):
    """Resuming (trainer.fit(ckpt_path=...)) loads local checkpoints with torch's weights_only default."""
    marker = tmp_path / "unpickled"
    bad = tmp_path / "bad.ckpt"
    ckpt = torch.load(trained[0] / "ckpt" / "last.ckpt", weights_only=True)
    ckpt["evil"] = Payload(marker)
    torch.save(ckpt, bad)
    t = trainer(
        tmp_path, max_steps=8, callbacks=[PEFT(_stack(), unfreeze=["classifier"], model_attr="model")]
    )
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        t.fit(
            ClassifierModule(model=tiny_bert(**NO_DROPOUT)), loader(classification_data(n=16)), ckpt_path=bad
        )
    with pytest.raises(pickle.UnpicklingError):
        restore_from_checkpoint(ClassifierModule(model=tiny_bert()), str(bad))
    assert not marker.exists()


def test_adapter_folder_holds_safetensors_and_json_only(trained):
    folder = trained[0] / "adapters"
    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert suffixes == {".safetensors", ".json"}
    stack = load_adapters(tiny_bert(**NO_DROPOUT), folder)
    assert [s.name for s in stack.strategies] == ["prompt_tuning", "lora", "adalora"]


@pytest.mark.parametrize(
    ("victim", "fix_checksum"),
    [(name, fix) for name in (NATIVE_WEIGHTS_NAME, "lora/adapter_model.safetensors", MANIFEST_NAME)
     for fix in (False, True) if not (name == MANIFEST_NAME and fix)],  # the manifest has no checksum of itself
)
def test_pickle_in_place_of_an_adapter_file_is_refused(trained, tmp_path, victim, fix_checksum):
    import shutil

    folder = tmp_path / "adapters"
    shutil.copytree(trained[0] / "adapters", folder)
    marker = tmp_path / "unpickled"
    target = folder / victim
    with open(target, "wb") as f:
        torch.save({"weight": Payload(marker)}, f)  # torch's pickle-based format
    # an attacker who also rewrites the manifest's SHA-256: the file is still not safetensors
    if fix_checksum:
        import hashlib

        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        data = target.read_bytes()
        manifest["files"][victim] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    model = tiny_bert(**NO_DROPOUT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match="corrupted|not a readable safetensors|not a lightning_peft"):
        load_adapters(model, folder)
    assert not marker.exists()
    assert model.state_dict().keys() == before.keys()  # nothing was applied
