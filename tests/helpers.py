"""Tiny real models and a tiny Lightning setup shared by the tests (all CPU, built from configs)."""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

VOCAB = 128


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels)
    cfg.update(overrides)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_t5(seed: int = 0, **overrides):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
               decoder_start_token_id=0, pad_token_id=0)
    cfg.update(overrides)
    return T5ForConditionalGeneration(T5Config(**cfg)).eval()


def tiny_vit(seed: int = 0):
    """A one-layer ViT image classifier (16x16 images, 4x4 patches: its patch embedding is a Conv2d)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg).eval()


def save_and_reload(model, tmp_path, cls=None):
    """Round-trip through save_pretrained / from_pretrained, the real loading path."""
    path = os.path.join(str(tmp_path), "base")
    model.save_pretrained(path)
    cls = cls or type(model)
    return cls.from_pretrained(path).eval(), path


def token_batch(batch: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


class ClassifierModule(L.LightningModule):
    """A LightningModule that knows nothing of PEFT: wraps an HF sequence classifier."""

    def __init__(self, model=None, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model if model is not None else tiny_bert()
        self.lr = lr

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        loss = torch.nn.functional.cross_entropy(self(input_ids), labels)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        input_ids, labels = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(input_ids), labels))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class CausalLMModule(L.LightningModule):
    """A plain causal-LM LightningModule (the loss comes from the HF model's ``labels``)."""

    def __init__(self, model=None, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = model if model is not None else tiny_llama()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        out = self.model(input_ids=input_ids, labels=input_ids)
        self.log("train_loss", out.loss)
        return out.loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def classification_data(n: int = 64, length: int = 12, seed: int = 0) -> TensorDataset:
    """A learnable toy task: the label is whether token 7 appears in the sequence."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(8, VOCAB, (n, length), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    x[y == 1, 3] = 7
    return TensorDataset(x, y)


def lm_data(n: int = 32, length: int = 12, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB - length, (n, 1), generator=g)
    return TensorDataset(start + torch.arange(length))  # counting sequences: easy to learn


def loader(dataset, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=10, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                    deterministic=True, num_sanity_val_steps=0)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def straight_and_resumed(tmp_path, make_module, make_callbacks, data, epochs: int = 2, **trainer_kwargs):
    """Fit ``epochs`` epochs straight, then 1 epoch with a checkpoint and the rest resumed from it.

    Returns (straight, resumed, half, resumed trainer): the modules of the uninterrupted run, of the resumed run
    and of the one-epoch run. Resuming at an epoch boundary, as Lightning restarts a plain DataLoader's epoch.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(n: int, ckpt_path=None, save_dir=None):
        torch.manual_seed(0)
        module = make_module()
        callbacks = list(make_callbacks())
        if save_dir is not None:
            callbacks.append(ModelCheckpoint(dirpath=save_dir, save_last=True))
        t = trainer(tmp_path, max_steps=-1, max_epochs=n, callbacks=callbacks, enable_checkpointing=save_dir is not None,
                    **trainer_kwargs)
        t.fit(module, data, ckpt_path=ckpt_path)
        return module, t

    straight, _ = run(epochs)
    half, first = run(1, save_dir=os.path.join(str(tmp_path), "ck"))
    resumed, t = run(epochs, ckpt_path=first.checkpoint_callback.last_model_path)
    return straight, resumed, half, t


def assert_mixed_rows_match(model, x: torch.Tensor, names: list[str]) -> None:
    """A mixed-adapter batch (``adapter_names=names``) gives each row what its own set (``"__base__"``: none) gives
    that row alone."""
    from lightning_peft import activate, disable_adapters

    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with disable_adapters(model):
                    row = model(input_ids=x[i : i + 1]).logits
            else:
                activate(model, name)
                row = model(input_ids=x[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], row, rtol=0, atol=1e-5)
