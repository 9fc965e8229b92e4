"""Helpers for tests that start `cptron train` through the launch scripts (launch/*.sh) as subprocesses.

Owns the tiny run they share (random documents in one shard source, a tiny model, a few steps), reading
its per-step losses from metrics.jsonl, the one-process reference run (cached for the whole test session,
since every launcher test compares against the same one), and waiting for a run to reach a step.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from cptron.data.indexed_writer import IndexedDatasetWriter

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss, from the run's metrics.jsonl (rank 0 writes it)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def write_tiny_run(root: Path, *, steps: int, docs: int = 300, seed: int = 3, **extra) -> Path:
    """Random documents as one shard source under root/data, and root/train.yaml training the tiny preset
    on them (CPU, 64-token vocabulary padding so tp=2 divides it). Returns the config's path."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(root / "data" / "shard", vocab_size=300) as w:
        for _ in range(docs):
            w.add_document(np.append(rng.integers(3, 300, size=int(rng.integers(5, 50))), 2))
    cfg = {
        "model": {"preset": "tiny", "vocab_size": 300, "pad_vocab_to_multiple_of": 64, "max_seq_len": 64},
        "training": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "seq_len": 32, "device": "cpu"},
        "data": {"sources": {"text": {"paths": [str(root / "data")]}}},
        "metrics": {"log_every": 1, "progress_bar": "off"},
        **extra,
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def quiet_env(**more: str) -> dict[str, str]:
    """The environment for a launched run: one thread per process (2-core machines), the repo importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **more}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def reference_losses(tmp_path_factory, *, steps: int, **extra) -> dict[int, float]:
    """Losses of the one-process run of `write_tiny_run(steps=steps, **extra)`, computed once per session."""
    key = f"cptron-reference-{steps}-{hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:10]}"
    root = tmp_path_factory.getbasetemp() / key
    losses = train_losses(root / "run")
    if len(losses) == steps:
        return losses
    from cptron.cli import main  # in this process: a fresh interpreter would cost seconds of imports

    config = write_tiny_run(root, steps=steps, **extra)
    assert main(["train", str(config), "--training.run_dir", str(root / "run")]) == 0
    return train_losses(root / "run")


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Wait until metrics.jsonl has `step` training rows; fail if a process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while len(train_losses(run_dir)) < step:
        ended = [p.args for p in procs if p.poll() is not None]
        if ended:
            raise AssertionError(f"a launcher ended before step {step}: {ended}")
        if time.monotonic() > deadline:
            raise AssertionError(f"step {step} not reached within {timeout} s")
        time.sleep(0.05)


def assert_losses_match(got: dict[int, float], want: dict[int, float], tol: float = 1e-5) -> None:
    """Every step of `want` is in `got` with a loss within `tol`."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    bad = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > tol}
    assert not bad, f"losses differ beyond {tol}: {bad}"


def last_checkpoint_step(run_dir: Path) -> Optional[int]:
    """The step of the newest complete checkpoint in run_dir/checkpoints, or None."""
    steps = [int(p.parent.name.split("-")[1]) for p in (Path(run_dir) / "checkpoints").glob("step-*/COMPLETE")]
    return max(steps) if steps else None
