"""`torchrun ... cptron train` on CPU: the launcher's environment is picked up, and two
data-parallel ranks train like one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cptron.data.indexed import IndexedDatasetWriter


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_torchrun_two_ranks_match_one_process(tmp_path):
    rng = np.random.default_rng(1)
    with IndexedDatasetWriter(tmp_path / "data" / "shard", vocab_size=300) as w:
        for _ in range(200):
            w.add_document(np.append(rng.integers(3, 300, size=int(rng.integers(5, 50))), 2))
    cfg = {"model": {"preset": "tiny", "vocab_size": 300, "pad_vocab_to_multiple_of": 64, "max_seq_len": 64},
           "training": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "seq_len": 32, "device": "cpu"},
           "data": {"sources": {"text": {"paths": [str(tmp_path / "data")]}}},
           "metrics": {"log_every": 1, "progress_bar": "off"}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = ["-m", "cptron.cli", "train", str(tmp_path / "train.yaml")]
    subprocess.run([sys.executable, *train, "--training.run_dir", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *train, "--training.run_dir", str(tmp_path / "two"), "--parallel.dp_shard", "2"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2: pp=1 x dp_replicate=1 x dp_shard=2 x tp=1" in out.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "step-00000004" / "COMPLETE").is_file()
