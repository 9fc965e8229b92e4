"""Branching (checkpoint.branch_from): a branch from step k of a run continues with exactly the
weights, AdamW moments and next samples the parent would have used at step k + 1, under its own
LR schedule; each checkpoint.branch_carry switch is honoured; the parent's directory stays
byte-identical; a rerun of the branch resumes from its own checkpoint, without the source.

The parent (a WSD run) is trained once to step K with a checkpoint there; its own continuation
is recorded on a copy of its directory, so every branch reads the untouched original.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from cptron.config import config_from_dict
from cptron.data.config import DataConfig, SourceConfig
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.errors import ConfigError, CptronError
from cptron.models.llama import canonical_param_name
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import VOCAB, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.lr import LRConfig, build_lr_schedule
from cptron.train.trainer import Trainer

K = 4  # the parent's checkpoint the branches start from
PARENT_LR = dict(schedule="wsd", warmup_steps=1, decay_steps=2)  # 8 steps: stable through update 5
BRANCH_LR = dict(schedule="wsd", warmup_steps=1, decay_steps=3)  # 7 steps: decays from update 4 on
PEAK = 3e-3  # make_train_config's optim.lr


def _shards(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    for name in ("old", "new"):
        with IndexedDatasetWriter(str(root / name / "part"), vocab_size=VOCAB) as w:
            for _ in range(80):
                w.add_document(rng.integers(3, VOCAB, int(rng.integers(5, 40))))
    return {n: str(root / n) for n in ("old", "new")}


def _config(run_dir, paths, world_size=1, *, steps=8, lr=PARENT_LR, weights=(0.25, 0.75), **checkpoint):
    cfg = make_train_config(run_dir, ParallelConfig(dp_shard=world_size), steps=steps)
    cfg.data = DataConfig(sources={
        "old": SourceConfig(paths=[paths["old"]], weight=weights[0]),
        "new": SourceConfig(paths=[paths["new"]], weight=weights[1]),
    })
    cfg.lr = LRConfig(**lr)
    cfg.checkpoint = CheckpointConfig(**{"interval": K, "keep_last": 0, "save_final": False, "resume": True,
                                         **checkpoint})
    return cfg


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(rank, world_size, run_dir, paths, capture_at=None, stop_at=None, allow_change=False, **kw):
    """Run (or branch) and return what the update of 0-based index `capture_at` started from:
    weights, AdamW state and samples before the optimizer step, and its LR; plus the log."""
    cfg = _config(run_dir, paths, world_size, **kw)
    cfg.data.allow_mixture_change = allow_change
    captured, messages = {}, []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("cptron").addHandler(handler)
    logging.getLogger("cptron").setLevel(logging.INFO)
    trainer = None

    def grad_hook(index, parts):
        if index != capture_at:
            return
        names = {p: canonical_param_name(n) for part in parts for n, p in part.named_parameters()}
        captured["weights"] = {names[p]: _full(p) for p in names}
        captured["moments"] = {
            names[p]: {k: _full(v) for k, v in state.items()}
            for opt in trainer.optimizers for p, state in opt.state.items()
        }
        captured["samples"] = list(trainer.data.last_samples)
        captured["lr"] = trainer.lr

    try:
        trainer = Trainer(cfg, grad_hook=grad_hook)
        result = trainer.run(stop_at=stop_at)
        return {"captured": captured, "resumed_from": result.resumed_from, "last_step": result.last_step,
                "losses": result.losses, "log": messages, "error": None}
    except CptronError as e:
        return {"error": str(e), "log": messages}
    finally:
        logging.getLogger("cptron").removeHandler(handler)


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("branch")
    paths = _shards(root / "data")
    run = root / "parent"
    first = run_distributed(train, 1, str(run), paths, stop_at=K)[0]
    assert first["error"] is None and first["last_step"] == K
    # The parent's own next update, recorded on a copy so the original stays as the branches find it.
    shutil.copytree(run, root / "parent-continued")
    cont = run_distributed(train, 1, str(root / "parent-continued"), paths, capture_at=K, stop_at=K + 1)[0]
    assert cont["error"] is None and cont["resumed_from"].endswith(f"step-{K:08d}")
    return {"root": root, "paths": paths, "run": run, "source": str(run / "checkpoints" / f"step-{K:08d}"),
            "next": cont["captured"]}


def branch(parent, name, world_size=1, **kw):
    """Branch from the parent's step-K checkpoint into run `name`; rank 0's result (every rank's with
    several). The parent's files are hashed before and after."""
    before = tree_hashes(parent["run"])
    kw.setdefault("branch_from", parent["source"])
    out = run_distributed(train, world_size, str(parent["root"] / name), parent["paths"], **kw)
    assert tree_hashes(parent["run"]) == before, "the branch wrote to its source run"
    return out if world_size > 1 else out[0]


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], dict):
            same_tensors(a[name], b[name])
        else:
            assert torch.equal(a[name], b[name]), name


