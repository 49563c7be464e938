"""Model families through the hybrid stack on nf4 and through merge_and_export, all built from tiny configs.

Each family names its own attention and feed-forward linears; the test is that the package's matching,
quantization (including a family's ``_keep_in_fp32_modules``), prompt hosting and merged export hold for it.
"""

from __future__ import annotations

import pytest
import torch

from lightning_peft import AdaLoRA, LoRA, PromptTuning, Quantization, apply_peft, merge_and_export

V = 128
ARCHS = {  # name: (config class, model class, config kwargs, attention targets, feed-forward targets)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2), ["q_proj", "v_proj"], ["up_proj", "down_proj"]),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), ["q_proj", "v_proj"],
                ["gate_proj", "down_proj"]),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2), ["q_proj", "v_proj"], ["up_proj", "down_proj"]),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8), ["q_proj", "v_proj"],
              ["up_proj", "down_proj"]),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, word_embed_proj_dim=32), ["q_proj", "v_proj"], ["fc1", "fc2"]),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4), ["query_key_value"],
                 ["dense_h_to_4h", "dense_4h_to_h"]),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4), ["c_attn"],
             ["mlp.c_fc", "mlp.c_proj"]),
    "bert": ("BertConfig", "BertForSequenceClassification", dict(hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4), ["query", "value"],
             ["intermediate.dense", "output.dense"]),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
           decoder_start_token_id=0, pad_token_id=0), ["q", "v"], ["wi", "wo"]),
}


def build(arch: str, tmp_path, seed: int = 0):
    """The model saved with save_pretrained and loaded back (the real loading path), and its class."""
    import transformers

    cfg_cls, model_cls, kwargs, _, _ = ARCHS[arch]
    cls = getattr(transformers, model_cls)
    path = tmp_path / f"{arch}-base"
    if not path.exists():
        torch.manual_seed(seed)
        cls(getattr(transformers, cfg_cls)(vocab_size=V, max_position_embeddings=64, **kwargs)).save_pretrained(path)
    return cls.from_pretrained(path).eval(), cls


def batch(arch: str) -> dict:
    x = torch.randint(1, V, (2, 8), generator=torch.Generator().manual_seed(0))
    if arch == "t5":
        return dict(input_ids=x, decoder_input_ids=x[:, :5].contiguous())
    return dict(input_ids=x)


def loss_of(arch: str, model) -> torch.Tensor:
    b = batch(arch)
    if arch == "bert":
        return model(**b, labels=torch.tensor([0, 1])).loss
    if arch == "t5":
        return model(input_ids=b["input_ids"], labels=b["decoder_input_ids"]).loss
    return model(**b, labels=b["input_ids"]).loss


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hybrid_stack_on_nf4_trains(arch, tmp_path):
    model, _ = build(arch, tmp_path)
    _, _, _, attn, ff = ARCHS[arch]
    stack = apply_peft(model, [PromptTuning(num_virtual_tokens=4), LoRA(r=4, target_modules=attn),
                               AdaLoRA(init_r=4, target_r=2, target_modules=ff)],
                       quantize=Quantization("nf4", double_quant=True),
                       unfreeze=["classifier"] if arch == "bert" else None)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model.train()
    loss = loss_of(arch, model)
    loss.backward()
    assert torch.isfinite(loss)
    for strategy, applied in zip(stack.strategies, stack.applied):
        owned = [p for m in applied.modules for p in m.parameters() if p.requires_grad] + [
            p for p in applied.parameters if p.requires_grad]
        assert owned and any(p.grad is not None and p.grad.abs().sum() > 0 for p in owned), strategy.name


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_and_export_reloads_with_equal_logits(arch, tmp_path):
    model, cls = build(arch, tmp_path)
    _, _, _, attn, ff = ARCHS[arch]
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=attn, init_weights=False),
                               AdaLoRA(init_r=4, target_r=2, target_modules=ff)])
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
        ours = model(**batch(arch)).logits
    reloaded = cls.from_pretrained(merge_and_export(model, tmp_path / "merged")).eval()
    assert not any("lightning_peft" in type(m).__module__ for m in reloaded.modules())
    with torch.no_grad():
        theirs = reloaded(**batch(arch)).logits
    base, _ = build(arch, tmp_path)
    with torch.no_grad():
        assert not torch.allclose(base(**batch(arch)).logits, ours, atol=1e-4)  # the adapters changed the output
    err = (theirs - ours).abs().max() / ours.abs().max()
    assert err <= 1e-5, f"{arch}: relative logits error {err:.2e}"
