"""PEFT export of the other strategies: AdaLoRA folded into LoRA, uniform rank, prompt tuning, IA3, hybrids."""

import json
import warnings

import peft
import pytest
import safetensors.torch
import torch
from helpers import save_and_reload, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from test_export import TOL, agree, assert_peft_keys_match, logits, peft_load, randomize

from lightning_peft import IA3, AdaLoRA, AdaptedLayer, LoRA, PromptTuning, PTuning, apply_peft
from lightning_peft.io.adapters import NATIVE_WEIGHTS_NAME, load_adapters, read_manifest, save_adapters
from lightning_peft.io.peft_layout import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from lightning_peft.methods.adalora import adalora_deltas

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "bert": ["query", "value", "output.dense"],
    "gpt2": ["c_attn", "mlp.c_proj"],
}
BUILDERS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def prune(stack, seed: int = 2) -> dict[str, int]:
    """What a RankBudgetScheduler leaves: per-layer random kept triplets (some layers fully pruned)."""
    g = torch.Generator().manual_seed(seed)
    ranks = {}
    for layer_name, delta in adalora_deltas(stack).items():
        keep = torch.rand(delta.r, generator=g) < 0.5
        if len(ranks) == 1:
            keep[:] = False  # one layer pruned to rank 0
        delta.adalora_mask.copy_(keep)
        ranks[layer_name] = int(keep.sum())
    return ranks


def config_of(folder):
    return json.loads((folder / PEFT_CONFIG_NAME).read_text())


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_pruned_adalora_folds_into_lora(tmp_path, arch):
    model, base_path = save_and_reload(BUILDERS[arch](), tmp_path)
    stack = apply_peft(
        model,
        [AdaLoRA(init_r=6, target_r=3, alpha=4.0, target_modules=TARGETS[arch])],
        unfreeze=["classifier"] if arch == "bert" else None,
    )
    randomize(stack)
    ranks = prune(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "a")
    config = config_of(folder)
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]
    assert sorted(config["target_modules"]) == sorted(n for n, k in ranks.items() if k > 0)
    for name, k in ranks.items():  # every kept rank is in the pattern (or is the global r)
        if k:
            assert config["rank_pattern"].get(name, config["r"]) == k
    # one global alpha: peft's rule (alpha_pattern, else lora_alpha, over rank_pattern, else r) and an engine's
    # rule that ignores alpha_pattern (lora_alpha / the rank of B) both give every module its trained update
    assert config["alpha_pattern"] == {} and any(k != config["r"] for k in config["rank_pattern"].values())
    tensors = safetensors.torch.load_file(str(folder / PEFT_WEIGHTS_NAME))
    trained = {n: m.adapters[stack.name]["adalora"].delta_weight().detach() for n, m in model.named_modules()
               if isinstance(m, AdaptedLayer) and stack.name in m.adapters}
    for name, k in ranks.items():
        if not k:
            continue
        B = tensors[f"base_model.model.{name}.lora_B.weight"]
        A = tensors[f"base_model.model.{name}.lora_A.weight"]
        peft_scale = config["alpha_pattern"].get(name, config["lora_alpha"]) / config["rank_pattern"].get(
            name, config["r"])
        engine_scale = config["lora_alpha"] / B.shape[1]
        for scale in (peft_scale, engine_scale):
            torch.testing.assert_close(B @ A * scale, trained[name], atol=1e-6, rtol=1e-5)
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    assert_peft_keys_match(theirs, folder)
    diff = (logits(theirs, x) - ours).abs().max().item()
    agree(diff, TOL)
    # the native files keep the masks and the full init_r tensors: reload is bit-exact
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    assert torch.equal(logits(fresh, x), ours)


def _lora_plus_adalora(tmp_path, arch="llama"):
    model, base_path = save_and_reload(BUILDERS[arch](), tmp_path)
    # q_proj has both, v_proj only LoRA, down_proj only AdaLoRA
    stack = apply_peft(
        model,
        [
            LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
            AdaLoRA(init_r=6, target_r=2, target_modules=["q_proj", "down_proj"]),
        ],
    )
    randomize(stack)
    prune(stack, seed=5)
    return model, base_path, stack


def test_lora_and_adalora_folded_into_one_adapter(tmp_path):
    model, base_path, stack = _lora_plus_adalora(tmp_path)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "a")
    config = config_of(folder)
    ada = {n: d.rank for n, d in adalora_deltas(stack).items()}
    for i in range(2):
        q = f"model.layers.{i}.self_attn.q_proj"
        assert config["rank_pattern"].get(q, config["r"]) == 4 + ada[q]  # ranks concatenated
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    assert_peft_keys_match(theirs, folder)
    diff = (logits(theirs, x) - ours).abs().max().item()
    agree(diff, TOL)
    assert (folder / NATIVE_WEIGHTS_NAME).is_file()


