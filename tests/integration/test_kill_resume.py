"""A run killed with SIGKILL and restarted with the same command reproduces the
uninterrupted run bit for bit (one process), including a kill in the middle of a
checkpoint write.

The runs go through the real CLI and the real replay mixture over Megatron shards,
so the data loader's state is part of what must resume exactly.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cptron.data.indexed_writer import IndexedDatasetWriter

VOCAB = 500
STEPS = 30


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    rng = np.random.default_rng(0)
    for name, n_docs in (("old", 300), ("new", 200)):
        with IndexedDatasetWriter(root / name / "shard", vocab_size=VOCAB) as w:
            for _ in range(n_docs):
                doc = rng.integers(3, VOCAB, size=int(rng.integers(5, 60)))
                w.add_document(np.append(doc, 2))
    cfg = {
        "model": {"preset": "tiny", "vocab_size": VOCAB, "pad_vocab_to_multiple_of": 64, "max_seq_len": 64},
        "training": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 4, "seq_len": 32, "seed": 3,
                     "device": "cpu"},
        "optim": {"lr": 3e-3, "grad_clip": 0.5},
        "lr": {"warmup_steps": 2},
        "data": {"sources": {"old": {"paths": [str(root / "old")]}, "new": {"paths": [str(root / "new")]}},
                 "replay": {"fraction": 0.25, "sources": ["old"]},
                 "stages": [{"start_step": 15, "replay_fraction": 0.5}]},
        "checkpoint": {"interval": 2, "keep_last": 2},
        "metrics": {"log_every": 1, "progress_bar": "off"},
    }
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "cptron.cli", "train", str(config), "--training.run_dir", str(run_dir)]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    assert len(losses) == len([r for r in rows if r["kind"] == "train"]), "a step was logged twice"
    return losses


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(command(config, run_dir), check=True, env=env(), capture_output=True)
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize("seed,async_save", [(0, False), (1, False), (2, True), (3, True)])
def test_sigkill_at_a_random_moment_then_same_command(config, uninterrupted, tmp_path, seed, async_save):
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    # Background saves must resume exactly too: a kill may land while a checkpoint is still being written.
    cmd = command(config, run_dir) + ["--checkpoint.async_save", str(async_save).lower()]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    target = rng.randint(2, STEPS - 6)  # kill soon after this many steps were logged
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= target) and proc.poll() is None:
        assert time.time() < deadline, "training never got there"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = max(train_losses(run_dir))
    assert done_before < STEPS

    subprocess.run(cmd, check=True, env=env(), capture_output=True)
    assert train_losses(run_dir) == uninterrupted


KILL_IN_SAVE = """
import os, signal, sys
import cptron.checkpoint as c
orig = c._write_synced
def write(path, text):
    if path.name == {marker!r} and "step-00000004" in str(path.parent):
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(path, text)
c._write_synced = write
from cptron.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("marker", ["cptron.json", "COMPLETE"])
def test_sigkill_during_checkpoint_write(config, uninterrupted, tmp_path, marker):
    run_dir = tmp_path / "run"
    args = command(config, run_dir)[3:]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE.format(marker=marker), *args], env=env(),
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step-00000002" / "COMPLETE").is_file()
    assert not (ckpts / "step-00000004").exists(), "a half-written checkpoint must not look complete"

    out = subprocess.run(command(config, run_dir), check=True, env=env(), capture_output=True, text=True)
    assert "resumed from" in out.stderr and "step-00000002" in out.stderr
    assert train_losses(run_dir) == uninterrupted
    assert (ckpts / f"step-{STEPS:08d}" / "COMPLETE").is_file()


def _newest_complete_step(run_dir: Path) -> int:
    steps = [int(d.name.split("-")[1]) for d in (run_dir / "checkpoints").glob("step-*") if (d / "COMPLETE").is_file()]
    return max(steps)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_the_current_step_and_the_same_command_resumes(config, uninterrupted, tmp_path, sig):
    """What SLURM does before a preemption or the end of a job: the run saves where it is, not at the
    last interval, and exits 75; the rerun loses and repeats nothing."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(config, run_dir), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 7) and proc.poll() is None:
        assert time.time() < deadline, "training never got there"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert f"received {sig.name}" in err and "run the same command to resume" in err
    done = max(train_losses(run_dir))
    assert 7 <= done < STEPS
    assert _newest_complete_step(run_dir) == done, "the checkpoint is of the step the signal interrupted"
    out = subprocess.run(command(config, run_dir), check=True, env=env(), capture_output=True, text=True)
    assert f"step-{done:08d}" in out.stderr
    assert train_losses(run_dir) == uninterrupted


def test_the_time_limit_saves_and_stops_and_the_next_invocation_finishes(config, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    limited = command(config, run_dir) + ["--training.time_limit_minutes", "0.0001"]  # 6 ms: after one step
    out = subprocess.run(limited, env=env(), capture_output=True, text=True)
    assert out.returncode == 75, out.stderr[-2000:]
    assert "(time limit)" in out.stderr
    assert _newest_complete_step(run_dir) == max(train_losses(run_dir)) == 1
    subprocess.run(command(config, run_dir), check=True, env=env(), capture_output=True)
    assert train_losses(run_dir) == uninterrupted


def test_data_plan_prints_the_mixture_per_stage_and_continues_from_the_newest_checkpoint(config, tmp_path):
    run_dir = tmp_path / "run"
    plan = [sys.executable, "-m", "cptron.cli", "data", "plan", str(config), "--training.run_dir", str(run_dir)]
    fresh = subprocess.run(plan, env=env(), capture_output=True, text=True, check=True).stdout
    assert "steps 0..30" in fresh and "steps 0..15 (stage 0): new 75.0%, old 25.0%" in fresh
    assert "steps 15..30 (stage 1): new 50.0%, old 50.0%" in fresh
    assert "new  ~150 more samples" in fresh and "old  ~90 more samples" in fresh  # new: 8 x (15 x 3/4 + 15 / 2)
    subprocess.run(command(config, run_dir) + ["--training.time_limit_minutes", "0.0001"], env=env(),
                   capture_output=True)
    resumed = subprocess.run(plan, env=env(), capture_output=True, text=True, check=True).stdout
    assert "resuming from" in resumed and "step-00000001" in resumed
    assert "steps 1..15 (stage 0)" in resumed and "new  ~144 more samples" in resumed
