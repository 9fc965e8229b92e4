"""Stopping early on a signal or a time limit: every rank stops after the same step, with a
checkpoint of that step, even when only one rank was signalled."""
from __future__ import annotations

import os
import signal

import pytest

from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.trainer import Trainer

STEPS = 8


def train(rank, world_size, run_dir, parallel, signal_rank=None, signal_step=None, signals=("SIGUSR1",)):
    cfg = make_train_config(run_dir, parallel, steps=STEPS)
    cfg.checkpoint = CheckpointConfig(interval=3, keep_last=0, save_final=True, resume=True,
                                      save_on_signals=list(signals))

    sent = []

    def hook(step, loss):  # called per microbatch: signal once (a second signal kills, as documented)
        if rank == signal_rank and step == signal_step and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGUSR1)
        return loss

    result = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}), loss_hook=hook).run()
    return result.losses, result.last_step, result.stopped_by, result.resumed_from


@pytest.mark.parametrize("world_size,parallel", [(2, ParallelConfig(dp_shard=2)),
                                                 (2, ParallelConfig(pp=2, dp_shard=1))], ids=["dp2", "pp2"])
def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step_with_a_checkpoint(world_size, parallel,
                                                                                    tmp_path):
    ref = run_distributed(train, 1, str(tmp_path / "ref"), ParallelConfig())[0][0]
    results = run_distributed(train, world_size, str(tmp_path / "run"), parallel, 1, 4)
    for losses, last, stopped_by, _ in results:
        assert (last, stopped_by) == (5, "SIGUSR1")  # the signal arrived during step 4 (0-based): 5 done
        assert sorted(losses) == [0, 1, 2, 3, 4]
    assert (tmp_path / "run" / "checkpoints" / "step-00000005" / "COMPLETE").is_file()
    resumed = run_distributed(train, world_size, str(tmp_path / "run"), parallel)
    losses, last, stopped_by, resumed_from = resumed[0]
    assert resumed_from.endswith("step-00000005") and last == STEPS and stopped_by is None
    for step in range(5, STEPS):
        assert abs(losses[step] - ref[step]) <= 1e-6


SCRIPT = """
import os, signal, sys, time
from cptron.train.stop import StopRequests
none = StopRequests([])
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
stops = StopRequests(["SIGTERM", "USR1"])
os.kill(os.getpid(), signal.SIGUSR1)
assert stops.received == "SIGUSR1", stops.received
stops.restore()
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
StopRequests.repeat_grace_s = 0.3
stops = StopRequests(["SIGTERM"])
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # a copy within the grace period (SLURM and torchrun both send it)
print("first signal only recorded:", stops.received, flush=True)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still alive")
"""


def test_the_first_signal_is_recorded_a_copy_is_ignored_a_later_one_kills_and_restore_works():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert "first signal only recorded: SIGTERM" in out.stdout and "still alive" not in out.stdout
