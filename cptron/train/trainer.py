"""The training loop: batch -> forward/backward -> clip -> AdamW step -> metrics, eval, checkpoint.

`Trainer(cfg).run()` works on one CPU process and on a 3-D parallel GPU cluster
alike. Setup order:
  1. process group and device (torchrun/SLURM env, or a single local process);
  2. the model config (from the init checkpoint or the `model:` section) and the
     mesh (`cptron.parallel.dims`);
  3. model parts on the meta device: the whole model, or this rank's pipeline
     stages; each parallelized from outside (`parallelize_llama`), then
     materialized and initialized by (seed, parameter name);
  4. AdamW per part, the LR schedule, the data loaders;
  5. resume from the newest complete checkpoint, else load the initial weights.

Loss normalization: every microbatch's loss is its token-summed cross-entropy
divided by the number of target tokens in the whole global batch, and gradients
are summed (not averaged) over data-parallel ranks. So any split of the global
batch over ranks, microbatches and pipeline chunks gives the same gradient as
one process computing the token-mean loss of the whole batch.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from cptron.config import config_to_dict
from cptron.data.interface import IGNORE_INDEX, Batch, BatchSource
from cptron.errors import ConfigError, CptronError
from cptron.models.config import ModelConfig
from cptron.models.flex import check_attention_support
from cptron.models.llama import Transformer
from cptron.parallel.dims import build_mesh, mixed_precision_dtype, resolve_parallel_dims
from cptron.parallel.parallelize import describe_parallelism, parallelize_llama
from cptron.train.config import TrainConfig
from cptron.train.loss import cross_entropy_sum, cross_entropy_sum_and_rows, loss_parallel_context
from cptron.train.optim import build_optimizers, clip_gradients, global_grad_norm, resolve_adamw_implementation

log = logging.getLogger("cptron.train")


class NonFiniteLossError(CptronError):
    """The loss or gradient norm became NaN/inf and the policy says stop."""


@dataclass
class TrainResult:
    """What a run did; `losses[step]` is the global mean token loss of that optimizer step."""

    last_step: int
    losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    eval_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    resumed_from: Optional[str] = None
    source_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per step, the mean token loss of each data source present in its batch."""
    stopped_by: Optional[str] = None
    """Why the run stopped before training.steps after saving a checkpoint (a signal's name or
    "time limit"); None when it finished or `stop_at` ended it."""


_TAG_SHIFT, _SOURCE_BITS = 32, 12
"""Under pipelining each row's labels carry (row << 12 | source) << 32 to the last stage's loss function:
its source for the per-source losses and its row within the step's batch, which identifies the microbatch
whatever torch does to the targets (labels stay in [-100, 2**31); up to 4096 sources and 2**19 rows)."""


