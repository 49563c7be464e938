"""LoRA initializations that read the base weight (PiSSA, OLoRA, LoftQ) against peft's, their quantized bases,
their conversion to plain LoRA on export, and their native save / load / resume."""

import copy
import inspect
import json
import textwrap
import warnings

import pytest
import torch
from helpers import save_and_reload, tiny_gpt2, tiny_llama, token_batch
from test_export import agree, logits, peft_load, randomize

from lightning_peft import LoRA, PeftConfigError, Quantization, apply_peft
from lightning_peft.core.backend import base_weight
from lightning_peft.io.adapters import load_adapters, save_adapters
from lightning_peft.io.peft_layout import PEFT_CONFIG_NAME
from lightning_peft.methods.base import strategy_from_config
from lightning_peft.methods.lora import init
from lightning_peft.quantization.convert import quantize_model

peft = pytest.importorskip("peft")

LLAMA = ["q_proj", "v_proj", "down_proj"]
GPT2 = ["c_attn", "mlp.c_proj"]


def deltas(model, stack):
    return {n: model.get_submodule(n).adapters[stack.name]["lora"] for n in stack.applied[0].targets}


def peft_model(model, targets, init_weights, r=4, alpha=8, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=init_weights, **kw)
        return peft.get_peft_model(copy.deepcopy(model), cfg)


def max_diff_to_peft(ours, stack, ref) -> float:
    """Max |ours - peft| over every target's A, B and (residual) base weight."""
    diff = 0.0
    for name, delta in deltas(ours, stack).items():
        theirs = ref.base_model.model.get_submodule(name)
        pairs = [(delta.lora_A, theirs.lora_A["default"].weight), (delta.lora_B, theirs.lora_B["default"].weight),
                 (ours.get_submodule(name).base_layer.weight, theirs.base_layer.weight)]
        diff = max(diff, *((a.float() - b.float()).abs().max().item() for a, b in pairs))
    return diff


def output_change(model, stack, x) -> float:
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        with stack.disable_adapters():
            residual_only = model(input_ids=x).logits
    return (adapted - residual_only).abs().max().item()


# -- the config --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["PiSSA", "pissa_niter_", "pissa_niter_x", "lora", 1, None, "eva"])
def test_unknown_init_is_refused_listing_the_valid_ones(value):
    with pytest.raises(PeftConfigError, match=r"init_weights=.*not valid.*'pissa'.*'olora'.*'loftq'.*pissa_niter_<K>"):
        LoRA(init_weights=value)


def test_loftq_iter_is_checked_and_belongs_to_loftq():
    with pytest.raises(PeftConfigError, match="loftq_iter=0 is not valid"):
        LoRA(init_weights="loftq", loftq_iter=0)
    with pytest.raises(PeftConfigError, match="loftq_iter=3 applies to init_weights='loftq' only"):
        LoRA(init_weights="pissa", loftq_iter=3)
    for value in (True, False, "gaussian", "pissa", "pissa_niter_0", "pissa_niter_16", "olora", "loftq"):
        lora = LoRA(init_weights=value)
        assert strategy_from_config(json.loads(json.dumps(lora.config()))) == lora
        assert lora.changes_base == (value not in (True, False, "gaussian"))


def test_gaussian_init_draws_a_like_peft_and_keeps_b_zero():
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    stack = apply_peft(model, [LoRA(r=4, target_modules=["down_proj"], init_weights="gaussian")])
    for delta in deltas(model, stack).values():
        assert torch.count_nonzero(delta.lora_B) == 0
        assert abs(delta.lora_A.std().item() - 1 / 4) < 0.02  # peft: normal(std=1/r)


# -- PiSSA and OLoRA against peft ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "targets", "init_weights", "rslora"),
    [(tiny_llama, LLAMA, "pissa", False), (tiny_llama, LLAMA, "pissa", True), (tiny_llama, LLAMA, "olora", False),
     (tiny_gpt2, GPT2, "pissa", False)],
    ids=["llama-pissa", "llama-pissa-rslora", "llama-olora", "gpt2-conv1d-pissa"],
)
def test_pissa_and_olora_match_peft(build, targets, init_weights, rslora):
    model = build()
    ref = peft_model(model, targets, init_weights, use_rslora=rslora)
    ours = copy.deepcopy(model)
    stack = apply_peft(ours, [LoRA(r=4, alpha=8, target_modules=targets, init_weights=init_weights,
                                   use_rslora=rslora)])
    agree(max_diff_to_peft(ours, stack, ref), 1e-5)
    x = token_batch()
    agree((logits(ours, x) - logits(model, x)).abs().max().item(), 1e-5)  # the adapted model is the base model
    assert output_change(ours, stack, x) > 1e-2  # and the residual alone is not: the adapter holds a real part


