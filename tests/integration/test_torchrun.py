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

from cptron.data.indexed_writer import IndexedDatasetWriter


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def write_run(tmp_path: Path, *, docs: int, seed: int, steps: int, **extra) -> None:
    """Random documents as one shard source, and tmp_path/train.yaml training a tiny model on them."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(tmp_path / "data" / "shard", vocab_size=300) as w:
        for _ in range(docs):
            w.add_document(np.append(rng.integers(3, 300, size=int(rng.integers(5, 50))), 2))
    cfg = {"model": {"preset": "tiny", "vocab_size": 300, "pad_vocab_to_multiple_of": 64, "max_seq_len": 64},
           "training": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "seq_len": 32,
                        "device": "cpu"},
           "data": {"sources": {"text": {"paths": [str(tmp_path / "data")]}}},
           "metrics": {"log_every": 1, "progress_bar": "off"}, **extra}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))


def test_torchrun_two_ranks_match_one_process(tmp_path):
    write_run(tmp_path, docs=200, seed=1, steps=4)
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


@pytest.mark.parametrize("workers_too", [False, True], ids=["torchrun_only", "like_slurm"])
def test_sigterm_to_torchrun_saves_the_current_step_on_every_rank(tmp_path, workers_too):
    """torchrun forwards SIGTERM to its workers; SLURM (proctrack/cgroup) also signals every process of
    the step, so each worker gets it twice. Either way both ranks finish the same step, save it and
    exit 75; the same command then resumes and finishes."""
    import signal
    import time

    write_run(tmp_path, docs=400, seed=2, steps=60, checkpoint={"interval": 50})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "cptron.cli", "train", str(tmp_path / "train.yaml"), "--training.run_dir", str(tmp_path / "run"),
           "--parallel.dp_shard", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 5) and proc.poll() is None:
        assert time.time() < deadline, "training never got there"
        time.sleep(0.01)
    workers = []
    if workers_too:
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0, "torchrun reports the early stop as a failure, so a job script notices"
    assert err.count("received SIGTERM") == 2, err[-3000:]
    done = max(losses(tmp_path / "run"))
    assert 5 <= done < 60
    assert (tmp_path / "run" / "checkpoints" / f"step-{done:08d}" / "COMPLETE").is_file()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(losses(tmp_path / "run")) == list(range(1, 61))
