"""The forgetting and learning report of a real run (mixture loader, one old and one new source): every
eval row's changes and the end-of-run report.md equal what this test computes from metrics.jsonl on its
own, the per-source accounting equals the samples a fresh loader draws, a resumed run (also one whose
first part ran on two ranks) reports what the uninterrupted one does, and without a step-0 evaluation
no change is invented."""
from __future__ import annotations

import json
import logging
import math
import os
import re

import numpy as np
import pytest

from cptron.data.build import build_data_loaders
from cptron.data.config import DataConfig, ReplayConfig, SourceConfig
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import VOCAB, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.metrics import MetricsConfig
from cptron.train.trainer import Trainer

STEPS, SEQ, BATCH = 6, 16, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sources"))
    rng = np.random.default_rng(5)
    for name, (lo, hi) in {"en": (3, 60), "de": (200, VOCAB)}.items():  # different token ranges: different losses
        with IndexedDatasetWriter(os.path.join(root, name, "part"), vocab_size=VOCAB) as w:
            for _ in range(120):
                w.add_document(rng.integers(lo, hi, int(rng.integers(5, 40))))
    return {n: os.path.join(root, n) for n in ("en", "de")}


def data_config(paths) -> DataConfig:
    cfg = DataConfig(sources={"en": SourceConfig(paths=[paths["en"]]), "de": SourceConfig(paths=[paths["de"]])},
                     replay=ReplayConfig(fraction=0.25, sources=["en"]))
    cfg.validation.held_out_fraction = 0.1
    return cfg


def train(rank, world_size, run_dir, paths, stop_at=None, eval_at_start=True):
    cfg = make_train_config(run_dir, ParallelConfig(dp_shard=world_size), steps=STEPS, eval_every=2,
                            eval_at_start=eval_at_start)
    cfg.data = data_config(paths)
    cfg.checkpoint = CheckpointConfig(interval=3, keep_last=0, save_final=False, resume=True)
    cfg.metrics = MetricsConfig(log_every=1, jsonl=True, progress_bar="off")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("cptron").addHandler(handler)
    logging.getLogger("cptron").setLevel(logging.INFO)
    result = Trainer(cfg).run(stop_at=stop_at)
    return result.last_step, messages


