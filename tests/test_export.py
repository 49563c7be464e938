"""Adapter export: PEFT's own loader reproduces our logits; native reload is bit-exact; errors are clear."""

import json
import os
import warnings

import peft
import pytest
import torch
from helpers import save_and_reload, tiny_bert, tiny_gpt2, tiny_llama, token_batch

from lightning_peft import AdapterStateError, LoRA, apply_peft
from lightning_peft.io.adapters import (
    MANIFEST_NAME,
    NATIVE_WEIGHTS_NAME,
    load_adapters,
    read_manifest,
    save_adapters,
)
from lightning_peft.io.peft_layout import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

TOL = 1e-4


def randomize(stack, seed: int = 1) -> None:
    """Non-zero adapters (and heads), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def agree(diff: float, tol: float) -> None:
    """Assert and print an agreement figure (``pytest -s | grep export-agreement`` lists them all)."""
    name = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    print(f"export-agreement {name}: max|diff| = {diff:.2e} (limit {tol:g})")
    assert diff <= tol, diff


def peft_load(base, folder, **kw):
    """PeftModel.from_pretrained, failing on any PEFT warning about missing or unexpected keys."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(folder), **kw).eval()
    bad = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    assert not bad, bad
    return model


def assert_peft_keys_match(peft_model, folder):
    """Every tensor in the file is one PEFT expects, and PEFT expects no other."""
    from safetensors.torch import load_file

    ours = load_file(os.path.join(folder, PEFT_WEIGHTS_NAME))
    theirs = peft.get_peft_model_state_dict(peft_model)
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k].to(v.dtype)), k


@pytest.mark.parametrize(
    "builder,targets,unfreeze",
    [
        (tiny_llama, ["q_proj", "v_proj", "down_proj"], None),
        (tiny_bert, ["query", "value"], ["classifier"]),
        (tiny_gpt2, ["c_attn", "c_fc"], None),
    ],
)
def test_lora_loads_in_peft(tmp_path, builder, targets, unfreeze):
    model, base_path = save_and_reload(builder(), tmp_path)
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=targets)], unfreeze=unfreeze)
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "adapter")
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["modules_to_save"] == unfreeze
    assert (
        config["task_type"]
        == {
            "LlamaForCausalLM": "CAUSAL_LM",
            "BertForSequenceClassification": "SEQ_CLS",
            "GPT2LMHeadModel": "CAUSAL_LM",
        }[type(model).__name__]
    )
    assert config["base_model_name_or_path"] == base_path
    # plain LoRA is stored once: the native file would only duplicate the PEFT file
    assert not (folder / NATIVE_WEIGHTS_NAME).exists()
    theirs = peft_load(type(model).from_pretrained(base_path).eval(), folder)
    assert_peft_keys_match(theirs, folder)
    diff = (logits(theirs, x) - ours).abs().max().item()
    agree(diff, TOL)
    # ... and the base model alone differs (the check is not vacuous)
    assert (logits(type(model).from_pretrained(base_path).eval(), x) - ours).abs().max() > 1e-3


@pytest.mark.parametrize(
    "builder,targets,unfreeze",
    [
        (tiny_llama, "all-linear", None),
        (tiny_bert, ["query", "value"], ["classifier"]),
        (tiny_gpt2, ["c_attn"], None),
    ],
)
def test_load_adapters_round_trip_is_bit_exact(tmp_path, builder, targets, unfreeze):
    model = builder()
    stack = apply_peft(
        model, [LoRA(r=3, alpha=5, target_modules=targets, use_rslora=True)], unfreeze=unfreeze
    )
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    save_adapters(stack, tmp_path / "a")
    fresh = builder()
    stack2 = load_adapters(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, x), ours)
    assert {k: v.dtype for k, v in stack2.adapter_state_dict().items()} == {
        k: v.dtype for k, v in stack.adapter_state_dict().items()
    }
    assert stack2.describe()["strategies"] == stack.describe()["strategies"]
    assert {n for n, _ in stack2.named_trainable_parameters()} == {
        n for n, _ in stack.named_trainable_parameters()
    }


def test_manifest_contents(tmp_path):
    model = tiny_llama()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["q_proj"])])
    save_adapters(stack, tmp_path / "a")
    manifest = read_manifest(tmp_path / "a")
    assert manifest["stack"]["strategies"][0]["name"] == "lora"
    base = manifest["base_model"]
    assert base["class"] == "LlamaForCausalLM" and base["model_type"] == "llama"
    assert base["adapted_modules"] == {f"model.layers.{i}.self_attn.q_proj": [32, 32] for i in range(2)}
    assert base["fingerprint"].startswith("sha256:")
    assert manifest["library_version"]
    assert manifest["peft"]["layout"] == "single"
    assert set(manifest["files"]) == {PEFT_WEIGHTS_NAME}


def _saved(tmp_path, **kw):
    model = tiny_llama()
    stack = apply_peft(model, [LoRA(r=2, target_modules=["q_proj", "v_proj"])])
    randomize(stack)
    return save_adapters(stack, tmp_path / "a")


@pytest.mark.parametrize(
    "other,match",
    [
        (lambda: tiny_bert(), "saved from a 'llama' model"),
        (lambda: tiny_llama(hidden_size=48, num_attention_heads=4), r"\(in, out\) = \(48, 48\)"),
        (
            lambda: tiny_llama(num_hidden_layers=3),
            "not in the saved adapters: model.layers.2.self_attn.q_proj",
        ),
        (
            lambda: tiny_llama(num_hidden_layers=1),
            "adapted module 'model.layers.1.self_attn.q_proj' does not exist",
        ),
    ],
)
def test_mismatched_base_is_a_clear_error(tmp_path, other, match):
    folder = _saved(tmp_path)
    model = other()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(AdapterStateError, match=match):
        load_adapters(model, folder)
    assert {n: type(m) for n, m in model.named_modules()} == before  # left as it was
    assert all(p.requires_grad for p in model.parameters())


