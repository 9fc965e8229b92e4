"""Local sharded initialization (cptron.models.init): every layout initializes the same model, and a
rank draws only the tiles of its own shards, never a full large tensor."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cptron.models import init as model_init
from cptron.models.config import model_config_from_preset
from cptron.models.llama import Transformer, build_model
from cptron.parallel import pipeline as pl
from cptron.parallel.dims import ParallelConfig, ParallelDims, build_mesh
from cptron.parallel.parallelize import parallelize_llama
from cptron.testing.distributed import run_distributed

SEED = 11
# Wider than one tile (64 x 256) so that shards cut tiles in both dimensions: 1008 vocabulary rows
# split at 504, 320 columns at 160, the 864-wide FFN at 432 (all mid-tile); 7 padded vocabulary rows.
BASE = dict(dim=320, n_heads=4, n_kv_heads=2, ffn_hidden_dim=864, vocab_size=1001, pad_vocab_to_multiple_of=8)
CONFIGS = {
    "plain": model_config_from_preset("tiny", **BASE),
    "tied": model_config_from_preset("tiny", tie_embeddings=True, **BASE),
    "factorized": model_config_from_preset("tiny", embedding_rank=48, factorize_head=True, **BASE),
    "factorized_tied": model_config_from_preset(
        "tiny", embedding_rank=48, factorize_head=True, tie_embeddings=True, **BASE
    ),
    # 1001 rows, unpadded: uneven FSDP2 shards (501 + 500 rows); tp=2 cannot split it.
    "uneven": model_config_from_preset("tiny", **{**BASE, "pad_vocab_to_multiple_of": 1}),
}


def _build_parts(cfg, parallel: ParallelConfig, world_size: int):
    """This rank's parts as the trainer builds them (build_train_module): meta, parallelized, materialized."""
    dp_shard = world_size // (parallel.pp * parallel.tp)
    dims = ParallelDims(parallel.pp, 1, dp_shard, parallel.tp)
    mesh, _ = build_mesh(dims, "cpu")
    if dims.pp > 1:
        ranges = pl.split_layers(cfg.n_layers, dims.pp)
        stage_ids = pl.stage_ids_for_rank(mesh["pp"].get_local_rank(), dims.pp, 1, parallel.pp_schedule)
        parts = pl.build_stage_modules(cfg, stage_ids, dims.pp, ranges, ids_are_doc_ids=False)
    else:
        with torch.device("meta"):
            parts = [Transformer(cfg)]
    for part in parts:
        parallelize_llama(part, mesh, dims, parallel)
        part.to_empty(device="cpu")
    return parts


def _gathered(parts) -> dict[str, torch.Tensor]:
    out = {}
    for part in parts:
        for name, p in part.named_parameters(remove_duplicate=False):
            out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def init_in_layout(rank, world_size, parallel, names):
    results = {}
    for name in names:
        parts = _build_parts(CONFIGS[name], parallel, world_size)
        for part in parts:
            part.init_weights(SEED)
        results[name] = _gathered(parts)
    return results


