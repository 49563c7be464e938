"""Many tasks, one base: three adapter sets saved separately, served together on one NF4 base (tiny model)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import (
    IA3,
    LoRA,
    PromptTuning,
    Quantization,
    activate,
    active_adapters,
    apply_peft,
    deactivate,
    list_adapter_sets,
    load_adapters,
    save_adapters,
    unload,
)

config = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


tasks = {
    "sentiment": [LoRA(r=2, target_modules=["q_proj", "v_proj"])],
    "topic": [
        LoRA(r=4, target_modules="all-linear"),
        IA3(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ],
    "hybrid": [PromptTuning(num_virtual_tokens=8), LoRA(r=2, target_modules=["up_proj"])],
}
for name, strategies in tasks.items():  # each task trained on its own copy of the base, then saved
    model = base()
    apply_peft(model, strategies, name=name, quantize=Quantization("nf4"))
    ...  # trainer.fit(module_around(model), ...)
    save_adapters(model, f"adapters/{name}")

model = base()  # serving: one base, quantized once (by the first load), every set on it
for name in tasks:
    load_adapters(model, f"adapters/{name}", name=name)
print(list_adapter_sets(model), active_adapters(model))  # ['sentiment', 'topic', 'hybrid'] ['hybrid']
ids = torch.tensor([[1, 5, 9, 3]])
activate(model, "sentiment")  # no copy of the base, no re-quantization
sentiment_logits = model(ids).logits
deactivate(model)  # the base model alone
unload(model, "topic")  # the others stay
print(list_adapter_sets(model), active_adapters(model))  # ['sentiment', 'hybrid'] []
