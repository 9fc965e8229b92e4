"""A checkpoint resumes exactly, also into a different parallel layout.

Each case trains 6 steps with a checkpoint every 3, stops the first invocation
after step 4 (as a preemption would, so step 4 is lost and must be redone), and
resumes in another layout from the step-3 checkpoint. The resumed steps' losses
must equal the uninterrupted single-process run's within 1e-6.
"""
from __future__ import annotations

import pytest

from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.trainer import Trainer

STEPS = 6


def train(rank, world_size, run_dir, parallel, stop_at=None):
    cfg = make_train_config(run_dir, parallel, steps=STEPS)
    cfg.checkpoint = CheckpointConfig(interval=3, keep_last=0, save_final=False, resume=True)
    trainer = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}))
    result = trainer.run(stop_at=stop_at)
    return result.losses, result.resumed_from, result.last_step


_REF: dict = {}


def uninterrupted(tmp_path_factory):
    if "ref" not in _REF:
        _REF["ref"] = run_distributed(train, 1, str(tmp_path_factory.mktemp("uninterrupted")), ParallelConfig())[0]
    return _REF["ref"][0]


CASES = [
    pytest.param(8, ParallelConfig(pp=2, dp_shard=2, tp=2), 1, ParallelConfig(), id="pp2xdp2xtp2_to_1",
                 marks=pytest.mark.slow),
    pytest.param(4, ParallelConfig(dp_shard=2, tp=2), 4, ParallelConfig(dp_shard=4), id="dp2xtp2_to_dp4"),
    pytest.param(1, ParallelConfig(), 4, ParallelConfig(pp=2, tp=2, dp_shard=1), id="1_to_pp2xtp2"),
]


@pytest.mark.parametrize("save_world,save_layout,load_world,load_layout", CASES)
def test_resume_in_another_layout(save_world, save_layout, load_world, load_layout, tmp_path, tmp_path_factory):
    ref = uninterrupted(tmp_path_factory)
    first = run_distributed(train, save_world, str(tmp_path), save_layout, 5, timeout=300)[0]
    losses, resumed_from, last = first
    assert resumed_from is None and last == 5
    assert sorted(losses) == [0, 1, 2, 3, 4]

    second = run_distributed(train, load_world, str(tmp_path), load_layout, timeout=300)
    losses, resumed_from, last = second[0]
    assert resumed_from is not None and resumed_from.endswith("step-00000003"), resumed_from
    assert last == STEPS
    assert sorted(losses) == [3, 4, 5], "the resumed run redoes step 4, lost with the preempted invocation"
    for step in (3, 4, 5):
        assert abs(losses[step] - ref[step]) <= 1e-6, (step, losses[step], ref[step])
    for rank_result in second[1:]:
        assert rank_result[0] == losses


def test_resume_on_one_process_is_bit_identical(tmp_path, tmp_path_factory):
    ref = uninterrupted(tmp_path_factory)
    run_distributed(train, 1, str(tmp_path), ParallelConfig(), 4)
    losses, resumed_from, _ = run_distributed(train, 1, str(tmp_path), ParallelConfig())[0]
    assert resumed_from.endswith("step-00000003")
    assert {s: losses[s] for s in (3, 4, 5)} == {s: ref[s] for s in (3, 4, 5)}


def train_async(rank, world_size, run_dir, parallel, stop_at=None):
    cfg = make_train_config(run_dir, parallel, steps=STEPS)
    cfg.checkpoint = CheckpointConfig(interval=2, keep_last=2, async_save=True, save_final=True, resume=True)
    result = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {})).run(stop_at=stop_at)
    return result.losses, result.resumed_from


@pytest.mark.parametrize("world_size,parallel", [(1, ParallelConfig()), (2, ParallelConfig(dp_shard=2))],
                         ids=["1proc", "dp_shard2"])
def test_async_checkpoints_resume_exactly(world_size, parallel, tmp_path, tmp_path_factory):
    ref = uninterrupted(tmp_path_factory)
    run_distributed(train_async, world_size, str(tmp_path), parallel, 5)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000004"], names  # complete, nothing staged left
    losses, resumed_from = run_distributed(train_async, world_size, str(tmp_path), parallel)[0]
    assert resumed_from.endswith("step-00000004")
    for step in (4, 5):
        assert abs(losses[step] - ref[step]) <= 1e-6
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names == ["step-00000004", "step-00000006"], "keep_last=2 prunes the oldest"
