"""The CLI beyond the task modules: any LightningModule with the PEFT callback, the short names in a user's own
LightningCLI, and ``lightning-peft merge`` / ``export`` from a fit run's checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_peft import load_adapters
from lightning_peft.cli import run_cli
from lightning_peft.errors import PeftConfigError
from lightning_peft.lightning.checkpointing import CHECKPOINT_KEY
from tests.cli_modules import CausalLMModule, RecordedCausalLMModule
from tests.tiny_hf import MINILM_VOCAB, sentiment_rows, tiny_bert_dir, tiny_llama_dir, write_tsv

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.accelerator=cpu", "--trainer.max_epochs=1"]
PEFT_YAML = """\
trainer:
  callbacks:
    - class_path: PEFT
      init_args:
        model_attr: model
        strategies:
          - class_path: LoRA
            init_args: {r: 4, alpha: 8, target_modules: [q_proj, v_proj]}
"""
TOKENS = torch.randint(1, MINILM_VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-peft"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root)}


def _fit_any(tiny: dict, root: Path, module: str = "CausalLMModule"):
    """``lightning-peft fit --model tests.cli_modules.<module> --data ... --config peft.yaml``; (cli, checkpoint)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "peft.yaml"
    config.write_text(PEFT_YAML)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["lightning-peft"])
        cli = run_cli(["fit", f"--model=tests.cli_modules.{module}", f"--model.path={tiny['llama']}",
                       "--data=tests.cli_modules.CountingData", f"--data.vocab_size={MINILM_VOCAB}",
                       "--config", str(config), f"--trainer.default_root_dir={root}", *QUIET])
    return cli, cli.trainer.checkpoint_callback.best_model_path


@pytest.fixture(scope="module")
def any_run(tiny, tmp_path_factory):
    return _fit_any(tiny, tmp_path_factory.mktemp("any"))


def _logits(model, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**kwargs).logits


# -- 1. any LightningModule ----------------------------------------------------------------------------------------
def test_fit_any_lightning_module_with_the_peft_callback(tiny, any_run):
    from transformers import AutoModelForCausalLM

    cli, ckpt = any_run
    module = cli.model
    assert type(module) is CausalLMModule and type(cli.datamodule).__name__ == "CountingData"
    base = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    trained = dict(module.named_parameters())
    lora = sorted(n for n, p in trained.items() if p.requires_grad)
    assert len(lora) == 8 and all(".lora.lora_" in n for n in lora)  # A and B on q_proj, v_proj of 2 layers
    for name in lora:
        if name.endswith("lora_B"):
            assert trained[name].abs().max() > 0, f"{name} did not train (LoRA's B starts at zero)"
    frozen = {n.replace(".base_layer", ""): p for n, p in module.model.named_parameters() if not p.requires_grad}
    pretrained = dict(base.named_parameters())
    assert frozen.keys() == pretrained.keys()
    for name, p in pretrained.items():  # the frozen backbone is the pretrained one, untouched
        assert torch.equal(frozen[name], p), name
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert sorted(checkpoint["state_dict"]) == lora  # adapter-only: the 8 LoRA tensors, no backbone
    for name in lora:
        assert torch.equal(checkpoint["state_dict"][name], trained[name])
    assert checkpoint[CHECKPOINT_KEY]["adapter_only"] and checkpoint[CHECKPOINT_KEY]["model_attr"] == "model"
    assert os.path.getsize(ckpt) < 100_000
    assert (Path(ckpt).parents[1] / "config.yaml").is_file()  # LightningCLI's, found by export / merge


def test_own_module_with_text_data_module_and_task_module_with_own_data(tiny, tmp_path):
    """The two halves mix: TextDataModule (tokenizer given, as no model_name_or_path links it) under a plain
    module; a task module over a LightningDataModule that has no tokenizer argument to link."""
    from lightning_peft.tasks import CausalLM

    cli = run_cli(["--model=tests.cli_modules.CausalLMModule", f"--model.path={tiny['llama']}",
                   "--data=lightning_peft.data.TextDataModule", f"--data.tokenizer={tiny['llama']}",
                   "--data.task=causal_lm", *QUIET], run=False)
    assert type(cli.model) is CausalLMModule and cli.datamodule.tokenizer_name == tiny["llama"]
    cli = run_cli(["--model=lightning_peft.tasks.CausalLM", f"--model.model_name_or_path={tiny['llama']}",
                   "--data=tests.cli_modules.CountingData", *QUIET], run=False)
    assert type(cli.model) is CausalLM and type(cli.datamodule).__name__ == "CountingData"


