"""LoRA and its family: the config and delta (``method``), and the variants built on them (``dora``).

Importing the package imports every variant, and each registers itself in ``method.VARIANTS``.
"""

from lightning_peft.methods.lora.dora import DoRADelta
from lightning_peft.methods.lora.method import LoRA, LoRADelta

__all__ = ["DoRADelta", "LoRA", "LoRADelta"]
