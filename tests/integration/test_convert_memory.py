"""Acceptance: converting a >1 GB, multi-shard fp32 model stays within the memory budget.

Runs benchmarks/convert.py (HF -> cptron -> HF in fresh child processes) and requires
its verdict: whole-process peak RSS <= largest shard + 2 x largest tensor + 600 MB in
both directions, and a bit-identical round trip.
"""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_conversion_of_a_1gb_model_stays_within_the_rss_budget(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "convert.py"), "--target-gb", "1.05", "--max-shard-mb", "250",
         "--workdir", str(tmp_path), "--no-drop-caches", "--budget-basis", "absolute"],
        capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("memory           PASS") == 2, out
    assert "overall: PASS" in out, out
    size_mb, shards = map(int, re.search(r"(\d+) MB in (\d+) shards", out).groups())
    assert size_mb >= 1000 and shards >= 4, out
