"""Two nodes on one machine, and what happens when one of them dies.

Two network namespaces joined by a veth pair stand in for two nodes with addresses of their own
(192.0.2.1 and .2, a documentation range that exists only inside them); launch/torchrun.sh runs in each
with two processes and a c10d rendezvous on the first. A tiny model trains with dp_shard=2 x tp=2 on
shards. Then the second node "dies" (its link goes down and its processes are killed, so the first
node's packets vanish as with a dead machine, rather than being answered by a reset): the first node's
ranks name the lost ranks and exit within parallel.peer_timeout_minutes, and rerunning both resumes and
finishes with the one-process run's losses. Needs root and iproute2 (CI runs as root); the namespaces
are removed whatever happens.

The heartbeat itself (cptron.peers) is also checked without namespaces, on this machine's loopback.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist

from cptron.testing.launch import (
    LAUNCH,
    last_checkpoint_step,
    quiet_env,
    reference_losses,
    train_losses,
    wait_for_step,
    write_tiny_run,
)

STEPS = 16  # the same run as tests/integration/test_launch_scripts.py, so the reference is computed once
PEER_TIMEOUT_MIN = 0.1  # 6 s


# ------------------------------------------------------------------ the heartbeat, on loopback

LEAVING_RANK = textwrap.dedent(
    """
    import sys, time
    from cptron.peers import start_peer_watch
    start_peer_watch(2, 3, timeout_s=1.5)
    print("started", flush=True)
    time.sleep(1.0)
    """  # then exits normally: the goodbye is said at exit
)


def _watched_rank(rank: int, stderr_path: str, env: dict) -> None:
    """A forked rank (no fresh interpreter to pay for) that watches its peers until it is killed or gives up."""
    from cptron.peers import start_peer_watch

    # a log file in place of the stderr that `cptron` logs to (pytest captures this process's stderr)
    logging.basicConfig(force=True, stream=open(stderr_path, "w"))  # noqa: SIM115 - open until os._exit
    os.environ.update(env)
    start_peer_watch(rank, 3, timeout_s=1.5)
    time.sleep(30)
    os._exit(0)


def test_a_silent_rank_is_named_and_a_rank_that_said_goodbye_is_not(tmp_path):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "GROUP_RANK": "0"}
    fork = multiprocessing.get_context("fork")
    # rank 0 watches for up to 30 s; rank 1 is killed; rank 2 (a real interpreter) leaves normally
    ranks = [fork.Process(target=_watched_rank, args=(r, str(tmp_path / f"rank{r}.err"), env)) for r in (0, 1)]
    for proc in ranks:
        proc.start()
    leaving = subprocess.run(
        [sys.executable, "-c", LEAVING_RANK], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    try:
        assert leaving.returncode == 0 and leaving.stdout.strip() == "started", leaving.stderr
        time.sleep(1.0)  # rank 0 has seen rank 1 beat after rank 2 left
        assert ranks[0].is_alive(), "rank 2's normal exit is not a lost rank"
        ranks[1].kill()
        killed = time.monotonic()
        ranks[0].join(timeout=30)
        waited = time.monotonic() - killed
    finally:
        for proc in ranks:
            if proc.is_alive():
                proc.kill()
            proc.join()
    err = (tmp_path / "rank0.err").read_text()
    assert ranks[0].exitcode == 1, err
    assert "lost 1 peer rank(s)" in err and "rank 1 (node 0, host" in err, err
    assert "rank 2 (" not in err, "a rank that exited normally is not lost"
    # silent for the 1.5 s timeout, counted from its last beat (up to one 0.25 s interval before the kill)
    assert 1.0 <= waited < 10, f"gave up {waited:.1f} s after the kill (timeout 1.5 s)"


# ------------------------------------------------------------------ two namespaces


@dataclass
class Node:
    netns: str
    link: str
    addr: str

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.netns, *args], check=True, capture_output=True)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def torchrun(self, node_rank: int, endpoint: str, args: list[str], log: Path) -> subprocess.Popen:
        env = quiet_env(
            NNODES="2",
            NODE_RANK=str(node_rank),
            NPROC_PER_NODE="2",
            RDZV_ENDPOINT=endpoint,
            RDZV_ID="two-node-test",
            LOCAL_ADDR=self.addr,
            GLOO_SOCKET_IFNAME=self.link,
            SHUTDOWN_TIMEOUT="60",
        )
        cmd = ["ip", "netns", "exec", self.netns, str(LAUNCH / "torchrun.sh"), *args]
        # `ip netns exec` execs the script, which execs python: the pid stays the launcher's
        return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def kill_everything(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def two_nodes():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces stand in for the two nodes (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for the network namespaces")
    tag = os.getpid() % 100000
    nodes = [Node(f"cptron{tag}n{i}", f"cpt{tag}v{i}", f"192.0.2.{i + 1}") for i in range(2)]
    made: list[str] = []
    try:
        for node in nodes:
            out = subprocess.run(["ip", "netns", "add", node.netns], capture_output=True, text=True)
            if out.returncode != 0:
                pytest.skip(f"`ip netns add` is not available here: {out.stderr.strip()}")
            made.append(node.netns)
        subprocess.run(
            ["ip", "link", "add", nodes[0].link, "type", "veth", "peer", "name", nodes[1].link],
            check=True,
            capture_output=True,
        )
        for node in nodes:
            subprocess.run(["ip", "link", "set", node.link, "netns", node.netns], check=True, capture_output=True)
            node.ip("addr", "add", f"{node.addr}/24", "dev", node.link)
            node.ip("link", "set", "lo", "up")
            node.ip("link", "set", node.link, "up")
        yield nodes
    finally:
        for node in nodes:
            if node.netns in made:
                node.kill_everything()
        time.sleep(0.2)
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", nodes[0].link], capture_output=True)  # if it never moved
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not any(name in left for name in made), f"network namespaces left behind: {left}"


def all_train_rows(run_dir: Path) -> list[tuple[int, float]]:
    """Every (step, loss) row of metrics.jsonl, a step logged again after a resume included."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_survive_a_dead_node(two_nodes, tmp_path, tmp_path_factory):
    want = reference_losses(tmp_path_factory, steps=STEPS)
    config = write_tiny_run(tmp_path, steps=STEPS, checkpoint={"interval": 2})
    run_dir = tmp_path / "run"
    a, b = two_nodes
    endpoint = f"{a.addr}:29400"
    args = [
        str(config),
        "--training.run_dir",
        str(run_dir),
        "--parallel.dp_shard",
        "2",
        "--parallel.tp",
        "2",
        "--parallel.peer_timeout_minutes",
        str(PEER_TIMEOUT_MIN),
    ]
    procs = [a.torchrun(0, endpoint, args, tmp_path / "a1.log"), b.torchrun(1, endpoint, args, tmp_path / "b1.log")]
    try:
        wait_for_step(run_dir, 5, procs, timeout=240)
        # node b dies: its packets stop (link down) and its processes are gone
        b.ip("link", "set", b.link, "down")
        b.kill_everything()
        died = time.monotonic()
        status_a = procs[0].wait(timeout=120)
        waited = time.monotonic() - died
        procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log_a = (tmp_path / "a1.log").read_text()
    assert status_a not in (0, 75), log_a[-3000:]
    # Both of node b's ranks fall silent; a loaded machine may see one's heartbeat time out before the
    # other's, so a line may name one or both, but only ranks at node b's address.
    lost = [line for line in log_a.splitlines() if re.search(r"lost [12] peer rank\(s\)", line)]
    assert lost and all(b.addr in line and a.addr not in line for line in lost), log_a[-3000:]
    assert waited < PEER_TIMEOUT_MIN * 60 + 20, f"node a took {waited:.0f} s to give up"
    reached = max(train_losses(run_dir))
    assert 5 <= reached < STEPS
    resume_from = last_checkpoint_step(run_dir)
    assert resume_from is not None and resume_from >= 4

    b.ip("link", "set", b.link, "up")
    procs = [a.torchrun(0, endpoint, args, tmp_path / "a2.log"), b.torchrun(1, endpoint, args, tmp_path / "b2.log")]
    try:
        statuses = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log_a = (tmp_path / "a2.log").read_text()
    assert statuses == [0, 0], log_a[-3000:] + (tmp_path / "b2.log").read_text()[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{resume_from:08d}'}" in log_a
    assert "world 4: pp=1 x dp_replicate=1 x dp_shard=2 x tp=2" in log_a
    rows = all_train_rows(run_dir)
    assert sorted({s for s, _ in rows}) == list(range(1, STEPS + 1))
    bad = [(s, loss, want[s]) for s, loss in rows if abs(loss - want[s]) > 1e-5]
    assert not bad, f"two nodes differ from one process: {bad}"