def test_a_branch_continues_exactly_where_the_parent_would_under_its_own_schedule(parent):
    got = branch(parent, "decay", lr=BRANCH_LR, steps=7, capture_at=K, stop_at=K + 1, interval=1)
    assert got["error"] is None, got["error"]
    want, have = parent["next"], got["captured"]
    assert have["samples"] == want["samples"] and len(have["samples"]) == 8
    assert {s.source for s in have["samples"]} == {"old", "new"}
    same_tensors(have["weights"], want["weights"])
    assert have["moments"] and all(set(m) == {"exp_avg", "exp_avg_sq", "step"} for m in have["moments"].values())
    same_tensors(have["moments"], want["moments"])
    # The LR is the branch's: update K is the first of its 3 decay steps; the parent's is still stable.
    assert want["lr"] == PEAK
    assert have["lr"] == pytest.approx(PEAK * (1 - 0.9 / 3))
    note = next(m for m in got["log"] if m.startswith("branched from"))
    assert note.startswith(f"branched from {parent['source']} at step {K}: weights, optimizer state, "
                           "data position, step counter carried; LR from step 4: wsd schedule"), note

    # A rerun resumes from the branch's own checkpoint, even with the source gone; a changed
    # schedule that would rewrite a step already taken is refused first, naming the field.
    hidden = parent["root"] / "parent-away"
    os.rename(parent["run"], hidden)
    try:
        refused = run_distributed(train, 1, str(parent["root"] / "decay"), parent["paths"],
                                  branch_from=parent["source"], lr={**BRANCH_LR, "decay_steps": 2}, steps=7)[0]
        assert "lr.decay_steps 3 -> 2 since checkpoint" in refused["error"], refused["error"]
        assert "the LR of step 5, already taken, would change" in refused["error"]
        again = run_distributed(train, 1, str(parent["root"] / "decay"), parent["paths"],
                                branch_from=parent["source"], lr=BRANCH_LR, steps=7)[0]
    finally:
        os.rename(hidden, parent["run"])
    assert again["error"] is None, again["error"]
    assert again["resumed_from"] == str(parent["root"] / "decay" / "checkpoints" / f"step-{K + 1:08d}")
    assert again["last_step"] == 7 and sorted(again["losses"]) == [5, 6]


REWARM = dict(schedule="cosine", warmup_steps=2)  # a re-warm: update 0 at half the peak


def _source_positions(parent) -> dict[str, int]:
    meta = json.loads((Path(parent["source"]) / "cptron.json").read_text())
    return {n: s["position"] for n, s in meta["train_state"]["data"]["sources"].items()}


