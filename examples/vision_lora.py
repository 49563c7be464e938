"""Vision LoRA: a ViT image classifier fine-tuned with LoRA on its attention linears and its patch convolution.

    python examples/vision_lora.py [--quick] [--epochs 5] [--out runs/vision_lora]

The ViT is built from a tiny ``ViTConfig`` (no download), its backbone frozen by the ``PEFT`` callback: LoRA sits
on the attention's query and value projections (``nn.Linear``) and on the patch embedding (an ``nn.Conv2d``,
adapted because it is named: ``"all-linear"`` never selects convolutions); the new classification head is trained
in full. The data are synthetic 32x32 images the example draws itself: four classes of stripes (vertical,
horizontal, diagonal, checkerboard) with random period, phase and colour, under heavy noise, so chance is 25%.
At the end the adapters are written in the Hugging Face PEFT layout (``peft.PeftModel.from_pretrained`` loads
them) and the validation accuracy and trainable parameter count are printed.
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTConfig, ViTForImageClassification

from lightning_peft import LoRA, save_adapters
from lightning_peft.callbacks import PEFT

CLASSES = ("vertical", "horizontal", "diagonal", "checkerboard")


def stripes(n: int, size: int = 32, noise: float = 0.8, seed: int = 0) -> TensorDataset:
    """``n`` RGB images (n, 3, size, size) of class-dependent stripes plus Gaussian noise, and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    freq = 2 * math.pi / (4 + 4 * torch.rand(n, 1, 1, generator=g))  # a period of 4 to 8 pixels
    phase = 2 * math.pi * torch.rand(n, 2, 1, 1, generator=g)
    waves = torch.stack([
        torch.sin(xx * freq + phase[:, 0]),
        torch.sin(yy * freq + phase[:, 0]),
        torch.sin((xx + yy) * freq / math.sqrt(2) + phase[:, 0]),
        torch.sin(xx * freq + phase[:, 0]) * torch.sin(yy * freq + phase[:, 1]),
    ], 1)  # (n, 4, size, size)
    pattern = waves[torch.arange(n), labels]
    colour = 0.5 + torch.rand(n, 3, 1, 1, generator=g)  # the colour says nothing about the class
    images = pattern[:, None] * colour + noise * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(images, labels)


def tiny_vit(image_size: int = 32) -> ViTForImageClassification:
    config = ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=len(CLASSES))
    return ViTForImageClassification(config)  # random weights: a stand-in for a pretrained backbone


class ImageClassifier(L.LightningModule):  # an ordinary module: no PEFT code in it
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = tiny_vit()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = torch.nn.functional.cross_entropy(self.model(pixel_values=images).logits, labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        acc = (self.model(pixel_values=images).logits.argmax(-1) == labels).float().mean()
        self.log("val_acc", acc, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def main(quick: bool = False, epochs: int | None = None, out: str = "runs/vision_lora") -> dict:
    L.seed_everything(0)
    n_train, n_val = (256, 128) if quick else (1024, 512)
    epochs = epochs or (3 if quick else 5)
    train, val = stripes(n_train, seed=0), stripes(n_val, seed=1)
    peft = PEFT([LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj", "patch_embeddings.projection"])],
                unfreeze=["classifier"], model_attr="model")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=[peft], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=out)
    module = ImageClassifier()
    trainer.fit(module, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=128))
    accuracy = float(trainer.callback_metrics["val_acc"])
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    save_adapters(module, f"{out}/adapters")
    print(f"trainable parameters {trainable:,} of {total:,}; adapters in {out}/adapters")
    print(f"final validation accuracy {accuracy:.3f} (chance {1 / len(CLASSES):.2f})")
    return {"accuracy": accuracy, "trainable": trainable, "total": total, "module": module, "adapters": f"{out}/adapters"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 images and 3 epochs instead of 1024 and 5")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default="runs/vision_lora")
    args = parser.parse_args()
    main(args.quick, args.epochs, args.out)
