"""Input-level strategies: the prompt host (hooks that prepend virtual tokens), prompt tuning and P-tuning."""

from lightning_peft.methods.prompt.ptuning import PTuning
from lightning_peft.methods.prompt.tuning import PromptStrategy, PromptTuning

__all__ = ["PTuning", "PromptStrategy", "PromptTuning"]
