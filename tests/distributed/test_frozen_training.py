"""Partly frozen training under the trainer, in several layouts.

Frozen parameters and, with optim.train_new_rows_only, the old and padding rows of the input
embedding and the LM head stay bit-identical to the start; the rest trains; losses match the
single-process run; a stopped and resumed run equals the uninterrupted one; a resume that would
train what the checkpoint froze is refused at start-up.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.distributed.tensor import DTensor

from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import VOCAB, PackedSource, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.optim import ParamGroupConfig
from cptron.train.param_groups import VOCAB_EXTENSION_FILE
from cptron.train.trainer import Trainer

NEW = 400  # rows 400..499 of the 500-token vocabulary are new; 500..511 are padding
ROWS = ("tok_embeddings.weight", "output.weight")
NEW_ROWS_ONLY = dict(train_new_rows_only=True, new_rows_from=NEW)


def snapshot(trainer) -> dict[str, torch.Tensor]:
    out = {}
    for part in trainer.parts:
        for name, p in part.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[trainer.module.trainable.name_of(name)] = t.detach().clone()
    return out


def train(
    rank, world_size, run_dir, parallel, optim, *, tied=False, steps=3, checkpoint=None, stop_at=None, init_from=None
):
    cfg = make_train_config(run_dir, parallel, steps=steps)
    cfg.model.tie_embeddings = tied
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    if checkpoint is not None:
        cfg.checkpoint = checkpoint
    if init_from is not None:
        cfg.checkpoint.init_from = str(init_from)
    try:
        trainer = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}))
    except Exception as e:  # a refusal at start-up, which the test checks
        return str(e)
    before = snapshot(trainer)
    result = trainer.run(stop_at=stop_at)
    plan = trainer.module.trainable
    with_state = {
        plan.name_of(n)
        for part, opt in zip(trainer.parts, trainer.optimizers)
        for n, p in part.named_parameters()
        if opt.state.get(p)
    }
    return result.losses, before, snapshot(trainer), with_state


def merged(results):
    """Rank 0's losses; weights and optimizer-state names merged over ranks (pipeline stages differ)."""
    before, after, with_state = {}, {}, set()
    for _, b, a, s in results:
        before.update(b)
        after.update(a)
        with_state |= s
    return results[0][0], before, after, with_state


_REF: dict = {}


def reference(key, tmp_path_factory, **kw):
    if key not in _REF:
        _REF[key] = merged(run_distributed(train, 1, str(tmp_path_factory.mktemp(key)), ParallelConfig(), **kw))
    return _REF[key]


FROZEN = dict(
    frozen=["tok_embeddings.weight", "layers.0.*"],
    param_groups=[ParamGroupConfig(["output.weight"], lr_scale=10.0, weight_decay=0.0)],
)


@pytest.mark.parametrize(
    "world_size,parallel",
    [(1, ParallelConfig()), (2, ParallelConfig(dp_shard=2, activation_checkpoint="full"))],
    ids=["1proc", "dp_shard2_ac"],
)
def test_frozen_parameters_stay_bit_identical_without_optimizer_state(world_size, parallel, tmp_path, tmp_path_factory):
    ref_losses = reference("frozen", tmp_path_factory, optim=FROZEN)[0]
    losses, before, after, with_state = merged(run_distributed(train, world_size, str(tmp_path), parallel, FROZEN))
    frozen = {n for n in before if n == "tok_embeddings.weight" or n.startswith("layers.0.")}
    assert len(frozen) == 10
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in frozen), name
    assert with_state == set(before) - frozen, "AdamW holds state for the trainable parameters only"
    for step, loss in losses.items():
        assert abs(loss - ref_losses[step]) <= 1e-5, (step, loss, ref_losses[step])


LAYOUTS = [
    pytest.param(2, ParallelConfig(dp_shard=2), id="dp_shard2"),
    pytest.param(2, ParallelConfig(tp=2), id="tp2_sp_lossparallel"),
    pytest.param(4, ParallelConfig(dp_shard=2, tp=2), id="dp_shard2_tp2"),  # FSDP2 over the TP-sharded rows
    pytest.param(4, ParallelConfig(dp_replicate=2, dp_shard=2), id="hsdp2x2"),  # masks on replicated shards
    pytest.param(1, ParallelConfig(compile=True), id="compiled"),  # masked rows through compiled blocks
    pytest.param(
        2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2), id="pp2_interleaved"
    ),  # stages 1 and 2 hold only frozen blocks: empty optimizers
]


def assert_new_rows_only(before, after, with_state, trained=ROWS):
    for name in before:
        if name in trained:
            assert torch.equal(before[name][:NEW], after[name][:NEW]), f"{name}: old rows moved"
            assert torch.equal(before[name][VOCAB:], after[name][VOCAB:]), f"{name}: padding rows moved"
            assert (before[name][NEW:VOCAB] != after[name][NEW:VOCAB]).any(dim=1).all(), f"{name}: a new row is stuck"
        else:
            assert torch.equal(before[name], after[name]), f"{name} is frozen"
    assert with_state == set(trained)


def test_new_rows_only_in_one_process(tmp_path_factory):
    _, before, after, with_state = reference("untied", tmp_path_factory, optim=NEW_ROWS_ONLY)
    assert_new_rows_only(before, after, with_state)


def test_new_rows_only_tied(tmp_path_factory):
    _, before, after, with_state = reference("tied", tmp_path_factory, optim=NEW_ROWS_ONLY, tied=True)
    assert "output.weight" not in before
    assert_new_rows_only(before, after, with_state, trained=("tok_embeddings.weight",))


