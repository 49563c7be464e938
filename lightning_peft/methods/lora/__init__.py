"""LoRA and its family: the config and delta (``method``), and the variants built on them."""

from lightning_peft.methods.lora.method import LoRA, LoRADelta

__all__ = ["LoRA", "LoRADelta"]
