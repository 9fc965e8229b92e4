"""The chunked loss (training.loss_impl=chunked) trains like the plain loss of one process: losses,
gradient norms and every gradient within 1e-5 at fp32, under tensor parallelism (vocabulary-sharded
head, with and without sequence parallelism), pipeline parallelism (the loss inside the last stage)
and FSDP; per-source and held-out losses are the plain path's too.

The chunks are 5 tokens for microbatches of 16 (uneven), and the vocabulary is padded (500 -> 512),
so under tp=2 the second rank's shard holds 12 padded rows; one direct case pads a whole shard."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import make_train_config, train_recording_grads
from cptron.train.chunked_loss import ChunkedHeadLoss
from cptron.train.loss import cross_entropy_sum
from cptron.train.trainer import Trainer
from tests.distributed import test_factorized_parity as factorized
from tests.distributed import test_source_losses as sources
from tests.distributed.test_source_losses import shards  # noqa: F401 (the fixture of the source shards)
from tests.distributed.test_trainer_parity import assert_matches, merge_ranks, reference

CHUNKED = dict(loss_impl="chunked", loss_chunk_tokens=5)


def _train(rank, world_size, run_dir, parallel, model=None):
    cfg = make_train_config(run_dir, parallel, **CHUNKED)
    if model:
        cfg.model = dataclasses.replace(cfg.model, **model)
    trainer, result, grads = train_recording_grads(cfg)
    assert trainer.module.loss_path.chunk_tokens == 5, trainer.module.loss_path
    return result.losses, result.grad_norms, grads


LAYOUTS = [
    pytest.param(1, ParallelConfig(), id="one_process"),
    pytest.param(2, ParallelConfig(tp=2, sequence_parallel=False, loss_parallel=False), id="tp2"),
    pytest.param(2, ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True), id="tp2_sp_lossparallel"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), id="pp2_1f1b"),
    pytest.param(
        2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="zbv_zero_bubble", pp_stages_per_rank=2), id="pp2_zbv"
    ),
    pytest.param(4, ParallelConfig(dp_shard=2, tp=2), id="dp_shard2_tp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("world_size,parallel", LAYOUTS)
def test_chunked_loss_trains_like_the_plain_loss_of_one_process(world_size, parallel, tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)  # plain loss, one process (tests/distributed/test_trainer_parity.py)
    results = run_distributed(_train, world_size, str(tmp_path), parallel, timeout=300)
    for r in results[1:]:
        assert r[0] == results[0][0]
    assert_matches(merge_ranks(results), ref)


def test_factorized_head_under_tp_with_sequence_parallelism(tmp_path, tmp_path_factory):
    """logits = (h B^T) P^T: B's gradient is reduced over the sequence slices, P's is vocabulary-sharded."""
    ref = factorized.reference(tmp_path_factory)  # plain loss, one process, same factorized model
    parallel = ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True)
    results = run_distributed(_train, 2, str(tmp_path), parallel, factorized.FACTORIZED, timeout=300)
    assert_matches(merge_ranks(results), ref)


def test_tied_embeddings_across_pipeline_stages(tmp_path):
    """The last stage's copy of the tied embedding takes the chunked head's gradient, summed with the
    first stage's by TiedEmbeddingSync, as on the plain path."""
    tied = {"tie_embeddings": True}

    def plain(rank, world_size, run_dir):
        cfg = make_train_config(run_dir, ParallelConfig(), loss_impl="plain")
        cfg.model = dataclasses.replace(cfg.model, **tied)
        _, result, grads = train_recording_grads(cfg)
        return result.losses, result.grad_norms, grads

    ref = run_distributed(plain, 1, str(tmp_path / "ref"))[0]
    results = run_distributed(_train, 2, str(tmp_path / "pp"), ParallelConfig(pp=2, dp_shard=1), tied, timeout=300)
    merged = merge_ranks(results)
    for named in merged[2].values():  # the last stage's copy carries the summed gradient too
        assert torch.equal(named.pop("output.weight"), named["tok_embeddings.weight"])
    assert_matches(merged, ref)


def _train_sources(rank, world_size, run_dir, parallel, paths, impl):
    cfg = sources.config(run_dir, parallel, paths)
    cfg.training.loss_impl, cfg.training.loss_chunk_tokens = impl, 5
    result = Trainer(cfg).run()
    return result.losses, result.source_losses, result.eval_losses


@pytest.mark.parametrize(
    "world_size,parallel",
    [
        pytest.param(2, ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True), id="tp2_sp"),
        pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), id="pp2_1f1b"),
    ],
)
def test_per_source_and_held_out_losses_are_unchanged(world_size, parallel, shards, tmp_path):  # noqa: F811
    """Against the plain loss of one process: the training loss, loss/<source> and the held-out losses
    (evaluated after every step, so pipelines switch between eval and training each step)."""
    ref = run_distributed(_train_sources, 1, str(tmp_path / "ref"), ParallelConfig(), shards, "plain")[0]
    results = run_distributed(
        _train_sources, world_size, str(tmp_path / "par"), parallel, shards, "chunked", timeout=300
    )
    for losses, by_source, held_out in results:
        for step in range(sources.STEPS):
            assert abs(losses[step] - ref[0][step]) < 1e-5
            assert set(by_source[step]) == set(ref[1][step]) == {"old", "new"}
            for name, value in by_source[step].items():
                assert abs(value - ref[1][step][name]) < 1e-5, (step, name, value, ref[1][step][name])
        assert held_out and held_out.keys() == ref[2].keys()
        for step, named in held_out.items():
            for name, value in named.items():
                assert abs(value - ref[2][step][name]) < 1e-5, (step, name, value)


def _direct_tp(rank, world_size, vocab, padded, sequence_parallel):
    """ChunkedHeadLoss on a ColwiseParallel head vs the plain loss under loss_parallel, tp=2 (a rank
    whose whole shard is padding when vocab <= padded / 2)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)  # same weights and inputs on both ranks
    dim, rows, seq = 8, 2, 6
    head = nn.Linear(dim, padded, bias=False)
    parallelize_module(
        head, mesh, ColwiseParallel(output_layouts=torch.distributed.tensor.Shard(-1), use_local_output=False)
    )
    h = torch.randn(rows, seq, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (rows, seq))
    with loss_parallel():
        ref = cross_entropy_sum(head(h), labels, vocab).full_tensor()
        ref.backward()
    ref_h, ref_w = h.grad.clone(), head.weight.grad.full_tensor()
    h.grad, head.weight.grad = None, None
    got, _ = ChunkedHeadLoss(vocab, 4, sequence_parallel)(h, head, labels)
    got.backward()
    assert isinstance(head.weight.grad, DTensor)
    return [
        (got - ref).abs().item() / labels.numel(),
        (h.grad - ref_h).abs().max().item(),
        (head.weight.grad.full_tensor() - ref_w).abs().max().item(),
    ]


@pytest.mark.parametrize("vocab", [300, 200], ids=["padded_rows", "padded_shard"])
def test_vocab_parallel_chunks_match_loss_parallel(vocab):
    for errors in run_distributed(_direct_tp, 2, vocab, 512, False):
        assert max(errors) <= 1e-5, errors
