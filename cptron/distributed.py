"""The one home of cptron's process-group helpers; each also works without a process group.

Owns: joining the launcher's process group (`setup_distributed`), rank/world size/barrier,
rank 0's value on every rank, running a step on rank 0 alone, turning one rank's error into
the same error on every rank (so no rank is left waiting in a collective), tying a worker's life
to its launcher's (`die_with_parent`) and to its peers' (the collective timeout and cptron.peers'
heartbeats, started by `setup_distributed`), and the position of a DTensor's local shard in its global
tensor (the only use of torch's private helper for it).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from cptron import errors
from cptron.errors import ConfigError, CptronError
from cptron.peers import start_peer_watch

# The process that started this one (the launcher, for a worker), as seen when cptron was
# imported: compared after the parent-death signal is set, to catch a launcher that died first.
_STARTED_BY = (os.getpid(), os.getppid())

# The heartbeat watch of this process's group, kept alive with it (its thread ends the process when a
# peer is lost); like the process group itself, the one piece of process-wide state.
_PEER_WATCH: list = []


def is_distributed() -> bool:
    """A process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank, e.g. so that ranks act on one
    filesystem view."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_errors(fn: Callable[[], Any]) -> tuple[Any, Optional[str]]:
    """Run `fn`: (its result, None), or (None, the message of the CptronError it raised)."""
    try:
        return fn(), None
    except CptronError as e:
        return None, str(e)


def raise_on_every_rank(error: Optional[str], group=None, error_type: type[CptronError] = CptronError) -> None:
    """Collective: if any rank passes an error message, raise `error_type` with the first one
    (naming its rank when there are several ranks) on every rank."""
    if not is_distributed():
        if error is not None:
            raise error_type(error)
        return
    gathered: list[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, error, group=group)
    failed = [(r, e) for r, e in enumerate(gathered) if e is not None]
    if failed:
        rank, first = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise error_type(f"rank {rank}: {first}{more}" if len(gathered) > 1 else first)


def run_on_rank0(fn: Callable[[], Any], what: str, error_type: type[CptronError] = CptronError) -> None:
    """Collective: run `fn` on rank 0 while the others wait. Its CptronError is raised on every
    rank with the same class and message (rank 0 raises the original); any other exception
    becomes `error_type("<what> failed: ...")` everywhere, so the other ranks are released."""
    failure: Optional[tuple[str, str]] = None
    original: Optional[BaseException] = None
    if get_rank() == 0:
        try:
            fn()
        except CptronError as e:
            failure, original = (type(e).__name__, str(e)), e
        except Exception as e:
            failure = (error_type.__name__, f"{what} failed: {type(e).__name__}: {e}")
            original = error_type(failure[1])
            original.__cause__ = e
    failure = broadcast_from_rank0(failure)
    if failure is None:
        return
    if original is not None:
        raise original
    kind = getattr(errors, failure[0], None)
    raise (kind if isinstance(kind, type) and issubclass(kind, CptronError) else error_type)(failure[1])


def local_shard_region(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor, the region of the global tensor it holds); a plain tensor is
    all of itself. Raises CptronError for a DTensor whose shard is not one block (uneven
    strided placements)."""
    if not (hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")):
        return tensor, tuple(slice(0, n) for n in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    local = tensor.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CptronError(
            f"DTensor with placements {tensor.placements}: its local shard is not one block of the global tensor"
        )
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def setup_distributed(
    device_choice: str, peer_timeout_minutes: Optional[float] = None
) -> tuple[int, int, torch.device]:
    """Join the process group a launcher describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK: torchrun, the deepspeed launcher, or srun running torchrun), or start a
    one-process group. Returns (rank, world size, this rank's device). A group that exists already is
    joined as it is.

    With `peer_timeout_minutes` > 0 (parallel.peer_timeout_minutes) a multi-rank group also starts the
    heartbeat watch of cptron.peers: a rank silent for that long is named and this rank exits. The
    collectives then time out after twice that (at least one minute more), so a lost peer is named by
    its silence before a collective gives up without naming anyone."""
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device_choice == "auto" else device_choice
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda' is invalid: CUDA is not available on this machine")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            _end_with_launcher()
            if not peer_timeout_minutes:  # None or 0: torch's default timeouts, no heartbeats
                dist.init_process_group(backend)
            else:
                minutes = max(2 * peer_timeout_minutes, peer_timeout_minutes + 1)
                dist.init_process_group(backend, timeout=timedelta(minutes=minutes))
                _PEER_WATCH.append(start_peer_watch(dist.get_rank(), dist.get_world_size(), peer_timeout_minutes * 60))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def die_with_parent(sig: int, parent_pid: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits (PR_SET_PDEATHSIG; a no-op
    elsewhere). Returns False if the parent is no longer `parent_pid`: it died before the request
    took effect, so the signal will never come and the caller should exit."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
    return os.getppid() == parent_pid


def _end_with_launcher() -> None:
    """Make this worker stop when its launcher dies. torchrun puts each worker in a session of its
    own, so a SIGKILL to torchrun alone (or an OOM kill of it) otherwise leaves the workers
    training and writing checkpoints, and the next run collides with them.

    The worker gets SIGTERM instead: during `Trainer.run` with SIGTERM in checkpoint.save_on_signals
    (the default) every rank finishes its step, agrees to stop (any rank's signal stops all, so
    ranks of other nodes, whose launchers live, stop too), saves and exits 75; before the run, or
    without that setting, SIGTERM's default action ends it at once. No rank waits forever: a rank
    whose peer is gone exits once the peer's heartbeat has been silent for
    parallel.peer_timeout_minutes (cptron.peers), or fails in its next collective after the process
    group's timeout (without a peer timeout, torch's default: 10 min with NCCL, 30 with gloo), and a
    second SIGTERM more than 5 s after the first kills at once (cptron.train.stop)."""
    pid, parent = _STARTED_BY
    if pid != os.getpid():  # forked after cptron was imported: our parent is whoever forked us
        parent = os.getppid()
    if not die_with_parent(signal.SIGTERM, parent):
        raise CptronError(f"the launcher (pid {parent}) that started this worker has exited; not joining its job")
