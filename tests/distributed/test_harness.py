"""The multi-process harness every distributed test builds on.

The worker functions are nested or lambdas on purpose in places: the harness
forks, so nothing but return values has to be picklable.
"""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from cptron.testing.distributed import DistributedTestError, run_distributed


def _live_children() -> set[int]:
    """Pids of this process's descendants that are still running (zombies excluded)."""
    live = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                live.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return live


def _is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def no_worker_survives():
    """Every test here must leave no worker (or worker's child) running."""
    before = _live_children()
    yield
    assert _live_children() - before == set()


# --- collectives at every world size -------------------------------------------------


def _collectives(rank, world_size):
    summed = torch.tensor([rank + 1.0, 10.0 * rank])
    dist.all_reduce(summed)

    gathered = [torch.zeros(2, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(gathered, torch.tensor([rank, rank * rank]))

    source = world_size - 1  # not rank 0, so a broadcast that does nothing is caught
    broadcast = torch.full((3,), float(rank))
    dist.broadcast(broadcast, src=source)

    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "summed": summed.tolist(),
        "gathered": [t.tolist() for t in gathered],
        "broadcast": broadcast.tolist(),
    }


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_all_reduce_all_gather_broadcast(world_size):
    results = run_distributed(_collectives, world_size)

    assert len(results) == world_size
    expected_sum = [world_size * (world_size + 1) / 2, 10.0 * world_size * (world_size - 1) / 2]
    expected_gather = [[r, r * r] for r in range(world_size)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank
        assert result["world_size"] == world_size
        assert result["backend"] == "gloo"
        assert result["summed"] == expected_sum
        assert result["gathered"] == expected_gather
        assert result["broadcast"] == [float(world_size - 1)] * 3


# --- results, arguments, environment -------------------------------------------------


def test_results_come_back_in_rank_order_with_args_and_environment():
    def report(rank, world_size, offset, *, scale):
        # Higher ranks finish first, so completion order is the reverse of rank order.
        time.sleep(0.05 * (world_size - 1 - rank))
        env = {k: os.environ[k] for k in
               ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        return rank * scale + offset, os.getpid(), env, torch.get_num_threads(), torch.ones(2) * rank

    results = run_distributed(report, 4, 100, scale=3)

    assert [value for value, *_ in results] == [100, 103, 106, 109]
    pids = [pid for _, pid, *_ in results]
    assert len(set(pids)) == 4 and os.getpid() not in pids
    for rank, (_, _, env, threads, tensor) in enumerate(results):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == "4"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert int(env["MASTER_PORT"]) > 0
        assert threads == 1
        assert torch.equal(tensor, torch.full((2,), float(rank)))
    assert len({env["MASTER_PORT"] for _, _, env, *_ in results}) == 1


def test_fork_is_safe_after_multithreaded_ops_in_parent():
    # Without the harness's set_num_threads(1), a forked child that runs an op
    # after the parent used its OpenMP pool hangs forever.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
        expected = (a @ a).sum().item()
        torch.randn(1_000_000).exp().sum()
    finally:
        torch.set_num_threads(threads)

    def compute(rank, world_size):
        total = torch.tensor([(a @ a).sum().item()], dtype=torch.float64)
        torch.randn(1_000_000).exp().sum()
        dist.all_reduce(total)
        return total.item()

    results = run_distributed(compute, 2, timeout=60)
    assert results == pytest.approx([2 * expected] * 2, rel=1e-5)


def test_device_mesh_with_named_dims_at_four_ranks():
    def mesh_layout(rank, world_size):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp_sum = torch.tensor([float(rank)])
        dist.all_reduce(dp_sum, group=mesh["dp"].get_group())
        tp_sum = torch.tensor([float(rank)])
        dist.all_reduce(tp_sum, group=mesh["tp"].get_group())

        full = torch.arange(16.0).reshape(4, 4)
        sharded = distribute_tensor(full, mesh, [Replicate(), Shard(0)])
        return {
            "coords": (mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()),
            "dp_sum": dp_sum.item(),
            "tp_sum": tp_sum.item(),
            "local_shard": sharded.to_local(),
            "round_trip": torch.equal(sharded.full_tensor(), full),
        }

    results = run_distributed(mesh_layout, 4)

    full = torch.arange(16.0).reshape(4, 4)
    for rank, result in enumerate(results):
        dp, tp = divmod(rank, 2)  # row-major: rank = dp * 2 + tp
        assert result["coords"] == (dp, tp)
        assert result["dp_sum"] == tp + (2 + tp)  # ranks {tp, 2 + tp}
        assert result["tp_sum"] == 2 * dp + (2 * dp + 1)  # ranks {2dp, 2dp + 1}
        assert torch.equal(result["local_shard"], full[2 * tp: 2 * tp + 2])
        assert result["round_trip"]


# --- failures ----------------------------------------------------------------------


def _raise_on_rank_one(rank, world_size):
    # Every rank's gloo connections are up before rank 1 fails: otherwise a loaded machine can let the
    # other ranks finish and close theirs while rank 1 is still connecting, and rank 1 then fails in
    # connectFullMesh ("Connection closed by peer") instead of here (seen once in CI).
    dist.barrier()
    if rank == 1:
        raise ValueError("rank one was given a bad shard")
    return rank


def test_exception_on_one_rank_fails_with_its_traceback():
    with pytest.raises(DistributedTestError) as caught:
        run_distributed(_raise_on_rank_one, 4)

    error = caught.value
    assert isinstance(error, AssertionError)
    assert set(error.errors) == {1}
    assert error.missing == [] and not error.timed_out
    assert error.exitcodes == {0: 0, 1: 1, 2: 0, 3: 0}
    message = str(error)
    assert "rank 1 of 4 failed" in message
    assert "--- rank 1 raised ---" in message
    assert "in _raise_on_rank_one" in message
    assert "ValueError: rank one was given a bad shard" in message


def test_failure_while_peers_wait_in_a_collective_ends_quickly():
    def fail_before_all_reduce(rank, world_size):
        if rank == 1:
            raise RuntimeError("rank 1 gave up before the all_reduce")
        dist.all_reduce(torch.ones(1))

    start = time.monotonic()
    with pytest.raises(DistributedTestError) as caught:
        run_distributed(fail_before_all_reduce, 4, timeout=60)
    elapsed = time.monotonic() - start

    # The peers either fail on the closed connection or are killed after the
    # grace period; neither waits for the 60 s timeout.
    assert elapsed < 20
    assert not caught.value.timed_out
    message = str(caught.value)
    assert "RuntimeError: rank 1 gave up before the all_reduce" in message
    # The cause is listed before the peers' consequential errors.
    first_traceback = message.index("--- rank ")
    assert message.startswith("--- rank 1 raised", first_traceback)


def _hang_forever(pid_file, child_pid_file):
    sleeper = subprocess.Popen(["sleep", "300"])
    child_pid_file.write_text(str(sleeper.pid))
    pid_file.write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def test_hanging_rank_is_killed_after_timeout_with_its_stack(tmp_path):
    pid_file, child_pid_file = tmp_path / "worker.pid", tmp_path / "sleeper.pid"

    def maybe_hang(rank, world_size):
        if rank == 2:
            _hang_forever(pid_file, child_pid_file)
        return rank

    start = time.monotonic()
    with pytest.raises(DistributedTestError) as caught:
        run_distributed(maybe_hang, 4, timeout=3.0)
    elapsed = time.monotonic() - start

    error = caught.value
    assert 3.0 <= elapsed < 15
    assert error.timed_out
    assert error.missing == [2]
    assert error.exitcodes[2] == -signal.SIGKILL
    message = str(error)
    assert "rank 2 had not finished after the timeout of 3 s and was killed" in message
    assert "in _hang_forever" in message  # the stack dump shows where it hung
    assert "SIGKILL" in message
    # Neither the worker nor the process it started survives.
    assert _is_gone(int(pid_file.read_text()))
    assert _is_gone(int(child_pid_file.read_text()))


@pytest.mark.parametrize(
    "die, expected_code, expected_text",
    [
        (lambda: os._exit(3), 3, "exited with code 3 without reporting a result"),
        (lambda: os.kill(os.getpid(), signal.SIGSEGV), -signal.SIGSEGV,
         "exited with code -11 (SIGSEGV) without reporting a result"),
        (lambda: os.kill(os.getpid(), signal.SIGKILL), -signal.SIGKILL,
         "exited with code -9 (SIGKILL) without reporting a result"),
    ],
    ids=["os_exit_3", "segfault", "killed"],
)
def test_rank_that_dies_without_reporting_is_named_with_exit_code(die, expected_code, expected_text):
    def maybe_die(rank, world_size):
        if rank == 1:
            die()
            time.sleep(10)  # a signal is delivered asynchronously
        return rank

    with pytest.raises(DistributedTestError) as caught:
        run_distributed(maybe_die, 2, timeout=30)

    error = caught.value
    assert error.missing == [1]
    assert error.exitcodes == {0: 0, 1: expected_code}
    assert f"rank 1 {expected_text}" in str(error)
    if expected_code == -signal.SIGSEGV:  # where it crashed, from faulthandler
        assert "Fatal Python error: Segmentation fault" in str(error)
        assert "in maybe_die" in str(error)


_ORPHAN_SCRIPT = """
import os, sys, time
from cptron.testing.distributed import run_distributed

def hang(rank, world_size, pid_dir):
    with open(os.path.join(pid_dir, str(rank)), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(300)

run_distributed(hang, 3, sys.argv[1], timeout=300)
"""


def test_workers_die_with_a_killed_test_process(tmp_path):
    # The harness's finally-block cannot run when the test process is SIGKILLed
    # (CI timeout, OOM killer); the workers must not outlive it regardless.
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TMPDIR=str(tmp_path))  # the killed harness cannot remove its scratch folder
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_SCRIPT, str(pid_dir)], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list(pid_dir.iterdir())) < 3:
            assert parent.poll() is None, "the harness process exited early"
            assert time.monotonic() < deadline, "workers never started"
            time.sleep(0.05)
        worker_pids = [int(path.read_text()) for path in pid_dir.iterdir()]
        assert not any(_is_gone(pid) for pid in worker_pids)
    finally:
        parent.kill()
        parent.wait()

    deadline = time.monotonic() + 10
    while not all(_is_gone(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_is_gone(pid) for pid in worker_pids)


def test_unpicklable_result_is_reported_by_the_rank():
    with pytest.raises(DistributedTestError) as caught:
        run_distributed(lambda rank, world_size: (lambda: rank), 2)
    assert set(caught.value.errors) == {0, 1}
    assert "returned a function that cannot be pickled" in str(caught.value)


@pytest.mark.parametrize("world_size", [0, -2, 1.5, True, "2"])
def test_world_size_must_be_a_positive_integer(world_size):
    with pytest.raises(ValueError, match="world_size must be an integer >= 1"):
        run_distributed(lambda rank, size: None, world_size)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be a positive"):
        run_distributed(lambda rank, size: None, 2, timeout=0)


@pytest.mark.gpu
def test_nccl_ranks_each_get_their_own_gpu():
    # conftest's is_available() ran in this process; it must not have
    # initialized CUDA, or no forked rank could use it.
    assert not torch.cuda.is_initialized()
    world_size = min(2, torch.cuda.device_count())

    def reduce_on_gpu(rank, world_size):
        summed = torch.full((1024,), rank + 1.0, device="cuda")
        dist.all_reduce(summed)
        return torch.cuda.current_device(), summed.cpu()

    results = run_distributed(reduce_on_gpu, world_size, backend="nccl", timeout=120)

    expected = torch.full((1024,), world_size * (world_size + 1) / 2)
    for rank, (device, summed) in enumerate(results):
        assert device == rank
        assert torch.equal(summed, expected)
