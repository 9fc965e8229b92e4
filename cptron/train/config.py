"""The `cptron train` config: one section per component, each its own dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from cptron.data.config import DataConfig
from cptron.errors import require
from cptron.models.config import ModelConfig
from cptron.parallel.dims import ParallelConfig
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.lr import LRConfig
from cptron.train.metrics import MetricsConfig
from cptron.train.optim import OptimizerConfig


@dataclass
class TrainingConfig:
    """Batch shape, length of the run, evaluation and the non-finite loss policy."""

    run_dir: str = "runs/train"
    """Directory of this run: checkpoints/, metrics.jsonl, tensorboard/, config.yaml."""
    steps: int = 100
    """Number of optimizer steps of the whole run (a resumed run continues to this step)."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Sequences per forward pass on one rank; the rest of the rank's share is gradient accumulation (or pipeline microbatches)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    seed: int = 0
    """Seed of the initialization and of the data order."""
    document_masking: bool = True
    """Attend only within each packed document and restart positions per document; false: plain causal attention over the window (Megatron's default; lets SDPA use the flash kernel on GPU)."""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """Kernel for masked attention (packed documents, sliding window): sdpa with a boolean mask, flex (FlexAttention block-sparse mask, compiled on GPU), or auto: flex on CUDA, sdpa on CPU; plain causal attention always uses SDPA's causal kernel."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto: cuda when available, else cpu."""
    eval_every: int = 0
    """Evaluate the held-out sets every N steps (0: only at the end when validation sets exist)."""
    eval_at_start: bool = True
    """Evaluate the held-out sets before the first step of a fresh run (the base model's losses, the CPT baseline)."""
    eval_batches: int = 0
    """Limit each validation set to this many batches (0: all)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or grad norm: stop with an error (the newest checkpoint stays the last good one), or skip the step."""
    max_skipped_steps: int = 10
    """With nonfinite=skip: the most steps the run may skip (resumes included); one more stops it with an error (0: stop at the first)."""
    time_limit_minutes: float = 0.0
    """Stop this invocation after this much wall time from its start, set-up included (checked after each step): save a checkpoint and exit with code 75 so the same command resumes, e.g. a few minutes under a SLURM job's limit; 0: no limit."""
    tokenizer: Optional[str] = None
    """Tokenizer directory carried into every checkpoint (so an HF export has it); default: the init model's."""
    loss_impl: Literal["auto", "plain", "chunked"] = "auto"
    """Cross-entropy path: plain (a microbatch's full logits, then the loss), chunked (output projection and loss in chunks of tokens, forward and backward, so the fp32 logits never exist whole), or auto: chunked from 2**25 logits per microbatch and rank (128 MiB in fp32) when a microbatch has more tokens than one chunk."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the chunked loss (0: 512)."""

    def validate(self) -> None:
        require(bool(self.run_dir), "training.run_dir", self.run_dir, "a directory path")
        for name in ("steps", "global_batch_size", "micro_batch_size", "seq_len"):
            require(getattr(self, name) >= 1, f"training.{name}", getattr(self, name), "an integer >= 1")
        require(self.eval_every >= 0, "training.eval_every", self.eval_every, "an integer >= 0")
        require(self.eval_batches >= 0, "training.eval_batches", self.eval_batches, "an integer >= 0")
        require(self.max_skipped_steps >= 0, "training.max_skipped_steps", self.max_skipped_steps, "an integer >= 0")
        require(
            self.loss_chunk_tokens >= 0,
            "training.loss_chunk_tokens",
            self.loss_chunk_tokens,
            "an integer >= 0 (0: auto)",
        )
        require(
            self.time_limit_minutes >= 0 and self.time_limit_minutes != float("inf"),
            "training.time_limit_minutes",
            self.time_limit_minutes,
            "a number of minutes >= 0 (0: no limit)",
        )


@dataclass
class JobConfig:
    """Continually pretrain a Llama-family model (any mix of tensor/sequence, pipeline and sharded data parallelism)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.from_preset("tiny"))
    """Architecture; taken from the checkpoint when checkpoint.init_from is set, except pad_vocab_to_multiple_of (and embedding_rank, factorize_head for an HF directory)."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch, run length, evaluation, non-finite policy."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout (pp x dp_replicate x dp_shard x tp must equal the number of processes)."""
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and gradient clipping."""
    lr: LRConfig = field(default_factory=LRConfig)
    """Learning-rate schedule (a multiplier of optim.lr per step)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token shards, the replay mixture and validation sets."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and the initial weights."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Logging sinks and intervals."""

    def validate(self) -> None:
        t = self.training
        # global_batch_size is an int (the config parser makes it one), so its repr is the str this message showed
        require(
            t.global_batch_size % t.micro_batch_size == 0,
            "training.global_batch_size",
            t.global_batch_size,
            f"a multiple of training.micro_batch_size={t.micro_batch_size}",
        )
        require(math.isfinite(self.optim.lr), "optim.lr", self.optim.lr, "a finite number")
        if not self.checkpoint.init_from and not self.checkpoint.branch_from:  # the model section is the architecture
            self.model.check_embedding_rank()
        o = self.optim
        require(
            not o.train_new_rows_only or o.new_rows_from > 0 or bool(self.checkpoint.init_from),
            "optim.new_rows_from",
            o.new_rows_from,
            "the first new token id with optim.train_new_rows_only, or checkpoint.init_from a directory "
            "holding vocab_extension.json (written by `cptron vocab init`) that gives it",
        )