def test_uniform_rank_matches_per_module_ranks(tmp_path):
    model, base_path, _ = _lora_plus_adalora(tmp_path)
    x = token_batch()
    per_module = save_adapters(model, tmp_path / "patterns")
    uniform = save_adapters(model, tmp_path / "uniform", uniform_rank=True)
    cp, cu = config_of(per_module), config_of(uniform)
    assert cp["rank_pattern"]  # the per-module folder does need patterns here
    assert cu["rank_pattern"] == {} and cu["alpha_pattern"] == {}
    assert isinstance(cu["r"], int) and cu["lora_alpha"] == cu["r"] == max(
        [cp["r"], *cp["rank_pattern"].values()]
    )
    a = logits(peft_load(type(model).from_pretrained(base_path).eval(), per_module), x)
    b = logits(peft_load(type(model).from_pretrained(base_path).eval(), uniform), x)
    agree((a - b).abs().max().item(), 1e-5)
    agree((b - logits(model, x)).abs().max().item(), TOL)


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("cls", [PromptTuning, PTuning])
def test_prompt_exports_as_peft_prompt_tuning(tmp_path, arch, cls):
    model, base_path = save_and_reload(BUILDERS[arch](), tmp_path)
    n = 4
    stack = apply_peft(
        model, [cls(num_virtual_tokens=n)], unfreeze=["classifier"] if arch == "bert" else None
    )
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "a")
    config = config_of(folder)
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == n
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    assert_peft_keys_match(theirs, folder)
    out = logits(theirs, x)
    if arch == "llama":  # PEFT's causal-LM logits include the virtual positions; ours are the caller's
        out = out[:, n:]
    diff = (out - ours).abs().max().item()
    agree(diff, TOL)
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    assert torch.equal(logits(fresh, x), ours)  # P-tuning's encoder is in the native files


@pytest.mark.parametrize(
    "arch,targets,ff",
    [
        ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
        ("bert", ["key", "value", "output.dense"], ["output.dense"]),
        ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    ],
)
def test_ia3_loads_in_peft(tmp_path, arch, targets, ff):
    model, base_path = save_and_reload(BUILDERS[arch](), tmp_path)
    stack = apply_peft(model, [IA3(target_modules=targets, feedforward_modules=ff)])
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "a")
    assert config_of(folder)["peft_type"] == "IA3"
    assert not (folder / NATIVE_WEIGHTS_NAME).exists()  # ia3_l has PEFT's layout: stored once
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    assert_peft_keys_match(theirs, folder)
    diff = (logits(theirs, x) - ours).abs().max().item()
    agree(diff, TOL)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_hybrid_prompt_and_lora_nested_in_peft(tmp_path, arch):
    model, base_path = save_and_reload(BUILDERS[arch](), tmp_path)
    n = 3
    stack = apply_peft(
        model,
        [PromptTuning(num_virtual_tokens=n), LoRA(r=4, target_modules=TARGETS[arch][:2])],
        unfreeze=["classifier"] if arch == "bert" else None,
    )
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "a")
    assert config_of(folder / "lora")["peft_type"] == "LORA"
    assert config_of(folder / "prompt")["peft_type"] == "PROMPT_TUNING"
    assert read_manifest(folder)["peft"]["layout"] == "nested"
    assert not (folder / PEFT_CONFIG_NAME).exists()
    # the README's recipe: LoRA inside, the prompt adapter outside
    inner = peft.PeftModel.from_pretrained(
        type(model).from_pretrained(base_path), str(folder / "lora")
    ).eval()
    assert (logits(inner, x) - ours).abs().max() > 1e-3  # LoRA alone is not the model
    outer = peft.PeftModel.from_pretrained(inner, str(folder / "prompt")).eval()
    out = logits(outer, x)
    diff = ((out[:, n:] if arch == "llama" else out) - ours).abs().max().item()
    agree(diff, TOL)
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    assert torch.equal(logits(fresh, x), ours)


def test_hybrid_everything_round_trips_bit_exact(tmp_path):
    model = tiny_llama()
    stack = apply_peft(
        model,
        [
            PTuning(num_virtual_tokens=3, encoder="lstm"),
            LoRA(r=2, target_modules=["q_proj"]),
            AdaLoRA(init_r=4, target_r=2, target_modules=["q_proj", "up_proj"]),
            IA3(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        ],
    )
    randomize(stack)
    prune(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "a")
    assert sorted(p["name"] for p in read_manifest(folder)["peft"]["parts"]) == ["ia3", "lora", "prompt"]
    fresh = tiny_llama()
    stack2 = load_adapters(fresh, folder)
    assert torch.equal(logits(fresh, x), ours)
    saved, loaded = stack.adapter_state_dict(), stack2.adapter_state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_strategy_without_peft_format_warns(tmp_path):
    from lightning_peft import BitFit

    model = tiny_bert()
    stack = apply_peft(model, [BitFit(), LoRA(r=2, target_modules=["query"])])
    randomize(stack)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = save_adapters(model, tmp_path / "a")
    assert any("bitfit" in str(w.message).lower() for w in caught)
    assert "bitfit" in read_manifest(folder)["peft"]["not_exported"]
    fresh = tiny_bert()
    load_adapters(fresh, folder)
    x = token_batch()
    assert torch.equal(logits(fresh, x), logits(model, x))


@pytest.mark.parametrize(
    "strategy",
    [LoRA(r=4, target_modules=["q", "v"]), PromptTuning(num_virtual_tokens=3), IA3()],
    ids=["lora", "prompt", "ia3"],
)
def test_seq2seq_t5_loads_in_peft(tmp_path, strategy):
    from helpers import tiny_t5

    model, base_path = save_and_reload(tiny_t5(), tmp_path)
    stack = apply_peft(model, [strategy])
    randomize(stack)
    x, dec = token_batch(), token_batch(seed=1)[:, :5]
    ours = logits(model, x, decoder_input_ids=dec)
    folder = save_adapters(model, tmp_path / "a")
    assert config_of(folder)["task_type"] == "SEQ_2_SEQ_LM"
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    agree((logits(theirs, x, decoder_input_ids=dec) - ours).abs().max().item(), TOL)
