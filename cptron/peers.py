"""Noticing a lost peer: heartbeats through the job's key-value store, and the message naming the lost rank.

Owns `PeerWatch`. In a multi-rank run every rank runs one daemon thread. Every `interval` seconds the
thread adds 1 to the rank's own counter in the store the launcher set up (MASTER_ADDR:MASTER_PORT: the
torchrun agent's rendezvous store, or rank 0's store under the deepspeed launcher) and reads every rank's
counter. A rank whose counter has not moved for `timeout` seconds, and which did not say goodbye on its way
out, is lost: its process or its node died, or the network to it is cut. This rank then logs one line
naming it (rank, node, host, address) and ends with exit status 1, so the launcher and the job script
see a failure within the timeout, and the same command later resumes from the newest complete checkpoint.
The store's load: one add and one read of every rank's counter per rank and interval (at 1,000 ranks
and the 5 s interval, 200 of each per second, which a TCPStore serves easily).

Why a thread of our own rather than the collective's error: a rank blocked in a collective with a dead
peer does not come back to Python in time, or at all. gloo raises at once only when the peer's kernel
resets the connection (a killed process on a live node), naming the peer's address; when the peer's
packets just stop (a dead node, a cut link) it waits out the process-group timeout and names no peer.
NCCL's watchdog aborts the process at its timeout without a Python exception. torchrun's agent keeps a
rendezvous heartbeat per node, but with --max-restarts 0 a lost node changes nothing on the others.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

log = logging.getLogger("cptron.distributed")

EXIT_PEER_LOST = 1
"""Exit status of a rank that gave up on a lost peer: a failure, not a resumable stop (75)."""


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: several per timeout, at most 5 s (a store op per rank per interval)."""
    return min(5.0, max(0.2, timeout_s / 6.0))


def _local_address(host: str, port: int) -> str:
    """This machine's address on the route to `host` (a UDP connect sends nothing), for the message."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "?"


def _node_rank() -> str:
    # torchrun sets GROUP_RANK, the deepspeed launcher CROSS_RANK, SLURM SLURM_NODEID.
    for name in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):
        if os.environ.get(name):
            return os.environ[name]
    return "?"


class PeerWatch:
    """Heartbeats of every rank through the store at `host:port`; see the module docstring."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.where = f"{host}:{port}"
        # A prefix per launcher attempt: an elastic restart reuses torchrun's store.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self._prefix = f"cptron/peers/{attempt}/"
        op_timeout = timedelta(seconds=max(2.0, 2 * self.interval))
        self._store = dist.TCPStore(host, port, is_master=False, timeout=op_timeout, wait_for_workers=False)
        self._lock = threading.Lock()  # the store client is shared by the thread and the goodbye at exit
        self._stop = threading.Event()
        me = f"node {_node_rank()}, host {socket.gethostname()}, {_local_address(host, port)}, pid {os.getpid()}"
        with self._lock:
            self._store.set(self._key("info", rank), me)
            self._store.add(self._key("beat", rank), 1)
        self._thread = threading.Thread(target=self._run, name="cptron-peer-watch", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}{kind}/{rank}"

    def close(self) -> None:
        """Say goodbye (a normal exit, not a lost rank) and stop the thread; safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            with self._lock:
                self._store.set(self._key("left", self.rank), "1")
        except Exception:  # the store's host is gone: nobody is left to read the goodbye
            pass

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        beats = [self._key("beat", r) for r in range(self.world_size)]
        started = False
        seen: list[int] = []
        changed_at: list[float] = []
        store_ok_at = last_tick = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last_tick > self.timeout_s / 2:
                # This process was not running either (SIGSTOP, a suspended job): nobody's silence counts.
                changed_at = [now] * len(changed_at)
            last_tick = now
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._store.add(beats[self.rank], 1)
                    started = started or self._store.check(beats)
                    counts = [int(v) for v in self._store.multi_get(beats)] if started else []
                store_ok_at = now
            except Exception as e:  # noqa: BLE001 - any store failure counts towards losing the store's host
                if now - store_ok_at > self.timeout_s:
                    self._give_up(
                        f"the job's store at {self.where} (hosted by the rendezvous node, or by rank 0 under the "
                        f"deepspeed launcher) has been unreachable for {now - store_ok_at:.0f} s: that node is "
                        f"lost ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                    )
                continue
            if not started:
                continue
            if not seen:
                seen, changed_at = counts, [now] * len(counts)
            for r, count in enumerate(counts):
                if count != seen[r]:
                    seen[r], changed_at[r] = count, now
            silent = [r for r in range(self.world_size) if r != self.rank and now - changed_at[r] > self.timeout_s]
            if silent:
                lost = self._lost_among(silent)
                if lost:
                    self._give_up(self._message(lost, now - min(changed_at[r] for r, _ in lost)))

    def _lost_among(self, silent: list[int]) -> list[tuple[int, str]]:
        """(rank, its description) of the silent ranks that did not say goodbye."""
        lost = []
        try:
            with self._lock:
                for r in silent:
                    if not self._store.check([self._key("left", r)]):
                        lost.append((r, self._store.get(self._key("info", r)).decode()))
        except Exception:  # the store went away meanwhile: the next tick reports that
            return []
        return lost

    def _message(self, lost: list[tuple[int, str]], silent_s: float) -> str:
        shown = "; ".join(f"rank {r} ({info})" for r, info in lost[:8])
        more = f"; and {len(lost) - 8} more rank(s)" if len(lost) > 8 else ""
        return (
            f"lost {len(lost)} peer rank(s), no heartbeat for {silent_s:.0f} s "
            f"(parallel.peer_timeout_minutes={self.timeout_s / 60:g}): {shown}{more}; rank {self.rank} exits "
            "(rerun the same command to resume from the newest complete checkpoint)"
        )

    def _give_up(self, message: str) -> None:
        log.error(message)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        sys.stderr.flush()
        # The main thread may be blocked in a collective that never returns: end the process from here.
        os._exit(EXIT_PEER_LOST)


def start_peer_watch(rank: int, world_size: int, timeout_s: float) -> Optional[PeerWatch]:
    """A PeerWatch on the launcher's store (MASTER_ADDR, MASTER_PORT), or None for one rank or no store."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if world_size <= 1 or not host or not port:
        return None
    return PeerWatch(host, int(port), rank, world_size, timeout_s)
