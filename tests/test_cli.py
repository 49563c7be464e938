"""The ``lightning-peft`` command: recipes parse and instantiate, optimizers reach the adapters, errors are clear."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_peft import AdaLoRA, LoRA, PromptTuning
from lightning_peft.callbacks import PEFT, AdapterExport, RankBudgetScheduler
from lightning_peft.cli import CONFIG_DIR, recipes, resolve_config_args, run_cli
from lightning_peft.errors import PeftConfigError
from lightning_peft.tasks import CausalLM, SequenceClassification
from tests.helpers import ClassifierModule
from tests.tiny_hf import sentiment_rows, tiny_bert_dir, tiny_llama_dir, write_tsv

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-peft"])  # pytest's own arguments are not the CLI's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root), "root": root}


@pytest.fixture
def sentiment(tmp_path):
    return write_tsv(tmp_path / "sentiment.tsv", sentiment_rows())


def test_recipes_are_shipped_from_one_copy():
    names = sorted(recipes())
    for expected in (
        "demo",
        "minilm_lora",
        "minilm_loraplus",
        "minilm_adalora",
        "minilm_prompt_tuning",
        "minilm_hybrid",
        "minilm_qlora",
        "minilm_mam",
        "minilm_unipelt",
        "sst2_hybrid",
        "llama_lora",
        "llama_adalora",
        "llama_prompt_tuning",
        "llama_hybrid",
        "llama_qlora",
    ):
        assert expected in names
    # the one copy is cli_configs/ (installed into the wheel as lightning_peft/cli/recipes/, see
    # test_architecture_rules.py): read from there in a source checkout, and no other copy in the package
    assert CONFIG_DIR == ROOT / "cli_configs"
    assert names == sorted(p.stem for p in (ROOT / "cli_configs").glob("*.yaml"))
    assert not list((ROOT / "lightning_peft").rglob("*.yaml"))
    for name, path in recipes().items():
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# lightning-peft fit --config {name}"), first


def _recipe_args(name: str, tiny: dict, tmp_path: Path) -> list[str]:
    args = ["--config", name, f"--trainer.default_root_dir={tmp_path}"]
    if name.startswith("llama"):  # the recipes name a hub model; parse them against a local tiny Llama
        args += [f"--model.init_args.model_name_or_path={tiny['llama']}"]
    return args


@pytest.mark.parametrize("name", sorted(recipes()))
def test_every_recipe_parses_and_instantiates(name, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_recipe_args(name, tiny, tmp_path), run=False)
    model = cli.model
    assert isinstance(model, CausalLM if name.startswith("llama") else SequenceClassification)
    strategies = model.peft_strategies
    assert strategies and all(
        type(s).__name__ in {"LoRA", "AdaLoRA", "PromptTuning", "PrefixTuning", "Adapter"} for s in strategies
    )
    if any(isinstance(s, AdaLoRA) for s in strategies):
        assert any(isinstance(c, RankBudgetScheduler) for c in cli.trainer.callbacks)
    assert any(isinstance(c, AdapterExport) for c in cli.trainer.callbacks)
    assert cli.datamodule.tokenizer_name == model.model_name_or_path  # linked
    model.configure_model()  # the stack applies to the real backbone (MiniLM or the tiny Llama)
    assert model.peft_stack is not None
    if name == "minilm_loraplus":
        assert {g["name"] for g in model.configure_optimizers().param_groups} == {"loraplus_a", "loraplus_b"}
    if name in ("minilm_mam", "minilm_unipelt"):  # the presets, spelled out
        from lightning_peft import MAM, UniPELT

        preset = MAM() if name == "minilm_mam" else UniPELT()
        assert [s.config() for s in strategies] == [s.config() for s in preset]
    if "qlora" in name or name in ("demo", "sst2_hybrid", "llama_hybrid", "minilm_mam", "minilm_unipelt"):
        assert model.peft_stack.quantization is not None and model.peft_stack.quantization.mode == "nf4"


def test_print_config_shows_strategies_with_class_paths(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", "demo", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for cls in ("lightning_peft.PromptTuning", "lightning_peft.LoRA", "lightning_peft.AdaLoRA"):
        assert f"class_path: {cls}" in out


def test_config_by_name_or_path():
    assert resolve_config_args(["fit", "--config", "demo"])[2] == str(CONFIG_DIR / "demo.yaml")
    assert resolve_config_args(["fit", "--config=demo"])[1] == f"--config={CONFIG_DIR / 'demo.yaml'}"
    assert resolve_config_args(["fit", "-c", "cli_configs/demo.yaml"])[2] == "cli_configs/demo.yaml"
    with pytest.raises(SystemExit, match="neither a file nor an installed recipe; recipes: demo"):
        resolve_config_args(["fit", "--config", "nope"])


def test_recipes_command_lists_the_commands(capsys):
    assert run_cli(["recipes"]) is None
    out = capsys.readouterr().out
    assert "demo" in out and "lightning-peft fit --config demo" in out


def _fit_args(tiny: dict, data: str, tmp_path: Path, steps: int = 6) -> list[str]:
    return [
        "--model=lightning_peft.tasks.SequenceClassification",
        f"--model.model_name_or_path={tiny['bert']}",
        "--model.strategies=[{class_path: LoRA, init_args: {r: 4, target_modules: [query, value]}}]",
        "--data=lightning_peft.data.TextDataModule",
        f"--data.train_path={data}",
        f"--data.val_path={data}",
        "--data.text_column=sentence",
        "--data.batch_size=4",
        f"--trainer.max_steps={steps}",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]


def test_top_level_optimizer_trains_the_adapters(tiny, sentiment, tmp_path):
    """`--optimizer AdamW --optimizer.lr 1e-3` becomes the module's optimizer over the trainable parameters."""
    cli = run_cli(
        [*_fit_args(tiny, sentiment, tmp_path), "--optimizer", "AdamW", "--optimizer.lr", "1e-3"], run=False
    )
    model = cli.model
    model.configure_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-3
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if id(p) in in_optimizer} == trainable
    lora = [n for n in trainable if "lora_" in n]
    assert len(lora) == 8  # A and B on query and value of 2 layers
    for name in lora:
        assert not torch.equal(before[name], model.get_parameter(name)), f"{name} did not train"
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(before[name], p), f"frozen {name} changed"