def _tag_labels(labels: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """`labels` carrying each row's source and index (the bounds are checked at start-up)."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    return labels + (((rows << _SOURCE_BITS) | sources) << _TAG_SHIFT)[:, None]


def _untag_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(labels, each row's source, the first row's index) of tagged labels."""
    tag = (labels[:, 0] + (1 << (_TAG_SHIFT - 1))) >> _TAG_SHIFT  # -100 + 2**31 >= 0: the tag alone remains
    return labels - (tag << _TAG_SHIFT)[:, None], tag & ((1 << _SOURCE_BITS) - 1), int(tag[0] >> _SOURCE_BITS)

EXIT_RESUMABLE = 75
"""Exit status of `cptron train` when it saved and stopped early (a signal or the time limit):
rerunning the same command resumes (75 is EX_TEMPFAIL, "try again later")."""


class _StopRequests:
    """Signal handlers that ask the training loop to save and stop at the next step boundary.

    The first signal only sets a flag. Copies arriving within `repeat_grace_s` belong to the
    same request: under SLURM a worker gets the job's SIGTERM both directly and forwarded by
    torchrun. A signal repeated later gets the default action (usually death), for a run that
    is stuck and should not wait. Installed for `Trainer.run` only: during set-up a signal
    keeps its default action, which loses nothing (no step has run yet)."""

    repeat_grace_s = 5.0

    def __init__(self, names: list[str]):
        self.received: Optional[str] = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        if not names:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("checkpoint.save_on_signals ignored: signal handlers need the main thread")
            return
        from cptron.train.checkpointing import signal_number

        for name in names:  # validated by CheckpointConfig
            sig = signal.Signals(signal_number(name))
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._first_at < self.repeat_grace_s:
                return  # the same request, delivered twice (directly and through the launcher)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received, self._first_at = name, time.monotonic()
        log.warning("received %s: finishing this step, then saving a checkpoint and stopping (send it again "
                    "after %.0f s to stop at once)", name, self.repeat_grace_s)

    def restore(self) -> None:
        """Put back the handlers found at installation; one installed outside Python (which
        signal.signal cannot reinstall) becomes the default action."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """Join the process group a launcher describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK: torchrun, the deepspeed launcher, or srun running torchrun), or start a
    one-process group."""
    if device_choice == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = device_choice
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device='cuda' is invalid: CUDA is not available on this machine")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" \
        else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


class Trainer:
    """One training run. `data`/`val_sets` replace the configured data section (tests, benchmarks)."""

    def __init__(self, cfg: TrainConfig, *,
                 data_factory: Optional[Callable[[int, int], tuple[BatchSource, dict[str, Callable]]]] = None,
                 loss_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                 grad_hook: Optional[Callable[[int, list[nn.Module]], None]] = None):
        """`data_factory(dp_rank, dp_size) -> (train source, {name: validation batches factory})`
        replaces the `data:` section (tests, benchmarks). `loss_hook(step, loss)` may
        transform each microbatch loss before backward (fault injection);
        `grad_hook(step, parts)` sees the accumulated gradients before clipping."""
        from cptron.train.checkpointing import TrainCheckpointer, model_config_for_init
        from cptron.train.lr import build_lr_schedule

        from cptron.config import validate_config

        self._started = time.monotonic()  # training.time_limit_minutes counts set-up time too
        for section in (cfg.model, cfg.training, cfg.parallel, cfg.optim, cfg.lr, cfg.checkpoint, cfg.metrics):
            validate_config(section)
        cfg.validate()
        self.cfg = cfg
        self.loss_hook, self.grad_hook = loss_hook, grad_hook
        t = cfg.training
        self.rank, self.world_size, self.device = setup_distributed(t.device)

        init_from = cfg.checkpoint.init_from
        if init_from:
            self.model_cfg = model_config_for_init(init_from, cfg.model.pad_vocab_to_multiple_of)
        else:
            self.model_cfg = cfg.model
        self.model_cfg.validate()
        mc = self.model_cfg
        if t.seq_len > mc.max_seq_len:
            raise ConfigError(f"training.seq_len={t.seq_len} is invalid: expected <= model.max_seq_len="
                              f"{mc.max_seq_len}")

        self.dims = resolve_parallel_dims(cfg.parallel, self.world_size, mc)
        self.mesh, self.dp_mesh = build_mesh(self.dims, self.device.type)
        self.dp_rank = self.dp_mesh.get_local_rank()
        self.pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        self.param_dtype = mixed_precision_dtype(cfg.parallel, self.device)
        self._check_batch_shape()

        tokenizer_dir = t.tokenizer or _tokenizer_dir_of(init_from)
        self.checkpointer = TrainCheckpointer(cfg.checkpoint, t.run_dir, model_cfg=mc, tokenizer_dir=tokenizer_dir)
        latest = self.checkpointer.resume_path()
        # Weights that a checkpoint will overwrite are not initialized first:
        # initialization builds each full tensor on every rank, which is slow at 8B.
        self.parts, self.pipeline = self._build_model_parts(initialize=latest is None and not init_from)
        self.optimizers = build_optimizers(self.parts, cfg.optim, self.device)
        self.lr_schedule = build_lr_schedule(cfg.lr, t.steps)

        if data_factory is None:
            from cptron.data.loader import build_data_loaders

            validate_config(cfg.data)
            data, val_sets = build_data_loaders(
                cfg.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size, dp_rank=self.dp_rank,
                dp_size=self.dims.dp, vocab_size=mc.vocab_size, seed=t.seed, total_steps=t.steps)
        else:
            data, val_sets = data_factory(self.dp_rank, self.dims.dp)
        self.data = data
        # Per-source training losses (loss/<source> in the metrics) when the loader names its sources.
        self.source_names: list[str] = list(getattr(data, "source_names", None) or [])
        self._source_acc: Optional[torch.Tensor] = None
        self._pp_rows: dict[int, tuple] = {}
        if self.source_names and self.pipeline is not None and (
                len(self.source_names) > 1 << _SOURCE_BITS or self.local_rows >= 1 << (63 - _TAG_SHIFT - _SOURCE_BITS)):
            log.warning("per-source losses are off: under pipelining they handle up to %d sources and %d rows per "
                        "rank and step", 1 << _SOURCE_BITS, 1 << (63 - _TAG_SHIFT - _SOURCE_BITS))
            self.source_names = []
        self._last_source_losses: dict[str, float] = {}
        self.val_sets = val_sets or {}

        self.step = 0
        self.skipped: list[int] = []
        self.resumed_from: Optional[str] = None
        self._last_saved: Optional[int] = None
        if latest is not None:
            state = self.checkpointer.load(latest, self.parts, self.optimizers)
            self._restore_train_state(state)
            self.resumed_from = str(latest)
            self._last_saved = self.step
            log.info("resumed from %s at step %d", latest, self.step)
        elif init_from:
            self.checkpointer.load_initial_weights(init_from, self.parts)
            log.info("initial weights from %s", init_from)
        # On every rank (it is the same everywhere): a mixture that runs out of data before
        # training.steps raises here on all ranks, not mid-run and not on rank 0 alone.
        self._data_plan = self.data.describe_plan(t.steps) if hasattr(self.data, "describe_plan") else None
        self._log_setup()

    # ------------------------------------------------------------------ setup

    def _check_batch_shape(self) -> None:
        t, dims = self.cfg.training, self.dims
        if t.global_batch_size % dims.dp:
            raise ConfigError(f"training.global_batch_size={t.global_batch_size} is invalid: expected a multiple "
                              f"of the data-parallel size dp_replicate x dp_shard = {dims.dp}")
        self.local_rows = t.global_batch_size // dims.dp
        if self.local_rows % t.micro_batch_size:
            raise ConfigError(f"training.micro_batch_size={t.micro_batch_size} is invalid: each data-parallel rank "
                              f"gets {self.local_rows} sequences per step, expected a divisor of that")
        self.n_micro = self.local_rows // t.micro_batch_size
        if dims.tp > 1 and self.cfg.parallel.sequence_parallel and t.seq_len % dims.tp:
            raise ConfigError(f"training.seq_len={t.seq_len} is invalid: expected a multiple of parallel.tp="
                              f"{dims.tp} with sequence parallelism")
        if dims.pp > 1:
            mb = self.cfg.parallel.pp_microbatches or dims.pp * self.cfg.parallel.pp_stages_per_rank
            mb = min(mb, self.n_micro) if self.cfg.parallel.pp_microbatches is None else mb
            if self.n_micro % mb:
                raise ConfigError(f"parallel.pp_microbatches={mb} is invalid: each rank has {self.n_micro} "
                                  f"microbatches of {t.micro_batch_size} sequences per step, expected a divisor")
            self.pp_microbatches = mb
            from cptron.parallel.pipeline import check_pipeline_schedule

            fsdp_on = dims.dp > 1 or self.param_dtype != torch.float32
            check_pipeline_schedule(self.cfg.parallel.pp_schedule, dims.pp, self.cfg.parallel.pp_stages_per_rank, mb,
                                    compiled=self.cfg.parallel.compile,
                                    fsdp_reshard_after_forward=fsdp_on and self.cfg.parallel.fsdp_reshard_after_forward)

    def _build_model_parts(self, initialize: bool):
        pcfg, dims, mc = self.cfg.parallel, self.dims, self.model_cfg
        seed = self.cfg.training.seed
        pipeline = None
        check_attention_support(self.cfg.training.attention, self.device, compiled=pcfg.compile)
        if dims.pp > 1:
            from cptron.parallel import pipeline as pl

            pp_rank = self.mesh["pp"].get_local_rank()
            n_stages = dims.pp * pcfg.pp_stages_per_rank
            ranges = pl.split_layers(mc.n_layers, n_stages, pcfg.pp_layers_per_stage)
            stage_ids = pl.stage_ids_for_rank(pp_rank, dims.pp, pcfg.pp_stages_per_rank, pcfg.pp_schedule)
            parts = pl.build_stage_modules(mc, stage_ids, n_stages, ranges,
                                           ids_are_doc_ids=self.cfg.training.document_masking)
        else:
            with torch.device("meta"):
                parts = [Transformer(mc)]
        for part in parts:
            part.attention_impl = self.cfg.training.attention
            parallelize_llama(part, self.mesh, dims, pcfg, param_dtype=self.param_dtype)
            part.to_empty(device=self.device)
            if initialize:
                part.init_weights(seed)
            part.train()
        self.tied_sync = None
        if dims.pp > 1:
            pipeline = pl.build_pipeline_schedule(
                parts, stage_ids, n_stages, self.pp_group, self.device, self.pp_microbatches,
                self._pipeline_loss, pcfg.pp_schedule)
            self.stage_ids, self.n_stages = stage_ids, n_stages
            if mc.tie_embeddings:
                first, last = pl.tied_stage_ranks(dims.pp, pcfg.pp_stages_per_rank, pcfg.pp_schedule)
                self.tied_sync = pl.TiedEmbeddingSync(parts, self.mesh, first, last)
                log.info("tied embeddings: pipeline ranks %d and %d hold the input and output copies; their "
                         "gradients are summed every step", first, last)
        return parts, pipeline

    def _log_setup(self) -> None:
        if self.rank != 0:
            return
        n_params = self.model_cfg.num_params()
        t = self.cfg.training
        log.info("model: %s params (%d layers, dim %d, vocab %d padded to %d)", f"{n_params:,}",
                 self.model_cfg.n_layers, self.model_cfg.dim, self.model_cfg.vocab_size,
                 self.model_cfg.padded_vocab_size)
        log.info("world %d: %s", self.world_size,
                 describe_parallelism(self.dims, self.cfg.parallel, self.param_dtype, self.device))
        log.info("optimizer: AdamW (%s); attention: %s", resolve_adamw_implementation(self.cfg.optim, self.device),
                 _attention_description(self.cfg.training.document_masking, self.device, self.model_cfg,
                                        self.cfg.training.attention))
        log.info("batch: %d sequences x %d tokens per step = %d ranks x %d microbatches x %d", t.global_batch_size,
                 t.seq_len, self.dims.dp, self.n_micro, t.micro_batch_size)
        if self._data_plan is not None:
            log.info("%s", self._data_plan)

    # ------------------------------------------------------------------ state

    # RNG: each step reseeds torch's generators from (training.seed, step)
    # (`_seed_step`), so a resumed run draws the same random numbers as the
    # uninterrupted one without storing generator states. Those differ per rank
    # and could not be mapped onto a different layout anyway.

    def train_state(self) -> dict:
        return {"step": self.step, "data": self.data.state_dict(), "skipped_steps": list(self.skipped),
                "rng": {"seed": self.cfg.training.seed, "policy": "reseeded from (seed, step) every step"},
                "world_size": self.world_size, "layout": self.dims.describe()}

    def _restore_train_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = list(state.get("skipped_steps", []))
        self.data.load_state_dict(state["data"])
        saved_seed = state.get("rng", {}).get("seed", self.cfg.training.seed)
        if saved_seed != self.cfg.training.seed:
            raise ConfigError(f"training.seed={self.cfg.training.seed} is invalid for this resume: the checkpoint "
                              f"was trained with seed {saved_seed}")

    def _seed_step(self) -> None:
        torch.manual_seed((self.cfg.training.seed * 1_000_003 + self.step) % (2 ** 63))

    # ------------------------------------------------------------------ step

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._source_acc is not None:  # a training step with per-source losses: labels carry the source
            labels, sources, first_row = _untag_labels(labels)
            loss, rows = cross_entropy_sum_and_rows(logits, labels, self.model_cfg.vocab_size)
            # Kept per microbatch (by its first row): torch's schedules also call this on placeholder
            # outputs with the first microbatch's target (backward metadata inference, at the first step
            # and after each switch between training and eval), before the real call, which replaces it.
            self._pp_rows[first_row] = (rows, labels, sources)
        else:
            loss = cross_entropy_sum(logits, labels, self.model_cfg.vocab_size)
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        loss = loss * self._loss_scale
        if self.loss_hook is not None:
            loss = self.loss_hook(self.step, loss)
        return loss

    def _add_source_losses(self, rows: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor) -> None:
        acc = self._source_acc
        # A one-hot product rather than index_add_, whose CUDA kernel adds with atomics (run-to-run noise).
        onehot = torch.nn.functional.one_hot(sources, acc.shape[1]).to(acc.dtype)
        per_row = torch.stack([rows.to(acc.dtype), (labels != IGNORE_INDEX).sum(1).to(acc.dtype)])
        acc += per_row @ onehot

    def _doc_ids(self, b: Batch) -> Optional[torch.Tensor]:
        return b.doc_ids if self.cfg.training.document_masking else None

    def _ids(self, b: Batch) -> torch.Tensor:
        """What pipeline stages pass along: doc_ids (all zero for a batch without
        documents: one document per row), or plain positions without document masking."""
        if not self.cfg.training.document_masking:
            return torch.arange(b.tokens.shape[1]).expand_as(b.tokens)
        return b.doc_ids if b.doc_ids is not None else torch.zeros_like(b.tokens)

    def _pieces(self, batch: Batch):
        """The rows one forward takes at a time, on the device: a microbatch, or with
        pipelining the pp_microbatches microbatches of one schedule step."""
        rows = self.cfg.training.micro_batch_size * (self.pp_microbatches if self.pipeline is not None else 1)
        for i in range(0, batch.rows, rows):
            yield batch.slice(i, i + rows).to(self.device)

    def _global_tokens(self, batch: Batch) -> torch.Tensor:
        n = (batch.labels != IGNORE_INDEX).sum().to(self.device, torch.float32)
        dist.all_reduce(n, group=self.dp_mesh.get_group())
        return n

    def forward_backward(self, batch: Batch) -> torch.Tensor:
        """Accumulate this rank's gradients for one step (tied embedding copies summed across pipeline
        stages); return the global mean token loss."""
        n_tokens = self._global_tokens(batch)
        self._loss_scale = 1.0 / n_tokens.clamp_min(1.0)
        lp = self.dims.tp > 1 and self.cfg.parallel.loss_parallel
        total = torch.zeros((), device=self.device)
        per_source = bool(self.source_names)  # the same on every rank
        if per_source and batch.sources is None:
            raise CptronError(f"the data loader names sources {self.source_names} but its batch has no "
                              "Batch.sources")
        # [loss sum, labelled tokens] per source, for the metrics; read by _pipeline_loss too.
        self._source_acc = torch.zeros(2, len(self.source_names), device=self.device) if per_source else None
        try:
            self._forward_backward(batch, total, lp)
        finally:
            acc, self._source_acc = self._source_acc, None
        dist.all_reduce(total, group=self.dp_mesh.get_group())
        if self.pp_group is not None:
            dist.all_reduce(total, group=self.pp_group)  # only last-stage ranks hold a loss
        if acc is not None:
            dist.all_reduce(acc, group=self.dp_mesh.get_group())
            if self.pp_group is not None:
                dist.all_reduce(acc, group=self.pp_group)
            sums, counts = acc.tolist()
            self._last_source_losses = {n: s / c for n, s, c in zip(self.source_names, sums, counts) if c > 0}
        if self.tied_sync is not None:
            self.tied_sync.reduce_grads()
        self._last_loss = float(total)
        return total

    def _forward_backward(self, batch: Batch, total: torch.Tensor, lp: bool) -> None:
        with loss_parallel_context(lp):
            if self.pipeline is not None:
                from cptron.parallel.pipeline import pipeline_train_step

                for b in self._pieces(batch):
                    labels = b.labels
                    if self._source_acc is not None:  # the last stage's loss function reads each row's source
                        labels = _tag_labels(labels, b.sources)
                    self._pp_rows = {}
                    out = pipeline_train_step(self.pipeline, b.tokens, self._ids(b), labels)
                    seen = len(self._pp_rows)
                    if self._source_acc is not None and self.pipeline.has_last_stage and \
                            seen != self.pipeline.n_microbatches:
                        # Not an error raised here: only last-stage ranks see it, and the others would wait.
                        log.warning("per-source losses saw %d of %d microbatches of a pipeline step; this "
                                    "step's loss/<source> values are NaN", seen, self.pipeline.n_microbatches)
                        self._source_acc[0] = float("nan")
                    for rows, row_labels, sources in self._pp_rows.values():
                        self._add_source_losses(rows, row_labels, sources)
                    if out is not None:
                        total += out.detach()
            else:
                model = self.parts[0]
                for i, b in enumerate(self._pieces(batch)):
                    if hasattr(model, "set_requires_gradient_sync"):
                        # Reduce-scatter gradients once, after the last microbatch.
                        model.set_requires_gradient_sync(i == self.n_micro - 1)
                    logits = model(b.tokens, doc_ids=self._doc_ids(b))
                    if self._source_acc is not None:
                        loss, rows = cross_entropy_sum_and_rows(logits, b.labels, self.model_cfg.vocab_size)
                        self._add_source_losses(rows, b.labels, b.sources)
                    else:
                        loss = cross_entropy_sum(logits, b.labels, self.model_cfg.vocab_size)
                    if isinstance(loss, DTensor):
                        loss = loss.full_tensor()
                    loss = loss * self._loss_scale
                    if self.loss_hook is not None:
                        loss = self.loss_hook(self.step, loss)
                    loss.backward()
                    total += loss.detach()

    def train_step(self, batch: Batch) -> tuple[float, float, bool]:
        """One optimizer step. Returns (loss, grad_norm, stepped)."""
        from cptron.train.lr import apply_lr

        self._seed_step()
        self._lr = apply_lr(self.optimizers, self.cfg.optim.lr, self.lr_schedule.factor(self.step))
        loss = self.forward_backward(batch)
        if self.grad_hook is not None:
            self.grad_hook(self.step, self.parts)
        norm, stepped = self.optimizer_step()
        return float(loss), norm, stepped

    def optimizer_step(self) -> tuple[float, bool]:
        """After forward_backward: global grad norm, the non-finite check, clipping, AdamW.
        Returns (grad_norm, stepped); a non-finite loss or norm drops the gradients."""
        skip = self.tied_sync.duplicates if self.tied_sync is not None else ()
        norm = global_grad_norm(self.parts, self.pp_group, skip)
        norm_f = float(norm)
        # A NaN loss gives NaN gradients, so the norm catches both.
        if not math.isfinite(norm_f) or not math.isfinite(self._last_loss):
            self._zero_grad()
            return norm_f, False
        if self.cfg.optim.grad_clip > 0:
            clip_gradients(self.parts, self.cfg.optim.grad_clip, norm)
        for opt in self.optimizers:
            opt.step()
        self._zero_grad()
        return norm_f, True

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        out = {}
        limit = self.cfg.training.eval_batches
        lp = self.dims.tp > 1 and self.cfg.parallel.loss_parallel
        for name, make in self.val_sets.items():
            loss_sum = torch.zeros((), device=self.device)
            tokens = torch.zeros((), device=self.device)
            for i, batch in enumerate(make()):
                if limit and i >= limit:
                    break
                tokens += (batch.labels != IGNORE_INDEX).sum().to(self.device, torch.float32)
                self._loss_scale = 1.0
                with loss_parallel_context(lp):
                    if self.pipeline is not None:
                        from cptron.parallel.pipeline import pipeline_eval_step

                        for b in self._pieces(batch):
                            s = pipeline_eval_step(self.pipeline, b.tokens, self._ids(b), b.labels)
                            if s is not None:
                                loss_sum += s
                    else:
                        for b in self._pieces(batch):
                            loss = cross_entropy_sum(self.parts[0](b.tokens, doc_ids=self._doc_ids(b)), b.labels,
                                                     self.model_cfg.vocab_size)
                            loss_sum += loss.full_tensor() if isinstance(loss, DTensor) else loss
            dist.all_reduce(tokens, group=self.dp_mesh.get_group())
            dist.all_reduce(loss_sum, group=self.dp_mesh.get_group())
            if self.pp_group is not None:
                dist.all_reduce(loss_sum, group=self.pp_group)
            out[name] = float(loss_sum / tokens.clamp_min(1.0))
        return out

    # ------------------------------------------------------------------ loop

    def _stop_reason(self, stops: _StopRequests) -> Optional[str]:
        """A signal's name or "time limit" when this invocation should save and stop now; every rank
        gets the same answer (any rank's signal counts, rank 0's clock decides the time limit)."""
        limit_s = self.cfg.training.time_limit_minutes * 60.0
        if not self.cfg.checkpoint.save_on_signals and not limit_s:  # the same on every rank
            return None
        code = 0
        if stops.received is not None:
            code = 1 + int(signal.Signals[stops.received])
        elif limit_s and self.rank == 0 and time.monotonic() - self._started >= limit_s:
            code = -1
        if self.world_size > 1:
            # On the training device: NCCL's small all-reduce stays fast at thousands of ranks, where
            # gloo's grows with the world size; the host already waits for each step's loss anyway.
            flag = torch.tensor([code, -code], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            top, bottom = (int(v) for v in flag.tolist())
            code = top if top > 0 else -bottom
        if code > 0:
            return signal.Signals(code - 1).name
        return "time limit" if code < 0 else None

    def save(self) -> None:
        for part in self.parts:
            for name, p in part.named_parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                if not torch.isfinite(local).all():
                    raise NonFiniteLossError(f"refusing to save step {self.step}: parameter {name} is not finite")
        self.checkpointer.save(self.step, self.parts, self.optimizers, self.train_state())
        self._last_saved = self.step

    def run(self, stop_at: Optional[int] = None) -> TrainResult:
        """Train to training.steps. `stop_at` ends this invocation after that step
        without the final eval and save, as a preemption would (tests, job-time limits)."""
        from cptron.train.metrics import MetricsLogger, StepProfiler, Throughput, device_peak_flops, \
            flops_per_token, memory_stats

        cfg, t = self.cfg, self.cfg.training
        result = TrainResult(last_step=self.step, resumed_from=self.resumed_from, skipped_steps=self.skipped)
        metrics = MetricsLogger(cfg.metrics, t.run_dir, rank=self.rank, run_config=config_to_dict(cfg),
                                total_steps=t.steps, start_step=self.step)
        peak, peak_desc = device_peak_flops(self.device, self.param_dtype, override_tflops=cfg.metrics.peak_tflops)
        fpt = flops_per_token(self.model_cfg, t.seq_len)
        if self.rank == 0:
            log.info("%.4g FLOP/token; %s", fpt, peak_desc)
        meter = Throughput(fpt, peak, self.world_size)
        tokens_per_step = t.global_batch_size * t.seq_len
        ckpt_every = cfg.checkpoint.interval
        profiler = StepProfiler(cfg.metrics.profile_steps, t.run_dir, self.rank, self.device)
        stops = _StopRequests(cfg.checkpoint.save_on_signals)
        try:
            end = t.steps if stop_at is None else min(stop_at, t.steps)
            if self.val_sets and t.eval_at_start and self.step == 0:
                result.eval_losses[0] = ev = self.evaluate()
                metrics.log(0, {f"val/{k}": v for k, v in ev.items()}, kind="eval")
            while self.step < end:
                batch = next(self.data)
                with profiler.step(self.step + 1):
                    loss, norm, stepped = self.train_step(batch)
                step = self.step
                self.step += 1
                if not stepped:
                    self.skipped.append(step)
                    msg = f"step {step}: non-finite loss {loss} / grad norm {norm}"
                    if t.nonfinite == "stop":
                        raise NonFiniteLossError(msg + "; stopped (training.nonfinite=stop); the newest "
                                                 "checkpoint is the last good state")
                    log.warning("%s; step skipped (%d of at most %d)", msg, len(self.skipped), t.max_skipped_steps)
                    if len(self.skipped) > t.max_skipped_steps:
                        raise NonFiniteLossError(f"{len(self.skipped)} steps skipped for non-finite losses "
                                                 f"(training.max_skipped_steps={t.max_skipped_steps}): {self.skipped}")
                result.losses[step] = loss
                result.grad_norms[step] = norm
                if self.source_names:
                    result.source_losses[step] = dict(self._last_source_losses)
                # Metrics are keyed by completed updates (1-based): step N is the
                # state after N optimizer steps, the same number a checkpoint carries.
                rates = meter.update(tokens_per_step)
                row = {"loss": loss, **{f"loss/{n}": v for n, v in self._last_source_losses.items()},
                       "grad_norm": norm, "lr": self._lr, "skipped_steps": len(self.skipped), **rates}
                if self.step % cfg.metrics.log_every == 0 or self.step == t.steps:
                    row.update(memory_stats(self.device))
                    metrics.log(self.step, row)
                metrics.progress(self.step, {"loss": f"{loss:.4f}"})
                if self.val_sets and t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    result.eval_losses[self.step] = ev = self.evaluate()
                    metrics.log(self.step, {f"val/{k}": v for k, v in ev.items()}, kind="eval")
                    meter.reset()
                if ckpt_every and self.step % ckpt_every == 0 and self.step < t.steps:
                    self.save()
                    meter.reset()
                if self.step < end and (reason := self._stop_reason(stops)) is not None:
                    if self._last_saved != self.step:
                        self.save()
                    self.checkpointer.wait()
                    log.warning("stopped at step %d of %d (%s) after saving a checkpoint; run the same command "
                                "to resume", self.step, t.steps, reason)
                    metrics.close()
                    result.last_step, result.stopped_by = self.step, reason
                    return result
            if self.step < t.steps:  # stopped early: no final eval or save
                self.checkpointer.wait()
                metrics.close()
                result.last_step = self.step
                return result
            if self.val_sets:
                result.eval_losses[self.step] = ev = self.evaluate()
                metrics.log(self.step, {f"val/{k}": v for k, v in ev.items()}, kind="eval")
            if cfg.checkpoint.save_final and self._last_saved != self.step:
                self.save()
        except NonFiniteLossError:
            # Raised on every rank at the same step (the loss and norm are global),
            # so the collective wait is safe: a checkpoint still being written in
            # the background is the last good state and must be completed.
            self.checkpointer.wait()
            metrics.close()
            raise
        except BaseException:
            # Possibly raised on this rank only: a collective wait could hang, so
            # a pending background save is left incomplete (it stays ignored).
            metrics.close()
            raise
        finally:
            stops.restore()
        self.checkpointer.wait()
        metrics.close()
        result.last_step = self.step
        return result


def _attention_description(document_masking: bool, device: torch.device, mc: ModelConfig,
                           attention: str = "sdpa") -> str:
    if attention == "flex" and (document_masking or mc.sliding_window is not None):
        masks = (["document"] if document_masking else []) + \
            ([f"sliding-window ({mc.sliding_window} tokens)"] if mc.sliding_window is not None else [])
        kernel = "torch.compile'd kernel" if device.type != "cpu" else \
            "torch's dense reference on CPU, slower than sdpa"
        return f"FlexAttention with a block-sparse {' and '.join(masks)} causal mask ({kernel})"
    if document_masking:
        what = "SDPA with a boolean block-diagonal causal mask (documents masked; no flash kernel)"
    elif mc.sliding_window is not None:
        what = f"SDPA with a sliding-window causal mask ({mc.sliding_window} tokens)"
    else:
        what = "SDPA causal (is_causal: flash kernel eligible on CUDA)"
    if device.type == "cuda":
        enabled = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                         ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                         ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                                         ("math", torch.backends.cuda.math_sdp_enabled())) if on]
        what += f"; SDPA backends enabled: {', '.join(enabled)}"
    return what


def _tokenizer_dir_of(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    from pathlib import Path

    p = Path(path)
    if (p / "tokenizer").is_dir():
        return str(p / "tokenizer")
    from cptron.hf import tokenizer_files

    return str(p) if tokenizer_files(p) else None
