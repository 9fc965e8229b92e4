"""`python -m cptron.launch [torchrun options] -m cptron.cli train ...`: torchrun with a job script's exit status.

Owns the one difference from torchrun that `launch/torchrun.sh` needs. torchrun reports any worker exit
other than 0 as a failure (status 1), so a job script could not tell a resumable stop of `cptron train`
(every rank saved and exited 75 after SIGTERM/SIGUSR1 or `training.time_limit_minutes`) from a crash. This
runs torchrun's own launcher with the same options and exits 75 after a resumable stop (see
`exit_status`), 1 after any other failure, 0 on success.

The preemption signals (SIGTERM, and SIGUSR1/SIGUSR2 that SLURM's --signal sends) are forwarded to the
workers by this process instead of torchrun: torchrun's handler stops its monitor loop with an exception,
and the workers' exit statuses are lost. Workers still alive after the shutdown timeout (--shutdown-timeout
where torchrun has it, else TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 30 s) from the first forwarded signal
are killed (SIGKILL), as torchrun would. The other signals (SIGINT, SIGHUP, SIGQUIT) stay torchrun's.
This needs torchrun's --signals-to-handle (torch 2.9 and later): before it torchrun takes SIGTERM itself,
and a signalled run ends with status 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger("cptron.launch")

EXIT_RESUMABLE = 75  # cptron.train.stop.EXIT_RESUMABLE, without importing the trainer into the launcher
FORWARDED = ("SIGTERM", "SIGUSR1", "SIGUSR2")
DEFAULT_SHUTDOWN_TIMEOUT_S = 30  # torchrun's own default


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc): torchrun's workers are the children of its agent process."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class SignalForwarder:
    """Forwards each received preemption signal to the workers; kills them `shutdown_timeout` s after the first."""

    def __init__(self, names: list[str], shutdown_timeout: float):
        self.shutdown_timeout = shutdown_timeout
        self.received: Optional[str] = None
        self._killer: Optional[threading.Timer] = None
        for name in names:
            signal.signal(getattr(signal, name), self._forward)

    def _send(self, sig: int) -> None:
        for pid in child_pids(os.getpid()):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _forward(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not child_pids(os.getpid()):  # still in the rendezvous: nothing to save, stop as torchrun would
            log.warning("received %s before the workers started: exiting", name)
            raise SystemExit(128 + signum)
        log.warning("received %s: forwarding it to the workers (they save and exit 75)", name)
        self.received = self.received or name
        self._send(signum)
        if self._killer is None:
            self._killer = threading.Timer(self.shutdown_timeout, self._kill)
            self._killer.daemon = True
            self._killer.start()

    def _kill(self) -> None:
        log.error("workers still running %.0f s after %s: killing them", self.shutdown_timeout, self.received)
        self._send(signal.SIGKILL)


def exit_status(failures: dict) -> int:
    """75 for a resumable stop, else 1. `failures`: rank -> ProcessFailure (torchrun's).

    A worker exits 75 only after every rank agreed to stop and the checkpoint of that step is complete
    (its save is collective). torchrun stops the other workers as soon as the first one exits, so the
    slower ones, still shutting down with their signal handlers gone, die of that signal (a negative
    exit code): they count with the 75s. Any other exit code is a failure."""
    codes = [f.exitcode for f in failures.values()]
    resumable = EXIT_RESUMABLE in codes and all(c == EXIT_RESUMABLE or c < 0 for c in codes)
    return EXIT_RESUMABLE if resumable else 1


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    if hasattr(args, "signals_to_handle"):
        names = [n.strip() for n in args.signals_to_handle.split(",") if n.strip()]
        args.signals_to_handle = ",".join(n for n in names if n not in FORWARDED) or "SIGINT"
    else:
        log.warning("this torchrun handles SIGTERM itself (no --signals-to-handle): a signalled run exits 1, not 75")
    timeout = getattr(args, "shutdown_timeout", None)
    if timeout is None:
        timeout = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S))
    SignalForwarder(list(FORWARDED), timeout)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        status = exit_status(e.failures)
        if status == EXIT_RESUMABLE:
            log.warning("every worker saved and stopped early (exit 75): rerun the same command to resume")
        else:
            print(e.format_msg(), file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
