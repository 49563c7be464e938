"""SIGKILL mid-epoch, resume from the last checkpoint, finish equal to an uninterrupted run; atomic writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_peft.io.adapters import read_adapter_tensors

SCRIPT = Path(__file__).with_name("crash_train.py")


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(SCRIPT.parent.parent),
    }
    return env


def _run(out: Path, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(out), *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    """16 steps (2 epochs of 8); checkpoints every 3 steps; killed at step 11 (epoch 1, batch 2): the last
    checkpoint is step 9, mid-epoch; the resumed run redoes steps 10-16 and must match bit for bit."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = _run(straight)
    victim = _run(crashed, "--hang-at", "11")
    deadline = time.monotonic() + 300
    while not (crashed / "ready").exists():
        assert victim.poll() is None, victim.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    step, epoch, batch_idx = map(int, (crashed / "ready").read_text().split())
    assert (step, epoch, batch_idx) == (11, 1, 2)  # mid-epoch
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL

    # what the killed run left: a complete, weights_only-loadable last checkpoint at step 9 and complete exports
    last = torch.load(crashed / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9 and last["epoch"] == 1
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "position": 1}]
    assert not [p.name for p in (crashed / "ckpt").iterdir() if p.name.startswith(".")]
    folders = sorted(p.name for p in (crashed / "export").iterdir())
    assert "last" in folders and "final" not in folders
    for name in folders:
        if not name.startswith("."):
            assert read_adapter_tensors(crashed / "export" / name)  # SHA-256 checked against the manifest

    resumed = _run(crashed, "--resume")
    _finish(resumed)
    _finish(reference)
    want = torch.load(straight / "result.pt", weights_only=True)
    got = torch.load(crashed / "result.pt", weights_only=True)
    assert want["global_step"] == got["global_step"] == 16
    # the resumed run saw exactly the batches the uninterrupted one saw after step 9, in the same order
    assert len(got["labels"]) == 16 - 9
    for a, b in zip(want["labels"][9:], got["labels"]):
        assert torch.equal(a, b)
    assert want["adapters"].keys() == got["adapters"].keys()
    masks = [k for k in want["adapters"] if k.endswith("adalora_mask")]
    assert len(masks) == 6
    for key in want["adapters"]:
        assert torch.equal(want["adapters"][key], got["adapters"][key]), key
    assert want["allocator"].keys() == got["allocator"].keys()
    kept = sum(int(want["adapters"][k].sum()) for k in masks)
    print(
        f"\nresumed after SIGKILL at step 11 (last checkpoint: step 9): adapters and {len(masks)} AdaLoRA masks "
        f"bit-identical to the uninterrupted run; kept rank {kept}/24"
    )
    assert kept < 24  # the allocator pruned before and after the crash


# -- checkpoint files are never half-written ------------------------------------------------------------------------
def test_lightning_default_write_goes_through_the_system_temp_dir(tmp_path, monkeypatch):
    """Why AtomicCheckpointIO exists: Lightning's write renames (or, across filesystems, copies) a file made by
    tempfile.mkstemp() in the system temp dir, not in the checkpoint's directory."""
    import tempfile

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    made: list[str] = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    TorchCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "ck" / "a.ckpt")
    assert made and Path(made[0]).parent == Path(tempfile.gettempdir()) != tmp_path / "ck"


def test_atomic_checkpoint_io_keeps_the_previous_file_when_a_write_fails(tmp_path, monkeypatch):
    from lightning_peft.lightning import checkpoint_io as atomic_io

    path = tmp_path / "last.ckpt"
    io = atomic_io.AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)
    real_save = torch.save
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b)))

    def crash_midway(obj, f):
        real_save({"partial": torch.zeros(1000)}, f)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    io.save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3
    tmp_file = Path(replaced[-1][0])
    assert tmp_file.parent == tmp_path and tmp_file != path  # written beside the target, then renamed


KILL_LOOP = """
import sys, torch
from lightning_peft.lightning.checkpoint_io import AtomicCheckpointIO
io, path, i = AtomicCheckpointIO(), sys.argv[1], 0
while True:
    i += 1
    io.save_checkpoint({"i": i, "w": torch.full((2_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_LOOP, str(path)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for _ in range(3):  # let a few complete writes happen, then kill during the next ones
        assert proc.stdout.readline()
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], torch.full((2_000_000,), float(state["i"])))
    print(
        f"\nkilled while writing checkpoint {state['i'] + 1}: {path.name} holds complete checkpoint {state['i']}"
    )


def test_peft_callback_installs_atomic_checkpoint_io(tmp_path):
    import lightning as L
    from helpers import ClassifierModule, classification_data, loader, tiny_bert, trainer
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import LoRA
    from lightning_peft.callbacks import PEFT
    from lightning_peft.lightning.checkpoint_io import AtomicCheckpointIO
    from lightning_peft.lightning.export_callback import AdapterExport

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            io = trainer.strategy.checkpoint_io
            self.io = type(getattr(io, "inner", io))

    for order in ("peft_first", "export_first"):
        peft = PEFT([LoRA(r=2, target_modules=["query"])], model_attr="model")
        export, probe = AdapterExport(), Probe()
        ckpt = ModelCheckpoint(dirpath=tmp_path / order, filename="x")
        callbacks = [peft, export] if order == "peft_first" else [export, peft]
        t = trainer(tmp_path, max_steps=2, callbacks=[*callbacks, ckpt, probe], enable_checkpointing=True)
        module = ClassifierModule(model=tiny_bert())
        t.fit(module, loader(classification_data(n=16)))
        assert probe.io is AtomicCheckpointIO, order
        assert type(t.strategy.checkpoint_io) is TorchCheckpointIO  # put back at teardown
        assert (tmp_path / order / "x" / "lightning_peft.json").is_file()  # the export wrapper still works
        assert set(torch.load(tmp_path / order / "x.ckpt", weights_only=True)["state_dict"]) == {
            k for k, p in module.named_parameters() if p.requires_grad
        }
