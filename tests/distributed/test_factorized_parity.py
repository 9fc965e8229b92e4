"""Factorized embeddings (model.embedding_rank, model.factorize_head) under every parallel layout.

Two standards, both within 1e-5 at fp32:
- the project's usual one: each layout trains like one process of the same factorized model over 3
  clipped steps with gradient accumulation (losses, gradient norms, every gradient);
- against the materialized model: at step 0 a run of the ordinary model whose embedding and head
  are P @ B (exported to Hugging Face format and loaded with checkpoint.init_from) has the same loss,
  and its gradients give the factorized ones by the chain rule (dP = dW B^T, dB = P^T dW).
"""

from __future__ import annotations

import dataclasses

import pytest

from cptron import checkpoint as ckpt
from cptron.config import config_to_dict
from cptron.hf import compare_export, convert_cptron_to_hf
from cptron.models.llama import build_model
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config, train_recording_grads
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.trainer import Trainer
from tests.distributed.test_trainer_parity import STEPS, assert_matches, merge_ranks

RANK = 8
FACTORIZED = dict(embedding_rank=RANK, factorize_head=True)


def factorized_config(run_dir, parallel, **model):
    cfg = make_train_config(run_dir, parallel, steps=STEPS)
    cfg.model = dataclasses.replace(cfg.model, **(model or FACTORIZED))
    return cfg


def train_and_record(rank, world_size, run_dir, parallel, init_from=None, **model):
    cfg = factorized_config(run_dir, parallel, **model)
    cfg.checkpoint.init_from = init_from
    _, result, grads = train_recording_grads(cfg)
    return result.losses, result.grad_norms, grads


_REF: dict = {}


def reference(tmp_path_factory):
    if "ref" not in _REF:
        run_dir = str(tmp_path_factory.mktemp("factorized-ref"))
        _REF["ref"] = run_distributed(train_and_record, 1, run_dir, ParallelConfig())[0]
    return _REF["ref"]


def materialized_step0(tmp_path_factory):
    """(loss, gradients) at step 0 of the ordinary model holding P @ B, and the initial P and B."""
    if "mat" not in _REF:
        root = tmp_path_factory.mktemp("materialized")
        model_cfg = factorized_config(root, ParallelConfig()).model
        model = build_model(model_cfg, seed=0)  # the trainer's step-0 weights: init is a function of (seed, name)
        params = {n: p.detach() for n, p in model.named_parameters()}
        ckpt.write_checkpoint(root / "factorized", {"model": params}, {"model": config_to_dict(model_cfg), "step": 0})
        convert_cptron_to_hf(root / "factorized", root / "hf", progress=False)
        full = {"embedding_rank": None, "factorize_head": False}
        losses, _, grads = run_distributed(
            train_and_record, 1, str(root / "run"), ParallelConfig(), str(root / "hf"), **full
        )[0]
        _REF["mat"], _REF["hf"] = (losses[0], grads[0], params), root / "hf"
    return _REF["mat"]


LAYOUTS = [
    pytest.param(2, ParallelConfig(tp=2, sequence_parallel=False, loss_parallel=False), id="tp2"),
    pytest.param(2, ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True), id="tp2_sp_lossparallel"),
    pytest.param(2, ParallelConfig(dp_shard=2), id="dp_shard2"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), id="pp2_1f1b"),
    pytest.param(1, ParallelConfig(activation_checkpoint="full"), id="activation_checkpoint"),
]


@pytest.mark.parametrize("world_size,parallel", LAYOUTS)
def test_factorized_layout_matches_one_process_and_the_materialized_model(
    world_size, parallel, tmp_path, tmp_path_factory
):
    ref = reference(tmp_path_factory)
    results = run_distributed(train_and_record, world_size, str(tmp_path), parallel, timeout=300)
    for r in results[1:]:
        assert r[0] == results[0][0]
    got = merge_ranks(results)
    assert_matches(got, ref)
    assert {"tok_embeddings.coordinates.weight", "output.basis.weight"} <= set(got[2][0])

    loss, dense, params = materialized_step0(tmp_path_factory)
    assert abs(got[0][0] - loss) <= 1e-5, (got[0][0], loss)
    grads = got[2][0]
    expected = {
        "tok_embeddings.coordinates.weight": dense["tok_embeddings.weight"] @ params["tok_embeddings.basis.weight"].T,
        "tok_embeddings.basis.weight": params["tok_embeddings.coordinates.weight"].T @ dense["tok_embeddings.weight"],
        "output.coordinates.weight": dense["output.weight"] @ params["output.basis.weight"].T,
        "output.basis.weight": params["output.coordinates.weight"].T @ dense["output.weight"],
    }
    expected.update({n: g for n, g in dense.items() if n not in ("tok_embeddings.weight", "output.weight")})
    assert set(expected) == set(grads)
    for name, g in expected.items():
        err = (grads[name] - g).abs().max().item()
        assert err <= 1e-5, f"{name}: max |grad - chain rule of the materialized model| = {err:.2e}"