@pytest.mark.parametrize("carry", [
    ("weights", "optimizer", "data"),
    ("weights", "optimizer", "step"),
    ("weights", "data", "step"),
    ("weights",),
], ids=lambda c: "+".join(c))
def test_each_carry_switch_is_honoured(parent, carry):
    at = K if "step" in carry else 0  # without the step counter the branch counts from 0
    got = branch(parent, "carry-" + "-".join(carry), lr=REWARM, steps=7, capture_at=at, stop_at=at + 1,
                 branch_carry=list(carry))
    assert got["error"] is None, got["error"]
    have, want = got["captured"], parent["next"]
    same_tensors(have["weights"], want["weights"])
    if "optimizer" in carry:
        same_tensors(have["moments"], want["moments"])
    else:
        assert have["moments"] == {}, "a fresh AdamW holds no state before its first step"
    # Each source continues from its position (data) or starts from its beginning, at the branch's step.
    start = _source_positions(parent) if "data" in carry else {"old": 0, "new": 0}
    assert all(s.epoch == 0 for s in have["samples"])
    for name in ("old", "new"):
        drawn = sorted(s.position for s in have["samples"] if s.source == name)
        assert drawn == list(range(start[name], start[name] + len(drawn))), (name, drawn)
    assert [s.index for s in have["samples"]] == [at * 8 + i for i in range(8)]
    if "data" in carry and "step" in carry:
        assert have["samples"] == want["samples"]
    assert have["lr"] == pytest.approx(PEAK * build_lr_schedule(LRConfig(**REWARM), 7).factor(at))
    assert have["lr"] != want["lr"]
    note = next(m for m in got["log"] if m.startswith("branched from"))
    left = [w for c, w in [("optimizer", "optimizer state"), ("data", "data position"), ("step", "step counter")]
            if c not in carry]
    assert f"; not carried: {', '.join(left)}; LR from step {at}: cosine schedule" in note, note


def test_a_branch_reshards_into_another_layout(parent):
    ranks = branch(parent, "dp2", world_size=2, lr=BRANCH_LR, steps=7, capture_at=K, stop_at=K + 1)
    want = parent["next"]
    assert len(ranks) == 2
    for rank, got in enumerate(ranks):
        assert got["error"] is None, got["error"]
        same_tensors(got["captured"]["weights"], want["weights"])
        same_tensors(got["captured"]["moments"], want["moments"])
        assert got["captured"]["samples"] == want["samples"][4 * rank:4 * rank + 4]


def test_a_new_mixture_carries_positions_only_when_allowed(parent):
    refused = branch(parent, "mix-refused", weights=(0.5, 0.5), stop_at=K + 1)
    assert "its data position cannot carry over: data mixture changed since the checkpoint" in refused["error"]
    assert "data.allow_mixture_change=true" in refused["error"]
    assert "or leave data out of checkpoint.branch_carry" in refused["error"]
    got = branch(parent, "mix", weights=(0.5, 0.5), allow_change=True, capture_at=K, stop_at=K + 1)
    assert got["error"] is None, got["error"]
    start, samples = _source_positions(parent), got["captured"]["samples"]
    for name in ("old", "new"):
        drawn = sorted(s.position for s in samples if s.source == name)
        assert drawn == list(range(start[name], start[name] + 4)), "half and half, each from its position"


def test_refusals_name_the_field(parent, tmp_path):
    short = branch(parent, "short", steps=K)
    assert f"training.steps=4 is invalid: expected more than the {K} steps of the branch source" in short["error"]
    before = tree_hashes(parent["run"])  # its own run_dir: refused before the lock or anything else is written
    inside = run_distributed(train, 1, str(parent["run"]), parent["paths"], branch_from=parent["source"])[0]
    assert tree_hashes(parent["run"]) == before and not (parent["run"] / "run.lock").exists()
    assert inside["error"].startswith(f"checkpoint.branch_from='{parent['source']}' is invalid: expected a "
                                      "checkpoint outside training.run_dir"), inside["error"]
    missing = branch(parent, "missing", branch_from=str(tmp_path / "nowhere"))
    assert "checkpoint.branch_from=" in missing["error"] and "complete checkpoint directory" in missing["error"]


