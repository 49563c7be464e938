"""Prefix tuning: agreement with peft (forward, MLP, export, import), alignment, generation, the position limit,
the gate, composition, removal, Lightning training with an adapter-only checkpoint and exact resume."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import (
    VOCAB,
    ClassifierModule,
    classification_data,
    loader,
    save_and_reload,
    straight_and_resumed,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    token_batch,
)
from torch import nn

from lightning_peft import (
    IA3,
    LoRA,
    PeftConfigError,
    PrefixTuning,
    PromptTuning,
    apply_peft,
    merge_and_export,
)
from lightning_peft.core.state import PREFIX_HOST
from lightning_peft.io.adapters import load_adapters, save_adapters
from lightning_peft.io.peft_common import PEFT_CONFIG_NAME

N = 5
TASKS = {tiny_bert: "SEQ_CLS", tiny_gpt2: "CAUSAL_LM", tiny_llama: "CAUSAL_LM", tiny_t5: "SEQ_2_SEQ_LM"}
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def encoder_of(model: nn.Module, set_name: str = "default") -> nn.Module:
    return getattr(model, PREFIX_HOST).sets[set_name]["prefix_tuning"]


def padded_batch(batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_batch(batch, length)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on one row
    return ids, mask


def call(model, ids, mask, **kw):
    if getattr(model.config, "is_encoder_decoder", False):
        kw.setdefault("decoder_input_ids", token_batch(ids.shape[0], 4, seed=1))
    return model(input_ids=ids, attention_mask=mask, **kw)


def peft_twin(build, ours: nn.Module, projection: int | None = None):
    """peft's PREFIX_TUNING model of ``build()`` holding our prefix (table, or embedding + MLP)."""
    from peft import PrefixTuningConfig, get_peft_model

    extra = dict(prefix_projection=True, encoder_hidden_size=projection) if projection else {}
    ref = get_peft_model(build(), PrefixTuningConfig(task_type=TASKS[build], num_virtual_tokens=N, **extra))
    enc, theirs = encoder_of(ours), ref.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            theirs.embedding.weight.copy_(enc.embedding.weight)
            theirs.transform.load_state_dict(enc.transform.state_dict())
        else:
            theirs.embedding.weight.copy_(enc.prefix_embeddings)
    return ref.eval()


def bert_reference(ref, ids, mask, types):
    """peft's SEQ_CLS prefix path (backbone with peft's cache, then the head); peft 0.21.2 itself stops there with
    transformers 5, whose BertModel names the argument ``cache`` instead of ``past_key_values``."""
    base = ref.base_model
    full = torch.cat([torch.ones(ids.shape[0], N, dtype=mask.dtype), mask], 1)
    out = base.bert(input_ids=ids, attention_mask=full, token_type_ids=types, cache=ref.get_prompt(ids.shape[0]))
    return base.classifier(base.dropout(out.pooler_output))


# -- agreement with peft ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [None, 16])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_t5])
def test_matches_peft_forward(build, projection):
    ours = build()
    apply_peft(ours, [PrefixTuning(num_virtual_tokens=N, projection=projection)])
    ref = peft_twin(build, ours, projection)
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100) if TASKS[build] == "CAUSAL_LM" else token_batch(3, 4, seed=1)
    out, exp = call(ours, ids, mask, labels=labels), call(ref, ids, mask, labels=labels)
    assert out.logits.shape == exp.logits.shape  # no extra positions: peft's prefix adds none either
    assert (out.logits - exp.logits).abs().max().item() <= 1e-5
    assert abs(out.loss.item() - exp.loss.item()) <= 1e-5
    assert (out.logits - call(build(), ids, mask).logits).abs().max().item() > 1e-2  # the prefix does something


