"""Mid-epoch resume of TextDataModule's train loader: the loader's state (unit tests, worker processes, DDP shares)
and a real ``lightning-peft fit`` killed with SIGKILL mid-epoch and resumed with ``--ckpt_path``, which must end
with the uninterrupted run's tensors after seeing the same batches: in one process, and as a 2-process DDP job
(gloo, CPU) whose ranks must each see their own share again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_peft.data import ResumableDataLoader, ResumableSampler
from lightning_peft.errors import PeftConfigError
from tests.tiny_hf import sentiment_rows, tiny_bert_dir, write_tsv

ROOT = Path(__file__).resolve().parents[1]


def _epochs(loader: ResumableDataLoader, epochs: range) -> list[list[list[int]]]:
    out = []
    for e in epochs:
        loader.sampler.set_epoch(e)  # what Lightning does at each epoch start
        out.append([b.tolist() for b in loader])
    return out


def test_loader_resumes_mid_epoch_and_reshuffles_each_epoch():
    data = list(range(10))
    straight = _epochs(ResumableDataLoader(data, batch_size=3, seed=5), range(3))
    assert all(sorted(i for b in epoch for i in b) == data for epoch in straight)
    assert straight[0] != straight[1] != straight[2]  # seed + epoch: a new order each epoch
    assert straight == _epochs(ResumableDataLoader(data, batch_size=3, seed=5), range(3))  # and reproducible

    first = ResumableDataLoader(data, batch_size=3, seed=5)
    _epochs(first, range(1))
    first.sampler.set_epoch(1)
    it = iter(first)
    seen = [next(it).tolist(), next(it).tolist()]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2} and seen == straight[1][:2]

    resumed = ResumableDataLoader(data, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a checkpoint written before the next batch keeps the position
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == straight[1][2:]
    assert _epochs(resumed, range(2, 3)) == straight[2:]
    again = [b.tolist() for b in resumed]  # a second pass over the same epoch is whole again
    assert again == straight[2]


def test_a_state_saved_at_the_end_of_an_epoch_starts_the_next_one_whole():
    data = list(range(8))
    straight = _epochs(ResumableDataLoader(data, batch_size=3, seed=0), range(2))
    resumed = ResumableDataLoader(data, batch_size=3, seed=0)
    resumed.load_state_dict({"epoch": 0, "batches": 3})
    assert _epochs(resumed, range(1, 2)) == straight[1:]
    with pytest.raises(PeftConfigError, match=r"train loader state \{'position': 1\} is not a ResumableDataLoader"):
        resumed.load_state_dict({"position": 1})


def test_worker_processes_reading_ahead_do_not_move_the_position():
    data = list(range(24))
    straight = _epochs(ResumableDataLoader(data, batch_size=2, seed=3), range(1))[0]
    loader = ResumableDataLoader(data, batch_size=2, seed=3, num_workers=2)
    it = iter(loader)
    assert [next(it).tolist() for _ in range(3)] == straight[:3]
    time.sleep(0.5)  # the workers have read batches ahead (prefetch_factor 2 each) by now
    assert loader.state_dict() == {"epoch": 0, "batches": 3}
    del it
    resumed = ResumableDataLoader(data, batch_size=2, seed=3, num_workers=2)
    resumed.load_state_dict(loader.state_dict())
    resumed.sampler.set_epoch(0)
    assert [b.tolist() for b in resumed] == straight[3:]


def test_ddp_ranks_share_the_epoch_and_each_resumes_its_own_share():
    data = list(range(11))
    shares = [
        _epochs(ResumableDataLoader(data, batch_size=2, seed=1, num_replicas=2, rank=r), range(1))[0]
        for r in (0, 1)
    ]
    flat = [i for share in shares for b in share for i in b]
    assert set(flat) == set(data) and len(flat) == 12  # DistributedSampler pads 11 to 12
    assert isinstance(ResumableDataLoader(data, num_replicas=2, rank=1).sampler, ResumableSampler)
    resumed = ResumableDataLoader(data, batch_size=2, seed=1, num_replicas=2, rank=1)
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    resumed.sampler.set_epoch(0)
    assert [b.tolist() for b in resumed] == shares[1][2:]


def test_each_ddp_rank_restores_its_own_random_state(monkeypatch):
    """Under DDP the checkpoint (written by rank 0) holds every rank's torch random state; each rank takes its own
    back, and rank 0's when the world size is not the saved one (or the checkpoint predates the ranks' states)."""
    from lightning_peft.cli.data import resumable

    assert resumable.rng_state().keys() == {"cpu"}  # one process: nothing gathered
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    saved = {"cpu": states[0], "ranks": [{"cpu": states[0]}, {"cpu": states[1]}]}
    for world, want in (((1, 2), 1), ((0, 2), 0), ((1, 3), 0)):
        monkeypatch.setattr(resumable, "_world", lambda w=world: w)
        torch.manual_seed(99)
        resumable.restore_rng(saved)
        assert torch.equal(torch.get_rng_state(), states[want]), world
    monkeypatch.setattr(resumable, "_world", lambda: (1, 2))
    resumable.restore_rng({"cpu": states[0]})  # an older checkpoint: rank 0's state on every rank, as before
    assert torch.equal(torch.get_rng_state(), states[0])


# -- in process: a module that reads estimated_stepping_batches in configure_optimizers --------------------------
def test_resume_when_configure_optimizers_builds_the_loader_early(tmp_path):
    """Reading ``trainer.estimated_stepping_batches`` in ``configure_optimizers`` (a warm-up schedule, say) builds
    the train loader before Lightning restores the loops, and Lightning then never hands it the saved position;
    the loader takes it itself when the resumed epoch starts. A crash after step 8, resumed from step 6."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft import LoRA
    from lightning_peft.data import TextDataModule
    from lightning_peft.tasks import SequenceClassification

    bert = tiny_bert_dir(tmp_path)
    data = write_tsv(tmp_path / "train.tsv", sentiment_rows() + sentiment_rows()[:4])

    class Scheduled(SequenceClassification):
        def configure_optimizers(self):
            total = self.trainer.estimated_stepping_batches  # builds the train loader now
            optimizer = super().configure_optimizers()
            schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total)
            return {"optimizer": optimizer, "lr_scheduler": schedule}

    class Record(L.Callback):
        def __init__(self, crash_at=None):
            self.crash_at, self.seen = crash_at, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.global_step + 1, batch["input_ids"].tolist()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.crash_at:
                raise RuntimeError("crash")

    def run(record, ckpt_dir, ckpt_path=None):
        torch.manual_seed(0)
        model = Scheduled(bert, strategies=[LoRA(r=4, target_modules=["query", "value"])], lr=1e-2)
        dm = TextDataModule(bert, train_path=data, text_column="sentence", batch_size=4, seed=3)
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=1, save_last=True)
        t = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[record, checkpoint],
                      default_root_dir=tmp_path)
        t.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model

    straight = Record()
    a = run(straight, tmp_path / "a")
    with pytest.raises(RuntimeError, match="crash"):
        run(Record(crash_at=8), tmp_path / "b")
    resumed = Record()
    b = run(resumed, tmp_path / "b", ckpt_path=tmp_path / "b" / "last.ckpt")
    assert [s for s, _ in resumed.seen] == list(range(7, 16))
    assert resumed.seen == straight.seen[6:]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# -- a real SIGKILL mid-epoch ------------------------------------------------------------------------------------