def test_optimizer_given_twice_is_an_error(tiny, sentiment, tmp_path):
    args = [
        *_fit_args(tiny, sentiment, tmp_path),
        "--optimizer=SGD",
        "--optimizer.lr=0.1",
        "--model.optimizer=Adam",
    ]
    with pytest.raises(PeftConfigError, match="--optimizer and --model.init_args.optimizer are both given"):
        run_cli(args, run=False)


def test_model_scheduler_and_optimizer_from_the_command_line(tiny, sentiment, tmp_path):
    args = [
        *_fit_args(tiny, sentiment, tmp_path, steps=4),
        "--model.optimizer=SGD",
        "--model.optimizer.lr=0.5",
        "--lr_scheduler=StepLR",
        "--lr_scheduler.step_size=1",
        "--lr_scheduler.gamma=0.5",
    ]
    cli = run_cli(["fit", *args])
    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**4)  # stepped every optimizer step


def test_bad_strategy_value_is_a_clear_error(tiny, sentiment, tmp_path):
    args = _fit_args(tiny, sentiment, tmp_path)
    args[2] = "--model.strategies=[{class_path: LoRA, init_args: {r: 0}}]"
    with pytest.raises(PeftConfigError, match=r"r=0 is not valid; expected an integer > 0"):
        run_cli(args, run=False)


def test_unknown_strategy_class_is_refused(tiny, sentiment, tmp_path, capsys):
    args = _fit_args(tiny, sentiment, tmp_path)
    args[2] = "--model.strategies=[{class_path: NoSuchStrategy}]"
    with pytest.raises(SystemExit):
        run_cli(args, run=False)
    assert "NoSuchStrategy" in capsys.readouterr().err


def test_too_few_labels_in_model_is_a_clear_error(tiny, tmp_path):
    rows = [("good", "positive"), ("bad", "negative"), ("meh", "neutral")]
    data = write_tsv(tmp_path / "three.tsv", rows)
    with pytest.raises(PeftConfigError, match=r"the data has 3 labels .* set model.init_args.num_labels=3"):
        run_cli(["fit", *_fit_args(tiny, data, tmp_path)])


def test_peft_callback_configured_from_yaml(tmp_path):
    """The PEFT callback's strategies take class_path / init_args in trainer.callbacks too."""
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: PEFT\n      init_args:\n        model_attr: model\n"
        "        unfreeze: [classifier]\n        strategies:\n          - class_path: LoRA\n"
        "            init_args: {r: 4, target_modules: [query, value]}\n          - class_path: PromptTuning\n"
        "            init_args: {num_virtual_tokens: 3}\n"
    )
    cli = LightningCLI(ClassifierModule, args=["--config", str(config)], run=False)
    (peft,) = [c for c in cli.trainer.callbacks if isinstance(c, PEFT)]
    assert [type(s) for s in peft.strategies] == [LoRA, PromptTuning]
    assert peft.strategies[0].r == 4 and peft.strategies[1].num_virtual_tokens == 3