@pytest.mark.parametrize("fields,message", [
    (dict(branch_carry=["optimizer"]), "checkpoint.branch_carry=['optimizer'] is invalid: expected distinct items"),
    (dict(branch_carry=["weights", "moments"]), "checkpoint.branch_carry=['weights', 'moments'] is invalid"),
    (dict(load_optimizer=False), "checkpoint.load_optimizer=False is invalid: expected true with "
                                 "checkpoint.branch_from while checkpoint.branch_carry has optimizer"),
    (dict(init_from="."), "checkpoint.branch_from='src' is invalid: expected None when checkpoint.init_from"),
])
def test_branch_config_validation(fields, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(CheckpointConfig, {"branch_from": "src", **fields})
    assert message in str(err.value)
    config_from_dict(CheckpointConfig, {"branch_from": "src", "load_optimizer": False,
                                        "branch_carry": ["weights", "data"]})


def _baselines(rank, world_size, root, paths, carry):
    """The step-0 held-out losses a parent records, and those its branch starts with."""
    from cptron.data.config import ValidationConfig

    def cfg_of(run, **checkpoint):
        cfg = _config(str(root / run), paths, **checkpoint)
        cfg.data.validation = ValidationConfig(held_out_fraction=0.2, num_batches=1)
        cfg.training.eval_at_start = True
        return cfg

    parent = Trainer(cfg_of("eval-parent"))
    parent.run(stop_at=K)
    child = Trainer(cfg_of(f"eval-branch-{'-'.join(carry)}", branch_from=str(root / "eval-parent" / "checkpoints"
                                                                              / f"step-{K:08d}"), branch_carry=carry))
    try:
        return parent.report.baseline, child.report.baseline, child.step
    finally:
        child.close()


@pytest.mark.parametrize("carry", [["weights", "optimizer", "data", "step"], ["weights", "optimizer", "data"]])
def test_a_branch_that_carries_the_step_keeps_the_parents_step_0_losses(parent, carry):
    base, branched, step = run_distributed(_baselines, 1, parent["root"], parent["paths"], carry)[0]
    assert base and set(base) == {"old", "new"}
    if "step" in carry:
        assert step == K and branched == base  # forgetting is measured from the parent's base
    else:
        assert step == 0 and branched is None  # the branch's own step-0 evaluation sets it


def test_data_plan_of_a_branch_starts_where_the_branch_will(parent, capsys):
    """`cptron data plan` of a branch config (no checkpoint of its own yet) plans from the source's data
    position and step per checkpoint.branch_carry, as the branch's trainer will start."""
    from cptron.cli import run_data_plan

    def plan(name, **kw):
        cfg = _config(parent["root"] / name, parent["paths"], branch_from=parent["source"], **kw)
        text = run_data_plan(cfg)
        assert not (parent["root"] / name).exists(), "data plan wrote into the branch's run directory"
        return text

    before = tree_hashes(parent["run"])
    full = plan("plan-full")
    assert f"branching from {parent['source']} at step {K}: data position, step counter carried" in full
    assert f"the branch starts at step {K}" in full and f"steps {K}..8" in full
    fresh = plan("plan-fresh", branch_carry=["weights", "optimizer"])
    assert "no data position or step counter carried; the branch starts at step 0" in fresh
    assert "steps 0..8" in fresh
    data_only = plan("plan-data", branch_carry=["weights", "data"])
    assert "data position carried; the branch starts at step 0" in data_only
    # The carried positions show in the epochs each source reaches: the same 8 steps drawn after the
    # K steps the source took reach further than from the beginning.
    def epochs(text):
        return {line.split()[0]: float(line.split("; ")[1].split()[0])
                for line in text.splitlines() if "epochs of it by the end" in line}
    assert all(epochs(data_only)[n] > epochs(fresh)[n] for n in ("old", "new")), (data_only, fresh)
    assert tree_hashes(parent["run"]) == before
