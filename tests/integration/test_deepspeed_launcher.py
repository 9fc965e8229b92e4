"""`cptron train` under the deepspeed launcher: the `--local_rank` it adds is accepted, and two processes
started by `deepspeed` (through launch/deepspeed.sh, with a --deepspeed_config carrying the batch sizes)
train like one. The real run needs the deepspeed package (`pip install -e .[dev]` brings it; DS_BUILD_OPS=0,
no op is built or JIT-compiled)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess

import pytest

from cptron.cli import _take_local_rank, main
from cptron.testing.launch import LAUNCH, assert_losses_match, quiet_env, reference_losses, train_losses, write_tiny_run

STEPS = 16  # the same run as tests/integration/test_launch_scripts.py, so the reference is computed once


@pytest.mark.parametrize(
    "argv",
    [
        ["--local_rank=1", "train", "c.yaml"],
        ["--local_rank", "1", "train", "c.yaml"],
        ["--local-rank=1", "train", "c.yaml"],
        ["train", "c.yaml", "--local_rank=1"],
    ],
)
def test_local_rank_is_taken_out_and_becomes_local_rank(argv, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _take_local_rank(argv) == ["train", "c.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"


def test_local_rank_agreeing_with_the_launchers_environment_is_accepted(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert main(["--local_rank=3", "--version"]) == 0
    assert "cptron" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--local_rank=x", "train"], None, "--local_rank='x' is invalid: expected a rank >= 0"),
        (["train", "--local_rank"], None, "--local_rank='' is invalid"),
        (["--local_rank=2", "train"], "0", "expected the launcher's LOCAL_RANK=0"),
    ],
)
def test_a_bad_local_rank_is_one_line_and_exit_2(argv, env, message, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", env)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e .[dev] installs it)",
)
def test_two_processes_through_the_deepspeed_launcher_match_one(tmp_path, tmp_path_factory):
    want = reference_losses(tmp_path_factory, steps=STEPS)
    config = write_tiny_run(tmp_path, steps=STEPS)
    # The job's DeepSpeed config carries the batch sizes: 8 = 2 per rank x 2 accumulated x 2 ranks.
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}))
    env = quiet_env(GPUS_PER_NODE="2", MASTER_PORT=str(free_port()), DS_BUILD_OPS="0")
    out = subprocess.run(
        [
            str(LAUNCH / "deepspeed.sh"),
            str(config),
            "--training.run_dir",
            str(tmp_path / "run"),
            "--parallel.dp_shard",
            "2",
            "--deepspeed",
            "--deepspeed_config",
            str(ds),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "--local_rank=1" in log, "the launcher passed --local_rank, and cptron took it"
    assert "world 2: pp=1 x dp_replicate=1 x dp_shard=2 x tp=1" in log
    assert "gradient_accumulation_steps=2 -> nothing" in log, "the ds config's batch identity held with 2 ranks"
    assert "Building extension" not in log and "JIT" not in log, "no deepspeed op may be compiled"
    assert_losses_match(train_losses(tmp_path / "run"), want)
