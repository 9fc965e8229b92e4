"""Small, deterministic training set-ups shared by the trainer's tests and benchmarks."""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributed.tensor import DTensor

from cptron.data.interface import Batch, BatchSource, dp_slice
from cptron.models.config import model_config_from_preset
from cptron.models.llama import canonical_param_name
from cptron.parallel.dims import ParallelConfig
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.config import JobConfig, TrainingConfig
from cptron.train.lr import LRConfig
from cptron.train.metrics import MetricsConfig
from cptron.train.optim import OptimizerConfig

VOCAB = 500  # padded to 512: padded columns must not change the loss
EOS = 2


class PackedSource(BatchSource):
    """Deterministic packed windows with documents separated by EOS, sliced per DP rank."""

    def __init__(self, seq_len: int, global_batch: int, dp_rank: int, dp_size: int, seed: int = 0):
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.rows = dp_slice(global_batch, dp_rank, dp_size)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.step)
        w = torch.randint(3, VOCAB, (self.global_batch, self.seq_len + 1), generator=g)
        w[torch.rand(w.shape, generator=g) < 0.08] = EOS
        eos = (w == EOS).long()
        docs = torch.cumsum(eos, dim=1) - eos  # EOS is the last token of its document
        self.step += 1
        return Batch.from_windows(w[self.rows[0] : self.rows[1]], docs[self.rows[0] : self.rows[1]])

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def make_train_config(run_dir, parallel: Optional[ParallelConfig] = None, **training) -> JobConfig:
    """A 4-layer tiny model on 8 x 16-token sequences per step, micro batch 1 (gradient
    accumulation), clipping active, no checkpoints or metrics files unless overridden."""
    model = model_config_from_preset("tiny", n_layers=4, vocab_size=VOCAB, pad_vocab_to_multiple_of=64, max_seq_len=64)
    t = dict(run_dir=str(run_dir), steps=3, global_batch_size=8, micro_batch_size=1, seq_len=16, seed=0, device="cpu")
    t.update(training)
    return JobConfig(
        model=model,
        training=TrainingConfig(**t),
        parallel=parallel or ParallelConfig(),
        optim=OptimizerConfig(lr=3e-3, grad_clip=0.05, weight_decay=0.1),
        lr=LRConfig(schedule="cosine", warmup_steps=1),
        checkpoint=CheckpointConfig(interval=0, save_final=False, resume=False),
        metrics=MetricsConfig(log_every=1, jsonl=False, progress_bar="off"),
    )


def full_grads(parts) -> dict[str, torch.Tensor]:
    out = {}
    for part in parts:
        for name, p in part.named_parameters():
            g = p.grad
            if g is None:
                continue
            out[canonical_param_name(name)] = (g.full_tensor() if isinstance(g, DTensor) else g).clone()
    return out


def train_recording_grads(cfg: JobConfig):
    """Train `cfg` on PackedSource windows of its seq_len and global batch, recording every step's full
    gradients (`full_grads`, taken before the optimizer step). Returns (trainer, result, {step: {name: grad}})."""
    from cptron.train.trainer import Trainer  # deferred: the trainer imports far more than these set-ups need

    t, grads = cfg.training, {}
    trainer = Trainer(
        cfg,
        data_factory=lambda rank, size: (PackedSource(t.seq_len, t.global_batch_size, rank, size), {}),
        grad_hook=lambda step, parts: grads.__setitem__(step, full_grads(parts)),
    )
    result = trainer.run()
    return trainer, result, grads