def test_fit_continues_an_adapter_folder_given_in_the_config(tiny, any_run, tmp_path):
    """`PEFT` with `pretrained:` in a YAML config loads the folder (here one `lightning-peft export` wrote) and
    trains it further; with no step taken the adapters are the folder's."""
    _, ckpt = any_run
    folder = tmp_path / "adapters"
    run_cli(["export", "--ckpt_path", ckpt, "--output", str(folder)])
    config = tmp_path / "continue.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: PEFT\n      init_args: "
                      f"{{strategies: [], pretrained: {folder}, model_attr: model}}\n")
    args = [f"--model.path={tiny['llama']}", "--data=tests.cli_modules.CountingData",
            f"--data.vocab_size={MINILM_VOCAB}", "--config", str(config), *QUIET]
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    saved = load_adapters(reference, folder).adapter_state_dict()
    states = []
    for steps in (0, 3):
        cli = run_cli(["fit", "--model=tests.cli_modules.CausalLMModule", *args, f"--trainer.max_steps={steps}",
                       f"--trainer.default_root_dir={tmp_path / str(steps)}"])
        stack = next(c.stack for c in cli.trainer.callbacks if type(c).__name__ == "PEFT")
        assert [(s.name, s.r) for s in stack.strategies] == [("lora", 4)]
        states.append(stack.adapter_state_dict())
    assert states[0].keys() == saved.keys()
    assert all(torch.equal(states[0][k], saved[k]) for k in saved)  # loaded as saved
    assert any(not torch.equal(states[1][k], saved[k]) for k in saved)  # and trained on from there


# -- 3. merge and export from a checkpoint ---------------------------------------------------------------------------
def test_export_and_merge_any_module_checkpoint(tiny, any_run, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    cli, ckpt = any_run
    expected = _logits(cli.model.model, input_ids=TOKENS)
    run_cli(["export", "--ckpt_path", ckpt, "--output", str(tmp_path / "adapters")])
    assert "built from the run's config" in capsys.readouterr().out  # <log_dir>/config.yaml beside checkpoints/
    folder = tmp_path / "adapters"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    theirs = _logits(peft.PeftModel.from_pretrained(base, str(folder)), input_ids=TOKENS)
    ours_base = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    load_adapters(ours_base, folder)
    ours = _logits(ours_base, input_ids=TOKENS)
    run_cli(["merge", "--ckpt_path", ckpt, "--output", str(tmp_path / "merged")])
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), input_ids=TOKENS)
    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny["llama"]), input_ids=TOKENS)
    assert (expected - plain).abs().max() > 1e-4  # the adapters change the output: the comparisons mean something
    for got in (theirs, ours, merged):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_checkpoint_without_its_module_needs_config_or_model(tiny, any_run, tmp_path):
    _, ckpt = any_run
    alone = tmp_path / "alone" / "last.ckpt"
    alone.parent.mkdir()
    shutil.copy(ckpt, alone)
    out = str(tmp_path / "out")
    with pytest.raises(PeftConfigError, match=r"does not say which LightningModule wrote it .* Pass --config"):
        run_cli(["export", "--ckpt_path", str(alone), "--output", out])
    assert not Path(out).exists()
    run_cli(["export", "--ckpt_path", str(alone), "--output", out, "--config", str(Path(ckpt).parents[1] /
                                                                                    "config.yaml")])
    assert (Path(out) / "adapter_model.safetensors").is_file()
    out2 = str(tmp_path / "out2")
    run_cli(["export", "--ckpt_path", str(alone), "--output", out2, "--model", "tests.cli_modules.CausalLMModule",
             f"--model.path={tiny['llama']}"])
    a, b = (json.loads((Path(o) / "lightning_peft.json").read_text())["files"] for o in (out, out2))
    assert a == b  # the same tensors, byte for byte
    # a config.yaml found beside a checkpoint may name only classes already imported
    found = tmp_path / "found"
    (found / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, found / "checkpoints" / "last.ckpt")
    (found / "config.yaml").write_text("model:\n  class_path: not_imported_pkg.Module\n")
    with pytest.raises(PeftConfigError, match=r"names the class 'not_imported_pkg.Module' .* pass --config .*found"):
        run_cli(["export", "--ckpt_path", str(found / "checkpoints" / "last.ckpt"), "--output", str(tmp_path / "o3")])
    assert "not_imported_pkg" not in sys.modules