def test_olora_on_conv1d_decomposes_the_out_in_weight():
    """peft 0.21 QR-decomposes GPT-2's stored (in, out) weight, giving A and B the wrong shapes; ours takes the
    (out, in) weight, as for nn.Linear."""
    model = tiny_gpt2()
    ref = peft_model(model, ["c_attn"], "olora")
    theirs = ref.base_model.model.transformer.h[0].attn.c_attn
    assert tuple(theirs.lora_A["default"].weight.shape) != (4, 32)  # peft's shapes: (4, 96) and (32, 4)
    ours = copy.deepcopy(model)
    stack = apply_peft(ours, [LoRA(r=4, alpha=8, target_modules=["c_attn"], init_weights="olora")])
    for name, delta in deltas(ours, stack).items():
        W = model.get_submodule(name).weight.t()
        A, B = torch.linalg.qr(W)[1][:4], torch.linalg.qr(W)[0][:, :4]
        assert torch.equal(delta.lora_A.detach(), A) and torch.equal(delta.lora_B.detach(), B)
        torch.testing.assert_close(base_weight(ours.get_submodule(name).base_layer), W - 2 * B @ A)
    x = token_batch()
    agree((logits(ours, x) - logits(model, x)).abs().max().item(), 1e-5)


def test_pissa_niter_is_peft_given_the_same_sketch(monkeypatch):
    """peft draws the randomized SVD's sketch from the global RNG; ours from a fixed seed. Given ours, peft's
    ``pissa_init`` computes the same factors."""
    W = torch.randn(48, 32)
    torch.manual_seed(3)
    expected = torch.svd_lowrank(W, 4, niter=2)
    got = init.randomized_svd(W, 4, 2, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))  # torch's algorithm, our generator

    def fixed_sketch(weight, q, niter):
        return init.randomized_svd(weight, q, niter, torch.Generator().manual_seed(init.SKETCH_SEED))

    monkeypatch.setattr("peft.tuners.lora.layer.svd_lowrank", fixed_sketch)
    model = tiny_llama()
    ref = peft_model(model, LLAMA, "pissa_niter_2")
    ours = copy.deepcopy(model)
    stack = apply_peft(ours, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="pissa_niter_2")])
    agree(max_diff_to_peft(ours, stack, ref), 1e-5)
    again = copy.deepcopy(model)  # the same weight always gives the same factors
    other = apply_peft(again, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="pissa_niter_2")])
    for a, b in zip(deltas(ours, stack).values(), deltas(again, other).values()):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_remove_and_merge_give_back_the_original_and_adapted_weights():
    model = tiny_llama()
    ours = copy.deepcopy(model)
    stack = apply_peft(ours, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="pissa")])
    randomize(stack)
    x = token_batch()
    adapted = logits(ours, x)
    stack.merge()
    agree((logits(ours, x) - adapted).abs().max().item(), 1e-5)
    stack.unmerge()
    stack.remove()
    for (name, a), b in zip(ours.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


# -- on a quantized base ----------------------------------------------------------------------------------------
def llama64():
    """A tiny Llama whose linears have rows of 64 (bitsandbytes' CPU 4-bit block; 32-wide rows dequantize badly)."""
    return tiny_llama(hidden_size=64, intermediate_size=128)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_pissa_on_a_quantized_base_dequantizes_and_quantizes_the_residual(mode):
    original = llama64()
    model = copy.deepcopy(original)
    quantize_model(model, Quantization(mode))
    before = {n: base_weight(model.get_submodule(n)) for n, _ in model.named_modules() if n.endswith(tuple(LLAMA))}
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="pissa")])
    for name, delta in deltas(model, stack).items():
        A, B = init.pissa(before[name], 4, 2.0)  # the SVD of the dequantized weight
        assert torch.equal(delta.lora_A.detach(), A) and torch.equal(delta.lora_B.detach(), B)
        residual = before[name] - 2.0 * B @ A
        Q = base_weight(model.get_submodule(name).base_layer)
        torch.testing.assert_close(Q, init.roundtrip(residual, Quantization(mode)), atol=0, rtol=0)
        # quantizing the residual again costs less than the first quantization did (its entries are smaller)
        W = original.get_submodule(name).weight.detach()
        assert 0 < rel(Q + delta.delta_weight(), before[name]) < rel(before[name], W)


