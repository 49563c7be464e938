"""scripts/gpu_check.sh in CI (on the CPU): every step runs or says why not, and the results file lists each one.

On the CPU the CUDA tests skip (with the reason) and the benchmark runs its smoke mode, so this keeps the
script, the CUDA tests' collection and benchmarks/gpu_speed.py from rotting; on a GPU machine the same script
runs them for real (docs/gpu_check.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["setup", "nvidia-smi", "versions", "cuda-tests", "benchmark"]


def _run(tmp_path: Path, *args: str, python: str = sys.executable) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": python}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    report = (tmp_path / "gpu_check.md").read_text()
    return out, report


def _statuses(report: str) -> dict[str, str]:
    rows = re.findall(r"^\| ([\w-]+) \| ([^|]+) \| \d+ \|", report, flags=re.M)
    return {name: status.strip() for name, status in rows}


def test_smoke_runs_every_step_and_reports_it(tmp_path):
    out, report = _run(tmp_path, "--smoke", "--no-setup")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    status = _statuses(report)
    assert list(status) == STEPS, report
    assert status["setup"] == "skipped"
    assert status["versions"] == status["benchmark"] == "ok", report
    if status["nvidia-smi"] != "skipped":  # a machine with a driver
        assert status["nvidia-smi"] == "ok"
    assert status["cuda-tests"] == "ok", (tmp_path / "gpu_check.log").read_text()[-3000:]
    import torch

    if not torch.cuda.is_available():  # every CUDA test is collected and skipped, with the reason
        assert re.search(r"\d+ skipped, \d+ deselected", report) and "passed" not in report
        assert "needs a CUDA device" in report
    # the benchmark's rows and the targets, each with a verdict
    for row in ("qlora/ours", "qlora/peft", "lora/ours", "lora/peft", "hybrid/ours"):
        assert f"| {row} |" in report
    assert re.search(r"\| QLoRA tokens/s, ours / peft \| [\d.]+ \| >= 1.2 \| (met|MISSED) \|", report)
    bits = float(re.search(r"QLoRA backbone on cpu: ([\d.]+) bits per quantized parameter", report).group(1))
    assert abs(bits - 4.127) < 0.01  # nf4 + double quantization: 4 + 8/64 + 32/(64 x 256) bits
    assert (tmp_path / "gpu_profile.txt").read_text().startswith("Missed:")
    assert "===== benchmark" in (tmp_path / "gpu_check.log").read_text()


def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path):
    out, report = _run(tmp_path, "--no-setup", python=str(tmp_path / "no-such-python"))
    assert out.returncode == 1
    status = _statuses(report)
    assert list(status) == STEPS
    assert all(status[s].startswith("FAILED (exit 127)") for s in ("versions", "cuda-tests", "benchmark")), status
    assert "no table" in report
