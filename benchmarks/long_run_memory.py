"""Long runs hold no growing state: memory after N steps equals memory after N/10 steps, within noise.

Trains a tiny BERT with the full callback set (PEFT with prompt tuning + LoRA + AdaLoRA, RankBudgetScheduler,
ModelCheckpoint every 50 steps keeping one file, AdapterExport beside every checkpoint) for ``--steps`` optimizer
steps on the CPU, and measures at step ``--steps // 10`` (after warm-up), half-way and at the end:

- Python heap growth traced by ``tracemalloc`` (started at the first measurement), with the top allocation sites;
- bytes of every live ``torch.Tensor`` (unique storages, found through the garbage collector);
- the process's resident set size (coarse: the allocator keeps freed pages).

Run: ``OMP_NUM_THREADS=1 python benchmarks/long_run_memory.py --steps 1000``
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
import warnings

import lightning as L
import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import ClassifierModule, classification_data, loader, tiny_bert

from lightning_peft import AdaLoRA, LoRA, PromptTuning
from lightning_peft.callbacks import PEFT, RankBudgetScheduler
from lightning_peft.lightning.export_callback import AdapterExport

warnings.filterwarnings("ignore")


def tensor_bytes() -> tuple[int, int]:
    """(count, bytes) of the live tensors' unique storages."""
    seen: dict[int, int] = {}
    count = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                count += 1
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # half-built or exotic objects
            continue
    return count, sum(seen.values())


class Meter(L.Callback):
    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.rows: dict[int, dict[str, float]] = {}
        self.baseline: tracemalloc.Snapshot | None = None
        self.growth: list[tracemalloc.StatisticDiff] = []
        self.late_growth: list[tracemalloc.StatisticDiff] = []
        self.mid: tracemalloc.Snapshot | None = None

    def measure(self, step: int) -> None:
        gc.collect()
        n_tensors, t_bytes = tensor_bytes()
        heap = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
        rss = psutil.Process().memory_info().rss
        self.rows[step] = {
            "tensors": n_tensors,
            "tensor_bytes": t_bytes,
            "traced_heap": heap,
            "rss": rss,
            "time": time.perf_counter(),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self.first:
            tracemalloc.start(1)
            self.measure(step)
            self.baseline = tracemalloc.take_snapshot()
        elif step == (self.first + self.last) // 2:
            self.measure(step)
            self.mid = tracemalloc.take_snapshot()
        elif step == self.last:
            self.measure(step)
            snapshot = tracemalloc.take_snapshot()
            assert self.baseline is not None
            self.growth = snapshot.compare_to(self.baseline, "filename")[:8]
            self.late_growth = snapshot.compare_to(self.mid, "lineno")[:8] if self.mid is not None else []
            tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    first = max(args.steps // 10, 1)
    torch.manual_seed(0)
    module = ClassifierModule(model=tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    meter = Meter(first, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = [
            PEFT(
                [
                    PromptTuning(num_virtual_tokens=4),
                    LoRA(r=4, target_modules=["query", "value"]),
                    AdaLoRA(init_r=4, target_r=2, target_modules=["intermediate.dense"]),
                ],
                unfreeze=["classifier"],
                model_attr="model",
            ),
            RankBudgetScheduler(tinit=args.steps // 5, tfinal=args.steps // 5, delta_t=10, heatmap=False),
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=tmp, every_n_train_steps=50, save_top_k=1, monitor="step", mode="max"
            ),
            AdapterExport(final=False),
            meter,
        ]
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=args.steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )

        original = module.training_step

        def training_step(batch, batch_idx):
            module.log("step", float(trainer.global_step), batch_size=1)
            return original(batch, batch_idx)

        module.training_step = training_step
        trainer.fit(module, loader(classification_data(n=64), batch_size=8))
        files = sorted(os.listdir(tmp))
    mid = (first + args.steps) // 2
    a, m, b = meter.rows[first], meter.rows[mid], meter.rows[args.steps]
    rate = (args.steps - first) / (b["time"] - a["time"])
    print(f"steps {first} -> {args.steps} ({rate:.1f} steps/s with tracemalloc on); files left: {files}")
    print(
        f"{'':<24}{'step ' + str(first):>14}{'step ' + str(mid):>14}{'step ' + str(args.steps):>14}"
        f"{'growth ' + str(first) + '->' + str(args.steps):>18}{'growth ' + str(mid) + '->' + str(args.steps):>18}"
    )
    for key, label in [
        ("tensors", "live tensors"),
        ("tensor_bytes", "tensor bytes"),
        ("traced_heap", "Python heap (traced) B"),
        ("rss", "RSS B"),
    ]:
        print(
            f"{label:<24}{a[key]:>14,}{m[key]:>14,}{b[key]:>14,}{b[key] - a[key]:>+18,}{b[key] - m[key]:>+18,}"
        )
    print(f"largest Python heap changes by file, steps {first} -> {args.steps} (tracemalloc):")
    for stat in meter.growth[:6]:
        print(f"  {stat.size_diff:>+10,} B {stat.count_diff:>+7} blocks  {stat.traceback[0].filename}")
    print(f"largest Python heap changes by line, steps {mid} -> {args.steps}:")
    for stat in meter.late_growth[:6]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff:>+10,} B {stat.count_diff:>+7} blocks  {frame.filename}:{frame.lineno}")


if __name__ == "__main__":
    main()
