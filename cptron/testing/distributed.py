"""Run a function on N forked ranks with torch.distributed initialized; the test harness.

Distributed tests and benchmarks call ``run_distributed(fn, world_size, ...)``. The
parent forks one worker per rank *after* torch (and whatever else the test
imported) is loaded, so a 2-8 rank test costs well under a second of overhead
instead of one fresh interpreter per rank. Because the workers are forked,
``fn`` can be a closure or a lambda: nothing about it is pickled, only its
return value is.

Each worker:
  * limits torch to one intra-op thread. This is not only about the 2-core
    machines: the OpenMP pool the parent used before forking does not exist in
    the child, and the first multi-threaded op there waits on it forever. Code
    under test must not raise the thread count again.
  * joins a process group whose rendezvous store the parent serves on a port
    the OS picked (port 0), so there is no window in which another process can
    take a port we chose but have not bound yet.
  * sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT for code that reads them, and pins gloo to the loopback device.
  * runs ``fn(rank, world_size, *args, **kwargs)``, sends the result (or its
    formatted traceback) to the parent, destroys the process group and leaves
    with ``os._exit`` so no atexit handler or finalizer inherited from the
    parent (pytest's included) runs twice.

The parent waits for every rank. A failing rank, a rank that dies without
reporting, or a rank still running at the timeout fails the call with a
``DistributedTestError`` that names the ranks, their tracebacks, exit codes and,
for ranks that had to be killed, the Python stacks they were stuck in. No worker
(or anything a worker started in its process group) outlives the call.

Ranks start from the parent's RNG state, so every rank sees the same random
numbers unless the test seeds per rank.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# torch.cuda.is_available() otherwise initializes the CUDA driver in this (the
# parent) process, after which no forked rank can use CUDA. With this set it
# asks NVML instead. Tests that skip on is_available() then still fork cleanly.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cptron._torch_compat import preimport_torch_dynamo  # noqa: E402
from cptron.distributed import die_with_parent  # noqa: E402

# DTensor, and with it TP, FSDP2 and DCP, imports torch._dynamo lazily on its
# first op: some 300 modules, about 2 s per rank on 2 cores when every forked
# rank does it again. Imported once here, before forking, every rank shares it.
# Modules a test itself imports lazily inside fn are repeated per rank the same
# way; import them at the top of the test module instead.
preimport_torch_dynamo()

__all__ = ["DistributedTestError", "run_distributed"]

# After one rank has failed, the others usually fail soon too (their peer's
# sockets close) or are blocked in a collective that will never complete. Give
# them this long to report their own errors, then kill them rather than waiting
# for the full timeout.
FAILURE_GRACE_S = 3.0

# How long the parent waits for a hung rank to write its stack dump before
# killing it.
STACK_DUMP_WAIT_S = 1.0

MASTER_ADDR = "127.0.0.1"

_STACK_DUMP_SIGNAL = signal.SIGUSR1


class DistributedTestError(AssertionError):
    """One or more ranks failed, died or hung; the message has each rank's story.

    An AssertionError so pytest reports a failed test, not an error in the harness.
    Attributes: ``errors`` maps rank -> formatted traceback of ranks that raised;
    ``missing`` lists ranks that never reported a result; ``exitcodes`` maps
    every rank to its exit code (negative: killed by that signal);
    ``timed_out`` says whether the timeout expired.
    """

    def __init__(
        self,
        message: str,
        errors: dict[int, str],
        missing: list[int],
        exitcodes: dict[int, int | None],
        timed_out: bool,
    ):
        super().__init__(message)
        self.errors = errors
        self.missing = missing
        self.exitcodes = exitcodes
        self.timed_out = timed_out


@dataclass
class _Worker:
    rank: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    stack_path: str
    # ("ok", value, when) or ("error", traceback text, when); `when` is the
    # rank's time.monotonic(), one clock for all processes on Linux, so errors
    # can be listed in the order they happened, the first usually the cause.
    message: tuple[str, Any, float] | None = None
    conn_closed: bool = False
    killed: bool = False
    stack_dump: str = ""


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 120.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` forked ranks.

    Returns the per-rank return values in rank order. Raises
    ``DistributedTestError`` if any rank raises, dies, or has not finished
    ``timeout`` seconds after the call started. The process group's own
    collective timeout is set to ``timeout`` as well.
    """
    _check_arguments(world_size, backend, timeout)
    deadline = time.monotonic() + timeout
    context = multiprocessing.get_context("fork")
    scratch = tempfile.mkdtemp(prefix="cptron-dist-")
    workers: list[_Worker] = []
    store = None
    try:
        # Anything buffered now would be written again by every child; garbage collected now is
        # finalized here, in the parent, where its threads still exist.
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():
            # Python 3.12+ warns that forking a multi-threaded process may
            # deadlock the child. The parent's other threads are normally
            # torch's idle OpenMP workers, which a rank never waits on since it
            # runs one intra-op thread (see _worker_main). A test that starts
            # threads of its own and forks while they hold a lock can still
            # hang a rank; the timeout then names it, with its stack.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*fork.*")
            for rank in range(world_size):
                parent_conn, child_conn = context.Pipe(duplex=True)
                stack_path = os.path.join(scratch, f"stack-rank{rank}.txt")
                inherited = [w.conn for w in workers]
                process = context.Process(
                    target=_worker_main,
                    name=f"cptron-rank{rank}",
                    args=(
                        rank,
                        world_size,
                        backend,
                        timeout,
                        child_conn,
                        inherited,
                        stack_path,
                        os.getpid(),
                        fn,
                        args,
                        kwargs,
                    ),
                )
                process.start()
                child_conn.close()
                _own_process_group(process.pid)
                workers.append(_Worker(rank, process, parent_conn, stack_path))

        # Served by the parent, on a port the OS assigned when binding, so no
        # other process can race us to it. Created after the fork so no child
        # inherits the store's server thread.
        store = dist.TCPStore(
            MASTER_ADDR,
            0,
            None,
            True,
            timeout=datetime.timedelta(seconds=timeout),
            wait_for_workers=False,
        )
        for worker in workers:
            try:
                worker.conn.send(store.port)
            except OSError:
                pass  # the worker already died; the wait below reports it

        timed_out = _wait_for_workers(workers, deadline)
        failure = _describe_failure(workers, world_size, backend, timeout, timed_out)
        if failure is not None:
            raise failure
        return [worker.message[1] for worker in workers]
    finally:
        for worker in workers:
            if worker.process.exitcode is None:
                _kill(worker)
            worker.process.join()
            worker.conn.close()
        del store
        shutil.rmtree(scratch, ignore_errors=True)