def test_fit_then_predict_reuses_the_label_names(tiny, sentiment, tmp_path):
    cli = run_cli(
        [
            "fit",
            *_fit_args(tiny, sentiment, tmp_path, steps=2),
            "--trainer.enable_checkpointing=true",
            "--trainer.callbacks+=AdapterExport",
        ]
    )
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert ckpt and os.path.getsize(ckpt) < 2_000_000  # adapter-only
    predict = tmp_path / "predict.tsv"
    predict.write_text("sentence\nwhat a wonderful film\nboring\n")
    args = [
        a
        for a in _fit_args(tiny, sentiment, tmp_path)
        if not a.startswith(("--data.train_path", "--data.val"))
    ]
    cli = run_cli(["predict", *args, f"--data.predict_path={predict}", f"--ckpt_path={ckpt}"])
    (batch,) = cli.trainer.predict_loop.predictions
    assert set(batch["labels"]) <= {"negative", "positive"} and len(batch["labels"]) == 2


def test_demo_data_labels_file_written(tiny, sentiment, tmp_path):
    label_map = tmp_path / "labels.json"
    run_cli(["fit", *_fit_args(tiny, sentiment, tmp_path, steps=1), f"--data.label_map_path={label_map}"])
    assert json.loads(label_map.read_text()) == {"labels": ["negative", "positive"]}


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path, monkeypatch):
    """`lightning-peft fit --config demo` as the README runs it: accuracy, adapter folder, heatmap."""
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", "demo", "--trainer.enable_progress_bar=false"])
    acc = float(cli.trainer.callback_metrics["val_acc"])
    assert acc > 0.8, acc
    assert (tmp_path / "runs/demo/adapters/final/lightning_peft.json").is_file()
    assert (tmp_path / "runs/demo/adalora_rank_heatmap.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2} (../shared/data/sst2)")
def test_sst2_hybrid_recipe_quick_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = run_cli(
        [
            "fit",
            "--config",
            "sst2_hybrid",
            f"--data.train_path={SST2 / 'train.tsv'}",
            f"--data.val_path={SST2 / 'test.tsv'}",
            "--data.test_path=null",
            "--data.limit_train_samples=1280",
            "--data.limit_val_samples=200",
            "--trainer.max_steps=40",
            "--trainer.val_check_interval=null",
            "--trainer.callbacks.init_args.tinit=8",
            "--trainer.callbacks.init_args.tfinal=16",
            "--trainer.callbacks.init_args.delta_t=2",
            "--model.init_args.lr=0.005",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    labels = json.loads(next(tmp_path.rglob("labels.json")).read_text())["labels"]
    assert labels == ["0", "1"]  # SST-2's integer labels are their own ids
    with open(SST2 / "test.tsv", newline="") as f:
        n_rows = sum(1 for _ in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)) - 1
    assert n_rows == 872
    assert float(cli.trainer.callback_metrics["val_acc"]) > 0.65  # 0.755 measured (40 steps of 32 sentences)


def test_llama_qlora_recipe_fits_a_tiny_llama(tiny, tmp_path, monkeypatch):
    """The causal-LM path end to end: jsonl prompt/response, NF4 + bf16 compute, gradient checkpointing."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    rows = [
        {"prompt": f"count from {i}", "response": " ".join(str(i + k) for k in range(5))} for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = run_cli(
        [
            "fit",
            "--config",
            "llama_qlora",
            f"--model.init_args.model_name_or_path={tiny['llama']}",
            f"--data.train_path={data}",
            f"--data.val_path={data}",
            "--data.batch_size=4",
            "--data.max_length=32",
            "--trainer.max_steps=2",
            "--trainer.accumulate_grad_batches=1",
            "--trainer.val_check_interval=null",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert float(metrics["val_ppl"]) == pytest.approx(math.exp(float(metrics["val_loss"])), rel=0.05)
    assert {type(m.base_layer).__name__ for m in cli.model.peft_stack.adapted_layers()} == {"Linear4bit"}
    assert (tmp_path / "final" / "adapter_config.json").is_file()  # AdapterExport, no ModelCheckpoint
