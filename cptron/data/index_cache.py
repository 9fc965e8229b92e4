"""Atomic, lock-guarded files of the sample-index cache: built once by one process, read by all.

Files are written under a temporary name and renamed, and the first process to
need a missing file builds it under an O_EXCL lock while the others wait and
then read it; a lock left by a dead builder on this host, or held past
LOCK_WAIT_S, is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cptron.errors import CptronError

log = logging.getLogger("cptron.data")

LOCK_WAIT_S = 900.0
"""How long a process waits for another one's index build before building itself."""


def atomic_save(path: str, arr: np.ndarray) -> None:
    # No fsync: the cache can be rebuilt, and a file that a crash left short is detected
    # (its length disagrees with its header) and rebuilt by SourceIndex.epoch.
    _atomic_write(path, "wb", lambda fh: np.save(fh, arr, allow_pickle=False))


def atomic_write_json(path: str, data: dict) -> None:
    _atomic_write(path, "w", lambda fh: json.dump(data, fh, indent=1))


def _atomic_write(path: str, mode: str, write: Callable[[Any], None]) -> None:
    """`write(file)` into a temporary name beside `path`, then rename it over `path`."""
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CacheWriteError(CptronError):
    """A cache file could not be written (a full disk, a quota, permissions): rebuilding cannot help."""


def _write_error(path: str, e: OSError) -> CacheWriteError:
    # A failed write into an open file (a full disk, a quota) names no file: this names it.
    return CacheWriteError(
        f"writing the sample-index cache file {path} failed: {e.strerror or e}; free space there "
        "or set data.cache_dir to another directory"
    )


def _lock_is_stale(lock: str) -> bool:
    """True when the lock's builder is a dead process on this host (a crash left the lock behind)."""
    try:
        with open(lock, encoding="utf-8") as fh:
            host, pid = fh.read().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False


def load_or_build(path: str, build: Callable[[], None], wait_s: float = LOCK_WAIT_S) -> None:
    """Make sure `path` exists: build it (`build` writes it atomically) unless another process is at it."""
    if os.path.exists(path):
        return
    lock = path + ".lock"
    deadline = time.monotonic() + wait_s
    while not os.path.exists(path):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock) or time.monotonic() > deadline:
                log.warning("taking over index build lock %s (its builder is gone or too slow)", lock)
                try:
                    os.remove(lock)
                except FileNotFoundError:
                    pass
            else:
                time.sleep(0.05)
            continue
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
            os.close(fd)
            if not os.path.exists(path):  # another builder may have finished between our checks
                build()
        finally:
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass


__all__ = ["CacheWriteError", "atomic_save", "atomic_write_json", "load_or_build", "LOCK_WAIT_S"]
