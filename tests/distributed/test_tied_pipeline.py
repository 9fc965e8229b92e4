"""Tied input/output embeddings under pipeline parallelism.

The first stage holds tok_embeddings.weight, the last output.weight; the trainer
sums their gradients across the pipeline and AdamW keeps the copies equal. Each
layout must train like one process with one tied parameter (losses, gradient
norms and gradients within 1e-5 over 3 clipped steps with accumulation), the
copies must stay bit-identical, and checkpoints store the embedding once and
resume across pp sizes.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.tensor import DTensor

from cptron import checkpoint as ckpt
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config, train_recording_grads
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.trainer import Trainer

STEPS = 3


def tied_config(run_dir, parallel, **training):
    cfg = make_train_config(run_dir, parallel, **training)
    cfg.model = dataclasses.replace(cfg.model, tie_embeddings=True)
    return cfg


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train_and_record(rank, world_size, run_dir, parallel: ParallelConfig):
    cfg = tied_config(run_dir, parallel, steps=STEPS)
    trainer, result, grads = train_recording_grads(cfg)
    weights = {}
    for part in trainer.parts:
        for name in ("tok_embeddings", "output"):
            module = getattr(part, name, None)
            if module is not None:
                weights[name] = _full(module.weight)
    return result.losses, result.grad_norms, grads, weights


_REF: dict = {}


def reference(tmp_path_factory):
    if "ref" not in _REF:
        _REF["ref"] = run_distributed(train_and_record, 1, str(tmp_path_factory.mktemp("ref")), ParallelConfig())[0]
    return _REF["ref"]


LAYOUTS = [
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), id="pp2_1f1b"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2),
                 id="pp2_interleaved_1f1b"),
    # The V puts the first and the last stage on pipeline rank 0: both copies on one rank.
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="zbv_zero_bubble", pp_stages_per_rank=2,
                                   fsdp_reshard_after_forward=False), id="pp2_zbv"),
    pytest.param(4, ParallelConfig(pp=2, dp_shard=2), id="pp2_dp_shard2"),
    pytest.param(4, ParallelConfig(pp=2, dp_shard=1, tp=2, sequence_parallel=True, loss_parallel=True),
                 id="pp2_tp2_sp"),
    pytest.param(8, ParallelConfig(pp=2, dp_replicate=2, dp_shard=2), id="pp2_hsdp", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("world_size,parallel", LAYOUTS)
def test_tied_embeddings_under_pipeline_parallelism_match_one_process(world_size, parallel, tmp_path,
                                                                     tmp_path_factory):
    ref_losses, ref_norms, ref_grads, ref_weights = reference(tmp_path_factory)
    assert set(ref_weights) == {"tok_embeddings", "output"}
    assert torch.equal(ref_weights["tok_embeddings"], ref_weights["output"])  # one parameter on one process
    results = run_distributed(train_and_record, world_size, str(tmp_path), parallel, timeout=300)
    losses, norms, _, _ = results[0]
    grads: dict[int, dict[str, torch.Tensor]] = {s: {} for s in range(STEPS)}
    embedding, output = [], []
    for r_losses, _, r_grads, r_weights in results:
        assert r_losses == losses
        for step, named in r_grads.items():
            if "output.weight" in named:  # the last stage's copy: its gradient is the sum, as the first's
                out = named.pop("output.weight")
                grads[step].setdefault("_output_copy", out)
            grads[step].update(named)
        embedding += [r_weights["tok_embeddings"]] if "tok_embeddings" in r_weights else []
        output += [r_weights["output"]] if "output" in r_weights else []
    for step in range(STEPS):
        assert abs(losses[step] - ref_losses[step]) <= 1e-5, (step, losses[step], ref_losses[step])
        assert abs(norms[step] - ref_norms[step]) <= 1e-5 * max(1.0, ref_norms[step]), (step, norms[step])
        assert ref_norms[step] > 0.05, "clipping must be active for the test to cover it"
        out = grads[step].pop("_output_copy")
        assert torch.equal(out, grads[step]["tok_embeddings.weight"]), "the copies' gradients differ"
        assert set(grads[step]) == set(ref_grads[step])
        for name, g in grads[step].items():
            err = (g - ref_grads[step][name]).abs().max().item()
            assert err <= 1e-5, f"step {step} {name}: max |grad diff| = {err:.2e}"
    assert embedding and output
    for w in embedding + output:  # after 3 AdamW steps the copies are still one parameter
        assert torch.equal(w, embedding[0])
    # Against one process, within 1% of one AdamW step: AdamW divides each update by sqrt(v), so an element
    # whose gradients are ~1e-7 turns a 1e-9 gradient difference (the gradients are within 1e-5 above) into
    # a few 1e-5 of weight (seen: 1.5e-5 under pp2 x tp2 + SP); copies out of sync are off by whole steps.
    tolerance = 0.01 * tied_config(tmp_path / "lr", ParallelConfig()).optim.lr
    assert (embedding[0] - ref_weights["tok_embeddings"]).abs().max().item() <= tolerance


def test_summing_is_what_makes_the_layout_match(tmp_path, tmp_path_factory):
    """Without the gradient sum the copies drift apart and the losses leave the reference."""
    ref_losses = reference(tmp_path_factory)[0]
    results = run_distributed(_train_without_sync, 2, str(tmp_path), ParallelConfig(pp=2, dp_shard=1))
    losses = results[0]
    assert max(abs(losses[s] - ref_losses[s]) for s in range(1, STEPS)) > 1e-4


def _train_without_sync(rank, world_size, run_dir, parallel):
    from cptron.parallel import pipeline

    pipeline.TiedEmbeddingSync.reduce_grads = lambda self: None
    cfg = tied_config(run_dir, parallel, steps=STEPS)
    return Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {})).run().losses


RESUME_STEPS = 6


def train_resumable(rank, world_size, run_dir, parallel, stop_at=None):
    cfg = tied_config(run_dir, parallel, steps=RESUME_STEPS)
    cfg.checkpoint = CheckpointConfig(interval=3, keep_last=0, save_final=False, resume=True)
    result = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {})).run(stop_at=stop_at)
    return result.losses, result.resumed_from


@pytest.mark.parametrize("save_world,save_layout,load_world,load_layout", [
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1), 1, ParallelConfig(), id="pp2_to_1"),
    pytest.param(1, ParallelConfig(), 2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="zbv_zero_bubble",
                                                        pp_stages_per_rank=2), id="1_to_pp2_zbv"),
    pytest.param(2, ParallelConfig(pp=2, dp_shard=1, pp_schedule="zbv_zero_bubble", pp_stages_per_rank=2), 2,
                 ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), id="pp2_zbv_to_pp2_1f1b"),
])
def test_tied_checkpoints_store_the_embedding_once_and_resume_across_pp(save_world, save_layout, load_world,
                                                                        load_layout, tmp_path, tmp_path_factory):
    ref = run_distributed(train_resumable, 1, str(tmp_path_factory.mktemp("tied-ref")), ParallelConfig())[0][0]
    first = run_distributed(train_resumable, save_world, str(tmp_path), save_layout, 5, timeout=300)[0]
    assert sorted(first[0]) == [0, 1, 2, 3, 4]
    stored = ckpt.tensor_metadata(tmp_path / "checkpoints" / "step-00000003")
    assert "model.tok_embeddings.weight" in stored and "model.output.weight" not in stored
    assert not [k for k in stored if "output.weight" in k], "the output copy must be stored as tok_embeddings"
    assert "optimizer.state.tok_embeddings.weight.exp_avg" in stored
    losses, resumed_from = run_distributed(train_resumable, load_world, str(tmp_path), load_layout, timeout=300)[0]
    assert resumed_from.endswith("step-00000003") and sorted(losses) == [3, 4, 5]
    for step in (3, 4, 5):
        assert abs(losses[step] - ref[step]) <= 1e-6, (step, losses[step], ref[step])


def train_from_tied_hf(rank, world_size, run_dir, hf_dir, parallel):
    from cptron.data.interface import InMemoryTokenSource

    cfg = tied_config(run_dir, parallel, steps=2)
    cfg.checkpoint = CheckpointConfig(init_from=str(hf_dir), save_final=False, resume=False)
    tokens = torch.randint(3, 500, (4000,), generator=torch.Generator().manual_seed(5))
    return Trainer(cfg, data_factory=lambda r, n: (InMemoryTokenSource(tokens, 16, 8, r, n, seed=1), {})).run().losses


@pytest.mark.parametrize("parallel", [
    pytest.param(ParallelConfig(pp=2, dp_shard=1), id="pp2_1f1b"),
    pytest.param(ParallelConfig(pp=2, dp_shard=1, pp_schedule="zbv_zero_bubble", pp_stages_per_rank=2), id="pp2_zbv"),
])
def test_a_tied_hf_model_initializes_both_copies(parallel, tmp_path):
    import torch.nn.functional as F
    import transformers

    from cptron.data.interface import InMemoryTokenSource

    config = transformers.LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=10000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(3, 500, (4000,), generator=torch.Generator().manual_seed(5))
    batch = next(InMemoryTokenSource(tokens, 16, 8, seed=1))
    with torch.no_grad():
        hf_loss = F.cross_entropy(model(batch.tokens).logits.flatten(0, 1), batch.labels.flatten()).item()
    ref = run_distributed(train_from_tied_hf, 1, str(tmp_path / "ref"), tmp_path / "hf", ParallelConfig())[0]
    got = run_distributed(train_from_tied_hf, 2, str(tmp_path / "par"), tmp_path / "hf", parallel)[0]
    assert abs(ref[0] - hf_loss) < 1e-5 and abs(got[0] - hf_loss) < 1e-5, (ref[0], got[0], hf_loss)
    assert abs(got[1] - ref[1]) < 1e-5
