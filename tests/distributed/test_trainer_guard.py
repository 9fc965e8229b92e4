"""The non-finite loss guard: a NaN never reaches the weights or a checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

from cptron.checkpoint import latest_complete_checkpoint, load_model, read_meta
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.trainer import NonFiniteLossError, Trainer


def nan_at(bad_steps):
    def hook(step, loss):
        return loss * float("nan") if step in bad_steps else loss
    return hook


def train(rank, world_size, run_dir, parallel, policy, bad_steps, max_skipped=10, steps=5):
    cfg = make_train_config(run_dir, parallel, steps=steps, nonfinite=policy, max_skipped_steps=max_skipped)
    cfg.checkpoint = CheckpointConfig(interval=1, keep_last=0, save_final=True, resume=True)
    trainer = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}), loss_hook=nan_at(bad_steps))
    try:
        result = trainer.run()
    except NonFiniteLossError as e:
        finite = all(torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all()
                     for part in trainer.parts for p in part.parameters())
        return {"error": str(e), "step": trainer.step, "finite": finite}
    finite = all(torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all()
                 for part in trainer.parts for p in part.parameters())
    return {"losses": result.losses, "skipped": result.skipped_steps, "finite": finite, "step": trainer.step}


def all_checkpoints_finite(root):
    for ckpt in sorted((root / "checkpoints").glob("step-*")):
        model = load_model(ckpt)
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"{ckpt.name}: {name} holds non-finite values"


@pytest.mark.parametrize("world_size,parallel", [(1, ParallelConfig()), (2, ParallelConfig(dp_shard=2))],
                         ids=["1proc", "dp_shard2"])
def test_stop_policy_keeps_last_good_checkpoint(world_size, parallel, tmp_path):
    out = run_distributed(train, world_size, str(tmp_path), parallel, "stop", {2})
    for r in out:
        assert "non-finite loss" in r["error"] and "step 2" in r["error"], r
        assert r["finite"]
    latest = latest_complete_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step-00000002", "the last good state is the one before the NaN step"
    assert read_meta(latest)["step"] == 2
    all_checkpoints_finite(tmp_path)


def test_skip_policy_skips_and_counts(tmp_path):
    ref = run_distributed(train, 1, str(tmp_path / "ref"), ParallelConfig(), "skip", set())[0]
    out = run_distributed(train, 1, str(tmp_path / "run"), ParallelConfig(), "skip", {1, 3})[0]
    assert out["skipped"] == [1, 3] and out["finite"] and out["step"] == 5
    assert math.isnan(out["losses"][1]) and math.isnan(out["losses"][3])
    assert out["losses"][0] == ref["losses"][0]
    # The skipped steps consumed their batches but changed no weight: step 2 differs from
    # the clean run (which had updated on step 1's batch), and training goes on.
    assert out["losses"][2] != ref["losses"][2] and math.isfinite(out["losses"][4])
    all_checkpoints_finite(tmp_path / "run")
    state = read_meta(latest_complete_checkpoint(tmp_path / "run" / "checkpoints"))["train_state"]
    assert state["skipped_steps"] == [1, 3]


def test_skip_policy_stops_after_the_limit(tmp_path):
    out = run_distributed(train, 1, str(tmp_path), ParallelConfig(), "skip", {0, 1, 2}, 2)[0]
    assert "3 steps skipped" in out["error"] and "max_skipped_steps=2" in out["error"]
    all_checkpoints_finite(tmp_path)