def test_pissa_with_quantize_decomposes_the_full_precision_weight():
    """QPiSSA: apply_peft(quantize=...) takes the SVD of W before quantizing, and quantizes W_res."""
    model = llama64()
    ref = peft_model(model, LLAMA, "pissa")
    ours = copy.deepcopy(model)
    stack = apply_peft(ours, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="pissa")],
                       quantize=Quantization("nf4"))
    for name, delta in deltas(ours, stack).items():
        theirs = ref.base_model.model.get_submodule(name)
        assert torch.equal(delta.lora_A.detach(), theirs.lora_A["default"].weight.detach())
        W_res = theirs.base_layer.weight.detach()
        Q = base_weight(ours.get_submodule(name).base_layer)
        torch.testing.assert_close(Q, init.roundtrip(W_res, Quantization("nf4")), atol=0, rtol=0)
        W = model.get_submodule(name).weight.detach()
        plain_q = init.roundtrip(W, Quantization("nf4"))
        assert rel(Q + delta.delta_weight(), W) < rel(plain_q, W)  # less error than nf4 of W


@pytest.mark.parametrize("init_weights", ["pissa", "loftq"])
def test_init_needing_a_readable_weight_is_refused_naming_the_layer(init_weights):
    with torch.device("meta"):
        meta = tiny_llama()
    with pytest.raises(PeftConfigError, match=r"q_proj has no weight to read \(on the meta device"):
        apply_peft(meta, [LoRA(r=4, target_modules=["q_proj"], init_weights=init_weights)])


def test_loftq_without_the_full_precision_weight_is_refused():
    model = llama64()
    with pytest.raises(PeftConfigError, match=r"layers.0.self_attn.q_proj is not quantized by this apply_peft call"):
        apply_peft(model, [LoRA(r=4, target_modules=["q_proj"], init_weights="loftq")])
    quantize_model(model, Quantization("nf4"))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(PeftConfigError, match=r"q_proj is already quantized, so its full-precision weight is lost"):
        apply_peft(model, [LoRA(r=4, target_modules=["q_proj"], init_weights="loftq")], quantize=Quantization("nf4"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_rank_tied_weights_and_other_sets_are_refused():
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(PeftConfigError, match=r"r=40 exceeds min\(in, out\) = 32 of model.layers.0.self_attn.q_proj"):
        apply_peft(model, [LoRA(r=40, target_modules=["q_proj"], init_weights="pissa")])
    with pytest.raises(PeftConfigError, match=r"lm_head's weight is tied to model.embed_tokens.weight, which would change too"):
        apply_peft(model, [LoRA(r=4, target_modules=["lm_head"], init_weights="olora")])
    apply_peft(model, [LoRA(r=4, target_modules=["q_proj"])], name="a")
    with pytest.raises(PeftConfigError, match=r"already has adapter sets \['a'\]"):
        apply_peft(model, [LoRA(r=4, target_modules=["v_proj"], init_weights="pissa")], name="b")
    other = tiny_llama()
    apply_peft(other, [LoRA(r=4, target_modules=["q_proj"], init_weights="pissa")], name="a")
    with pytest.raises(PeftConfigError, match=r"set 'a' has init_weights='pissa', which changed the base weights"):
        apply_peft(other, [LoRA(r=4, target_modules=["v_proj"])], name="b")


# -- LoftQ --------------------------------------------------------------------------------------------------------
@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """peft's own ``loftq_init``, with its hard-coded ``"cuda"`` compute device replaced by the CPU."""
    import peft.utils.loftq_utils as loftq_utils

    source = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init)).replace('"cuda"', '"cpu"')
    namespace = dict(vars(loftq_utils))
    exec(source, namespace)
    monkeypatch.setattr("peft.tuners.lora.layer.loftq_init", namespace["loftq_init"])


@pytest.mark.parametrize(("mode", "bits", "iters", "tol"), [("nf4", 4, 1, 1e-5), ("nf4", 4, 3, 1e-5),
                                                            ("int8", 8, 2, 1e-5)])
