"""One run per run directory: a second run is refused before it touches anything, a stale lock is
taken over, the lock goes with the run; workers do not outlive a killed torchrun; and no pruned
checkpoint is left on disk when a run ends."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.errors import CptronError
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.run_lock import LOCK_NAME
from cptron.train.trainer import Trainer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

# Holds the lock of argv[1] (as rank 0 of a one-process group) until killed.
HOLD = """
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
from cptron.train.run_lock import RunDirLock
lock = RunDirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
if sys.argv[2] == "die":
    os._exit(0)  # no clean-up: the lock stays, naming a pid that is gone
time.sleep(600)
"""


def hold_lock(run_dir: Path, then: str = "sleep") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), then], env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def data(r, n):
    return PackedSource(16, 8, r, n), {}


def train_records(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def write_run(tmp_path: Path, *, steps: int, **extra) -> Path:
    """A tiny model on random documents (as tests/integration/test_torchrun.py); returns the yaml."""
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(tmp_path / "data" / "shard", vocab_size=300) as w:
        for _ in range(400):
            w.add_document(np.append(rng.integers(3, 300, size=int(rng.integers(5, 50))), 2))
    cfg = {
        "model": {"preset": "tiny", "vocab_size": 300, "pad_vocab_to_multiple_of": 64, "max_seq_len": 64},
        "training": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2, "seq_len": 32, "device": "cpu"},
        "data": {"sources": {"text": {"paths": [str(tmp_path / "data")]}}},
        "metrics": {"log_every": 1, "progress_bar": "off"},
        **extra,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "train.yaml"


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------ a run directory in use


def refused(rank, world_size, run_dir):
    try:
        Trainer(make_train_config(run_dir, steps=2), data_factory=data)
    except CptronError as e:
        return str(e)
    return None


def test_a_trainer_on_a_run_dir_in_use_is_refused_on_every_rank_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        messages = run_distributed(refused, 2, str(run_dir))
        for message in messages:
            assert message is not None and "\n" not in message
            assert f"run_dir {run_dir} is in use by another run" in message
            assert f"host {socket.gethostname()}, pid {holder.pid}, since " in message
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing else touched
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_cptron_train_is_refused_and_the_first_run_is_untouched(tmp_path):
    """The issue's collision: the second run rewrote the first one's metrics.jsonl and died on a
    checkpoint temp file. The first run is paused (SIGSTOP) while the second starts, so nothing
    of the first changes unless the second changes it."""
    cfg = write_run(tmp_path, steps=40, checkpoint={"interval": 5})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cptron.cli", "train", str(cfg), "--training.run_dir", str(run_dir)]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: (
                (run_dir / "metrics.jsonl").exists() and len(train_records(run_dir)) >= 12 or first.poll() is not None
            ),
            "the first run's step 12",
        )
        first.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # a write in flight lands
        metrics = (run_dir / "metrics.jsonl").read_bytes()
        checkpoints = sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").iterdir())
        second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith(
            f"cptron train: error: run_dir {run_dir} is in use by another run (host "
            f"{socket.gethostname()}, pid {first.pid}, since "
        ), error
        assert (run_dir / "metrics.jsonl").read_bytes() == metrics
        assert sorted((p.name, p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    assert train_records(run_dir) == list(range(1, 41))
    assert not (run_dir / "metrics.discarded.jsonl").exists()
    assert (run_dir / "checkpoints" / "step-00000040" / "COMPLETE").is_file()
    assert not (run_dir / LOCK_NAME).exists()


# ------------------------------------------------------------------ stale locks


def train_and_log(rank, world_size, run_dir):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("cptron").addHandler(handler)
    result = Trainer(make_train_config(run_dir, steps=2), data_factory=data).run()
    return result.last_step, messages


@pytest.mark.parametrize("stale", ["dead_pid_on_this_host", "old_refresh_on_another_host"])
def test_a_stale_lock_is_taken_over_with_a_warning_naming_the_old_holder(tmp_path, stale):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir, then="die")
    holder.wait()
    record = json.loads((run_dir / LOCK_NAME).read_text())
    assert record["pid"] == holder.pid
    old = f"host {socket.gethostname()}, pid {holder.pid}, since "
    why = "its process has exited"
    if stale == "old_refresh_on_another_host":
        # A node that crashed: its pid means nothing here, only the refresh time does.
        record.update(host="node-that-crashed", pid=4242, refreshed=time.time() - 3600)
        (run_dir / LOCK_NAME).write_text(json.dumps(record))
        old, why = "host node-that-crashed, pid 4242, since ", "its lock was last refreshed 3600 s ago"
    last_step, messages = run_distributed(train_and_log, 1, str(run_dir))[0]
    assert last_step == 2
    warnings = [m for m in messages if "taking over the lock" in m]
    assert len(warnings) == 1 and old in warnings[0] and why in warnings[0], messages
    assert not (run_dir / LOCK_NAME).exists()


def test_a_lock_refreshed_recently_by_another_host_is_live(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir, then="die")
    holder.wait()
    record = json.loads((run_dir / LOCK_NAME).read_text())
    record.update(host="node-7", pid=4242, refreshed=time.time() - 10)
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    message = run_distributed(refused, 1, str(run_dir))[0]
    assert message is not None and "host node-7, pid 4242, since " in message


# ------------------------------------------------------------------ the lock goes with the run


def lock_lifetime(rank, world_size, run_dir):
    lock = Path(run_dir) / LOCK_NAME
    seen = []

    def hook(step, loss):
        seen.append(json.loads(lock.read_text())["pid"])
        return loss

    Trainer(make_train_config(run_dir, steps=2), data_factory=data, loss_hook=hook).run()
    held_by_us = set(seen) == {os.getpid()}
    after_run = lock.exists()

    def fail(step, loss):
        raise RuntimeError("injected failure")

    with_error = Trainer(make_train_config(run_dir, steps=4), data_factory=data, loss_hook=fail)
    try:
        with_error.run()
    except RuntimeError:
        pass
    after_error = lock.exists()

    def broken_data(r, n):
        raise CptronError("no data")

    try:
        Trainer(make_train_config(run_dir, steps=2), data_factory=broken_data)
    except CptronError:
        pass
    after_failed_setup = lock.exists()

    unused = Trainer(make_train_config(run_dir, steps=2), data_factory=data)
    in_this_process = refused(rank, world_size, run_dir)  # the unused Trainer still holds it
    unused.close()
    after_close = lock.exists()
    return held_by_us, after_run, after_error, after_failed_setup, in_this_process, after_close


def test_the_lock_is_released_after_run_after_an_error_and_by_close(tmp_path):
    held, after_run, after_error, after_failed_setup, in_this_process, after_close = run_distributed(
        lock_lifetime, 2, str(tmp_path / "run")
    )[0]
    assert held
    assert (after_run, after_error, after_failed_setup, after_close) == (False, False, False, False)
    assert in_this_process is not None and "is in use by another run" in in_this_process


# ------------------------------------------------------------------ pruned checkpoints

# shutil.rmtree made slow, as deleting a real checkpoint is: the end of the run must wait for it.
SLOW_DELETE = """
import shutil, sys, time
rmtree = shutil.rmtree
shutil.rmtree = lambda *a, **k: (time.sleep(1.0), rmtree(*a, **k))
from cptron.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_no_pruned_checkpoint_is_left_behind_after_cptron_train(tmp_path):
    cfg = write_run(tmp_path, steps=6, checkpoint={"interval": 2, "keep_last": 1})
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-c", SLOW_DELETE, "train", str(cfg), "--training.run_dir", str(run_dir)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000006"]


