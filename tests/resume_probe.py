"""A callback for tests/test_data_resume.py's ``lightning-peft fit`` subprocesses (not a test file).

It appends the token ids of every training batch to ``<out>/seen.jsonl``, can stop the run after optimizer step
``hang_at`` (writes ``<out>/ready``, then waits to be killed with SIGKILL), and at the end of training saves the
trainable tensors to ``<out>/result.pt``. Under DDP, rank ``r > 0`` writes ``seen.rank<r>.jsonl``,
``ready.rank<r>`` and ``result.rank<r>.pt`` beside rank 0's.
"""

from __future__ import annotations

import json
import os
import time

import lightning as L
import torch


class Probe(L.Callback):
    def __init__(self, out: str, hang_at: int | None = None) -> None:
        self.out, self.hang_at = out, hang_at
        os.makedirs(out, exist_ok=True)

    def _path(self, trainer, name: str) -> str:
        if trainer.global_rank:
            stem, dot, ext = name.partition(".")
            name = f"{stem}.rank{trainer.global_rank}{dot}{ext}"
        return os.path.join(self.out, name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self._path(trainer, "seen.jsonl"), "a") as f:
            f.write(json.dumps([trainer.global_step + 1, batch["input_ids"].tolist()]) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hang_at is not None and trainer.global_step == self.hang_at:
            with open(self._path(trainer, "ready"), "w") as f:
                f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}\n")
            time.sleep(600)  # killed here by the test

    def on_train_end(self, trainer, pl_module) -> None:
        trained = {k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad}
        state = {"trained": trained, "global_step": trainer.global_step, "world_size": trainer.world_size}
        torch.save(state, self._path(trainer, "result.pt"))