@pytest.mark.parametrize("world_size,parallel", LAYOUTS)
def test_new_rows_only_in_parallel_layouts_matches_one_process(world_size, parallel, tmp_path, tmp_path_factory):
    ref_losses, ref_before, ref_after, _ = reference("untied", tmp_path_factory, optim=NEW_ROWS_ONLY)
    losses, before, after, with_state = merged(
        run_distributed(train, world_size, str(tmp_path), parallel, NEW_ROWS_ONLY, timeout=300)
    )
    assert_new_rows_only(before, after, with_state)
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in losses.items():
        assert abs(loss - ref_losses[step]) <= 1e-5, (step, loss, ref_losses[step])
    for name in ROWS:
        assert torch.equal(after[name][:NEW], ref_after[name][:NEW])
        assert (after[name] - ref_after[name]).abs().max() <= 1e-5, name


def test_new_rows_only_resume_equals_uninterrupted_run(tmp_path):
    checkpoint = CheckpointConfig(interval=3, keep_last=0, save_final=False, resume=True)
    kw = dict(steps=6, checkpoint=checkpoint)
    ref_losses, start, ref_after, _ = run_distributed(
        train, 1, str(tmp_path / "ref"), ParallelConfig(), NEW_ROWS_ONLY, **kw
    )[0]
    first = run_distributed(
        train, 2, str(tmp_path / "run"), ParallelConfig(dp_shard=2), NEW_ROWS_ONLY, **kw, stop_at=4
    )[0]
    assert sorted(first[0]) == [0, 1, 2, 3]
    losses, _, after, with_state = run_distributed(
        train, 1, str(tmp_path / "run"), ParallelConfig(), NEW_ROWS_ONLY, **kw
    )[0]
    assert sorted(losses) == [3, 4, 5], "resumed from step 3, step 4 redone"
    for step in (3, 4, 5):
        assert abs(losses[step] - ref_losses[step]) <= 1e-6, (step, losses[step], ref_losses[step])
    assert_new_rows_only(start, after, with_state)
    for name in after:
        assert (after[name] - ref_after[name]).abs().max() <= 1e-6, name


def test_resume_with_another_frozen_set(tmp_path):
    # Stopped at step 2 of 3, not a 2-step run extended: a resume keeps the cosine schedule's length.
    checkpoint = CheckpointConfig(interval=2, save_final=True, resume=True)
    run_distributed(
        train, 1, str(tmp_path), ParallelConfig(), dict(frozen=["layers.0.*"]), steps=3, checkpoint=checkpoint,
        stop_at=2,
    )
    refused = run_distributed(train, 1, str(tmp_path), ParallelConfig(), {}, steps=3, checkpoint=checkpoint)[0]
    assert isinstance(refused, str) and refused.startswith("optim.frozen is invalid for this resume"), refused
    assert "layers.0.attention.wk.weight (9 tensors) frozen" in refused and "load_optimizer=false" in refused
    # Freezing more works: the newly frozen layer keeps the checkpoint's weights.
    losses, before, after, with_state = run_distributed(
        train,
        1,
        str(tmp_path),
        ParallelConfig(),
        dict(frozen=["layers.0.*", "layers.1.*"]),
        steps=3,
        checkpoint=checkpoint,
    )[0]
    assert sorted(losses) == [2]
    assert all(torch.equal(before[n], after[n]) == n.startswith(("layers.0.", "layers.1.")) for n in before)
    assert not any(n.startswith(("layers.0.", "layers.1.")) for n in with_state)


@pytest.fixture(scope="module")
def extended_hf_dir(tmp_path_factory):
    """A tiny untied HF Llama standing for `cptron vocab init` output: rows from 450 on are new."""
    path = tmp_path_factory.mktemp("extended")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    (path / VOCAB_EXTENSION_FILE).write_text(json.dumps({"old_vocab_size": 450, "new_tokens": 50}))
    return path


def test_new_rows_from_vocab_extension_json_of_init_from(extended_hf_dir, tmp_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(extended_hf_dir)
    losses, before, after, with_state = run_distributed(
        train, 1, str(tmp_path), ParallelConfig(), dict(train_new_rows_only=True), steps=2, init_from=extended_hf_dir
    )[0]
    assert sorted(losses) == [0, 1] and with_state == set(ROWS)
    for name, hf_weight in (
        ("tok_embeddings.weight", hf.model.embed_tokens.weight),
        ("output.weight", hf.lm_head.weight),
    ):
        assert torch.equal(after[name][:450], hf_weight.detach()[:450]), f"{name}: old rows must stay the HF rows"
        assert (after[name][450:VOCAB] != before[name][450:VOCAB]).any(dim=1).all(), name
    for name in set(before) - set(ROWS):
        assert torch.equal(before[name], after[name]), name


def test_new_rows_only_after_a_full_run_keeps_old_rows_exact(tmp_path):
    """The checkpoint of a run that trained every row holds AdamW moments for the old rows: switching
    to new rows only must not let that momentum move them."""
    # Stopped at step 2 of 4 (a resume keeps the cosine schedule's length), every row trained so far.
    checkpoint = CheckpointConfig(interval=2, save_final=True, resume=True)
    run_distributed(train, 1, str(tmp_path), ParallelConfig(), {}, steps=4, checkpoint=checkpoint, stop_at=2)
    losses, before, after, with_state = run_distributed(
        train, 1, str(tmp_path), ParallelConfig(), NEW_ROWS_ONLY, steps=4, checkpoint=checkpoint
    )[0]
    assert sorted(losses) == [2, 3]
    assert_new_rows_only(before, after, with_state)
