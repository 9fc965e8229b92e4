"""The fused factorized-embedding ops (cptron::factorized_embedding_fwd/_bwd) on CPU.

The CPU implementation is the math the CUDA kernels must match; here it is checked against an
independent formulation (an explicit one-hot matrix: out = O P B, dP = O^T dOut B^T, dB = (O P)^T dOut,
with O [N, V] the one-hot rows of the ids this shard owns) within 1e-6 in float64, against the
vocabulary-sharded lookup summed over shards, through opcheck, gradcheck and torch.compile.
Tolerances: 1e-6 absolute in float64, 1e-5 relative in float32, 1e-2 relative in bfloat16.
"""

from __future__ import annotations

import logging

import pytest
import torch

from cptron.errors import ConfigError
from cptron.kernels import factorized_embedding as dispatch
from cptron.kernels.factorized_embedding import factorized_embedding, factorized_embedding_reference
from cptron.kernels.factorized_embedding_check import CASES, TOLERANCE, relative_error
from cptron.kernels.factorized_embedding_op import (
    factorized_embedding_bwd,
    factorized_embedding_fused,
    factorized_embedding_fwd,
)

MODES = pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])


def one_hot_lookup(ids, coords, basis, dout, vocab_start):
    """(out, dP, dB) through the dense one-hot matrix of owned ids, in float64."""
    v = coords.shape[0]
    local = ids.reshape(-1) - vocab_start
    owned = (local >= 0) & (local < v)
    onehot = torch.zeros(local.numel(), v, dtype=torch.float64)
    onehot[owned.nonzero().squeeze(1), local[owned]] = 1.0
    p, b, g = coords.double(), basis.double(), dout.reshape(-1, basis.shape[1]).double()
    out = onehot @ p @ b
    return out.reshape(*ids.shape, -1), onehot.T @ (g @ b.T), (onehot @ p).T @ g


def inputs(tokens=37, vocab=23, rank=5, hidden=11, dtype=torch.float64, seed=0, id_range=None, shape=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, id_range or vocab, shape or (tokens,), generator=g)
    coords = torch.randn(vocab, rank, generator=g).to(dtype)
    basis = torch.randn(rank, hidden, generator=g).to(dtype)
    dout = torch.randn(*ids.shape, hidden, generator=g).to(dtype)
    return ids, coords, basis, dout


@MODES
@pytest.mark.parametrize("vocab_start", [0, 10], ids=["whole vocabulary", "shard at 10"])
def test_ops_match_the_one_hot_formulation_in_float64(deterministic, vocab_start):
    # ids run over [0, 40): with a 23-row shard at 10, tokens below 10 and from 33 on are not owned.
    ids, coords, basis, dout = inputs(id_range=40 if vocab_start else None, shape=(4, 9))
    ids[0, :5] = ids[0, 0]  # repeats
    out = factorized_embedding_fwd(ids, coords, basis, vocab_start, deterministic)
    dp, db = factorized_embedding_bwd(dout, ids, coords, basis, vocab_start, deterministic)
    ref_out, ref_dp, ref_db = one_hot_lookup(ids, coords, basis, dout, vocab_start)
    assert out.shape == (4, 9, 11) and dp.shape == coords.shape and db.shape == basis.shape
    for got, ref in ((out, ref_out), (dp, ref_dp), (db, ref_db)):
        assert (got - ref).abs().max().item() < 1e-6
    if vocab_start:
        unowned = ((ids < 10) | (ids >= 33)).reshape(-1)
        assert unowned.any() and out.reshape(-1, 11)[unowned].abs().max().item() == 0.0


@MODES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(deterministic, dtype):
    ids, coords, basis, dout = inputs(tokens=300, vocab=50, rank=40, hidden=64, dtype=dtype)
    out = factorized_embedding_fwd(ids, coords, basis, 0, deterministic)
    dp, db = factorized_embedding_bwd(dout, ids, coords, basis, 0, deterministic)
    assert out.dtype == dp.dtype == db.dtype == dtype
    for got, ref in zip((out, dp, db), one_hot_lookup(ids, coords, basis, dout, 0)):
        assert relative_error(got, ref) < TOLERANCE[dtype]


@MODES
def test_vocab_parallel_shards_sum_to_the_unsharded_lookup(deterministic):
    ids, coords, basis, dout = inputs(tokens=200, vocab=29, rank=6, hidden=13, shape=(8, 25))
    bounds = [0, 7, 19, 29]  # uneven shards
    outs, dps, dbs = [], [], []
    for lo, hi in zip(bounds, bounds[1:]):
        shard = coords[lo:hi].clone()
        outs.append(factorized_embedding_fwd(ids, shard, basis, lo, deterministic))
        dp, db = factorized_embedding_bwd(dout, ids, shard, basis, lo, deterministic)
        dps.append(dp)
        dbs.append(db)
    full_out = factorized_embedding_fwd(ids, coords, basis, 0, deterministic)
    full_dp, full_db = factorized_embedding_bwd(dout, ids, coords, basis, 0, deterministic)
    assert (sum(outs) - full_out).abs().max().item() < 1e-6
    assert (torch.cat(dps) - full_dp).abs().max().item() < 1e-6
    assert (sum(dbs) - full_db).abs().max().item() < 1e-6
    assert (full_out - factorized_embedding_reference(ids, coords, basis)).abs().max().item() < 1e-6


