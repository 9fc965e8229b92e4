"""Overhead of cptron's forked test harness against fresh interpreters per rank.

cptron path:  run_distributed(barrier, N): fork N ranks from this process (torch
              already imported), init gloo, barrier, tear down, collect results.
baseline:     N fresh `python -c "import torch, torch.distributed ..."` processes
              started with subprocess, each init gloo over tcp://, barrier, exit;
              what a torchrun- or spawn-based test pays per test.

Both run the same world sizes on the same machine, with one intra-op thread per
rank and gloo on the loopback device. Prints median wall times and the ratio
(baseline / harness) last.

    python benchmarks/harness_overhead.py [--world-sizes 2 4 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import torch.distributed as dist

from cptron.testing.distributed import run_distributed

_FRESH_RANK = """
import sys
import torch, torch.distributed as dist
rank, world_size, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
dist.barrier()
dist.destroy_process_group()
"""


def _barrier(rank: int, world_size: int) -> int:
    dist.barrier()
    return rank


def time_harness(world_size: int) -> float:
    start = time.perf_counter()
    assert run_distributed(_barrier, world_size) == list(range(world_size))
    return time.perf_counter() - start


def _free_port() -> int:
    # The port may be taken between close and rank 0 binding it; the baseline
    # retries then, which is what torchrun-based setups have to do too.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_fresh_interpreters(world_size: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for _ in range(3):
        port = _free_port()
        start = time.perf_counter()
        ranks = [
            subprocess.Popen([sys.executable, "-c", _FRESH_RANK, str(rank), str(world_size), str(port)],
                             env=env, stderr=subprocess.PIPE)
            for rank in range(world_size)
        ]
        codes = [rank.wait(timeout=300) for rank in ranks]
        elapsed = time.perf_counter() - start
        if all(code == 0 for code in codes):
            return elapsed
    errors = b"".join(rank.stderr.read() for rank in ranks).decode(errors="replace")
    raise RuntimeError(f"fresh-interpreter baseline failed at world size {world_size}:\n{errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell; the median is shown")
    options = parser.parse_args()

    time_harness(2)  # first fork pays for page-table copies of a freshly loaded torch
    rows = []
    for world_size in options.world_sizes:
        harness = statistics.median(time_harness(world_size) for _ in range(options.repeats))
        fresh = statistics.median(time_fresh_interpreters(world_size) for _ in range(options.repeats))
        rows.append((world_size, harness, fresh))

    print(f"{'ranks':>5}  {'run_distributed (s)':>19}  {'fresh interpreters (s)':>22}  {'ratio':>6}")
    for world_size, harness, fresh in rows:
        print(f"{world_size:>5}  {harness:>19.3f}  {fresh:>22.3f}  {fresh / harness:>5.1f}x")
    ratios = ", ".join(f"{n} ranks {fresh / harness:.1f}x" for n, harness, fresh in rows)
    print(f"ratio (fresh interpreters / run_distributed, median of {options.repeats}): {ratios}")


if __name__ == "__main__":
    main()
