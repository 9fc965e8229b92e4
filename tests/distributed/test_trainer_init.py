"""Initial weights from a Hugging Face model at step 0, in any layout; eval and compile parity."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from cptron.data.interface import InMemoryTokenSource
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.trainer import Trainer

VOCAB = 500
TOKENS = torch.randint(3, VOCAB, (4000,), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def train_from_hf(rank, world_size, run_dir, hf_dir, parallel):
    cfg = make_train_config(run_dir, parallel, steps=2)
    cfg.checkpoint = CheckpointConfig(init_from=str(hf_dir), save_final=False, resume=False)

    def data(dp_rank, dp_size):
        val = {"heldout": lambda: [next(InMemoryTokenSource(TOKENS, 16, 8, dp_rank, dp_size, seed=99))]}
        return InMemoryTokenSource(TOKENS, 16, 8, dp_rank, dp_size, seed=1), val

    trainer = Trainer(cfg, data_factory=data)
    result = trainer.run()
    return result.losses, result.eval_losses


def hf_first_step_loss(hf_dir) -> float:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    batch = next(InMemoryTokenSource(TOKENS, 16, 8, seed=1))
    with torch.no_grad():
        logits = model(batch.tokens).logits
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten()).item()


@pytest.mark.parametrize("world_size,parallel", [
    (2, ParallelConfig(dp_shard=2)),
    (4, ParallelConfig(dp_shard=2, tp=2)),
    (2, ParallelConfig(pp=2, dp_shard=1)),
    (4, ParallelConfig(pp=2, tp=2, dp_shard=1)),
], ids=["dp_shard2", "dp_shard2_tp2", "pp2", "pp2_tp2"])
def test_hf_init_in_any_layout_matches_one_process_and_transformers(world_size, parallel, hf_dir, tmp_path):
    ref_losses, ref_eval = run_distributed(train_from_hf, 1, str(tmp_path / "ref"), hf_dir, ParallelConfig())[0]
    assert abs(ref_losses[0] - hf_first_step_loss(hf_dir)) < 1e-5, "step 0 must see exactly the HF model"
    losses, evals = run_distributed(train_from_hf, world_size, str(tmp_path / "par"), hf_dir, parallel,
                                    timeout=300)[0]
    for step in (0, 1):
        assert abs(losses[step] - ref_losses[step]) < 1e-5, (step, losses[step], ref_losses[step])
    assert set(evals) == set(ref_eval) == {0, 2}, "eval before the first step and after the last"
    for step in evals:
        assert abs(evals[step]["heldout"] - ref_eval[step]["heldout"]) < 1e-5


def train_small(rank, world_size, run_dir, parallel):
    cfg = make_train_config(run_dir, parallel, steps=2)
    return Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {})).run().losses


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path):
    eager = run_distributed(train_small, 1, str(tmp_path / "eager"), ParallelConfig())[0]
    compiled = run_distributed(train_small, 1, str(tmp_path / "compiled"), ParallelConfig(compile=True),
                               timeout=600)[0]
    for step in eager:
        assert abs(eager[step] - compiled[step]) < 1e-5
