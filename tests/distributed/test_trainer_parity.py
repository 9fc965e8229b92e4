"""Every parallel layout trains like one process: losses and gradients within 1e-5.

Each case runs 3 optimizer steps of the trainer with gradient accumulation (each
rank's share of the global batch is split into microbatches) and clipping that
is active (the clip norm is below the gradient norm), on packed documents, and
compares every step's loss and every parameter's gradient (gathered to full
tensors under their checkpoint names) with the single-process run.
"""
from __future__ import annotations

import pytest
import torch

from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config, train_recording_grads
from cptron.train.trainer import Trainer

STEPS = 3


def train_and_record(rank, world_size, run_dir, parallel: ParallelConfig):
    cfg = make_train_config(run_dir, parallel, steps=STEPS)
    _, result, grads = train_recording_grads(cfg)
    return result.losses, result.grad_norms, grads


_REFERENCE: dict = {}


def reference(tmp_path_factory):
    if "ref" not in _REFERENCE:
        _REFERENCE["ref"] = run_distributed(train_and_record, 1, str(tmp_path_factory.mktemp("ref")),
                                            ParallelConfig())[0]
    return _REFERENCE["ref"]


LAYOUTS = [
    pytest.param(2, ParallelConfig(dp_shard=2), id="dp_shard2"),
    pytest.param(2, ParallelConfig(dp_replicate=2, dp_shard=1), id="dp_replicate2"),
    pytest.param(2, ParallelConfig(tp=2, sequence_parallel=False, loss_parallel=False), id="tp2"),
    pytest.param(2, ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True), id="tp2_sp_lossparallel"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="gpipe"), id="pp2_gpipe"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), id="pp2_1f1b"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2),
                 id="pp2_interleaved_1f1b"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="looped_bfs", pp_stages_per_rank=2),
                 id="pp2_looped_bfs"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="interleaved_zero_bubble", pp_stages_per_rank=2),
                 id="pp2_interleaved_zero_bubble"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="zbv_zero_bubble", pp_stages_per_rank=2),
                 id="pp2_zbv_zero_bubble"),
    pytest.param(4, ParallelConfig(dp_shard=2, tp=2), id="dp_shard2_tp2"),
    pytest.param(4, ParallelConfig(dp_replicate=2, dp_shard=2), id="dp_replicate2_dp_shard2"),
    pytest.param(8, ParallelConfig(pp=2, dp_shard=2, tp=2), id="pp2_dp_shard2_tp2", marks=pytest.mark.slow),
]


def assert_matches(got, ref, tol=1e-5):
    losses, norms, grads = got
    ref_losses, ref_norms, ref_grads = ref
    assert sorted(losses) == list(range(STEPS))
    for step in range(STEPS):
        assert abs(losses[step] - ref_losses[step]) <= tol, (step, losses[step], ref_losses[step])
        assert abs(norms[step] - ref_norms[step]) <= tol * max(1.0, ref_norms[step]), (step, norms[step])
        assert ref_norms[step] > 0.05, "clipping must be active for the test to cover it"
        assert set(grads[step]) == set(ref_grads[step]), sorted(set(ref_grads[step]) ^ set(grads[step]))
        for name, g in grads[step].items():
            err = (g - ref_grads[step][name]).abs().max().item()
            assert err <= tol, f"step {step} {name}: max |grad diff| = {err:.2e}"


def merge_ranks(results):
    """Losses/norms from rank 0; gradients merged over ranks (pipeline stages hold disjoint parameters)."""
    losses, norms, _ = results[0]
    grads: dict[int, dict[str, torch.Tensor]] = {s: {} for s in range(STEPS)}
    for _, _, g in results:
        for step, named in g.items():
            grads[step].update(named)
    return losses, norms, grads


@pytest.mark.parametrize("world_size,parallel", LAYOUTS)
def test_layout_matches_single_process(world_size, parallel, tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    results = run_distributed(train_and_record, world_size, str(tmp_path), parallel, timeout=300)
    for r in results[1:]:  # every rank reports the same global loss
        assert r[0] == results[0][0]
    assert_matches(merge_ranks(results), ref)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_nothing(mode, tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    got = run_distributed(train_and_record, 1, str(tmp_path), ParallelConfig(activation_checkpoint=mode))[0]
    assert_matches(got, ref, tol=1e-6)


def train_unmasked(rank, world_size, run_dir, parallel):
    cfg = make_train_config(run_dir, parallel, steps=STEPS, document_masking=False)
    return Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {})).run().losses


@pytest.mark.parametrize("world_size,parallel", [(2, ParallelConfig(pp=2, dp_shard=1)),
                                                 (2, ParallelConfig(tp=2))], ids=["pp2", "tp2"])
def test_without_document_masking(world_size, parallel, tmp_path, tmp_path_factory):
    masked = reference(tmp_path_factory)[0]
    ref = run_distributed(train_unmasked, 1, str(tmp_path / "ref"), ParallelConfig())[0]
    got = run_distributed(train_unmasked, world_size, str(tmp_path / "par"), parallel)[0]
    assert abs(ref[0] - masked[0]) > 1e-4, "attention across documents must change the loss"
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5