def test_corrupted_and_truncated_files(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / PEFT_WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterStateError, match="corrupted or truncated"):
        load_adapters(tiny_llama(), folder)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(AdapterStateError, match="corrupted or truncated"):
        load_adapters(tiny_llama(), folder)
    # without the manifest's hashes, safetensors' own check still fails loudly
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"][PEFT_WEIGHTS_NAME] = {}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    weights.write_bytes(data[:100])
    with pytest.raises(AdapterStateError, match="not a readable safetensors file"):
        load_adapters(tiny_llama(), folder)
    (folder / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(AdapterStateError, match="corrupted"):
        load_adapters(tiny_llama(), folder)


def test_extra_or_missing_tensors_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    extra = {"model.layers.0.self_attn.k_proj.adapters.default.lora.lora_A": torch.zeros(2, 32)}
    save_file(extra, str(folder / NATIVE_WEIGHTS_NAME))
    manifest["files"][NATIVE_WEIGHTS_NAME] = {}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(AdapterStateError, match="unexpected: model.layers.0.self_attn.k_proj"):
        load_adapters(tiny_llama(), folder)
    os.remove(folder / NATIVE_WEIGHTS_NAME)
    del manifest["files"][NATIVE_WEIGHTS_NAME]
    key = next(iter(manifest["tensor_map"]))
    del manifest["tensor_map"][key]
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(AdapterStateError, match="missing: " + key.replace(".", r"\.")):
        load_adapters(tiny_llama(), folder)
    assert load_file(str(folder / PEFT_WEIGHTS_NAME))  # the PEFT file itself was untouched


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(AdapterStateError, match="no lightning_peft.json"):
        load_adapters(tiny_llama(), tmp_path)


# -- merged export ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "builder,targets,unfreeze",
    [
        (tiny_llama, "all-linear", None),
        (tiny_bert, ["query", "value", "dense"], ["classifier"]),
        (tiny_gpt2, ["c_attn", "c_proj"], None),
    ],
)
def test_merged_export_loads_in_plain_transformers(tmp_path, builder, targets, unfreeze):
    from lightning_peft.io.merged import merge_and_export

    model = builder()
    stack = apply_peft(model, [LoRA(r=4, target_modules=targets)], unfreeze=unfreeze)
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = merge_and_export(model, tmp_path / "merged")
    # the adapted model is unchanged and still adapted
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, x), ours)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    merged = type(model).from_pretrained(folder).eval()
    assert not any("adapters" in n or "base_layer" in n for n, _ in merged.named_parameters())
    diff = (logits(merged, x) - ours).abs().max().item()
    agree(diff, 1e-5)


def test_merged_export_of_nf4_base(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lightning_peft.io.merged import merge_and_export

    _, base_path = save_and_reload(tiny_llama(), tmp_path)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=bnb, device_map="cpu").eval()
    stack = apply_peft(model, [LoRA(r=4, target_modules="all-linear")])
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = merge_and_export(model, tmp_path / "merged")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert type(model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"  # model untouched
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    diff = (logits(merged, x) - ours).abs().max().item()
    agree(diff, 1e-5)  # measured 8.6e-7: the CPU 4-bit forward runs on the same dequantized weights


def test_merged_export_with_prompt_keeps_a_peft_prompt_adapter(tmp_path):
    from lightning_peft import PromptTuning
    from lightning_peft.io.merged import merge_and_export

    model = tiny_llama()
    n = 3
    stack = apply_peft(
        model, [PromptTuning(num_virtual_tokens=n), LoRA(r=4, target_modules=["q_proj", "v_proj"])]
    )
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    with pytest.warns(UserWarning, match="cannot be merged"):
        folder = merge_and_export(model, tmp_path / "merged")
    merged = type(model).from_pretrained(folder).eval()
    assert not any("prompt" in k for k in merged.state_dict())
    with_prompt = peft.PeftModel.from_pretrained(merged, str(folder / "prompt")).eval()
    diff = (logits(with_prompt, x)[:, n:] - ours).abs().max().item()
    agree(diff, 1e-5)
    assert torch.equal(logits(model, x), ours)  # our model still has its prompt and LoRA


def test_merge_refuses_unmergeable_strategies(tmp_path):
    from lightning_peft import Adapter, PeftConfigError
    from lightning_peft.io.merged import merge_and_export

    model = tiny_bert()
    apply_peft(model, [Adapter()])
    with pytest.raises(PeftConfigError, match="cannot be folded"):
        merge_and_export(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_quantized_stack_round_trip_and_merge(tmp_path):
    from lightning_peft.io.merged import merge_and_export
    from lightning_peft.quantization import Quantization

    model = tiny_llama()
    stack = apply_peft(
        model,
        [LoRA(r=4, target_modules=["q_proj", "v_proj"])],
        quantize=Quantization("nf4", double_quant=True),
    )
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(stack, tmp_path / "a")
    assert read_manifest(folder)["stack"]["quantization"]["mode"] == "nf4"
    fresh = tiny_llama()  # full precision: load_adapters quantizes it the same way first
    load_adapters(fresh, folder)
    assert type(fresh.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(fresh, x), ours)
    merged_dir = merge_and_export(model, tmp_path / "merged")
    merged = type(model).from_pretrained(merged_dir).eval()
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    diff = (logits(merged, x) - ours).abs().max().item()
    agree(diff, 1e-5)