def test_both_backward_modes_agree_and_the_empty_batch_works():
    ids, coords, basis, dout = inputs(tokens=500, vocab=9, rank=4, hidden=7)  # ~55 repeats per id
    det = factorized_embedding_bwd(dout, ids, coords, basis, 0, True)
    atomic = factorized_embedding_bwd(dout, ids, coords, basis, 0, False)
    for a, b in zip(det, atomic):
        assert (a - b).abs().max().item() < 1e-9
    empty = torch.zeros(2, 0, dtype=torch.long)
    out = factorized_embedding_fwd(empty, coords, basis, 0, True)
    dp, db = factorized_embedding_bwd(torch.zeros(2, 0, 7, dtype=torch.float64), empty, coords, basis, 0, True)
    assert out.shape == (2, 0, 7) and dp.abs().sum().item() == 0 and db.abs().sum().item() == 0


@MODES
def test_autograd_through_the_op_and_gradcheck(deterministic):
    ids, coords, basis, dout = inputs(tokens=15, vocab=8, rank=3, hidden=5, id_range=11)
    coords.requires_grad_(True)
    basis.requires_grad_(True)
    fn = lambda p, b: factorized_embedding_fused(ids, p, b, vocab_start=2, deterministic=deterministic)
    assert torch.autograd.gradcheck(fn, (coords, basis))
    fn(coords, basis).backward(dout)
    _, ref_dp, ref_db = one_hot_lookup(ids, coords.detach(), basis.detach(), dout, 2)
    assert (coords.grad - ref_dp).abs().max().item() < 1e-6
    assert (basis.grad - ref_db).abs().max().item() < 1e-6


def test_opcheck_schema_fake_and_autograd_registration():
    ids, coords, basis, dout = inputs(tokens=20, vocab=10, rank=4, hidden=6, dtype=torch.float32, shape=(4, 5))
    coords.requires_grad_(True)
    basis.requires_grad_(True)
    for deterministic in (True, False):
        torch.library.opcheck(factorized_embedding_fwd, (ids, coords, basis, 3, deterministic))
        torch.library.opcheck(factorized_embedding_bwd, (dout, ids, coords.detach(), basis.detach(), 3, deterministic))


def test_torch_compile_traces_through_the_op_without_graph_breaks():
    ids, coords, basis, dout = inputs(tokens=30, vocab=12, rank=4, hidden=6, dtype=torch.float32, shape=(5, 6))

    def loss(p, b, lo):
        return (factorized_embedding_fused(ids, p, b, vocab_start=lo) * dout).sum()

    # aot_eager runs dynamo and AOTAutograd (fake tensors through the fake implementations and the
    # autograd formula), skipping inductor's C++ codegen, which the op is opaque to anyway.
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss, compiled):
        p, b = coords.clone().requires_grad_(True), basis.clone().requires_grad_(True)
        value = fn(p, b, 2)
        value.backward()
        grads.append((value.detach(), p.grad, b.grad))
    for eager, traced in zip(*grads):
        assert torch.allclose(eager, traced, rtol=1e-6, atol=1e-6)
    whole = torch.compile(factorized_embedding, fullgraph=True, backend="aot_eager")
    assert torch.allclose(whole(ids, coords, basis), factorized_embedding_reference(ids, coords, basis))


def test_dispatch_on_cpu_is_the_reference_and_logs_once(caplog, monkeypatch):
    ids, coords, basis, _ = inputs(dtype=torch.float32)
    monkeypatch.setattr(dispatch, "_announced", set())
    with caplog.at_level(logging.INFO, logger="cptron.kernels.factorized_embedding"):
        for _ in range(3):
            assert torch.equal(
                factorized_embedding(ids, coords, basis), factorized_embedding_reference(ids, coords, basis)
            )
    lines = [r.getMessage() for r in caplog.records if "factorized embedding lookup" in r.getMessage()]
    assert lines == ["factorized embedding lookup: PyTorch reference (F.embedding + matmul) on cpu"]
    monkeypatch.setenv(dispatch.KERNEL_ENV, "fast")
    with pytest.raises(ConfigError, match="CPTRON_FACTORIZED_KERNEL='fast' is invalid"):
        factorized_embedding(ids, coords, basis)


def test_the_gpu_check_harness_passes_the_cpu_op_and_catches_a_missing_mask(monkeypatch):
    """The shared check harness (used by the GPU script and the gpu tests) itself, on a few of its
    cases: it passes the CPU op and fails an op that ignores the vocabulary range."""
    import cptron.kernels.factorized_embedding_check as check

    assert {c.name for c in CASES} >= {"empty batch", "many repeated ids", "vocab shard 2 of 3"}
    cases = {c.name: c for c in CASES}
    cpu = torch.device("cpu")
    for name in ("odd sizes", "vocab shard 2 of 3", "empty batch"):
        assert check.check_case(cases[name], torch.float32, True, cpu)["ok"]
    real = check.factorized_embedding_fwd

    def unmasked(ids, coords, basis, vocab_start, deterministic):
        if coords.dtype == torch.float32:  # the call under test, not the float64 reference
            ids = ids.clamp(vocab_start, vocab_start + coords.shape[0] - 1)
        return real(ids, coords, basis, vocab_start, deterministic)

    monkeypatch.setattr(check, "factorized_embedding_fwd", unmasked)
    result = check.check_case(cases["vocab shard 2 of 3"], torch.float32, True, cpu)
    assert not result["ok"] and result["out"] > 0.5
    assert check.check_case(cases["odd sizes"], torch.float32, True, cpu)["ok"]  # no shard: the mask is moot
