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


def test_gpu_train_dry_run_checks_torch_and_validates_every_configuration():
    proc = run(["benchmarks/gpu_train.py", "--dry-run", "--configs", "all"], timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"torch API check: all \d+ torch APIs cptron uses are present", proc.stdout), proc.stdout
    valid = {line.split()[0]: line for line in proc.stdout.splitlines() if line.rstrip().endswith(": valid")}
    assert set(valid) == {"eager", "eager+ac", "compile", "compile+ac", "compile+docs", "eager+docs",
                          "compile+docs-sdpa", "hf"}, proc.stdout
    assert all("dtype=bfloat16" in line and "params=1,235,814,400" in line for line in valid.values()), proc.stdout
    # On CUDA, training.attention=auto takes flex for packed documents and SDPA's causal kernel otherwise.
    assert "attention=flex " in valid["compile+docs"] and "attention=flex " in valid["eager+docs"]
    assert "attention=sdpa " in valid["compile+docs-sdpa"]
    assert "attention=sdpa-causal" in valid["compile"] and "attention=sdpa-causal" in valid["hf"]
    m = re.search(r"flex computes (\d+) of the 528 causal 32x32 tiles", proc.stdout)
    assert m and 0 < int(m.group(1)) < 528, proc.stdout


def test_gpu_train_runs_its_code_path_on_cpu():
    proc = run(["benchmarks/gpu_train.py", "--device", "cpu", "--preset", "tiny", "--seq-len", "32",
                "--configs", "eager+docs,hf", "--doc-len", "8", "--warmup", "1", "--steps", "1",
                "--peak-tflops", "1"])
    # Exit 0: both configurations ran and MFU has a peak (the goal itself is not asserted on CPU).
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^(eager\+docs|hf) +(sdpa|sdpa-causal) .*$", proc.stdout,
                                                        re.MULTILINE)}
    assert set(rows) == {"eager+docs", "hf"}, proc.stdout
    assert all(re.search(r"\d+\.\d%", row) for row in rows.values()), rows
    # cptron/transformers ratio in the cptron row; the masked config's unmasked twin did not run.
    assert re.search(r"% +n/a +\d+\.\d\dx +- ", rows["eager+docs"]), rows
    assert "attention SDPA with a boolean block-diagonal causal mask" in proc.stdout  # CPU keeps SDPA
    assert re.search(r"best cptron MFU: \d+\.\d% \(eager\+docs\), goal >= 55%: (PASS|MISS)$", proc.stdout.strip()), \
        proc.stdout


def test_gpu_train_fails_clearly_without_a_gpu():
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so this holds on GPU machines too.
    proc = run(["benchmarks/gpu_train.py", "--steps", "1"], timeout=60, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "no CUDA device is available" in proc.stderr
