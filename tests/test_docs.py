"""The documentation builds (mkdocs, strict) and every code block in it is either run here or quoted from a file.

Rules for the ```python blocks of README.md and docs/*.md:

- a block preceded by ``<!-- from examples/NAME.py -->`` (any path in the repository) is a quote: its non-blank
  lines must appear, in order, among that file's lines (examples are run by tests/test_examples.py);
- a block preceded by ``<!-- continues -->`` runs after the previous executed block of the same page, in its
  namespace;
- every other block is executed in a fresh namespace, with a temporary directory as the working directory.

```yaml blocks preceded by ``<!-- from cli_configs/NAME.yaml -->`` are quotes in the same way; other YAML and
shell blocks are not checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(from\s+(?P<source>\S+)|(?P<continues>continues))\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    source: str | None = None  # quoted from this file
    continues: bool = False

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclass
class Chain:
    """Executed blocks that share one namespace: a block and the ``<!-- continues -->`` blocks after it."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.blocks[0].id


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        found.append(
            Block(
                page,
                line,
                m.group(1),
                m.group(2),
                source=marker.group("source") if marker else None,
                continues=bool(marker and marker.group("continues")),
            )
        )
    return found


ALL = [b for page in PAGES for b in blocks(page)]
QUOTES = [b for b in ALL if b.source]


def chains() -> list[Chain]:
    out: list[Chain] = []
    for b in ALL:
        if b.lang != "python" or b.source:
            continue
        if b.continues:
            assert out and out[-1].blocks[0].page == b.page, f"{b.id}: <!-- continues --> with nothing before it"
            out[-1].blocks.append(b)
        else:
            out.append(Chain([b]))
    return out


def test_the_docs_have_code_blocks() -> None:
    assert len(PAGES) > 5 and any(b.lang == "python" for b in ALL)
    assert all(b.lang for b in ALL), [b.id for b in ALL if not b.lang]  # say what each block is


@pytest.mark.parametrize("block", QUOTES, ids=lambda b: b.id)
def test_quoted_block_is_in_its_file(block: Block) -> None:
    source = ROOT / block.source
    assert source.is_file(), f"{block.id}: {block.source} does not exist"
    lines = [line.rstrip() for line in source.read_text().splitlines()]
    position = 0
    for wanted in (line.rstrip() for line in block.code.splitlines() if line.strip()):
        try:
            position = lines.index(wanted, position) + 1
        except ValueError:
            pytest.fail(f"{block.id}: line not found (in order) in {block.source}: {wanted!r}")


@pytest.mark.parametrize("chain", chains(), ids=lambda c: c.id)
def test_code_block_runs(chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    for block in chain.blocks:
        exec(compile(block.code, block.id, "exec"), namespace)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is not installed (pip install -e '.[docs]')"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_api_page_covers_the_public_api() -> None:
    import lightning_peft
    import lightning_peft.callbacks

    page = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: (lightning_peft[\w.]*\.\w+)$", page, re.M))
    missing = []
    for package in (lightning_peft, lightning_peft.callbacks):
        for n in package.__all__:
            if n == "__version__":
                continue
            obj = getattr(package, n)  # a lazily resolved name is documented at its defining module
            paths = {f"{package.__name__}.{n}", f"{getattr(obj, '__module__', '')}.{n}"}
            if not paths & documented:
                missing.append(f"{package.__name__}.{n}")
    assert not missing, missing
