"""Per-source training losses (loss/<source>): each is the mean token loss of that source's rows of the
step's batch, computed from the same cross-entropy as the training loss, and every parallel layout reports
what one process does."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cptron.data.config import DataConfig, ReplayConfig, SourceConfig
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import VOCAB, make_train_config
from cptron.train.trainer import Trainer

STEPS = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sources"))
    rng = np.random.default_rng(5)
    for name, (lo, hi) in {"old": (3, 60), "new": (200, VOCAB)}.items():  # different token ranges: different losses
        with IndexedDatasetWriter(os.path.join(root, name, "part"), vocab_size=VOCAB) as w:
            for _ in range(120):
                w.add_document(rng.integers(lo, hi, int(rng.integers(5, 40))))
    return {n: os.path.join(root, n) for n in ("old", "new")}


def config(run_dir, parallel, paths):
    cfg = make_train_config(run_dir, parallel, steps=STEPS)
    cfg.data = DataConfig(sources={"old": SourceConfig(paths=[paths["old"]]), "new": SourceConfig(paths=[paths["new"]])},
                          replay=ReplayConfig(fraction=0.25, sources=["old"]))
    # Eval after every step: pipeline schedules re-run their metadata inference (which calls the loss
    # function on placeholders) after each switch between eval and training.
    cfg.data.validation.held_out_fraction = 0.1
    cfg.training.eval_every = 1
    return cfg


def train(rank, world_size, run_dir, parallel, paths):
    result = Trainer(config(run_dir, parallel, paths)).run()
    return result.losses, result.source_losses


def test_source_losses_are_the_mean_token_loss_of_each_sources_rows(shards, tmp_path):
    def check(rank, world_size, run_dir):
        trainer = Trainer(config(run_dir, ParallelConfig(), shards))
        batch = next(trainer.data)
        with torch.no_grad():
            logits = trainer.parts[0](batch.tokens, doc_ids=batch.doc_ids)[..., :VOCAB]
            per_row = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none").view(
                batch.labels.shape).sum(1)
        want = {name: float(per_row[batch.sources == i].sum() / (batch.sources == i).sum() / batch.labels.shape[1])
                for i, name in enumerate(trainer.module.sources.names)}
        total = float(trainer.module.forward_backward(batch, trainer.step))
        return want, dict(trainer.module.sources.last), total, [trainer.module.sources.names[i] for i in batch.sources]

    want, got, total, sources = run_distributed(check, 1, str(tmp_path))[0]
    assert set(got) == set(sources) == {"old", "new"} and sources.count("new") == 6  # 25% replay of 8 rows
    for name in want:
        assert abs(got[name] - want[name]) < 1e-5, (name, got[name], want[name])
    assert abs(got["old"] - got["new"]) > 1e-3, "the two sources must be told apart for the test to mean anything"
    mean = sum(got[name] for name in sources) / len(sources)  # every row holds seq_len labelled tokens
    assert abs(total - mean) < 1e-5


LAYOUTS = [
    pytest.param(2, ParallelConfig(dp_shard=2), id="dp_shard2"),
    pytest.param(2, ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True), id="tp2_sp_lossparallel"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), id="pp2_1f1b"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2),
                 id="pp2_interleaved"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="zbv_zero_bubble", pp_stages_per_rank=2),
                 id="pp2_zbv"),
    pytest.param(4, ParallelConfig(pp=2, dp_shard=2), id="pp2_dp_shard2"),
]


@pytest.mark.parametrize("world_size,parallel", LAYOUTS)
def test_every_layout_reports_the_single_process_source_losses(world_size, parallel, shards, tmp_path):
    ref_losses, ref_sources = run_distributed(train, 1, str(tmp_path / "ref"), ParallelConfig(), shards)[0]
    results = run_distributed(train, world_size, str(tmp_path / "par"), parallel, shards, timeout=300)
    for losses, sources in results:
        for step in range(STEPS):
            assert abs(losses[step] - ref_losses[step]) < 1e-5
            assert set(sources[step]) == set(ref_sources[step]) == {"old", "new"}
            for name, value in sources[step].items():
                assert abs(value - ref_sources[step][name]) < 1e-5, (step, name, value, ref_sources[step][name])