def test_module_that_records_its_hyperparameters_needs_only_the_checkpoint(tiny, tmp_path, capsys):
    cli, ckpt = _fit_any(tiny, tmp_path / "run", module="RecordedCausalLMModule")
    alone = tmp_path / "last.ckpt"
    shutil.copy(ckpt, alone)
    capsys.readouterr()
    run_cli(["merge", "--ckpt_path", str(alone), "--output", str(tmp_path / "merged")])
    assert "RecordedCausalLMModule built from the checkpoint's hyper_parameters" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), input_ids=TOKENS)
    torch.testing.assert_close(merged, _logits(cli.model.model, input_ids=TOKENS), atol=1e-5, rtol=0)
    # a class the checkpoint names is not imported on its say-so
    checkpoint = torch.load(alone, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["_class_path"] == "tests.cli_modules.RecordedCausalLMModule"
    checkpoint["hyper_parameters"]["_class_path"] = "not_imported_pkg.evil.Module"
    forged = tmp_path / "forged.ckpt"
    torch.save(checkpoint, forged)
    with pytest.raises(PeftConfigError, match=r"names the class 'not_imported_pkg.evil.Module' .* does not import"):
        run_cli(["export", "--ckpt_path", str(forged), "--output", str(tmp_path / "x")])
    assert "not_imported_pkg" not in sys.modules and issubclass(RecordedCausalLMModule, CausalLMModule)


def test_task_module_checkpoint_to_peft_folder_and_merged_model(tiny, tmp_path):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_tsv(tmp_path / "sentiment.tsv", sentiment_rows())
    cli = run_cli(["fit", "--model=lightning_peft.tasks.SequenceClassification",
                   f"--model.model_name_or_path={tiny['bert']}",
                   "--model.strategies=[{class_path: LoRA, init_args: {r: 4, target_modules: [query, value]}}]",
                   "--model.lr=0.01", "--data=lightning_peft.data.TextDataModule", f"--data.train_path={data}", f"--data.val_path={data}",
                   "--data.text_column=sentence", "--data.batch_size=4", f"--trainer.default_root_dir={tmp_path}",
                   *QUIET])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    batch = AutoTokenizer.from_pretrained(tiny["bert"])(["a wonderful film", "dull"], padding=True,
                                                        return_tensors="pt")
    expected = _logits(cli.model.model, **batch)
    plain = _logits(AutoModelForSequenceClassification.from_pretrained(tiny["bert"]), **batch)
    assert (expected - plain).abs().max() > 1e-4
    run_cli(["export", "--ckpt_path", ckpt, "--output", str(tmp_path / "adapters"), "--uniform_rank"])
    run_cli(["merge", "--ckpt_path", ckpt, "--output", str(tmp_path / "merged"), "--dtype", "float32"])
    for folder in ("adapters", "merged"):
        assert (tmp_path / folder / "tokenizer_config.json").is_file()  # the model's tokenizer, saved with it
    base = AutoModelForSequenceClassification.from_pretrained(tiny["bert"])
    theirs = _logits(peft.PeftModel.from_pretrained(base, str(tmp_path / "adapters")), **batch)
    ours_base = AutoModelForSequenceClassification.from_pretrained(tiny["bert"])
    load_adapters(ours_base, tmp_path / "adapters")
    merged_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged_model.config.id2label == {0: "negative", 1: "positive"}  # the training run's label names
    for got in (theirs, _logits(ours_base, **batch), _logits(merged_model, **batch)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(PeftConfigError, match="--name 'nope' is not an adapter set of .*; it holds: default"):
        run_cli(["export", "--ckpt_path", ckpt, "--output", str(tmp_path / "x"), "--name", "nope"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not an export")
    with pytest.raises(SystemExit, match="--output: .* exists and is not a lightning_peft export"):
        run_cli(["merge", "--ckpt_path", ckpt, "--output", str(tmp_path / "mine")])


def test_merge_and_export_refuse_bad_input_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--ckpt_path .* is not a file"):
        run_cli(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--output", str(tmp_path / "o")])
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {}}, full)
    with pytest.raises(PeftConfigError, match="has no 'lightning_peft' section"):
        run_cli(["merge", "--ckpt_path", str(full), "--output", str(tmp_path / "o")])
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"lightning_peft": {}, "obj": Path("x")}, pickled)
    with pytest.raises(PeftConfigError, match=r"torch.load\(weights_only=True\) refuses"):
        run_cli(["export", "--ckpt_path", str(pickled), "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="unknown argument '--trainer.max_epochs'"):
        run_cli(["export", "--ckpt_path", str(full), "--output", "o", "--trainer.max_epochs", "2"])
    with pytest.raises(SystemExit) as info:
        run_cli(["merge", "--help"])
    assert info.value.code == 0 and "--dtype" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:  # the top-level help lists the subcommands LightningCLI does not know
        run_cli(["--help"])
    top = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0 and all(f"`{c}" in top for c in ("recipes", "merge --ckpt_path", "export --ckpt_path"))
    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    assert "merge --ckpt_path" not in " ".join(capsys.readouterr().out.split())


# -- 2. short names in a user's own LightningCLI ----------------------------------------------------------------------
def test_short_names_in_a_users_own_lightning_cli(tiny, tmp_path):
    """In a fresh interpreter: `class_path: PEFT` / `LoRA` fail before register_short_names() and fit after it."""
    config = tmp_path / "peft.yaml"
    config.write_text(PEFT_YAML)
    script = textwrap.dedent(f"""
        import sys
        from lightning.pytorch.cli import LightningCLI
        from tests.cli_modules import CausalLMModule, CountingData

        args = ["fit", "--config", {str(config)!r}, "--model.path", {tiny['llama']!r},
                "--data.vocab_size", "{MINILM_VOCAB}", "--trainer.default_root_dir", {str(tmp_path)!r},
                "--trainer.max_steps", "2", *{QUIET!r}]
        try:
            LightningCLI(CausalLMModule, CountingData, args=args, run=False)
        except SystemExit:
            print("REFUSED WITHOUT THE IMPORT")
        assert "lightning_peft" not in sys.modules

        from lightning_peft.cli import register_short_names

        register_short_names()
        cli = LightningCLI(CausalLMModule, CountingData, args=args)
        (peft,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "PEFT"]
        print("FITTED", cli.trainer.global_step, type(peft.strategies[0]).__name__, peft.strategies[0].r)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED WITHOUT THE IMPORT" in result.stdout
    assert "FITTED 2 LoRA 4" in result.stdout


def test_hybrid_recipe_on_nf4_checkpoint_to_folders(tiny, tmp_path, monkeypatch):
    """The llama_hybrid recipe (prompt + LoRA + AdaLoRA on an NF4 backbone) on a tiny Llama: the exported folder
    reloads bit for bit; the merged folder (dequantized, LoRA and AdaLoRA folded in) plus its prompt/ adapter
    reproduce the trained model's logits."""
    import peft
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count from {i}", "response": " ".join(str(i + k) for k in
                                                                                           range(5))}) + "\n"
                            for i in range(8)))
    budget = tmp_path / "budget.yaml"  # the recipe's RankBudgetScheduler schedule, shrunk to 4 steps
    budget.write_text("trainer:\n  callbacks:\n    - class_path: RankBudgetScheduler\n"
                      "      init_args: {tinit: 1, tfinal: 1, delta_t: 1}\n")
    cli = run_cli(["fit", "--config", "llama_hybrid", "--config", str(budget),
                   f"--model.init_args.model_name_or_path={tiny['llama']}", f"--data.train_path={data}",
                   f"--data.val_path={data}", "--data.batch_size=4", "--data.max_length=32", "--trainer.max_steps=4",
                   "--trainer.accumulate_grad_batches=1", "--trainer.val_check_interval=null",
                   f"--trainer.default_root_dir={tmp_path}", *QUIET[:4]])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert {type(m.base_layer).__name__ for m in cli.model.peft_stack.adapted_layers()} == {"Linear4bit"}
    expected = _logits(cli.model.model, input_ids=TOKENS)
    run_cli(["export", "--ckpt_path", ckpt, "--output", str(tmp_path / "adapters")])
    base = AutoModelForCausalLM.from_pretrained(tiny["llama"])
    load_adapters(base, tmp_path / "adapters")  # quantizes the fresh base to NF4 as the run did
    torch.testing.assert_close(_logits(base, input_ids=TOKENS), expected, atol=0, rtol=0)
    with pytest.warns(UserWarning, match="cannot be merged"):
        run_cli(["merge", "--ckpt_path", ckpt, "--output", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # dequantized
    with_prompt = peft.PeftModel.from_pretrained(merged, str(tmp_path / "merged" / "prompt"))
    got = _logits(with_prompt, input_ids=TOKENS)[:, -TOKENS.shape[1]:]  # peft keeps the virtual tokens' rows
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
