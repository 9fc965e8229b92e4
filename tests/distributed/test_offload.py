"""CPU offload (parallel.offload=all) trains exactly like the run without it.

The parity cases reuse the layout-parity helpers (3 steps, gradient accumulation, active
clipping, packed documents; losses and every gradient within 1e-5 of one process without
offload); the resume cases reuse the resume helpers (a checkpoint saved with offload resumes
without it and the reverse, continuing the uninterrupted run within 1e-6). On these CPU-only
machines offload moves nothing, but FSDP2's offload path runs: the CPU-materialized wrap
(over a 1-rank mesh without data parallelism), the per-unit copies before each all-gather
and after each reduce-scatter, and the optimizer step on the offloaded shards.
"""

from __future__ import annotations

import pytest
import torch

from cptron.parallel.dims import ParallelConfig
from cptron.parallel.parallelize import describe_offload, materialize_device, offload_pins
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.trainer import Trainer
from tests.distributed.test_source_losses import shards  # noqa: F401 (a fixture)
from tests.distributed.test_source_losses import train as train_with_sources
from tests.distributed.test_trainer_parity import assert_matches, merge_ranks, reference, train_and_record
from tests.distributed.test_trainer_resume import STEPS as RESUME_STEPS
from tests.distributed.test_trainer_resume import train as train_resumable
from tests.distributed.test_trainer_resume import uninterrupted

LAYOUTS = [
    pytest.param(1, ParallelConfig(offload="all"), id="1proc"),
    pytest.param(2, ParallelConfig(dp_shard=2, offload="all"), id="dp_shard2"),
    pytest.param(4, ParallelConfig(dp_shard=2, tp=2, offload="all"), id="tp2_dp_shard2"),
    pytest.param(
        2,
        ParallelConfig(pp=2, dp_shard=1, offload="all", activation_checkpoint="full", fsdp_reshard_after_forward=False),
        id="pp2_ac_full",
    ),
]


@pytest.mark.parametrize("world_size,parallel", LAYOUTS)
def test_offload_matches_the_run_without(world_size, parallel, tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    results = run_distributed(train_and_record, world_size, str(tmp_path), parallel, timeout=300)
    for r in results[1:]:
        assert r[0] == results[0][0]
    assert_matches(merge_ranks(results), ref)


def test_offload_wraps_every_unit_with_the_cpu_offload_policy(tmp_path):
    def check(rank, world_size, run_dir):
        trainer = Trainer(
            make_train_config(run_dir, ParallelConfig(offload="all")),
            data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}),
        )
        model = trainer.parts[0]
        units = [model, *model.layers.values()]
        flags = [p.offload_to_cpu for u in units for p in u._get_fsdp_state()._fsdp_param_group.fsdp_params]
        state = trainer.optimizers[0].state
        trainer.run()
        moments = [s["exp_avg"].to_local().device.type for s in state.values()]
        trainer.close()
        return flags, moments

    flags, moments = run_distributed(check, 1, str(tmp_path))[0]
    assert flags and all(flags), "every FSDP2 parameter must carry the CPU offload policy"
    assert moments and set(moments) == {"cpu"}


def test_offload_log_and_placement_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on = ParallelConfig(offload="all")
    assert materialize_device(on, cuda) == cpu and materialize_device(ParallelConfig(), cuda) == cuda
    assert offload_pins(on, "cuda") and not offload_pins(on, "cpu")
    assert not offload_pins(ParallelConfig(offload="all", offload_pin_memory=False), "cuda")
    assert "pinned CPU memory" in describe_offload(on, cuda)
    assert "not pinned: pinning needs an accelerator" in describe_offload(on, cpu)
    assert describe_offload(ParallelConfig(), cuda).startswith("offload=none")


def test_offload_reports_the_same_source_losses(shards, tmp_path):  # noqa: F811
    ref_losses, ref_sources = run_distributed(train_with_sources, 1, str(tmp_path / "ref"), ParallelConfig(), shards)[0]
    got = run_distributed(
        train_with_sources, 2, str(tmp_path / "off"), ParallelConfig(dp_shard=2, offload="all"), shards
    )
    losses, sources = got[0]
    for step, value in ref_losses.items():
        assert abs(losses[step] - value) <= 1e-5
        assert set(sources[step]) == set(ref_sources[step]) == {"old", "new"}
        for name, v in sources[step].items():
            assert abs(v - ref_sources[step][name]) <= 1e-5, (step, name)


RESUME = [
    pytest.param(2, ParallelConfig(dp_shard=2, offload="all"), 1, ParallelConfig(), id="offload_to_none"),
    pytest.param(1, ParallelConfig(), 2, ParallelConfig(dp_shard=2, offload="all"), id="none_to_offload"),
]


@pytest.mark.parametrize("save_world,save_layout,load_world,load_layout", RESUME)
def test_resume_across_offload(save_world, save_layout, load_world, load_layout, tmp_path, tmp_path_factory):
    ref = uninterrupted(tmp_path_factory)
    first = run_distributed(train_resumable, save_world, str(tmp_path), save_layout, 5, timeout=300)[0]
    assert first[2] == 5
    losses, resumed_from, last = run_distributed(train_resumable, load_world, str(tmp_path), load_layout)[0]
    assert resumed_from.endswith("step-00000003") and last == RESUME_STEPS
    assert sorted(losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert abs(losses[step] - ref[step]) <= 1e-6, (step, losses[step], ref[step])