@pytest.mark.parametrize("projection", [None, 16])
def test_bert_classifier_matches_peft_prefix(projection):
    ours = tiny_bert()
    apply_peft(ours, [PrefixTuning(num_virtual_tokens=N, projection=projection)], unfreeze=["classifier"])
    ref = peft_twin(tiny_bert, ours, projection)
    ids, mask = padded_batch()
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    out = ours(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert out.shape == (3, 2)
    assert (out - bert_reference(ref, ids, mask, types)).abs().max().item() <= 1e-5
    base = tiny_bert()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (out - base).abs().max().item() > 1e-3  # BERT's self-attention reads the passed cache (not a decoder)


def greedy_without_cache(model, ids, mask, steps: int):
    """Greedy decoding by full forwards (no cache), positions from the mask as ``generate`` makes them."""
    cur, m = ids, mask
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).clamp_min(0)
        nxt = model(input_ids=cur, attention_mask=m, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        cur, m = torch.cat([cur, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return cur


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_generate_with_cache_equals_full_forwards(build):
    """Cached generate (prefix injected at prefill, later steps only extend the mask) gives the tokens of greedy
    decoding by full forwards, ours and peft's. peft 0.21.2's own generate drops the prefix under transformers 5
    (it injects ``past_key_values`` while generate passes ``cache``), so it is not the reference here."""
    model = build()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch()
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert got.shape == (3, ids.shape[1] + 6)
    assert torch.equal(got, greedy_without_cache(model, ids, mask, 6))
    assert torch.equal(got, greedy_without_cache(peft_twin(build, model), ids, mask, 6))  # peft's forwards
    plain = build().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(got, plain)


def test_t5_generate_equals_full_decoder_forwards():
    model = tiny_t5()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch()
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    dec = torch.zeros(3, 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(5):
        nxt = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
        dec = torch.cat([dec, nxt], 1)
    assert torch.equal(got, dec)


# -- peft's folder layout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,projection", [(tiny_gpt2, 16), (tiny_llama, None), (tiny_t5, None)])
def test_peft_export_loads_in_peft_and_round_trips(tmp_path, build, projection):
    import peft

    model, base_path = save_and_reload(build(), tmp_path)
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N, projection=projection)])
    with torch.no_grad():  # a trained-looking MLP / table
        for p in encoder_of(model).parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = save_adapters(model, tmp_path / "a")
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    geometry = encoder_of(model).geometry
    assert config["peft_type"] == "PREFIX_TUNING" and config["prefix_projection"] is False
    assert (config["num_virtual_tokens"], config["num_layers"], config["token_dim"]) == (
        N, geometry.num_layers, geometry.token_dim)
    assert config["num_transformer_submodules"] == (2 if build is tiny_t5 else 1)
    ids, mask = padded_batch()
    want = call(model, ids, mask).logits
    theirs = peft.PeftModel.from_pretrained(type(model).from_pretrained(base_path).eval(), str(folder)).eval()
    assert (call(theirs, ids, mask).logits - want).abs().max().item() <= 1e-5
    # our own folder restores the MLP (training state) exactly; the peft folder alone imports the folded table
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    assert dict(encoder_of(fresh).named_parameters()).keys() == dict(encoder_of(model).named_parameters()).keys()
    assert torch.equal(call(fresh, ids, mask).logits, want)
    peft_only = tmp_path / "peft_only"
    peft_only.mkdir()
    for name in (PEFT_CONFIG_NAME, "adapter_model.safetensors"):
        (peft_only / name).write_bytes((folder / name).read_bytes())
    imported = type(model).from_pretrained(base_path).eval()
    stack = load_adapters(imported, peft_only)
    assert isinstance(stack.strategies[0], PrefixTuning) and stack.strategies[0].projection is None
    assert (call(imported, ids, mask).logits - want).abs().max().item() <= 1e-5


def test_peft_folder_written_by_peft_imports(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    ref = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)).eval()
    ref.save_pretrained(tmp_path / "p")
    ours = tiny_llama()
    load_adapters(ours, tmp_path / "p")
    ids, mask = padded_batch()
    assert (call(ours, ids, mask).logits - call(ref, ids, mask).logits).abs().max().item() <= 1e-5


