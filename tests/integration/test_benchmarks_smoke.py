"""Smoke tests of the training benchmarks: they run end to end on a tiny shape and print what they promise."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY_SHAPE = ["--dim", "64", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--ffn-hidden-dim", "128",
              "--vocab", "512", "--seq-len", "32", "--batch", "2"]


def run(argv: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def test_train_step_prints_table_and_ratio_lines_last():
    proc = run(["benchmarks/train_step.py", *TINY_SHAPE, "--warmup", "1", "--rounds", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert re.match(r"overhead cptron/bare step time: \d+\.\d{3} .*goal <= 1\.05: (PASS|MISS)$", lines[-2]), lines[-2]
    assert re.match(r"speedup  HF/cptron step time: +\d+\.\d{3} .*goal >= 1\.2: (PASS|MISS)$", lines[-1]), lines[-1]
    assert re.search(r"\d+ torch threads \(\d+ cores available\)", lines[0]), lines[0]
    assert re.search(r"model: [\d,]+ params", proc.stdout)

    rows = {}
    for line in lines:
        m = re.match(r"(cptron|bare|HF)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(1)] = [float(x.replace(",", "")) for x in m.groups()[1:]]
    assert set(rows) == {"cptron", "bare", "HF"}, proc.stdout
    # Same weights, batch and optimizer: the three must agree on the losses, or the
    # timings compare different work.
    first = [r[4] for r in rows.values()]
    last = [r[5] for r in rows.values()]
    assert max(first) - min(first) < 1e-4, rows
    assert max(last) - min(last) < 1e-3, rows
    assert all(r[0] > 0 and r[3] > 0 for r in rows.values()), rows


def test_train_step_rejects_bad_arguments():
    proc = run(["benchmarks/train_step.py", "--rounds", "0"], timeout=60)
    assert proc.returncode == 2
    assert "--rounds=0 is invalid: expected an integer >= 1" in proc.stderr


def test_gpu_train_dry_run_validates_the_four_configurations():
    proc = run(["benchmarks/gpu_train.py", "--dry-run"], timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    valid = [line for line in proc.stdout.splitlines() if line.rstrip().endswith(": valid")]
    assert len(valid) == 4, proc.stdout
    assert {line.split()[0] for line in valid} == {"eager", "eager+ac", "compile", "compile+ac"}
    assert all("dtype=bfloat16" in line and "params=1,235,814,400" in line for line in valid), proc.stdout


def test_gpu_train_runs_its_code_path_on_cpu():
    proc = run(["benchmarks/gpu_train.py", "--device", "cpu", "--preset", "tiny", "--seq-len", "32",
                "--configs", "eager,eager+ac", "--warmup", "1", "--steps", "1", "--peak-tflops", "1"])
    # Exit 0: both configurations ran and MFU has a peak (the goal itself is not asserted on CPU).
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if re.match(r"(eager|eager\+ac)\s+False\s+(none|full)\s", line)]
    assert len(rows) == 2, proc.stdout
    assert all(re.search(r"\d+\.\d%", row) for row in rows), rows
    assert re.search(r"best MFU: \d+\.\d% \(eager(\+ac)?\), goal >= 55%: (PASS|MISS)$", proc.stdout.strip()), \
        proc.stdout


def test_gpu_train_fails_clearly_without_a_gpu():
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so this holds on GPU machines too.
    proc = run(["benchmarks/gpu_train.py", "--steps", "1"], timeout=60, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "no CUDA device is available" in proc.stderr
