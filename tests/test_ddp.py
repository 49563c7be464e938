"""DDP (2 processes, gloo, CPU) and the checks the PEFT callback makes on Lightning's distributed strategies.

The 2-process runs launch ``tests/ddp_train.py`` as a script with ``strategy="ddp", devices=2`` (Lightning's
launcher re-runs the script for rank 1), next to the same script with ``devices=1`` and the same global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ClassifierModule, classification_data, loader, tiny_bert, trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_peft import BitFit, LoRA, PeftConfigError, Unfreeze
from lightning_peft.callbacks import PEFT
from lightning_peft.quantization import Quantization

SCRIPT = Path(__file__).with_name("ddp_train.py")
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
#: DDP averages two half-batch gradients where one process takes the mean over the full batch: the same
#: numbers up to float32 summation order, amplified a little by 6 AdamW steps (measured: <= 1.4e-6)
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, devices: int, *args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(SCRIPT.parent.parent),
    }
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        env.pop(key, None)
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--devices", str(devices), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_ddp_hybrid_stack_equals_single_process(tmp_path, quantize):
    """prompt + LoRA + AdaLoRA (+ nf4 backbone): 2 DDP ranks vs 1 process, same global batch of 8."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    runs = [
        _launch(ddp, 2, "--stack", "hybrid", "--quantize", quantize),
        _launch(single, 1, "--stack", "hybrid", "--quantize", quantize),
    ]
    logs = [_wait(p) for p in runs]
    assert "Starting with 2 processes" in logs[0]
    r0, r1, one = (
        torch.load(p, weights_only=True) for p in (ddp / "rank0.pt", ddp / "rank1.pt", single / "rank0.pt")
    )
    assert (r0["world_size"], r1["world_size"], one["world_size"]) == (2, 2, 1)
    assert r0["bnb_layers"] == (13 if quantize == "nf4" else 0)  # 2 layers x 6 linears + pooler
    # the ranks saw different data ...
    assert not torch.equal(r0["batches"][0], r1["batches"][0])
    assert torch.equal(
        torch.cat([r0["batches"][0], r1["batches"][0]]).sort().values, one["batches"][0].sort().values
    )
    # ... and hold the same adapters, bit for bit
    assert r0["adapters"].keys() == r1["adapters"].keys() == one["adapters"].keys()
    for key in r0["adapters"]:
        assert torch.equal(r0["adapters"][key], r1["adapters"][key]), key
    # AdaLoRA masks: identical on both ranks after every reallocation, and equal to the single process's
    assert sorted(r0["masks"]) == list(range(1, 7))
    kept = []
    for step, masks in r0["masks"].items():
        for key, mask in masks.items():
            assert torch.equal(mask, r1["masks"][step][key]), (step, key)
            assert torch.equal(mask, one["masks"][step][key]), (step, key)
        kept.append(sum(int(m.sum()) for m in masks.values()))
    assert kept[0] == 24 and kept[-1] == 12  # 6 matrices x init_r=4 pruned to target_r=2 on average
    worst = max(
        (r0["adapters"][k].float() - one["adapters"][k].float()).abs().max().item() for k in r0["adapters"]
    )
    print(
        f"\n[{quantize}] DDP(2) vs single process: max |adapter diff| = {worst:.2e}; kept ranks per step {kept}"
    )
    assert worst <= TOLERANCE
    # exactly one checkpoint and one export, written by rank zero only (nothing half-written left beside them)
    assert _files(ddp / "ckpt") == ["epoch=0-step=6.ckpt"]
    exported = _files(ddp / "export")
    assert [f for f in exported if "/" not in f] == ["final"], exported
    assert not any(Path(f).name.startswith(".") for f in exported)
    ckpt = torch.load(ddp / "ckpt" / "epoch=0-step=6.ckpt", weights_only=True)
    assert ckpt["state_dict"].keys() == {"model." + k for k in r0["adapters"]}


@pytest.mark.slow
def test_ddp_lora_equals_single_process(tmp_path):
    runs = [_launch(tmp_path / "ddp", 2, "--stack", "lora"), _launch(tmp_path / "one", 1, "--stack", "lora")]
    for p in runs:
        _wait(p)
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert r0["find_unused"] is None  # LoRA uses every parameter: DDP's faster default is kept
    worst = max((r0["adapters"][k] - one["adapters"][k]).abs().max().item() for k in r0["adapters"])
    print(f"\nLoRA DDP(2) vs single process: max |adapter diff| = {worst:.2e}")
    assert worst <= TOLERANCE


