"""The README's main job, shortened: examples/quickstart.py runs end to end (English base, vocabulary
extension for German, CPT with replay on 2 processes under torchrun, report, PNGs, export, generation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_main_job_tells_the_whole_story(tmp_path):
    work = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--workdir", str(work), "--steps", "6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "German tokens per word:" in out and "after `vocab extend`" in out
    assert "forgetting" in out and "learning" in out
    assert "$ torchrun --standalone --nproc_per_node=2 -m cptron.cli train" in out  # CPT under torchrun
    assert "'Und Gott sprach:' ->" in out and "'And God said,' ->" in out
    for png in ("curves.png", "lr.png"):
        assert (work / png).stat().st_size > 10_000, png
    assert (work / "cpt" / "report.md").is_file()
    assert (work / "hf" / "config.json").is_file()
    assert "OK" in proc.stdout + proc.stderr  # convert verify