def _check_arguments(world_size: int, backend: str, timeout: float) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if "fork" not in multiprocessing.get_all_start_methods():
        raise RuntimeError("run_distributed needs the 'fork' start method, which this platform lacks")
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            "run_distributed was called from a process that already has a default process "
            "group; the forked ranks would inherit a copy of it. Destroy it first."
        )
    if "nccl" in backend and torch.cuda.is_initialized():
        raise RuntimeError(
            f"backend {backend!r} needs CUDA in the forked ranks, but CUDA is already "
            "initialized in the parent and cannot be used after fork. Keep CUDA calls out "
            "of the test process (module level, fixtures) and inside fn."
        )


def _own_process_group(pid: int) -> None:
    """Put a worker in its own process group so killing it also kills what it started.

    Both parent and child call setpgid, so the group exists whichever runs first.
    """
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child already did it, or has already exited


def _worker_main(
    rank: int,
    world_size: int,
    backend: str,
    timeout: float,
    conn: multiprocessing.connection.Connection,
    inherited: list[multiprocessing.connection.Connection],
    stack_path: str,
    parent_pid: int,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> None:
    exit_code = 1
    reported = False
    # What the parent left for its garbage collector (e.g. a Trainer a test let fail, with process
    # groups whose finalizers join threads that do not exist here) is never finalized in a rank:
    # collecting it here hangs the rank in a futex wait.
    gc.freeze()
    try:
        _own_process_group(0)
        _die_with_parent(parent_pid)
        for other in inherited:  # earlier ranks' parent ends; not ours to hold
            other.close()
        torch.set_num_threads(1)
        # Where this rank is stuck (on the parent's signal) or where it crashed
        # (on a fatal signal) goes to a file the parent quotes in its error.
        stack_file = open(stack_path, "w")
        faulthandler.register(_STACK_DUMP_SIGNAL, file=stack_file, all_threads=True)
        faulthandler.enable(file=stack_file, all_threads=True)

        port = conn.recv()
        _set_environment(rank, world_size, port)
        if "nccl" in backend:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        pg_timeout = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore(MASTER_ADDR, port, world_size, False, timeout=pg_timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=pg_timeout)
        try:
            result = fn(rank, world_size, *args, **kwargs)
            # Plain pickle, not the ForkingPickler behind Connection.send: torch
            # registers reducers there that pass tensors through shared memory,
            # which would vanish when this process exits.
            try:
                payload = pickle.dumps(("ok", result, time.monotonic()))
            except Exception as error:
                raise TypeError(
                    f"rank {rank} returned a {type(result).__name__} that cannot be pickled back to the parent"
                ) from error
            exit_code = 0
        except BaseException:  # SystemExit and KeyboardInterrupt fail this rank too
            payload = pickle.dumps(("error", traceback.format_exc(), time.monotonic()))
        # Report before tearing down, so the parent learns of a failure even if
        # the teardown blocks on peers that are still busy.
        conn.send_bytes(payload)
        reported = True
        dist.destroy_process_group()
    except BaseException:
        exit_code = 1
        text = traceback.format_exc()
        try:
            if reported:  # the parent has a result; the exit code will flag this
                sys.stderr.write(f"rank {rank} failed after reporting its result:\n{text}")
            else:
                conn.send_bytes(pickle.dumps(("error", text, time.monotonic())))
        except BaseException:
            pass  # the parent is gone or the pipe broke; the exit code still tells
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(exit_code)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this worker if the test process dies, so none is orphaned."""
    if not die_with_parent(signal.SIGKILL, parent_pid):  # the parent died before prctl took effect
        os._exit(1)


def _set_environment(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=MASTER_ADDR,
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    # Gloo otherwise binds to whatever the hostname resolves to, which on some
    # hosts is an address other ranks cannot reach. All ranks are local here.
    loopback = _loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("TP_SOCKET_IFNAME", loopback)


def _loopback_interface() -> str | None:
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    for candidate in ("lo", "lo0"):
        if candidate in names:
            return candidate
    return None


def _wait_for_workers(workers: list[_Worker], deadline: float) -> bool:
    """Collect every rank's message and exit; return True if the deadline passed first."""
    first_failure_at: float | None = None
    while True:
        for worker in workers:
            if worker.message is None and not worker.conn_closed and worker.conn.poll():
                _receive(worker)
                if worker.message is not None and worker.message[0] == "error" and first_failure_at is None:
                    first_failure_at = time.monotonic()
            if worker.message is None and worker.conn_closed and first_failure_at is None:
                first_failure_at = time.monotonic()  # died without reporting

        alive = [w for w in workers if w.process.exitcode is None]
        if not alive:
            return False
        now = time.monotonic()
        limit = deadline
        if first_failure_at is not None:
            limit = min(limit, first_failure_at + FAILURE_GRACE_S)
        if now >= limit:
            return limit == deadline
        listening = [w.conn for w in workers if w.message is None and not w.conn_closed]
        multiprocessing.connection.wait(listening + [w.process.sentinel for w in alive], timeout=limit - now)


def _receive(worker: _Worker) -> None:
    try:
        worker.message = pickle.loads(worker.conn.recv_bytes())
    except (EOFError, OSError):
        worker.conn_closed = True
    except Exception:
        worker.message = (
            "error",
            "the parent could not unpickle this rank's result:\n" + traceback.format_exc(),
            time.monotonic(),
        )


def _kill(worker: _Worker) -> None:
    """SIGKILL the worker's whole process group (it and anything it started)."""
    pid = worker.process.pid
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    worker.killed = True


def _dump_stacks_and_kill(workers: list[_Worker]) -> None:
    """Ask each still-running rank where it is stuck, then kill it."""
    for worker in workers:
        try:
            os.kill(worker.process.pid, _STACK_DUMP_SIGNAL)
        except OSError:
            pass
    give_up = time.monotonic() + STACK_DUMP_WAIT_S
    pending = list(workers)
    while pending and time.monotonic() < give_up:
        time.sleep(0.02)
        pending = [w for w in pending if not _read_stack(w) and w.process.exitcode is None]
    time.sleep(0.05)  # let a dump that has started finish
    for worker in workers:
        _read_stack(worker)
        if worker.process.exitcode is None:
            _kill(worker)
        worker.process.join()


def _read_stack(worker: _Worker) -> str:
    try:
        with open(worker.stack_path) as handle:
            worker.stack_dump = handle.read().strip()
    except OSError:
        worker.stack_dump = ""
    return worker.stack_dump


def _describe_failure(
    workers: list[_Worker], world_size: int, backend: str, timeout: float, timed_out: bool
) -> DistributedTestError | None:
    """Kill ranks still running, then build the error naming every rank at fault."""
    survivors = [w for w in workers if w.process.exitcode is None]
    if survivors:
        _dump_stacks_and_kill(survivors)
    for worker in workers:  # a result can arrive between the last wait and the exit
        worker.process.join()
        if worker.message is None and not worker.conn_closed and worker.conn.poll():
            _receive(worker)

    exitcodes = {w.rank: w.process.exitcode for w in workers}
    errors = {
        w.rank: w.message[1]
        for w in sorted(workers, key=lambda w: w.message[2] if w.message else 0.0)
        if w.message and w.message[0] == "error"
    }
    missing = [w.rank for w in workers if w.message is None]
    bad_exit = [w.rank for w in workers if w.message and w.message[0] == "ok" and w.process.exitcode != 0]
    if not errors and not missing and not bad_exit:
        return None

    lines = [
        f"{_ranks(sorted(set(errors) | set(missing) | set(bad_exit)))} of {world_size} "
        f"failed (backend {backend}, world size {world_size})."
    ]
    for position, (rank, text) in enumerate(errors.items()):
        first = " first" if position == 0 and len(errors) > 1 else ""
        lines += [f"\n--- rank {rank} raised{first} ---", text.rstrip()]
    for rank in bad_exit:
        lines.append(f"\n--- rank {rank} returned, then exited with {_exit_text(exitcodes[rank])} ---")
    for worker in workers:
        if worker.message is not None:
            continue
        if worker.killed and timed_out:
            why = f"had not finished after the timeout of {timeout:g} s and was killed"
        elif worker.killed:
            why = f"was still running {FAILURE_GRACE_S:g} s after another rank failed and was killed"
        else:
            why = f"exited with {_exit_text(worker.process.exitcode)} without reporting a result"
        lines.append(f"\n--- rank {worker.rank} {why} ---")
        if worker.killed:
            lines.append(worker.stack_dump or "(no stack dump was written)")
        elif _read_stack(worker):  # a crash faulthandler caught, e.g. a segfault
            lines.append(worker.stack_dump)
    lines.append("\nexit codes: " + ", ".join(f"rank {rank}: {_exit_text(code)}" for rank, code in exitcodes.items()))
    return DistributedTestError("\n".join(lines), errors, missing, exitcodes, timed_out)


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"code {code}"
    return f"code {code}"