RESUME_STEPS = 6


def train_resumable(rank, world_size, run_dir, parallel, stop_at=None, **model):
    cfg = factorized_config(run_dir, parallel, **model)
    cfg.training.steps = RESUME_STEPS
    cfg.checkpoint = CheckpointConfig(interval=3, keep_last=0, save_final=False, resume=True)
    result = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {})).run(stop_at=stop_at)
    return result.losses, result.resumed_from


def test_factorized_checkpoints_keep_the_factors_resume_across_layouts_and_export(tmp_path, tmp_path_factory):
    ref = run_distributed(train_resumable, 1, str(tmp_path_factory.mktemp("factorized-resume")), ParallelConfig())
    ref_losses = ref[0][0]
    sp = ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True)
    first = run_distributed(train_resumable, 2, str(tmp_path), sp, 5, timeout=300)[0]
    assert sorted(first[0]) == [0, 1, 2, 3, 4]
    saved = tmp_path / "checkpoints" / "step-00000003"
    stored = ckpt.tensor_metadata(saved)
    factors = {f"model.{m}.{half}.weight" for m in ("tok_embeddings", "output") for half in ("coordinates", "basis")}
    assert factors <= set(stored) and "model.tok_embeddings.weight" not in stored
    assert tuple(stored["model.tok_embeddings.coordinates.weight"][0]) == (512, RANK)

    losses, resumed_from = run_distributed(train_resumable, 2, str(tmp_path), ParallelConfig(pp=2, dp_shard=1))[0]
    assert resumed_from.endswith("step-00000003")
    for step in (3, 4, 5):
        assert abs(losses[step] - ref_losses[step]) <= 1e-5, (step, losses[step], ref_losses[step])

    convert_cptron_to_hf(saved, tmp_path / "hf", progress=False)
    assert compare_export(saved, tmp_path / "hf").diff <= 1e-5  # transformers' logits of the materialized export


@pytest.mark.parametrize(
    "rank,world_size,parallel",
    [
        pytest.param(RANK, 1, ParallelConfig(), id="factors_file_rank8"),
        pytest.param(12, 2, ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True), id="svd_rank12_tp2"),
    ],
)
def test_hf_weights_are_factorized_at_step_0(rank, world_size, parallel, tmp_path, tmp_path_factory):
    """checkpoint.init_from an HF model with model.embedding_rank: the factors file at its own rank, else an
    SVD (exact here: the exported matrices have rank 8). Either way step 0 is the reference's step 0."""
    ref_loss, hf = materialized_step0(tmp_path_factory)[0], _REF["hf"]
    losses, _, _ = run_distributed(
        train_and_record, world_size, str(tmp_path), parallel, str(hf), embedding_rank=rank, factorize_head=True
    )[0]
    assert abs(losses[0] - ref_loss) <= 1e-5, (losses[0], ref_loss)


def test_tied_factorized_checkpoints_store_each_factor_once_and_resume(tmp_path, tmp_path_factory):
    tied = dict(FACTORIZED, tie_embeddings=True)
    ref = run_distributed(train_resumable, 1, str(tmp_path_factory.mktemp("tied-ref")), ParallelConfig(), **tied)[0][0]
    run_distributed(train_resumable, 1, str(tmp_path), ParallelConfig(), 5, **tied)
    stored = ckpt.tensor_metadata(tmp_path / "checkpoints" / "step-00000003")
    assert "model.tok_embeddings.coordinates.weight" in stored
    assert not [k for k in stored if k.startswith("model.output.")]
    tp = ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True)
    losses, resumed_from = run_distributed(train_resumable, 2, str(tmp_path), tp, **tied)[0]
    assert resumed_from.endswith("step-00000003")
    for step in (3, 4, 5):
        assert abs(losses[step] - ref[step]) <= 1e-5, (step, losses[step], ref[step])
