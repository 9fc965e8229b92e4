"""The mixture loader on real data-parallel ranks: rank 0 builds the index, every rank reads its slice."""
import os

import numpy as np
import pytest

from cptron.data.build import build_data_loaders
from cptron.data.config import DataConfig, SourceConfig
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.data.sample_index import SourceIndex
from cptron.errors import CptronError
from cptron.testing.distributed import run_distributed

SEQ, GBS = 16, 8


def _write(root, name, docs, seed, vocab):
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(os.path.join(root, name, "part_00"), vocab_size=vocab) as w:
        for _ in range(docs):
            w.add_document(rng.integers(0, vocab, int(rng.integers(1, 50))))
    return os.path.join(root, name)


def _cfg(root):
    return DataConfig(sources={"web": SourceConfig(paths=[os.path.join(root, "web")], weight=0.7),
                               "med": SourceConfig(paths=[os.path.join(root, "med")], weight=0.3)})


def _run(rank, world_size, root, cache, vocab, steps):
    built = []
    original = SourceIndex._build_epoch

    def counting(self, epoch):
        built.append((self.name, epoch))
        original(self, epoch)

    SourceIndex._build_epoch = counting
    try:
        loader, _ = build_data_loaders(_cfg(root), seq_len=SEQ, global_batch_size=GBS, dp_rank=rank,
                                       dp_size=world_size, vocab_size=vocab, seed=3, cache_dir=cache)
    except CptronError as e:
        return {"error": str(e)}
    rows, tokens = [], []
    for _ in range(steps):
        tokens.append(next(loader).tokens.numpy())
        rows.append([(r.index, r.source, r.epoch, r.position) for r in loader.last_samples])
    return {"built": built, "rows": rows, "tokens": tokens, "state": loader.state_dict()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dp-shards"))
    _write(root, "web", 60, 1, 500)
    _write(root, "med", 40, 2, 500)
    return root


def test_ranks_share_one_index_build_and_together_read_the_single_process_ledger(data_root, tmp_path):
    results = run_distributed(_run, 2, data_root, str(tmp_path / "cache"), 500, 4)
    assert sorted(results[0]["built"]) == [("med", 0), ("web", 0)] and results[1]["built"] == []
    assert results[0]["state"] == results[1]["state"]
    single, _ = build_data_loaders(_cfg(data_root), seq_len=SEQ, global_batch_size=GBS, dp_rank=0, dp_size=1,
                                   vocab_size=500, seed=3, cache_dir=str(tmp_path / "cache"))
    for step in range(4):
        batch = next(single)
        expected = [(r.index, r.source, r.epoch, r.position) for r in single.last_samples]
        assert results[0]["rows"][step] + results[1]["rows"][step] == expected
        np.testing.assert_array_equal(np.concatenate([results[0]["tokens"][step], results[1]["tokens"][step]]),
                                      batch.tokens.numpy())


def test_rank_0s_vocabulary_error_reaches_every_rank(data_root, tmp_path):
    results = run_distributed(_run, 2, data_root, str(tmp_path / "cache"), 100, 1)
    for result in results:
        assert "error" in result and ">= vocab_size=100" in result["error"] and "part_00" in result["error"]