def test_gated_prefix_is_not_exported_to_peft(tmp_path):
    model = tiny_gpt2()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N, gate=True)])
    with pytest.warns(UserWarning, match="gate=True: peft's PREFIX_TUNING has no gates"):
        folder = save_adapters(model, tmp_path / "a")
    assert not (folder / PEFT_CONFIG_NAME).exists()
    with pytest.raises(PeftConfigError, match="gate=True: peft's PREFIX_TUNING has no gates"):
        merge_and_export(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    fresh = tiny_gpt2()
    load_adapters(fresh, folder)
    ids, mask = padded_batch()
    assert torch.equal(call(fresh, ids, mask).logits, call(model, ids, mask).logits)


# -- alignment, positions, removal -----------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert])
def test_outputs_align_and_returned_cache_holds_prefix(build):
    model = build()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=True)
    assert all(h.shape[1] == ids.shape[1] for h in out.hidden_states)
    if build is not tiny_bert:
        assert out.cache.get_seq_length() == N + ids.shape[1]


def test_position_ids_are_shifted_like_peft():
    model = tiny_llama()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N)])
    ref = peft_twin(tiny_llama, model)
    ids, mask = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert (out - ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits).abs().max().item() <= 1e-5


def test_position_limit_is_refused_at_plan_and_at_forward():
    with pytest.raises(PeftConfigError, match=r"num_virtual_tokens=128 .*max_position_embeddings=128"):
        apply_peft(tiny_bert(), [PrefixTuning(num_virtual_tokens=128)])
    model = tiny_gpt2()  # n_positions=128
    apply_peft(model, [PrefixTuning(num_virtual_tokens=20)])
    model(input_ids=token_batch(1, 108))
    with pytest.raises(PeftConfigError, match=r"109 tokens .*num_virtual_tokens=20 is 129 .*=128"):
        model(input_ids=token_batch(1, 109))


def test_remove_restores_model_exactly_and_deepcopy_uses_copys_prefix():
    model = tiny_llama()
    ids, mask = padded_batch()
    before = call(model, ids, mask).logits
    hooks = (len(model.model._forward_pre_hooks), len(model.model._forward_hooks))
    stack = apply_peft(model, [PrefixTuning(num_virtual_tokens=N)])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        encoder_of(twin).prefix_embeddings.zero_()
    assert not torch.equal(call(twin, ids, mask).logits, call(model, ids, mask).logits)
    stack.remove()
    assert not hasattr(model, PREFIX_HOST)
    assert (len(model.model._forward_pre_hooks), len(model.model._forward_hooks)) == hooks
    assert torch.equal(call(model, ids, mask).logits, before)


def test_only_prefix_parameters_train_and_disable_gives_base():
    from lightning_peft import disable_adapters

    model = tiny_gpt2()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N, projection=8)])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(PREFIX_HOST + ".") for n in trainable)
    ids, mask = padded_batch()
    call(model, ids, mask, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    with disable_adapters(model):
        assert torch.equal(call(model, ids, mask).logits, call(tiny_gpt2(), ids, mask).logits)


# -- the gate ----------------------------------------------------------------------------------------------------
def test_gate_scales_each_layers_prefix_per_example():
    model = tiny_llama()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N, gate=True)])
    enc = encoder_of(model)
    ids, mask = padded_batch()
    gated = call(model, ids, mask).logits
    ungated = tiny_llama()
    apply_peft(ungated, [PrefixTuning(num_virtual_tokens=N)])
    with torch.no_grad():
        encoder_of(ungated).prefix_embeddings.copy_(enc.prefix_embeddings)
    assert (gated - call(ungated, ids, mask).logits).abs().max().item() > 1e-4
    call(model, ids, mask, labels=ids).loss.backward()  # the gate learns
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in enc.gates)
    with torch.no_grad():  # a saturated gate (g = 1) is the plain prefix
        for g in enc.gates:
            g.weight.zero_()
            g.bias.fill_(40.0)
    assert (call(model, ids, mask).logits - call(ungated, ids, mask).logits).abs().max().item() <= 1e-5
    with torch.no_grad():  # generation (the prefix scaled once, at prefill) equals full forwards
        for g in enc.gates:
            nn.init.normal_(g.weight, std=0.5)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, greedy_without_cache(model, ids, mask, 4))


