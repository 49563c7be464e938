"""AdapterExport in a real Trainer: a folder per kept checkpoint, removed with it, and final/."""

import os
from pathlib import Path

import peft
import pytest
import torch
from helpers import ClassifierModule, classification_data, loader, tiny_bert, token_batch, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft import LoRA
from lightning_peft.callbacks import PEFT
from lightning_peft.io.adapters import MANIFEST_NAME, load_adapters
from lightning_peft.lightning.export_callback import AdapterExport


def _fit(tmp_path, export, **ckpt_kwargs):
    module = ClassifierModule(tiny_bert())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", **ckpt_kwargs)
    t = trainer(
        tmp_path,
        max_steps=8,
        enable_checkpointing=True,
        callbacks=[
            PEFT([LoRA(r=4, target_modules=["query", "value"])], unfreeze=["classifier"]),
            ckpt,
            export,
        ],
    )
    t.fit(module, loader(classification_data(), shuffle=False))
    return module.eval(), ckpt, t


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_folder_per_kept_checkpoint_and_final(tmp_path):
    module, _, t = _fit(
        tmp_path, AdapterExport(), monitor="train_loss", save_top_k=2, every_n_train_steps=2, save_last=True
    )
    ckpt_dir = tmp_path / "ckpts"
    kept = sorted(p.stem for p in ckpt_dir.glob("*.ckpt"))
    folders = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name != "final")
    assert len(kept) == 3 and "last" in kept  # 2 best + last
    assert folders == kept  # every kept checkpoint has its folder; removed ones lost theirs
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert (ckpt_dir / "final" / MANIFEST_NAME).is_file()
    assert t.strategy.checkpoint_io.__class__.__name__ == "TorchCheckpointIO"  # unwrapped at teardown
    # final/ is the trained model: PEFT on a fresh base reproduces it (the stack is on the LightningModule,
    # the PEFT keys are relative to the HF model inside it)
    x = token_batch()
    ours = _logits(module.model, x)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(ckpt_dir / "final")).eval()
    assert (_logits(theirs, x) - ours).abs().max() <= 1e-4
    # the last checkpoint's folder equals final (no step after the last save)
    last = peft.PeftModel.from_pretrained(tiny_bert(), str(ckpt_dir / "last")).eval()
    assert (_logits(last, x) - ours).abs().max() <= 1e-4
    # and the native files reload onto the bare HF model, bit for bit
    fresh = tiny_bert()
    load_adapters(fresh, ckpt_dir / "final")
    assert torch.equal(_logits(fresh.eval(), x), ours)


def test_folders_match_their_checkpoint(tmp_path):
    """Each folder holds the adapters of its own step, not the final ones."""
    _fit(
        tmp_path,
        AdapterExport(dirpath=str(tmp_path / "adapters"), final=False),
        every_n_train_steps=4,
        save_top_k=-1,
    )
    adapters = tmp_path / "adapters"
    names = sorted(p.name for p in adapters.iterdir())
    assert names == ["epoch=0-step=4", "epoch=0-step=8"]
    x = token_batch()
    for name in names:
        state = torch.load(tmp_path / "ckpts" / f"{name}.ckpt", weights_only=True)["state_dict"]
        module = ClassifierModule(tiny_bert())
        from lightning_peft.callbacks import restore_from_checkpoint

        restore_from_checkpoint(module, {"state_dict": state, **_meta(tmp_path / "ckpts" / f"{name}.ckpt")})
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(adapters / name)).eval()
        assert (_logits(theirs, x) - _logits(module.model.eval(), x)).abs().max() <= 1e-4, name
    steps = [_logits(peft.PeftModel.from_pretrained(tiny_bert(), str(adapters / n)).eval(), x) for n in names]
    assert (steps[0] - steps[1]).abs().max() > 1e-4


def _meta(path):
    ckpt = torch.load(path, weights_only=True)
    return {k: v for k, v in ckpt.items() if k == "lightning_peft"}


def test_every_checkpoint_false_writes_only_final(tmp_path):
    _fit(tmp_path, AdapterExport(every_checkpoint=False), every_n_train_steps=4, save_top_k=-1)
    dirs = [p.name for p in (tmp_path / "ckpts").iterdir() if p.is_dir()]
    assert dirs == ["final"]


def test_export_without_peft_stack_is_a_clear_error(tmp_path):
    from lightning_peft.errors import AdapterStateError

    module = ClassifierModule(tiny_bert())
    t = trainer(tmp_path, max_steps=1, callbacks=[AdapterExport()])
    with pytest.raises(AdapterStateError, match="no lightning_peft adapters"):
        t.fit(module, loader(classification_data()))
    assert not os.path.exists(Path(tmp_path) / "final")