LAYOUTS = {
    "dp_shard2": (2, ParallelConfig(dp_shard=2)),
    "tp2": (2, ParallelConfig(tp=2, dp_shard=1)),
    "tp2_dp_shard2": (4, ParallelConfig(tp=2, dp_shard=2)),
    "pp2": (2, ParallelConfig(pp=2, dp_shard=1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_initializes_the_one_process_model(layout):
    world_size, parallel = LAYOUTS[layout]
    # Tied factorized embeddings cannot be pipelined (build_stage_modules refuses them).
    names = [
        n
        for n in CONFIGS
        if not (parallel.pp > 1 and n == "factorized_tied") and not (parallel.tp > 1 and n == "uneven")
    ]
    results = run_distributed(init_in_layout, world_size, parallel, names)
    for name in names:
        reference = dict(build_model(CONFIGS[name], seed=SEED).named_parameters(remove_duplicate=False))
        merged = {}
        for rank_result in results:
            merged.update(rank_result[name])
        assert set(merged) == set(reference), name
        for key, tensor in merged.items():
            assert torch.equal(tensor, reference[key]), f"{layout} {name}: {key}"


def _record_normal_draws(monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = torch.Tensor.normal_

    def recording(self, *args, **kwargs):
        sizes.append(self.numel())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", recording)
    return sizes


def draws_on_rank(rank, world_size, full_tensors):
    cfg = model_config_from_preset("tiny", **{**BASE, "vocab_size": 8192, "dim": 512, "ffn_hidden_dim": 1024})
    (part,) = _build_parts(cfg, ParallelConfig(dp_shard=2), world_size)
    with pytest.MonkeyPatch.context() as mp:
        sizes = _record_normal_draws(mp)
        params = [(n, p) for n, p in part.named_parameters()]
        stats = model_init.initialize_parameters(params, cfg, SEED, full_tensors=full_tensors)
    total = sum(p.numel() for n, p in params if model_init.param_init(cfg, n).fill == "normal")
    return stats, sizes, total, part.tok_embeddings.weight.numel()


def test_a_rank_draws_only_its_shards_in_tiles():
    for stats, sizes, total, _ in run_distributed(draws_on_rank, 2, False):
        assert max(sizes) <= model_init.TILE_ELEMENTS, "no draw may exceed one tile"
        assert sum(sizes) == stats.drawn_elements
        # Shards of 4096 embedding rows and 256/512-row blocks fall on tile boundaries here: exact.
        assert stats.drawn_elements <= 1.02 * stats.local_elements, (stats.drawn_elements, stats.local_elements)
        assert stats.local_elements <= 0.51 * total
    # The former full-tensor path draws whole tensors on every rank: the check above would fail on it.
    for stats, sizes, total, embedding in run_distributed(draws_on_rank, 2, True):
        assert max(sizes) == embedding and sum(sizes) == total == stats.drawn_elements


@pytest.mark.parametrize(
    "shape, region",
    [
        ((1008, 320), (slice(504, 1008), slice(0, 320))),  # FSDP / colwise: a row block, mid-tile
        ((320, 864), (slice(0, 320), slice(432, 864))),  # rowwise: a column block, mid-tile
        ((1001, 320), (slice(251, 502), slice(160, 320))),  # 2-D mesh, uneven rows
        ((70000,), (slice(33333, 70000),)),  # a long 1-D tensor, several tiles
        ((6, 40, 300), (slice(1, 4), slice(0, 40), slice(100, 250))),  # >2-D, sharded past dim 0
        ((48, 300), (slice(0, 0), slice(0, 300))),  # an empty shard
    ],
)
@pytest.mark.parametrize("in_place", [True, False], ids=["cpu", "through_cpu_bands"])
def test_any_block_equals_the_same_block_of_the_whole_tensor(shape, region, in_place, monkeypatch):
    # A GPU parameter is filled through CPU bands: the same path, taken here on CPU.
    monkeypatch.setattr(model_init, "_fills_in_place", lambda t: in_place)
    full = torch.empty(shape)
    model_init.draw_normal_region(shape, tuple(slice(0, n) for n in shape), 0.5, 3, "w", full)
    block = torch.empty(tuple(s.stop - s.start for s in region))
    model_init.draw_normal_region(shape, region, 0.5, 3, "w", block)
    assert torch.equal(block, full[region])
    # A strided destination in bf16 receives the same values, rounded once.
    strided = torch.empty(tuple(reversed(block.shape)), dtype=torch.bfloat16).permute(*reversed(range(block.dim())))
    model_init.draw_normal_region(shape, region, 0.5, 3, "w", strided)
    assert torch.equal(strided, full[region].to(torch.bfloat16))


def test_initial_statistics_hold_across_tiles():
    cfg = model_config_from_preset(
        "tiny", **{**BASE, "vocab_size": 3000, "pad_vocab_to_multiple_of": 64, "n_layers": 8}
    )
    model = build_model(cfg, seed=SEED)
    emb = model.tok_embeddings.weight
    real = emb[: cfg.vocab_size]
    assert emb.shape[0] == 3008 and torch.count_nonzero(emb[cfg.vocab_size :]) == 0
    # 960k N(0, 0.02) values: mean within 5 standard errors, std within 1%.
    assert abs(real.mean().item()) < 5 * cfg.init_std / math.sqrt(real.numel())
    assert abs(real.std().item() / cfg.init_std - 1) < 0.01
    for w in (model.layers["3"].attention.wo.weight, model.layers["5"].feed_forward.w2.weight):
        assert abs(w.std().item() / (cfg.init_std / 4.0) - 1) < 0.02  # 1 / sqrt(2 * 8 layers)
    assert torch.equal(model.norm.weight, torch.ones(cfg.dim))
    # Distinct tiles draw distinct, uncorrelated values (each tile seeds its own generator).
    a, b = emb[:64, :256].flatten(), emb[64:128, :256].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05  # 6 standard errors
    fcfg = model_config_from_preset("tiny", **{**BASE, "embedding_rank": 64, "factorize_head": True})
    fmodel = build_model(fcfg, seed=SEED)
    basis = fmodel.tok_embeddings.basis.weight
    assert abs(basis.std().item() * math.sqrt(64) - 1) < 0.02
    assert torch.count_nonzero(fmodel.output.coordinates.weight[fcfg.vocab_size :]) == 0


def test_the_benchmark_runs_and_checks_the_layouts():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "benchmarks/init_time.py", "--preset", "tiny", "--layers", "1"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "layout check dp_shard=2 vs 1 rank: 24 shards compared by SHA-256, identical" in lines
    assert "layout check tp=2 vs 1 rank: 24 shards compared by SHA-256, identical" in lines
    assert lines[-1].startswith("ratios (local / full-tensor init, slower rank): time ")
    assert lines[-1].endswith("layouts identical"), lines[-1]
