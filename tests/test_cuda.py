"""Tests that need a CUDA device: marker ``cuda``, skipped elsewhere with the reason; ``scripts/gpu_check.sh`` runs
them (``pytest -m cuda``) on a GPU machine. They have not run on a GPU yet (docs/gpu_check.md).

Each test names the CPU test that covers the same logic without CUDA; what only CUDA can show is the device
path itself: bitsandbytes' CUDA kernels, quantizing on the GPU in ``PEFT.setup``, the bf16 paths of a GPU, and
FSDP (Lightning refuses FSDP with ``accelerator="cpu"``).

``LIGHTNING_PEFT_CUDA_TESTS_DEVICE=cpu`` runs the bodies that can run on the CPU there (how they were written
without a GPU); the device-specific assertions are skipped then, and the FSDP test is skipped.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft import (
    Adapter,
    LoRA,
    Quantization,
    apply_peft,
    merge_adapter_set,
    unmerge_adapter_set,
)
from lightning_peft.callbacks import PEFT
from lightning_peft.core.backend import is_bnb_layer
from tests.helpers import CausalLMModule, lm_data, loader, tiny_llama, token_batch, trainer

DEVICE = torch.device(os.environ.get("LIGHTNING_PEFT_CUDA_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                       reason="needs a CUDA device (scripts/gpu_check.sh runs these on a GPU machine)"),
]
ACCELERATOR = "gpu" if ON_CUDA else "cpu"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def wide_llama(seed: int = 0):
    """A 2-layer Llama whose linears have whole 64-element 4-bit blocks (bitsandbytes' CPU kernels need them)."""
    return tiny_llama(seed=seed, hidden_size=64, intermediate_size=128)


def cuda_trainer(tmp_path, **kwargs):
    # deterministic=False: CUDA's deterministic mode refuses some kernels the backward of these models uses
    return trainer(tmp_path, accelerator=ACCELERATOR, deterministic=False, **kwargs)


class Snapshot(Callback):
    """The trainable parameters at fit start (after PEFT.setup), to show that training changed them."""

    def on_train_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def assert_adapters_trained(module, snapshot: Snapshot) -> None:
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert after.keys() == snapshot.before.keys() and after
    changed = [n for n in after if not torch.equal(after[n], snapshot.before[n])]
    lora_b = [n for n in after if n.endswith("lora_B")]
    assert lora_b and set(lora_b) <= set(changed), sorted(set(lora_b) - set(changed))


@pytest.mark.parametrize(
    ("mode", "double_quant", "precision"),
    [("nf4", True, "bf16-mixed"), ("nf4", False, "32-true"), ("fp4", False, "32-true"), ("fp4", True, "bf16-mixed"),
     ("int8", False, "32-true"), ("int8", False, "16-mixed")],
)
def test_quantized_backbone_fits_through_the_callback(tmp_path, mode, double_quant, precision):
    """nf4 / fp4 / int8 through ``PEFT(quantize=...)``: quantized on the GPU in setup, forward and backward in a few
    ``Trainer.fit`` steps, adapters change, the backbone does not, the checkpoint is adapter-only.

    CPU: tests/test_quantization.py (the callback's quantize= on the CPU, ``test_quantize_on_a_given_device_then_
    stack_goes_on``), tests/test_matrix.py's quantized cells, tests/test_callback.py::test_checkpoint_holds_
    adapters_only."""
    module = CausalLMModule(model=wide_llama().train(), lr=1e-2)
    peft = PEFT([LoRA(r=4, alpha=8, target_modules=TARGETS)], model_attr="model",
                quantize=Quantization(mode, double_quant=double_quant))
    snap = Snapshot()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    t = cuda_trainer(tmp_path, max_steps=4, precision=precision, callbacks=[peft, snap, ckpt],
                     enable_checkpointing=True)
    t.fit(module, loader(lm_data(n=32)))
    assert torch.isfinite(t.callback_metrics["train_loss"])
    bnb = [m for m in module.modules() if is_bnb_layer(m)]
    assert len(bnb) == 2 * 7  # every linear of both blocks (the head stays full precision)
    if ON_CUDA:
        assert peft._quantize_device.type == "cuda"  # quantized on the GPU in setup, not on the CPU
        assert all(m.weight.device.type == "cuda" for m in bnb)
    assert not any(m.weight.requires_grad for m in bnb)
    assert_adapters_trained(module, snap)
    state = torch.load(ckpt.last_model_path, weights_only=True, map_location="cpu")["state_dict"]
    assert set(state) == {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_fit_through_the_callback(tmp_path, precision):
    """bf16-mixed (autocast) and bf16-true (the whole module in bf16) train the adapters; the trained model's
    logits in bf16 agree with the same weights in fp32 to the combination matrix's bf16 tolerance (4e-2).

    CPU: tests/test_regressions_core.py::test_bf16_mixed_trainer_fits_with_lora_dropout, tests/test_matrix.py's
    bf16-true and bf16-mixed cells."""
    module = CausalLMModule(model=wide_llama().train(), lr=1e-2)
    snap = Snapshot()
    t = cuda_trainer(tmp_path, max_steps=4, precision=precision, callbacks=[
        PEFT([LoRA(r=4, alpha=8, dropout=0.1, target_modules=TARGETS)], model_attr="model"), snap])
    t.fit(module, loader(lm_data(n=32)))
    assert torch.isfinite(t.callback_metrics["train_loss"])
    assert_adapters_trained(module, snap)
    model = module.model.eval()
    want = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in model.parameters()} == {want}
    x = token_batch(2, 12).to(DEVICE)
    with torch.no_grad():
        if precision == "bf16-true":
            low = model(input_ids=x).logits.float()
            full = copy.deepcopy(model).float()(input_ids=x).logits
        else:
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                low = model(input_ids=x).logits.float()
            full = model(input_ids=x).logits
    rel = ((low - full).abs().max() / full.abs().max()).item()
    print(f"{precision}: max |bf16 - fp32| / max |fp32| = {rel:.2e}")
    assert rel <= 4e-2


@pytest.mark.skipif(not ON_CUDA, reason="Lightning refuses BitsandbytesPrecision on the CPU")
def test_bitsandbytes_precision_plugin_quantizes_the_backbone_not_the_adapters(tmp_path):
    """Lightning's ``BitsandbytesPrecision`` with the callback: the callback quantizes the backbone (on the GPU)
    with the plugin's settings and the plugin converts nothing more: the adapters train in float, the head stays.

    CPU: tests/test_quantization.py::test_lightning_bitsandbytes_plugin (the settings read off the plugin)."""
    import bitsandbytes as bnb
    from lightning.pytorch.plugins import BitsandbytesPrecision

    module = CausalLMModule(model=wide_llama().train(), lr=1e-2)
    peft = PEFT([LoRA(r=4, target_modules=["q_proj", "v_proj"]), Adapter(bottleneck=8, target_modules=["mlp.down_proj"])],
                model_attr="model")
    snap = Snapshot()
    t = cuda_trainer(tmp_path, max_steps=3, plugins=[BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16)],
                     callbacks=[peft, snap])
    t.fit(module, loader(lm_data(n=24)))
    assert torch.isfinite(t.callback_metrics["train_loss"])
    assert peft.stack.quantization.mode == "nf4" and peft.stack.quantization.double_quant
    four_bit = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 14 and all(m.compute_dtype == torch.bfloat16 for m in four_bit)
    assert type(module.model.lm_head) is torch.nn.Linear  # the head is left alone, as the callback plans it
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert any(".adapter_down" in n for n in trainable)  # the bottleneck adapter trains, in float
    assert all(p.is_floating_point() for p in trainable.values())
    assert not any(m.weight.requires_grad for m in four_bit)
    assert_adapters_trained(module, snap)