def test_gate_ignores_padding():
    model = tiny_gpt2()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N, gate=True)])
    with torch.no_grad():
        for g in encoder_of(model).gates:
            nn.init.normal_(g.weight, std=0.5)
    ids = token_batch(1, 6)
    alone = model(input_ids=ids).logits
    padded = torch.cat([torch.full((1, 3), 5), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=padded, attention_mask=mask, position_ids=pos).logits[:, 3:]
    assert (out - alone).abs().max().item() <= 1e-5


# -- composition -------------------------------------------------------------------------------------------------
def test_composes_with_layer_strategies_and_a_prompt():
    model = tiny_llama()
    stack = apply_peft(model, [LoRA(r=4, target_modules=["q_proj", "v_proj"]), IA3(target_modules=["down_proj"]),
                               PromptTuning(num_virtual_tokens=3, init="vocab"), PrefixTuning(num_virtual_tokens=N)])
    ids, mask = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True)
    assert out.logits.shape == (3, ids.shape[1], VOCAB)
    assert out.cache.get_seq_length() == N + 3 + ids.shape[1]
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, greedy_without_cache(model, ids, mask, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert stack.describe()["strategies"]


def test_composes_with_nf4_and_int8(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning_peft import Quantization

    for kind in ("nf4", "int8"):
        model = tiny_llama()
        apply_peft(model, [LoRA(r=4, target_modules=["q_proj"]), PrefixTuning(num_virtual_tokens=N)],
                   quantize=Quantization(kind))
        ids, mask = padded_batch()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        assert encoder_of(model).prefix_embeddings.grad is not None
        assert torch.isfinite(out.logits).all()


def test_later_all_linear_set_leaves_the_prefix_mlp_and_gates_alone():
    model = tiny_llama()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N, projection=8, gate=True)])
    other = apply_peft(model, [LoRA(r=2, target_modules="all-linear")], name="b")
    assert other.applied[0].targets and not any(PREFIX_HOST in t for t in other.applied[0].targets)


def test_mixed_batches_with_a_prefix_set_are_refused():
    model = tiny_llama()
    apply_peft(model, [PrefixTuning(num_virtual_tokens=N)], name="a")
    apply_peft(model, [LoRA(r=4, target_modules=["q_proj"])], name="b")
    with pytest.raises(PeftConfigError, match="PrefixTuning"):
        model(input_ids=token_batch(2, 5), adapter_names=["a", "b"])


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens=0"),
    (dict(projection=0), "projection=0"),
    (dict(gate="yes"), "gate='yes'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(PeftConfigError, match=match):
        PrefixTuning(**kwargs)


def test_plan_errors_leave_the_model_untouched():
    model = tiny_t5()
    with pytest.raises(PeftConfigError, match="gate=True is not supported on encoder-decoder"):
        apply_peft(model, [PrefixTuning(num_virtual_tokens=N, gate=True)])
    assert not hasattr(model, PREFIX_HOST)
    model = tiny_llama()
    with pytest.raises(PeftConfigError, match="one strategy of each kind per stack"):
        apply_peft(model, [PrefixTuning(num_virtual_tokens=N), PrefixTuning(num_virtual_tokens=2)])
    assert not hasattr(model, PREFIX_HOST)


# -- Lightning ---------------------------------------------------------------------------------------------------
def _peft_callback():
    from lightning_peft.callbacks import PEFT

    return PEFT([PrefixTuning(num_virtual_tokens=4, projection=16)], unfreeze=["classifier"], model_attr="model")


def test_callback_trains_and_resumes_exactly(tmp_path):
    data = classification_data(n=32)  # 4 steps per epoch at batch 8
    straight, resumed, _, t = straight_and_resumed(
        tmp_path, lambda: ClassifierModule(model=tiny_bert(**NO_DROPOUT), lr=1e-2), lambda: [_peft_callback()],
        loader(data))
    assert t.global_step == 8
    want = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    assert any(".transform." in n for n in want)  # the MLP is trained and checkpointed, not folded
    got = dict(resumed.named_parameters())
    assert max((want[n] - got[n]).abs().max().item() for n in want) <= 1e-6
    ckpt = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert all(PREFIX_HOST in k or "classifier" in k for k in ckpt["state_dict"])  # adapter-only checkpoint