def test_loftq_matches_peft(peft_loftq_on_cpu, mode, bits, iters, tol):
    model = llama64()
    ref = peft_model(model, LLAMA, "loftq", alpha=4, loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    ours = copy.deepcopy(model)
    stack = apply_peft(ours, [LoRA(r=4, alpha=4, target_modules=LLAMA, init_weights="loftq", loftq_iter=iters)],
                       quantize=Quantization(mode))
    diff = 0.0
    for name, delta in deltas(ours, stack).items():
        theirs = ref.base_model.model.get_submodule(name)
        Q = base_weight(ours.get_submodule(name).base_layer)  # peft keeps Q dequantized in full precision
        for a, b in [(Q, theirs.base_layer.weight), (delta.lora_A, theirs.lora_A["default"].weight),
                     (delta.lora_B, theirs.lora_B["default"].weight)]:
            diff = max(diff, (a - b).abs().max().item())
        W = model.get_submodule(name).weight.detach()
        ours_err = rel(Q + delta.delta_weight(), W)
        theirs_err = rel(theirs.base_layer.weight + theirs.lora_B["default"].weight @ theirs.lora_A["default"].weight, W)
        assert abs(ours_err - theirs_err) < 1e-6
        assert ours_err < rel(init.roundtrip(W, Quantization(mode)), W)  # below plain quantization's error
    agree(diff, tol)


def test_loftq_accounts_for_the_scaling_and_more_rounds_reduce_the_error():
    """peft's LoftQ factors assume alpha == r (scaling 1); ours fit Q + s B A to W for any scaling."""
    model = llama64()
    errors = {}
    for alpha, iters in [(4, 1), (16, 1), (16, 4)]:
        ours = copy.deepcopy(model)
        stack = apply_peft(ours, [LoRA(r=4, alpha=alpha, target_modules=LLAMA, init_weights="loftq",
                                       loftq_iter=iters)], quantize=Quantization("nf4", double_quant=True))
        errors[alpha, iters] = [rel(base_weight(ours.get_submodule(n).base_layer) + d.delta_weight(),
                                    model.get_submodule(n).weight.detach()) for n, d in deltas(ours, stack).items()]
    torch.testing.assert_close(torch.tensor(errors[4, 1]), torch.tensor(errors[16, 1]))
    assert sum(errors[16, 4]) < sum(errors[16, 1])


# -- export and reload ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "targets", "init_weights", "rslora"),
    [(tiny_llama, LLAMA, "pissa", False), (tiny_llama, LLAMA, "olora", True), (tiny_gpt2, GPT2, "pissa_niter_3", False)],
    ids=["llama-pissa", "llama-olora-rslora", "gpt2-pissa-niter"],
)
def test_export_converts_to_lora_of_the_original_base(tmp_path, build, targets, init_weights, rslora):
    model, base_path = save_and_reload(build(), tmp_path)
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=targets, init_weights=init_weights,
                                    use_rslora=rslora)])
    randomize(stack)  # as after training: A, B moved away from A0, B0
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "adapter")
    config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == pytest.approx(8 * 2**0.5 if rslora else 16)
    assert config["init_lora_weights"] is True
    original = type(model).from_pretrained(base_path).eval()  # unmodified: W, not W_res
    agree((logits(peft_load(original, folder), x) - ours).abs().max().item(), 1e-5)
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)  # native: recomputes the residual from the fresh base, then loads A, B, A0, B0
    agree((logits(fresh, x) - ours).abs().max().item(), 1e-5)


def test_resume_on_another_sketch_rebuilds_the_residual_from_the_saved_initial_factors(monkeypatch):
    """An SVD run elsewhere (another device, another sketch) gives other A0, B0: loading the saved ones makes the
    base give up those instead, through the stack's loader and through nn.Module.load_state_dict (Lightning)."""
    model = tiny_llama()
    trained = copy.deepcopy(model)
    stack = apply_peft(trained, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="pissa_niter_1")])
    randomize(stack)
    x = token_batch()
    expected = logits(trained, x)
    state = stack.adapter_state_dict()
    monkeypatch.setattr(init, "SKETCH_SEED", 1)
    for load in ("stack", "module"):
        fresh = copy.deepcopy(model)
        other = apply_peft(fresh, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="pissa_niter_1")])
        name, delta = next(iter(deltas(fresh, other).items()))
        assert not torch.equal(delta.lora_A0, state[f"{name}.adapters.default.lora.lora_A0"])
        if load == "stack":
            other.load_adapter_state_dict(state)
        else:
            fresh.load_state_dict(state, strict=False)
        agree((logits(fresh, x) - expected).abs().max().item(), 1e-5)


