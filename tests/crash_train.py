"""A PEFT run that tests/test_crash_resume.py kills with SIGKILL and resumes (a script, not a test file).

``--hang-at N`` makes the run write ``<out>/ready`` after optimizer step N and then wait to be killed;
``--resume`` continues from ``<out>/ckpt/last.ckpt``. The result (adapter state, AdaLoRA masks and the
allocator's state, the order of the samples seen) goes to ``<out>/result.pt``.

Exact mid-epoch resume needs a dataloader whose position is saved in the checkpoint: Lightning restores the
loops' counters but restarts a plain DataLoader at the epoch's first batch. :class:`ResumableLoader`
implements ``state_dict``/``load_state_dict``, which Lightning saves and restores for any train dataloader.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ClassifierModule, classification_data, tiny_bert
from helpers import trainer as make_trainer

from lightning_peft import AdaLoRA, LoRA, get_stack
from lightning_peft.callbacks import PEFT, RankBudgetScheduler
from lightning_peft.lightning.export_callback import AdapterExport

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


class ResumableLoader(DataLoader):
    """A DataLoader with a per-epoch seeded shuffle whose position survives a checkpoint.

    ``position`` counts the batches handed out in the current epoch. Lightning 2.6 fetches a sized loader's
    batches one at a time, without looking ahead, so when a checkpoint is written in ``on_train_batch_end``
    that is exactly the number of batches the training step consumed (the test checks the batches seen after
    resuming against the uninterrupted run).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=False)
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __iter__(self) -> Iterator[Any]:
        if self.position >= len(self):  # the previous epoch ran to its end
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(
            len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        for idx in order.split(self.batch_size)[self.position :]:
            self.position += 1
            yield self.collate_fn([self.dataset[int(i)] for i in idx])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class Recorder(L.Callback):
    def __init__(self, hang_at: int | None, out: str) -> None:
        self.hang_at, self.out = hang_at, out
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hang_at is not None and trainer.global_step == self.hang_at:
            with open(os.path.join(self.out, "ready"), "w") as f:
                f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}\n")
            time.sleep(600)  # killed here by the test


class Module(ClassifierModule):
    def __init__(self) -> None:
        super().__init__(model=tiny_bert(**NO_DROPOUT), lr=1e-2)
        self.labels: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.labels.append(batch[0][:, 0].clone())  # which samples, in which order
        return super().training_step(batch, batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = Module()
    # total_step=None: T comes from trainer.estimated_stepping_batches, read in on_train_start, after Lightning
    # restored the loader's position (reading it earlier would build the loader too soon; README, "Scaling out")
    scheduler = RankBudgetScheduler(tinit=2, tfinal=3, delta_t=2, heatmap=False)
    ckpt_dir = os.path.join(args.out, "ckpt")
    callbacks = [
        PEFT(
            [
                LoRA(r=4, alpha=8, target_modules=["query", "value"]),
                AdaLoRA(
                    init_r=4, target_r=2, alpha=4.0, target_modules=["intermediate.dense", "output.dense"]
                ),
            ],
            unfreeze=["classifier"],
            model_attr="model",
        ),
        scheduler,
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=1, save_last=True),
        AdapterExport(dirpath=os.path.join(args.out, "export")),
        Recorder(args.hang_at, args.out),
    ]
    trainer = make_trainer(args.out, max_steps=-1, max_epochs=args.epochs, enable_checkpointing=True,
                           callbacks=callbacks)
    data = ResumableLoader(classification_data(n=64), batch_size=8)
    trainer.fit(module, data, ckpt_path=os.path.join(ckpt_dir, "last.ckpt") if args.resume else None)
    torch.save(
        {
            "adapters": get_stack(module, required=True).adapter_state_dict(),
            "allocator": scheduler.allocator.state_dict(),
            "labels": module.labels,
            "global_step": trainer.global_step,
        },
        os.path.join(args.out, "result.pt"),
    )


if __name__ == "__main__":
    main()