def test_mixed_adapter_batch_on_an_nf4_base():
    """``model(..., adapter_names=[...])`` on the device: each row equals that row alone under its own set.

    CPU: tests/test_mixed_batch.py::test_nf4_base (the same model, sets and rows, to 1e-5). On CUDA each row's
    own forward runs with another batch shape and so may take other kernels: 1e-4 of the outputs' largest value."""
    from test_mixed_batch import build, layer_sets, output, own_rows, padded

    model = wide_llama()
    build(model, {"lora": layer_sets("llama")["lora"]}, quantize=Quantization("nf4"))
    build(model, {k: v for k, v in layer_sets("llama").items() if k != "lora"})
    model.to(DEVICE)
    names = ["ia3", "lora", "__base__", "both", "rslora", "lora"]
    x, mask = (t.to(DEVICE) for t in padded(len(names)))
    with torch.no_grad():
        mixed = output(model, input_ids=x, attention_mask=mask, adapter_names=names)
        own = own_rows(model, names, input_ids=x, attention_mask=mask)
    rel = ((mixed - own).abs().max() / own.abs().max()).item()
    print(f"mixed batch on {DEVICE.type}: max |row - own forward| / max = {rel:.2e}")
    assert rel <= 1e-4


def test_merge_and_merge_and_export_of_an_nf4_base(tmp_path):
    """LoRA on an nf4 backbone on the device: merge keeps the logits, unmerge restores them, and
    ``merge_and_export`` writes a plain model whose logits (on the CPU) equal the adapted model's.

    CPU: tests/test_export.py::test_merged_export_of_nf4_base, tests/test_adapter_sets.py::
    test_merge_is_explicit_reversible_and_pins_the_set, tests/test_matrix.py's merge cells."""
    from test_export import randomize
    from transformers import AutoModelForCausalLM

    from lightning_peft import merge_and_export

    model = wide_llama().to(DEVICE)
    stack = apply_peft(model, [LoRA(r=4, target_modules="all-linear")], quantize=Quantization("nf4", double_quant=True))
    randomize(stack)
    assert all(m.weight.device.type == DEVICE.type for m in model.modules() if is_bnb_layer(m))
    x = token_batch().to(DEVICE)

    def logits(m):
        with torch.no_grad():
            return m(input_ids=x.to(next(m.parameters()).device)).logits.float().cpu()

    adapted = logits(model)
    scale = adapted.abs().max().item()
    merge_adapter_set(model)
    merged = logits(model)
    unmerge_adapter_set(model)
    back = logits(model)
    folder = merge_and_export(model, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded.model.layers[0].mlp.up_proj) is torch.nn.Linear
    exported = logits(reloaded)
    errors = {"merge": (merged - adapted).abs().max().item() / scale,
              "unmerge": (back - adapted).abs().max().item() / scale,
              "export": (exported - adapted).abs().max().item() / scale}
    print(f"nf4 on {DEVICE.type}, relative to max |logit|: {errors}")
    assert errors["merge"] <= 1e-4 and errors["unmerge"] <= 1e-4 and errors["export"] <= 1e-4