def eval_rows(run_dir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    return {r["step"]: {k: v for k, v in r.items() if k != "time"} for r in rows if r["kind"] == "eval"}


def report_tables(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(validation sets, sources) of report.md: first column -> the other cells of each table row."""
    sets, sources = {}, {}
    table = sets
    for line in text.splitlines():
        if line.startswith("## Data drawn"):
            table = sources
        if line.startswith("| ") and not line.startswith(("| set ", "| source ")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[cells[0]] = cells[1:]
    return sets, sources


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    last, messages = run_distributed(train, 1, run_dir, shards)[0]
    assert last == STEPS
    return run_dir, messages


def test_eval_rows_and_report_equal_what_metrics_jsonl_gives(uninterrupted, shards):
    run_dir, messages = uninterrupted
    rows = eval_rows(run_dir)
    assert sorted(rows) == [0, 2, 4, 6]
    base = {n: rows[0][f"val/{n}"] for n in ("en", "de")}
    for row in rows.values():
        en, de = row["val/en"], row["val/de"]
        assert row["forgetting/en"] == en - base["en"] and row["learning/de"] == base["de"] - de
        assert "learning/en" not in row and "forgetting/de" not in row, "en is replayed (old), de is new"
        assert math.isclose(row["ppl/en"], math.exp(en), rel_tol=1e-12)
        assert row["domain/old/forgetting"] == row["forgetting/en"] and row["domain/new/loss"] == de
    assert rows[6]["forgetting/en"] != 0 and rows[6]["learning/de"] != 0, "a change too small to check"

    text = open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()
    assert "forgetting" in text and "learning" in text
    table = report_tables(text)[0]
    for name, domain, change in (("en", "old", rows[6]["val/en"] - base["en"]),
                                 ("de", "new", base["de"] - rows[6]["val/de"])):
        got_domain, before, after, ppl_before, ppl_after, got_change = table[name][:6]
        assert got_domain == domain
        assert abs(float(before) - base[name]) <= 5.1e-5 and abs(float(after) - rows[6][f"val/{name}"]) <= 5.1e-5
        assert abs(float(ppl_before) - math.exp(base[name])) <= 5.1e-3
        assert abs(float(ppl_after) - math.exp(rows[6][f"val/{name}"])) <= 5.1e-3
        word, value = got_change.split()
        assert word == ("forgetting" if domain == "old" else "learning") and abs(float(value) - change) <= 5.1e-5
    assert any(m.startswith("forgetting and learning report") for m in messages), "the summary is logged too"
    assert any("validation sets: de (new), en (old)" in m for m in messages)


def test_accounting_equals_the_samples_a_fresh_loader_draws(uninterrupted, shards):
    run_dir, _ = uninterrupted
    loader, _ = build_data_loaders(data_config(shards), seq_len=SEQ, global_batch_size=BATCH, dp_rank=0, dp_size=1,
                                   vocab_size=VOCAB, seed=0, total_steps=STEPS)
    samples, tokens = {"en": 0, "de": 0}, {"en": 0, "de": 0}
    for _ in range(STEPS):
        batch = next(loader)
        for row, source in enumerate(batch.sources.tolist()):
            name = loader.source_names[source]
            samples[name] += 1
            tokens[name] += int((batch.labels[row] >= 0).sum())
    assert samples == {"en": 12, "de": 36}  # 25% replay of 6 x 8 samples
    table = report_tables(open(os.path.join(run_dir, "report.md"), encoding="utf-8").read())[1]
    for name in ("en", "de"):
        got_samples, share, got_tokens, epochs = table[name]
        assert int(got_samples.replace(",", "")) == samples[name]
        assert int(got_tokens.replace(",", "")) == tokens[name] == samples[name] * SEQ
        windows = loader.sources[loader.names.index(name)].windows_per_epoch
        assert abs(float(epochs) - samples[name] / windows) <= 5e-4
        assert share == f"{samples[name] / (STEPS * BATCH):.1%}"


def test_a_resumed_run_reports_what_the_uninterrupted_one_does(uninterrupted, shards, tmp_path):
    ref_dir, _ = uninterrupted
    last, _ = run_distributed(train, 1, str(tmp_path), shards, 4)[0]
    assert last == 4 and not (tmp_path / "report.md").exists(), "no report before the end"
    last, messages = run_distributed(train, 1, str(tmp_path), shards)[0]
    assert last == STEPS and any("resumed from" in m for m in messages)
    assert (tmp_path / "report.md").read_text() == open(os.path.join(ref_dir, "report.md")).read()
    assert eval_rows(tmp_path) == eval_rows(ref_dir)


def test_a_run_resumed_on_another_world_size_keeps_its_step0_losses(uninterrupted, shards, tmp_path):
    ref_dir, _ = uninterrupted
    run_distributed(train, 2, str(tmp_path), shards, 4)  # both ranks save the same step-0 losses
    run_distributed(train, 1, str(tmp_path), shards)
    ref, got = eval_rows(ref_dir), eval_rows(tmp_path)
    assert got[6]["forgetting/en"] == got[6]["val/en"] - got[0]["val/en"], "the two-rank run's step-0 losses"
    for step in (0, 6):  # another layout sums in another order: equal to float32 rounding
        assert set(got[step]) == set(ref[step])
        for key in set(ref[step]) - {"step", "kind"}:
            assert math.isclose(got[step][key], ref[step][key], rel_tol=1e-5, abs_tol=1e-5), (step, key)
    text = (tmp_path / "report.md").read_text()
    assert report_tables(text)[1] == report_tables(open(os.path.join(ref_dir, "report.md")).read())[1]


def test_without_a_step0_evaluation_no_change_is_invented(shards, tmp_path):
    last, messages = run_distributed(train, 1, str(tmp_path), shards, None, False)[0]
    assert last == STEPS
    rows = eval_rows(tmp_path)
    assert sorted(rows) == [2, 4, 6]
    assert not any(re.match(r"(forgetting|learning|domain/\w+/(forgetting|learning))", k) for r in rows.values()
                   for k in r)
    assert all(f"ppl/{n}" in rows[6] for n in ("en", "de"))
    text = (tmp_path / "report.md").read_text()
    assert "Change since step 0 not computed: training.eval_at_start is false" in text
    assert "forgetting n/a" in text and "learning n/a" in text
    assert any("not computed: training.eval_at_start is false" in m for m in messages)
