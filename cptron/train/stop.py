"""When a run stops early to save and resume later: a signal (SLURM's SIGTERM/SIGUSR1 before a
preemption or the job's end) or `training.time_limit_minutes`, agreed by every rank after a step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

from cptron.train.checkpointer import signal_number

log = logging.getLogger("cptron.train")

EXIT_RESUMABLE = 75
"""Exit status of `cptron train` when it saved and stopped early (a signal or the time limit):
rerunning the same command resumes (75 is EX_TEMPFAIL, "try again later")."""


class StopRequests:
    """Signal handlers that ask the training loop to save and stop at the next step boundary.

    The first signal only sets a flag. Copies arriving within `repeat_grace_s` belong to the
    same request: under SLURM a worker gets the job's SIGTERM both directly and forwarded by
    torchrun. A signal repeated later gets the default action (usually death), for a run that
    is stuck and should not wait. Installed for `Trainer.run` only: during set-up a signal
    keeps its default action, which loses nothing (no step has run yet)."""

    repeat_grace_s = 5.0

    def __init__(self, names: list[str]):
        self.received: Optional[str] = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        if not names:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("checkpoint.save_on_signals ignored: signal handlers need the main thread")
            return
        for name in names:  # validated by CheckpointConfig
            sig = signal.Signals(signal_number(name))
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._first_at < self.repeat_grace_s:
                return  # the same request, delivered twice (directly and through the launcher)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received, self._first_at = name, time.monotonic()
        log.warning(
            "received %s: finishing this step, then saving a checkpoint and stopping (send it again "
            "after %.0f s to stop at once)",
            name,
            self.repeat_grace_s,
        )

    def restore(self) -> None:
        """Put back the handlers found at installation; one installed outside Python (which
        signal.signal cannot reinstall) becomes the default action."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


class StopPolicy:
    """Decides after each step whether this invocation saves and stops; every rank gets the same
    answer (any rank's signal counts, rank 0's clock decides the time limit)."""

    def __init__(
        self,
        signals: list[str],
        time_limit_minutes: float,
        started: float,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        """`started`: time.monotonic() at the trainer's start (the limit counts set-up, as a job's does)."""
        self.signals, self.limit_s, self.started = signals, time_limit_minutes * 60.0, started
        self.rank, self.world_size, self.device = rank, world_size, device
        self.requests: Optional[StopRequests] = None

    def __enter__(self) -> StopPolicy:
        self.requests = StopRequests(self.signals)
        return self

    def __exit__(self, *exc) -> None:
        self.requests.restore()

    def reason(self) -> Optional[str]:
        """A signal's name or "time limit" when the run should save and stop now, else None."""
        if not self.signals and not self.limit_s:  # the same on every rank
            return None
        code = 0
        if self.requests.received is not None:
            code = 1 + int(signal.Signals[self.requests.received])
        elif self.limit_s and self.rank == 0 and time.monotonic() - self.started >= self.limit_s:
            code = -1
        if self.world_size > 1:
            # On the training device: NCCL's small all-reduce stays fast at thousands of ranks, where
            # gloo's grows with the world size; the host already waits for each step's loss anyway.
            flag = torch.tensor([code, -code], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            top, bottom = (int(v) for v in flag.tolist())
            code = top if top > 0 else -bottom
        if code > 0:
            return signal.Signals(code - 1).name
        return "time limit" if code < 0 else None
