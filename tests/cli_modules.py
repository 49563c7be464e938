"""A LightningModule and a LightningDataModule that know nothing of lightning_peft, for the CLI tests: LightningCLI
imports them by path (``--model tests.cli_modules.CausalLMModule``)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class CausalLMModule(L.LightningModule):
    """A transformers causal LM loaded from ``path``; the loss is the model's own. Records no hyperparameters."""

    def __init__(self, path: str, lr: float = 1e-2) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path)
        self.lr = lr

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class RecordedCausalLMModule(CausalLMModule):
    """The same, with ``save_hyperparameters()``: the checkpoint says how to build it again."""

    def __init__(self, path: str, lr: float = 1e-2) -> None:
        super().__init__(path, lr)
        self.save_hyperparameters()


class CountingData(L.LightningDataModule):
    """Counting sequences of token ids (easy to learn), ``n`` rows of ``length`` tokens below ``vocab_size``."""

    def __init__(self, vocab_size: int = 128, n: int = 16, length: int = 12, batch_size: int = 4) -> None:
        super().__init__()
        self.vocab_size, self.n, self.length, self.batch_size = vocab_size, n, length, batch_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(1, self.vocab_size - self.length, (self.n, 1), generator=g)
        return DataLoader(TensorDataset(start + torch.arange(self.length)), batch_size=self.batch_size)
