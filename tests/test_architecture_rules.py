"""The package's layout rules, checked from the code: import direction and cycles, what ``import lightning_peft``
loads, one implementation of each shared helper, typed levels, file sizes, and the wheel's recipes."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import tomllib
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_peft"

#: the layers, bottom up: a module may import only from its own unit or from a unit of a lower rank
RANKS = {
    "errors": 0,
    "version": 0,
    "core": 1,
    "ops": 2,
    "methods": 3,
    "quantization": 4,
    "stack": 5,
    "io": 6,
    "viz": 6,
    "lightning": 7,
    "cli": 8,
}
#: re-export facades: the package itself and the first import paths kept for users and recipes
FACADES = {"lightning_peft", "callbacks", "strategies", "tasks", "data"}
#: units below the Lightning layer: plain torch, testable without a Trainer
BELOW_LIGHTNING = {unit for unit, rank in RANKS.items() if rank < RANKS["lightning"]}
FRAMEWORKS = {"lightning", "pytorch_lightning", "lightning_fabric", "jsonargparse"}


# -- the import graph ------------------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every imported module name (function-local ones included, ``if TYPE_CHECKING:`` blocks left out)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _target(name: str) -> str | None:
    """The package module ``name`` refers to (the longest known prefix), or None for other packages."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between package modules, external top-level packages each module imports)."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    external: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for name in _imports(tree, module, path.name == "__init__.py"):
            target = _target(name)
            if target is None:
                external[module].add(name.split(".")[0])
            elif target != module:
                edges[module].add(target)
    return edges, external


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if color.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in color:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(edges):
        if node not in color:
            found = dfs(node)
            if found:
                return found
    return None


def test_every_unit_has_a_rank():
    units = {_unit(m) for m in MODULES}
    assert units - FACADES == set(RANKS), "a new top-level module or package needs a place in RANKS"


def test_no_import_cycle_between_modules_or_units():
    edges, _ = _graph()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])
    units: dict[str, set[str]] = {}
    for module, targets in edges.items():
        units.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    assert _cycle(units) is None, " -> ".join(_cycle(units) or [])


def test_imports_point_down_only():
    edges, _ = _graph()
    wrong = []
    for module, targets in edges.items():
        unit = _unit(module)
        for target in targets:
            other = _unit(target)
            if other == unit or (unit in FACADES and other not in FACADES):
                continue
            if other in FACADES:
                wrong.append(f"{module} -> {target} (a re-export facade: import from the module that defines it)")
            elif RANKS[other] >= RANKS[unit]:
                wrong.append(f"{module} ({unit}) -> {target} ({other})")
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_lightning_layer_imports_lightning_or_jsonargparse():
    _, external = _graph()
    wrong = {m: sorted(ext & FRAMEWORKS) for m, ext in external.items() if _unit(m) in BELOW_LIGHTNING}
    assert not {m: e for m, e in wrong.items() if e}


def test_the_graph_sees_function_local_imports_and_skips_type_checking_blocks():
    tree = ast.parse(textwrap.dedent("""
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from lightning_peft.stack.peft_stack import PeftStack
        def f():
            from lightning_peft.core.layer import AdaptedLinear
    """))
    found = [_target(n) for n in _imports(tree, "lightning_peft.core.state", False)]
    assert "lightning_peft.core.layer" in found and "lightning_peft.stack.peft_stack" not in found