def _command() -> list[str]:
    script = shutil.which("lightning-peft", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "lightning_peft.cli"]


def _fit(out: Path, bert: str, data: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "fit",
        "--seed_everything=7",
        "--model=lightning_peft.tasks.SequenceClassification",
        f"--model.model_name_or_path={bert}",
        "--model.strategies=[{class_path: LoRA, init_args: {r: 4, target_modules: [query, value], dropout: 0.1}}]",
        "--model.lr=0.01",
        "--data=lightning_peft.data.TextDataModule",
        f"--data.train_path={data}",
        f"--data.val_path={data}",  # validated after each epoch (and the sanity check on resuming)
        "--data.text_column=sentence",
        "--data.batch_size=4",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=3",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={out}",
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.dirpath={out / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=tests.resume_probe.Probe",
        f"--trainer.callbacks.out={out}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(  # a session of its own: killpg reaches a DDP run's rank 1 (rank 0's child) too
        [*_command(), *args], cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]


def _seen(out: Path, name: str = "seen.jsonl") -> list[tuple[int, list[list[int]]]]:
    return [tuple(json.loads(line)) for line in (out / name).read_text().splitlines()]


def _wait_ready(proc: subprocess.Popen, *files: Path) -> None:
    deadline = time.monotonic() + 300
    while not all(f.exists() for f in files):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    """20 sentences in batches of 4: 5 steps an epoch, 15 in 3 epochs; a checkpoint every 3 steps; killed after
    step 8 (epoch 1, its 3rd batch), so the last checkpoint is step 6, one batch into epoch 1. The resumed run
    must train steps 7-15 on the uninterrupted run's batches and end with its tensors, bit for bit (dropout on:
    the data module's checkpoint state holds torch's random state too)."""
    bert = tiny_bert_dir(tmp_path)  # BERT's own dropout 0.1 too
    rows = sentiment_rows() + sentiment_rows()[:4]
    data = write_tsv(tmp_path / "train.tsv", rows)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = _fit(straight, bert, data)
    victim = _fit(crashed, bert, data, "--trainer.callbacks.hang_at=8")
    _wait_ready(victim, crashed / "ready")
    assert (crashed / "ready").read_text().split() == ["8", "1", "2"]  # step 8 = epoch 1, batch 2: mid-epoch
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL

    last = torch.load(crashed / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    before_kill = _seen(crashed)
    resumed = _fit(crashed, bert, data, f"--ckpt_path={crashed / 'ckpt' / 'last.ckpt'}")
    _finish(resumed)
    _finish(reference)

    want, got = _seen(straight), _seen(crashed)[len(before_kill):]
    assert [s for s, _ in want] == list(range(1, 16))
    assert [s for s, _ in got] == list(range(7, 16))
    assert got == want[6:]  # the same batches, in the same order, after the checkpoint
    assert before_kill[:8] == want[:8]
    a = torch.load(straight / "result.pt", weights_only=True)
    b = torch.load(crashed / "result.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 15
    assert a["trained"].keys() == b["trained"].keys() and any("lora_B" in k for k in a["trained"])
    for key in a["trained"]:
        assert torch.equal(a["trained"][key], b["trained"][key]), key


# -- the same under DDP: 2 processes (gloo, CPU), the whole run killed mid-epoch -----------------------------------
def _ddp_env() -> dict[str, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _sentence(row: list[int]) -> tuple[int, ...]:
    while row and row[-1] == 0:  # [PAD]
        row = row[:-1]
    return tuple(row)


def test_ddp_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """``lightning-peft fit --trainer.strategy=ddp --trainer.devices=2`` on the CPU: 40 distinct sentences, 4 per
    rank per step (8 a step), 5 steps an epoch, 15 in 3 epochs, shuffled with ``seed + epoch``, dropout on. The
    whole job (both ranks, one process group) is killed with SIGKILL after step 8 (epoch 1, batch 2; the last
    checkpoint is step 6) and resumed with ``--ckpt_path``: each rank must train steps 7-15 on the batches it saw
    in the uninterrupted run, the ranks' shares of every epoch must be disjoint and cover the data, and the
    tensors must end equal to the uninterrupted run's on both ranks, bit for bit."""
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(key, raising=False)  # a launched rank must not take them from this process
    bert = tiny_bert_dir(tmp_path)
    rows = [(f"{text} {i}", label) for i, (text, label) in enumerate(sentiment_rows() * 3)][:40]
    data = write_tsv(tmp_path / "train.tsv", rows)
    ddp = ("--trainer.strategy=ddp", "--trainer.devices=2")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    reference = _fit(straight, bert, data, *ddp, env=_ddp_env())
    victim = _fit(crashed, bert, data, *ddp, "--trainer.callbacks.hang_at=8", env=_ddp_env())
    _wait_ready(victim, crashed / "ready", crashed / "ready.rank1")
    assert (crashed / "ready").read_text().split() == (crashed / "ready.rank1").read_text().split() == ["8", "1", "2"]
    os.killpg(victim.pid, signal.SIGKILL)  # the whole job, as a preempted node loses it
    victim.wait()
    assert victim.returncode == -signal.SIGKILL

    last = torch.load(crashed / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    before = {name: len(_seen(crashed, name)) for name in ("seen.jsonl", "seen.rank1.jsonl")}
    resumed = _fit(crashed, bert, data, *ddp, f"--ckpt_path={crashed / 'ckpt' / 'last.ckpt'}", env=_ddp_env())
    _finish(resumed)
    _finish(reference)

    wanted = [_seen(straight, name) for name in before]
    for name, want in zip(before, wanted):
        got = _seen(crashed, name)
        assert [s for s, _ in want] == list(range(1, 16)) and all(len(b) == 4 for _, b in want)
        assert _seen(crashed, name)[:8] == want[:8]
        assert [s for s, _ in got[before[name]:]] == list(range(7, 16)), name
        assert got[before[name]:] == want[6:], name  # this rank's batches after the checkpoint, in order
    for epoch in range(3):  # the two ranks' shares of an epoch: disjoint, together every sentence once
        shares = [[_sentence(r) for step, b in want if (step - 1) // 5 == epoch for r in b] for want in wanted]
        assert not set(shares[0]) & set(shares[1])
        assert len(set(shares[0] + shares[1])) == len(shares[0]) + len(shares[1]) == 40
    assert wanted[0][:5] != wanted[0][5:10]  # reshuffled each epoch

    results = [torch.load(d / n, weights_only=True) for d in (straight, crashed) for n in ("result.pt", "result.rank1.pt")]
    assert all(r["world_size"] == 2 and r["global_step"] == 15 for r in results)
    a = results[0]["trained"]
    assert any("lora_B" in k for k in a)
    for r in results[1:]:
        assert r["trained"].keys() == a.keys()
        for key in a:
            assert torch.equal(a[key], r["trained"][key]), key