@pytest.mark.parametrize("init_weights", ["pissa", "loftq"])
def test_quantized_native_round_trip(tmp_path, init_weights):
    """load_adapters on the original float base quantizes it as saved and recomputes the residual / LoftQ's Q."""
    model, base_path = save_and_reload(llama64(), tmp_path)
    rounds = 2 if init_weights == "loftq" else 1
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights=init_weights, loftq_iter=rounds)],
                       quantize=Quantization("nf4"))
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "adapter")
    fresh = type(model).from_pretrained(base_path).eval()
    load_adapters(fresh, folder)
    agree((logits(fresh, x) - ours).abs().max().item(), 0.0)


def test_loftq_single_round_export_loads_on_the_base_quantized_at_load_time(tmp_path):
    """With loftq_iter=1, Q is the plain quantization of W, so PEFT's folder loads on the original base loaded in
    4 bits (more rounds quantize W - s B A instead: the PEFT folder then needs that Q as its base)."""
    from transformers import LlamaForCausalLM

    from lightning_peft.quantization.config import bnb_config
    from lightning_peft.quantization.convert import keep_standard_layout

    model, base_path = save_and_reload(llama64(), tmp_path)
    stack = apply_peft(model, [LoRA(r=4, alpha=8, target_modules=LLAMA, init_weights="loftq")],
                       quantize=Quantization("nf4"))
    randomize(stack)
    x = token_batch()
    ours = logits(model, x)
    folder = save_adapters(model, tmp_path / "adapter")
    quantized = LlamaForCausalLM.from_pretrained(base_path, quantization_config=bnb_config(Quantization("nf4")),
                                                 dtype=torch.float32).eval()
    keep_standard_layout(quantized)  # no bf16 repacking on AVX512-BF16 CPUs, as apply_peft does
    agree((logits(peft_load(quantized, folder), x) - ours).abs().max().item(), 1e-5)


def test_lightning_checkpoint_of_a_pissa_run_restores_on_a_fresh_module(tmp_path, monkeypatch):
    """PEFT callback + Trainer + ModelCheckpoint, then the documented restore on a fresh module, whose randomized
    SVD (another sketch here) gives other A0, B0 than the run's: the checkpoint's are the ones the base gives up."""
    from helpers import ClassifierModule, classification_data, loader, tiny_bert, trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_peft.callbacks import PEFT, restore_from_checkpoint

    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = ClassifierModule(model=tiny_bert(**no_dropout))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    callback = PEFT([LoRA(r=4, alpha=8, target_modules=["query", "value"], init_weights="pissa_niter_2")],
                    unfreeze=["classifier"], model_attr="model")
    trainer(tmp_path, max_steps=4, callbacks=[callback, ckpt], enable_checkpointing=True).fit(
        module, loader(classification_data()))
    x = classification_data(n=4).tensors[0]
    module.eval()
    with torch.no_grad():
        want = module(x)
    monkeypatch.setattr(init, "SKETCH_SEED", 1)
    loaded = ClassifierModule.load_from_checkpoint(ckpt.last_model_path, strict=False, model=tiny_bert(**no_dropout))
    restore_from_checkpoint(loaded, ckpt.last_model_path)
    loaded.eval()
    with torch.no_grad():
        agree((loaded(x) - want).abs().max().item(), 1e-5)


def test_callback_does_not_quantize_before_a_strategy_that_reads_the_full_precision_weights():
    """On a CUDA Trainer the callback quantizes on the device before ``apply_peft``; LoftQ must see W first, so it
    leaves the quantization to ``apply_peft`` (here the device pre-quantization is forced on the CPU)."""
    from helpers import CausalLMModule

    from lightning_peft.callbacks import PEFT

    module = CausalLMModule(model=tiny_llama())
    callback = PEFT([LoRA(r=4, alpha=4, target_modules=["q_proj"], init_weights="loftq")],
                    quantize=Quantization("nf4"), model_attr="model")
    callback._quantize_device = torch.device("cpu")  # what setup sets on a CUDA Trainer
    stack = callback.apply(module)  # before the fix: PeftConfigError, the layer already quantized
    assert stack.strategies[0].init_weights == "loftq" and stack.quantization.mode == "nf4"
    assert type(module.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