# ------------------------------------------------------------------ a killed launcher


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_workers_exit_when_torchrun_is_killed_and_the_same_command_resumes(tmp_path):
    """torchrun starts each worker in a session of its own: a SIGKILL to torchrun alone used to
    leave them training. Now each gets SIGTERM from the kernel, saves its step and exits."""
    cfg = write_run(tmp_path, steps=1000, checkpoint={"interval": 100})
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cptron.cli",
        "train",
        str(cfg),
        "--training.run_dir",
        str(run_dir),
        "--parallel.dp_shard",
        "2",
    ]
    workers: list[int] = []
    try:
        with open(tmp_path / "first.log", "w") as log:
            launcher = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(
            lambda: (
                (run_dir / "metrics.jsonl").exists() and len(train_records(run_dir)) >= 5 or launcher.poll() is not None
            ),
            "training under way",
        )
        workers = [p.pid for p in psutil.Process(launcher.pid).children()]
        assert len(workers) == 2, workers
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 30
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), (tmp_path / "first.log").read_text()[-3000:]
        stopped_at = max(train_records(run_dir))
        assert stopped_at < 1000, "the run should have been cut short"

        with open(tmp_path / "second.log", "w") as log:
            again = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=log)
        wait_for(
            lambda: max(train_records(run_dir)) >= stopped_at + 3 or again.poll() is not None, "the rerun to train"
        )
        again.send_signal(signal.SIGTERM)  # enough: it resumed and trained; save and stop
        again.wait(timeout=120)
        second = (tmp_path / "second.log").read_text()
        assert f"resumed from {run_dir / 'checkpoints'}" in second, second[-3000:]
        steps = train_records(run_dir)
        assert steps == list(range(1, max(steps) + 1)), "a step was lost or repeated"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
