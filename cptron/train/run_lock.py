"""One run at a time per run directory: the lock file `<run_dir>/run.lock`.

Owns creating, refreshing, judging and releasing that file. It works on the shared file systems
of clusters (NFS, Lustre, GPFS) because it needs no fcntl/flock, which those implement partially
or not at all: the file is created with O_CREAT|O_EXCL (atomic on all of them) by global rank 0
and names its holder (host, pid, start time). A daemon thread rewrites it every `REFRESH_S`
seconds with a fresh `refreshed` time, by rename, so readers never see a partial file.

A lock is live when its holder runs on this machine and its process is alive, or, for a holder on
another machine (whose pid means nothing here), when it was refreshed within `STALE_AFTER_S`.
A second run finding a live lock refuses at start-up, before it touches metrics or checkpoints;
a stale one (a killed run, a crashed node) is taken over with a warning naming the old holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Optional

from cptron.distributed import get_rank, run_on_rank0
from cptron.errors import CptronError

log = logging.getLogger("cptron.train")

LOCK_NAME = "run.lock"
REFRESH_S = 30.0
"""How often the holder rewrites the lock's `refreshed` time."""
STALE_AFTER_S = 300.0
"""A lock of another machine not refreshed for this long is stale (ten missed refreshes: a busy
host or a slow file system must not lose its lock)."""

# token -> lock path of the locks this process holds, so that a lock naming this very pid is
# told apart from one left behind by an earlier holder in this process.
_HELD: dict[str, str] = {}


class RunDirLock:
    """The lock of one run directory; `acquire` is collective, `release` is local and idempotent.

    Only rank 0 touches the file; every rank learns rank 0's verdict, so a refused start raises
    the same one-line error on every rank. A lock object that is garbage collected, or still held
    at interpreter exit, is released then."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False
        self._finalizer: Optional[weakref.finalize] = None

    def acquire(self) -> None:
        """Collective: take the lock, or raise CptronError naming its live holder on every rank.
        Does nothing while this object holds it."""
        if self.held:
            return
        token, started = uuid.uuid4().hex, time.time()
        run_on_rank0(lambda: self._take(token, started), f"locking run_dir {self.run_dir}")
        self.held = True
        if get_rank() != 0:
            return
        stop = threading.Event()
        thread = threading.Thread(
            target=_refresh_loop, args=(self.path, token, started, stop), name="run-dir-lock", daemon=True
        )
        thread.start()
        _HELD[token] = str(self.path)
        self._finalizer = weakref.finalize(self, _release, self.path, token, stop, thread)

    def release(self) -> None:
        """Remove the lock file if it is still this run's, and stop refreshing it (local)."""
        self.held = False
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def _take(self, token: str, started: float) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # another run may be creating or taking over the file meanwhile
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                if holder is None:
                    continue  # released between our create and our read
                why = _stale_reason(holder, self.path)
                if why is None:
                    raise CptronError(self._in_use(holder)) from None
                if self._take_over(holder, token):
                    log.warning(
                        "run_dir %s: taking over the lock of an earlier run (%s): %s",
                        self.run_dir,
                        describe_holder(holder),
                        why,
                    )
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(_record(token, started)))
                fh.flush()
                os.fsync(fh.fileno())
            return
        raise CptronError(f"run_dir {self.run_dir}: could not take {self.path}: other runs keep creating it")

    def _take_over(self, holder: dict, token: str) -> bool:
        """Move a stale lock aside; put it back if another run replaced it since we judged it."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _read(aside)
        if moved is not None and moved.get("token") != holder.get("token"):
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            raise CptronError(self._in_use(moved))
        aside.unlink(missing_ok=True)
        return True

    def _in_use(self, holder: dict) -> str:
        return (
            f"run_dir {self.run_dir} is in use by another run ({describe_holder(holder)}; {self.path} "
            f"refreshed {max(0.0, time.time() - float(holder.get('refreshed', 0))):.0f} s ago): wait for it to "
            f"end or use another run_dir; if no run uses it, delete {self.path}"
        )


def describe_holder(holder: dict) -> str:
    """'host H, pid P, since <UTC time>' of a lock record."""
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder["started"])))
    except (KeyError, TypeError, ValueError, OverflowError):
        since = "an unknown time"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}"


def _machine() -> dict:
    """What tells this machine and pid namespace apart: a pid is only meaningful within one."""
    ident = {"host": socket.gethostname(), "boot_id": None, "pid_ns": None}
    try:
        ident["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ident["pid_ns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return ident


def _process_start(pid: int) -> Optional[str]:
    """The start time of `pid` in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited


def _record(token: str, started: float) -> dict:
    return {
        **_machine(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "started": started,
        "refreshed": time.time(),
        "token": token,
    }


def _read(path: Path) -> Optional[dict]:
    """The lock record, None if there is no file. A file just created by O_EXCL is empty until
    its creator writes it: read again for a moment, then judge it by its modification time."""
    for _ in range(20):
        try:
            text = path.read_text()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError:
            text, mtime = "", time.time()
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                return record
        except ValueError:
            pass
        time.sleep(0.05)
    return {"host": "unknown (unreadable lock file)", "refreshed": mtime, "token": None}


def _stale_reason(holder: dict, path: Path) -> Optional[str]:
    """Why `holder`'s lock is stale, or None if it is live."""
    me = _machine()
    same_machine = all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns")) and me["boot_id"] is not None
    if same_machine and isinstance(holder.get("pid"), int):
        pid = holder["pid"]
        if pid == os.getpid():
            return None if _HELD.get(holder.get("token")) == str(path) else "left behind by this process"
        start = _process_start(pid)
        if start is None or (holder.get("process_start") not in (None, start)):
            return "its process has exited"
        return None
    try:
        age = time.time() - float(holder.get("refreshed"))
    except (TypeError, ValueError):
        age = float("inf")
    if age > STALE_AFTER_S:
        return f"its lock was last refreshed {age:.0f} s ago (stale after {STALE_AFTER_S:.0f} s)"
    return None


def _refresh_loop(path: Path, token: str, started: float, stop: threading.Event) -> None:
    warned = False
    while not stop.wait(REFRESH_S):
        try:
            current = _read(path)
            if current is None or current.get("token") != token:
                if path.parent.is_dir():
                    log.error(
                        "the lock %s of this run was %s: another run may now write to this run_dir",
                        path,
                        "removed" if current is None else f"taken over by {describe_holder(current)}",
                    )
                return
            tmp = path.with_name(f"{LOCK_NAME}.{token}.tmp")
            tmp.write_text(json.dumps(_record(token, started)))
            os.replace(tmp, path)
            warned = False
        except OSError as e:
            if not warned:
                log.warning("refreshing the lock %s failed (retrying): %s", path, e)
            warned = True


def _release(path: Path, token: str, stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(timeout=10.0)
    _HELD.pop(token, None)
    current = _read(path)
    if current is not None and current.get("token") == token:
        path.unlink(missing_ok=True)
