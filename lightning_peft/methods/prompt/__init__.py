"""Input-level strategies: the prompt host (hooks that prepend virtual tokens), prompt tuning, P-tuning and prefix tuning."""

from lightning_peft.methods.prompt.prefix import PrefixTuning
from lightning_peft.methods.prompt.ptuning import PTuning
from lightning_peft.methods.prompt.tuning import PromptStrategy, PromptTuning

__all__ = ["PTuning", "PrefixTuning", "PromptStrategy", "PromptTuning"]