class FinalAdapters(Callback):
    """The trainable parameters at the end of fit, gathered (under FSDP) with clean names."""

    def on_train_end(self, trainer, pl_module):
        from contextlib import nullcontext

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = trainer.strategy.model
        ctx = FSDP.summon_full_params(wrapped, writeback=False) if isinstance(wrapped, FSDP) else nullcontext()
        with ctx:
            self.adapters = {n.replace("_fsdp_wrapped_module.", ""): p.detach().float().cpu().clone()
                             for n, p in wrapped.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not ON_CUDA, reason="Lightning refuses FSDPStrategy with accelerator='cpu'")
def test_fsdp_on_one_gpu_matches_a_single_device_run(tmp_path):
    """``FSDPStrategy`` on one GPU, a bf16 backbone with LoRA (``precision="bf16-true"``: under FSDP a "-true"
    precision casts the whole module, adapters too), 5 steps: trains, and the adapters equal a plain
    single-device run's to 1e-4.

    CPU: tests/test_ddp.py (the FSDP setup checks: quantized backbones and use_orig_params=False refused, a full
    precision one accepted; DDP against one process)."""
    from lightning.pytorch.strategies import FSDPStrategy

    runs = {}
    try:
        for name, strategy in (("single", "auto"), ("fsdp", FSDPStrategy())):
            torch.manual_seed(0)
            module = CausalLMModule(model=wide_llama().train().to(torch.bfloat16), lr=1e-2)
            final = FinalAdapters()
            t = cuda_trainer(tmp_path / name, max_steps=5, precision="bf16-true", strategy=strategy, callbacks=[
                PEFT([LoRA(r=4, alpha=8, target_modules=TARGETS)], model_attr="model"), final])
            t.fit(module, loader(lm_data(n=40)))
            assert torch.isfinite(t.callback_metrics["train_loss"])
            runs[name] = final.adapters
    finally:  # Lightning leaves the (one-process) process group up; later tests run without one
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    single, fsdp = runs["single"], runs["fsdp"]
    assert single.keys() == fsdp.keys() and any(k.endswith("lora_B") for k in single)
    assert all(single[k].abs().sum() > 0 for k in single if k.endswith("lora_B"))  # trained (B starts at zero)
    worst = max((single[k] - fsdp[k]).abs().max().item() for k in single)
    print(f"FSDP(1 GPU) vs single device after 5 steps: max |adapter diff| = {worst:.2e}")
    assert worst <= 1e-4
