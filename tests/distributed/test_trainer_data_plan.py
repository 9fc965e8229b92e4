"""The trainer with the mixture loader: a data section that cannot feed training.steps fails at start-up
on every rank (no rank waits in a collective for one that raised), and the plan is logged."""
from __future__ import annotations

import logging
import os

import numpy as np

from cptron.data.config import DataConfig, SourceConfig
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.errors import CptronError
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import VOCAB, make_train_config
from cptron.train.trainer import Trainer


def _shards(root):
    rng = np.random.default_rng(0)
    for name in ("capped", "zero"):
        with IndexedDatasetWriter(os.path.join(root, name, "part"), vocab_size=VOCAB) as w:
            for _ in range(60):
                w.add_document(rng.integers(3, VOCAB, int(rng.integers(5, 40))))
    return {n: os.path.join(root, n) for n in ("capped", "zero")}


def build(rank, world_size, run_dir, paths, max_samples):
    cfg = make_train_config(run_dir, ParallelConfig(dp_shard=world_size), steps=20)
    cfg.data = DataConfig(sources={"capped": SourceConfig(paths=[paths["capped"]], weight=1.0,
                                                         max_samples=max_samples),
                                   "zero": SourceConfig(paths=[paths["zero"]], weight=0.0)})
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("cptron").addHandler(handler)
    logging.getLogger("cptron").setLevel(logging.INFO)
    try:
        Trainer(cfg)
        return "built", messages
    except CptronError as e:
        return str(e), messages


def test_a_mixture_that_runs_dry_fails_at_start_up_on_every_rank(tmp_path):
    paths = _shards(str(tmp_path / "data"))
    results = run_distributed(build, 2, str(tmp_path / "run"), paths, 50, timeout=120)
    for outcome, _ in results:
        assert "the mixture runs out of samples at step 6.2 of 20: capped (cap 50) reach" in outcome, outcome
    built, messages = run_distributed(build, 2, str(tmp_path / "run2"), paths, 160, timeout=120)[0]
    assert built == "built"
    plan = next(m for m in messages if m.startswith("data: 2 source(s)"))
    assert "steps 0..20 (stage 0): capped 100.0%, zero 0.0%; capped reach(es) the cap" in plan