# -- what importing loads ----------------------------------------------------------------------------------------
def _run(code: str, env_extra: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_loads_neither_lightning_nor_jsonargparse():
    done = _run(
        "import lightning_peft, sys\n"
        "assert 'lightning' not in sys.modules and 'jsonargparse' not in sys.modules, sorted(sys.modules)\n"
        "assert lightning_peft.PEFTMixin.__name__ == 'PEFTMixin'  # resolved lazily\n"
        "assert 'lightning' in sys.modules\n"
    )
    assert done.returncode == 0, done.stderr


BLOCKED = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(f"{name} is blocked for this test")
        return None
sys.meta_path.insert(0, Blocker())
"""


def test_core_works_with_lightning_unimportable(tmp_path):
    code = BLOCKED + textwrap.dedent(f"""
        import torch
        from torch import nn
        from lightning_peft import LoRA, apply_peft, load_adapters, save_adapters
        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        trained = model()
        stack = apply_peft(trained, [LoRA(r=2, target_modules=["0", "2"], init_weights=False)])
        folder = save_adapters(stack, {str(tmp_path / "adapters")!r})
        fresh = model()
        load_adapters(fresh, folder)
        x = torch.randn(3, 8)
        assert torch.equal(trained(x), fresh(x))
        assert not torch.equal(model()(x), fresh(x))
        try:
            import lightning
        except ImportError:
            pass
        else:
            raise AssertionError("the blocker let lightning in")
        try:
            from lightning_peft import PEFTMixin
        except ImportError:
            pass
        else:
            raise AssertionError("PEFTMixin needs Lightning")
        print("ok")
    """)
    done = _run(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cli_layer_enables_strategy_subclasses_in_jsonargparse():
    done = _run(
        "import lightning_peft.lightning.mixin\n"
        "from jsonargparse import ArgumentParser\n"
        "from lightning_peft import Strategy\n"
        "p = ArgumentParser()\n"
        "p.add_argument('--s', type=list[Strategy])\n"
        "cfg = p.parse_args(['--s', '[{class_path: lightning_peft.LoRA, init_args: {r: 4}}]'])\n"
        "print(p.instantiate_classes(cfg).s[0].r)\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "4", done.stderr


# -- one implementation of each helper -----------------------------------------------------------------------------
def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def _where(pattern: str) -> list[str]:
    return [path for path, text in _sources().items() if re.search(pattern, text)]


@pytest.mark.parametrize(
    ("what", "pattern", "home"),
    [
        ("atomic renames", r"os\.replace\(", "lightning_peft/io/atomic.py"),
        ("fsync", r"os\.fsync\(", "lightning_peft/io/atomic.py"),
        ("quantized weight detection", r"[\"'](Params4bit|Int8Params|Linear4bit|Linear8bitLt)[\"']",
         "lightning_peft/core/backend.py"),
        ("the float dtype choice", r"def _?float_dtype\(", "lightning_peft/core/backend.py"),
        ("finding the stack", r"def (get_stack|find_stack)\(", "lightning_peft/core/state.py"),
        ("unfreeze matching", r"def resolve_unfreeze\(", "lightning_peft/core/targets.py"),
    ],
)
def test_one_implementation(what, pattern, home):
    assert _where(pattern) == [home], what


def test_unfreeze_matching_is_shared_by_the_stack_and_the_selective_strategy():
    assert "lightning_peft/methods/selective.py" in _where(r"resolve_unfreeze\(")
    assert "lightning_peft/stack/peft_stack.py" in _where(r"resolve_unfreeze\(")


def test_no_dead_code_or_missing_references():
    for pattern in (r"\bPART_ORDER\b", r"\bowned_values\b", r"DESIGN\.md", r"\bfind_stack\b"):
        assert not _where(pattern), pattern


# -- typed levels and capabilities -------------------------------------------------------------------------------
def test_levels_are_an_enum_and_no_code_checks_strategy_names():
    from lightning_peft import registered_strategies
    from lightning_peft.methods.base import Level

    assert {cls.level for cls in registered_strategies().values()} <= set(Level)
    assert not _where(r"\.level\s*[!=]=")
    # only the methods themselves: the PEFT file layout asks each strategy (Strategy.peft_part and the
    # peft_* methods, lightning_peft/methods/peft_protocol.py), so a user's strategy exports and imports too
    allowed = ("lightning_peft/methods/",)
    assert not [p for p in _where(r"\.name\s*[!=]=\s*[\"']") if not p.startswith(allowed)]
    names = "|".join(re.escape(n) for n in registered_strategies())
    by_name = rf"(==|!=|\bin)\s*\(?\s*[\"']({names})[\"']|[\"']({names})[\"']\s*,\s*[\"']({names})[\"']"
    assert not [p for p in _where(by_name) if p.startswith(("lightning_peft/io/", "lightning_peft/lightning/"))]


def test_strategies_keep_no_state_on_their_config_while_applying():
    from lightning_peft import IA3, AdaLoRA, LoRA, apply_peft
    from lightning_peft.methods.base import LayerStrategy

    seen = []
    original = LayerStrategy.apply

    def checked(self, model, plan, ctx):
        fields = {f.name for f in dataclasses.fields(self)}
        real_make = type(self).make_delta

        def make(s, *args):
            seen.append(type(s).__name__)
            assert set(vars(s)) == fields, sorted(set(vars(s)) - fields)
            return real_make(s, *args)

        with mock.patch.object(type(self), "make_delta", make):
            return original(self, model, plan, ctx)

    with mock.patch.object(LayerStrategy, "apply", checked):
        for strategy in (LoRA(r=2, target_modules=["0"]), AdaLoRA(init_r=4, target_r=2, target_modules=["0"]),
                         IA3(target_modules=["0", "2"], feedforward_modules=["2"])):
            apply_peft(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [strategy])
    assert seen == ["LoRA", "AdaLoRA", "IA3", "IA3"]


# -- sizes and packaging -----------------------------------------------------------------------------------------
def test_every_module_is_under_400_lines():
    long = {p: n for p, t in _sources().items() if (n := len(t.splitlines())) >= 400}
    assert not long


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert set(config["packages"]) == folders | {"lightning_peft.cli.recipes"}
    assert config["package-dir"] == {"lightning_peft.cli.recipes": "cli_configs"}


def test_recipe_class_paths_resolve():
    import importlib

    for path in sorted((ROOT / "cli_configs").glob("*.yaml")):
        for dotted in re.findall(r"class_path:\s*(lightning_peft\.[\w.]+)", path.read_text()):
            module, _, name = dotted.rpartition(".")
            assert isinstance(getattr(importlib.import_module(module), name), type), (path.name, dotted)


def test_installed_wheel_lists_the_recipes(tmp_path):
    """Build a real (non-editable) wheel from a copy of the sources, install it alone, and run its command."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lightning_peft", "cli_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-c", "import lightning_peft, runpy, sys; print(lightning_peft.__file__, flush=True); "
         "sys.argv = ['lightning-peft', 'recipes']; runpy.run_module('lightning_peft.cli', run_name='__main__')"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    first, *rows = done.stdout.splitlines()
    assert first.startswith(str(target))  # the installed copy, not the sources
    names = sorted(row.split()[0] for row in rows)
    assert names == sorted(p.stem for p in (ROOT / "cli_configs").glob("*.yaml"))
    assert any("lightning-peft fit --config demo" in row for row in rows)


def test_tests_run_against_this_checkout():
    import lightning_peft

    assert Path(lightning_peft.__file__).resolve().parent == PACKAGE