# -- options set (or refused) in PEFT.setup, checked on a Trainer that has not launched anything -------------------
def _ddp_trainer(tmp_path, **kwargs):
    return trainer(tmp_path, devices=2, **kwargs)


def _setup(t, strategies, unfreeze=("classifier",), **kw) -> ClassifierModule:
    module = ClassifierModule(model=tiny_bert())
    PEFT(strategies, unfreeze=list(unfreeze) or None, model_attr="model", **kw).setup(t, module, "fit")
    return module


def test_ddp_find_unused_parameters_set_for_selective_strategies(tmp_path):
    t = _ddp_trainer(tmp_path, strategy="ddp")
    _setup(t, [LoRA(r=2, target_modules=["query"])])
    assert "find_unused_parameters" not in t.strategy._ddp_kwargs  # all LoRA parameters are always used
    t = _ddp_trainer(tmp_path, strategy="ddp")
    _setup(t, [LoRA(r=2, target_modules=["query"]), BitFit()])
    assert t.strategy._ddp_kwargs["find_unused_parameters"] is True
    explicit = _ddp_trainer(tmp_path, strategy=DDPStrategy(find_unused_parameters=False))
    _setup(explicit, [BitFit()])
    assert explicit.strategy._ddp_kwargs["find_unused_parameters"] is False  # the user's choice wins


def _fsdp_trainer(**kwargs) -> SimpleNamespace:
    """What PEFT.setup reads of a Trainer, around a real FSDPStrategy: Lightning refuses to build a Trainer with
    FSDP and accelerator="cpu" ("requires a GPU accelerator"), so no FSDP run happens on this machine."""
    from lightning.pytorch.plugins.precision import Precision

    strategy = FSDPStrategy(parallel_devices=[torch.device("cpu")] * 2, **kwargs)
    return SimpleNamespace(strategy=strategy, precision_plugin=Precision(), is_global_zero=True)


def test_quantized_backbone_under_fsdp_fails_at_setup_naming_ddp():
    t = _fsdp_trainer()
    module = ClassifierModule(model=tiny_bert())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(PeftConfigError, match=r"not supported under FSDPStrategy.*strategy='ddp'"):
        PEFT([LoRA(r=2, target_modules=["query"])], model_attr="model", quantize=Quantization("nf4")).setup(
            t, module, "fit"
        )
    after = module.state_dict()  # refused before anything was quantized or injected
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("4bit" in type(m).__name__ for m in module.modules())


def test_fsdp_without_orig_params_is_refused():
    with pytest.raises(PeftConfigError, match="use_orig_params=True"):
        _setup(_fsdp_trainer(use_orig_params=False), [LoRA(r=2, target_modules=["query"])])
    module = _setup(_fsdp_trainer(), [LoRA(r=2, target_modules=["query"])])  # full precision + FSDP: accepted
    assert sum(p.requires_grad for p in module.parameters()) == 6


def test_quantized_backbone_under_deepspeed_is_refused():
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_peft.lightning.distributed import check_strategy

    with pytest.raises(PeftConfigError, match="strategy='ddp'"):
        check_strategy(SimpleNamespace(strategy=DeepSpeedStrategy()), tiny_bert(), Quantization("nf4"))


class _SpareHead(ClassifierModule):
    """A classifier whose HF model carries a trainable module the loss never uses."""

    def __init__(self) -> None:
        super().__init__(model=tiny_bert(**NO_DROPOUT))
        self.model.spare = torch.nn.Linear(32, 2)


def _fit_spare_head_under_ddp(tmp_path, peft: PEFT):
    """One-process DDP (gloo) in this process: the reducer behaves as with more ranks."""
    t = trainer(tmp_path, strategy="ddp", max_steps=3, callbacks=[peft])
    t.fit(_SpareHead(), loader(classification_data(n=32)))
    return t


def test_unused_trainable_parameter_under_ddp_gets_a_clear_error(tmp_path):
    peft = PEFT([LoRA(r=2, target_modules=["query"])], unfreeze=["classifier", "spare"], model_attr="model")
    with pytest.raises(PeftConfigError, match=r"no gradient on the first step under DDP.*spare\.weight"):
        _fit_spare_head_under_ddp(tmp_path, peft)


def test_selective_strategy_with_unused_parameters_trains_under_ddp(tmp_path):
    strategies = [LoRA(r=2, target_modules=["query"]), Unfreeze(modules=["spare"])]
    t = _fit_spare_head_under_ddp(tmp_path, PEFT(strategies, unfreeze=["classifier"], model_attr="model"))
    assert t.global_step == 3 and t.strategy._ddp_kwargs["find_unused_parameters"] is True
