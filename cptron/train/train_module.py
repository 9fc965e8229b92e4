"""What one training step does to the model, in each execution mode: the train module.

`TrainModule` is the interface the loop uses: `forward_backward(batch, step)` accumulates this
rank's gradients and returns the global mean token loss, `optim_step()` takes the global grad
norm, the non-finite check, clipping and AdamW, `evaluate(val_sets)` returns held-out losses.
`PlainTrainModule` runs the whole model on each rank (tensor and data parallelism);
`PipelineTrainModule` runs this rank's pipeline stages under a torch.distributed.pipelining
schedule. Both compute each microbatch's loss in `microbatch_loss`.

Loss normalization: every microbatch's loss is its token-summed cross-entropy divided by the
number of target tokens in the whole global batch, and gradients are summed (not averaged) over
data-parallel ranks. So any split of the global batch over ranks, microbatches and pipeline
chunks gives the same gradient as one process computing the token-mean loss of the whole batch.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from cptron.data.interface import IGNORE_INDEX, Batch
from cptron.errors import ConfigError, CptronError
from cptron.models.config import ModelConfig
from cptron.models.flex import attention_is_masked, choose_attention
from cptron.models.llama import Transformer
from cptron.parallel import pipeline as pl
from cptron.parallel.dims import ParallelDims
from cptron.parallel.parallelize import fsdp_enabled, materialize_device, parallelize_llama
from cptron.train.chunked_loss import ChunkedHeadLoss, resolve_loss_path
from cptron.train.config import JobConfig
from cptron.train.loss import cross_entropy_sum, cross_entropy_sum_and_rows, loss_parallel_context
from cptron.train.optim import build_optimizers, clip_gradients, global_grad_norm
from cptron.train.param_groups import TrainablePlan, resolve_trainable
from cptron.train.source_losses import SourceLosses, tag_labels, untag_labels

log = logging.getLogger("cptron.train")

LossHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MicrobatchPlan:
    """How a step's global batch splits on one data-parallel rank."""

    sequences_per_rank: int
    """Sequences of the global batch on each data-parallel rank."""
    microbatches: int
    """Microbatches of training.micro_batch_size sequences per rank and step."""
    pipeline_microbatches: Optional[int]
    """Microbatches per call of the pipeline schedule (parallel.pp_microbatches resolved); None without pp."""

    @property
    def sequences_per_forward(self) -> int:
        """The rows one forward call (or one pipeline schedule call) takes."""
        return self.sequences_per_rank // self.microbatches * (self.pipeline_microbatches or 1)


def plan_microbatches(cfg: JobConfig, dims: ParallelDims, param_dtype: torch.dtype) -> MicrobatchPlan:
    """The split of the batch over ranks, microbatches and pipeline schedule calls; ConfigError
    naming the field when it does not divide."""
    t, pcfg = cfg.training, cfg.parallel
    if t.global_batch_size % dims.dp:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is invalid: expected a multiple "
            f"of the data-parallel size dp_replicate x dp_shard = {dims.dp}"
        )
    rows = t.global_batch_size // dims.dp
    if rows % t.micro_batch_size:
        raise ConfigError(
            f"training.micro_batch_size={t.micro_batch_size} is invalid: each data-parallel rank "
            f"gets {rows} sequences per step, expected a divisor of that"
        )
    n_micro = rows // t.micro_batch_size
    if dims.tp > 1 and pcfg.sequence_parallel and t.seq_len % dims.tp:
        raise ConfigError(
            f"training.seq_len={t.seq_len} is invalid: expected a multiple of parallel.tp="
            f"{dims.tp} with sequence parallelism"
        )
    if dims.pp == 1:
        return MicrobatchPlan(rows, n_micro, None)
    mb = pcfg.pp_microbatches or dims.pp * pcfg.pp_stages_per_rank
    mb = min(mb, n_micro) if pcfg.pp_microbatches is None else mb
    if n_micro % mb:
        raise ConfigError(
            f"parallel.pp_microbatches={mb} is invalid: each rank has {n_micro} "
            f"microbatches of {t.micro_batch_size} sequences per step, expected a divisor"
        )
    fsdp_on = fsdp_enabled(dims, pcfg, param_dtype)
    pl.check_pipeline_schedule(
        pcfg.pp_schedule,
        dims.pp,
        pcfg.pp_stages_per_rank,
        mb,
        compiled=pcfg.compile,
        fsdp_reshard_after_forward=fsdp_on and pcfg.fsdp_reshard_after_forward,
    )
    return MicrobatchPlan(rows, n_micro, mb)


@dataclass(frozen=True)
class StepLayout:
    """Where and how this rank runs the step: the job, the model, the mesh and the batch split."""

    cfg: JobConfig
    model_cfg: ModelConfig
    dims: ParallelDims
    mesh: DeviceMesh
    dp_mesh: DeviceMesh
    """The flattened data-parallel mesh (dp_replicate x dp_shard)."""
    device: torch.device
    param_dtype: torch.dtype
    plan: MicrobatchPlan


class TrainModule(abc.ABC):
    """The model parts of this rank, their optimizers, and the step over them (see the module doc)."""

    def __init__(
        self,
        parts: list[nn.Module],
        layout: StepLayout,
        *,
        trainable: TrainablePlan,
        source_names: list[str],
        loss_hook: Optional[LossHook],
    ):
        self.parts, self.layout, self.trainable = parts, layout, trainable
        self.cfg, self.model_cfg, self.device, self.plan = layout.cfg, layout.model_cfg, layout.device, layout.plan
        self.optimizers = build_optimizers(parts, self.cfg.optim, self.device, trainable)
        dims = layout.dims
        self.dp_group = layout.dp_mesh.get_group()
        self.pp_group = layout.mesh["pp"].get_group() if dims.pp > 1 else None
        self.loss_parallel = dims.tp > 1 and self.cfg.parallel.loss_parallel
        t = self.cfg.training
        local_vocab = self.model_cfg.padded_vocab_size // dims.tp  # the head is vocabulary-sharded under TP
        self.loss_path = resolve_loss_path(
            t.loss_impl, t.loss_chunk_tokens, t.micro_batch_size * t.seq_len, local_vocab
        )
        if self.loss_path.chunk_tokens is not None:
            pcfg = self.cfg.parallel
            head_loss = ChunkedHeadLoss(
                self.model_cfg.vocab_size,
                self.loss_path.chunk_tokens,
                pcfg.sequence_parallel,
                repeat_backward=dims.pp > 1 and pcfg.pp_schedule in pl.SPLIT_BACKWARD_SCHEDULES,
            )
            for part in parts:
                part.head_loss = head_loss
        log.info("loss: %s; evaluation uses the same path", self.loss_path.describe())
        self.loss_hook = loss_hook
        self.sources = SourceLosses(source_names, self.device) if source_names else None
        self.last_loss = 0.0

    # -------------------------------------------------------------- the step

    def forward_backward(self, batch: Batch, step: int) -> torch.Tensor:
        """Accumulate this rank's gradients for one step (tied embedding copies summed across pipeline
        stages); return the global mean token loss."""
        scale = 1.0 / self._global_tokens(batch).clamp_min(1.0)
        if self.sources is not None:
            if batch.sources is None:
                raise CptronError(
                    f"the data loader names sources {self.sources.names} but its batch has no Batch.sources"
                )
            self.sources.start()
        total = torch.zeros((), device=self.device)
        with loss_parallel_context(self.loss_parallel):
            self._accumulate(batch, scale, step, total)
        groups = [self.dp_group, self.pp_group]  # under pp only last-stage ranks hold a loss
        for group in groups:
            if group is not None:
                dist.all_reduce(total, group=group)
        if self.sources is not None:
            self.sources.finish(groups)
        self._after_backward()
        self.last_loss = float(total)
        return total

    def microbatch_loss(
        self,
        logits,
        labels: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
        step: int = 0,
        with_rows: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(loss, per-row loss sums when `with_rows`) of one microbatch: its token-summed cross-entropy,
        times `scale` and through the loss hook in training (scale given), plain in evaluation.
        `logits` are the model's logits, or on the chunked path the (loss sum, per-token losses) the
        model computed from `model_labels(labels)`."""
        if isinstance(logits, tuple):
            loss, per_token = logits
            rows = per_token.sum(1) if with_rows else None
        elif with_rows:
            loss, rows = cross_entropy_sum_and_rows(logits, labels, self.model_cfg.vocab_size)
        else:
            loss, rows = cross_entropy_sum(logits, labels, self.model_cfg.vocab_size), None
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        if scale is not None:
            loss = loss * scale
            if self.loss_hook is not None:
                loss = self.loss_hook(step, loss)
        return loss, rows

    def optim_step(self) -> tuple[float, bool]:
        """After forward_backward: global grad norm, the non-finite check, clipping, AdamW.
        Returns (grad_norm, stepped); a non-finite loss or norm drops the gradients."""
        # Rows that do not train (train_new_rows_only) count neither in the norm nor in AdamW.
        self.trainable.mask_grads(self.parts)
        norm = global_grad_norm(self.parts, self.pp_group, self._norm_skip())
        norm_f = float(norm)
        # A NaN loss gives NaN gradients; the loss is checked as well in case a hook made only it NaN.
        stepped = math.isfinite(norm_f) and math.isfinite(self.last_loss)
        if stepped:
            if self.cfg.optim.grad_clip > 0:
                clip_gradients(self.parts, self.cfg.optim.grad_clip, norm)
            self.trainable.decay_new_rows(self.optimizers)
            for opt in self.optimizers:
                opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return norm_f, stepped

    @torch.no_grad()
    def evaluate(self, val_sets: dict[str, Callable], limit: int = 0) -> dict[str, float]:
        """The mean token loss of each validation set (at most `limit` batches each; 0: all)."""
        out = {}
        for name, make in val_sets.items():
            loss_sum = torch.zeros((), device=self.device)
            tokens = torch.zeros((), device=self.device)
            for i, batch in enumerate(make()):
                if limit and i >= limit:
                    break
                tokens += (batch.labels != IGNORE_INDEX).sum().to(self.device, torch.float32)
                with loss_parallel_context(self.loss_parallel):
                    loss_sum += self._eval_loss_sum(batch)
            dist.all_reduce(tokens, group=self.dp_group)
            dist.all_reduce(loss_sum, group=self.dp_group)
            if self.pp_group is not None:
                dist.all_reduce(loss_sum, group=self.pp_group)
            out[name] = float(loss_sum / tokens.clamp_min(1.0))
        return out

    # -------------------------------------------------------------- what the two modes fill in

    @abc.abstractmethod
    def _accumulate(self, batch: Batch, scale: torch.Tensor, step: int, total: torch.Tensor) -> None:
        """Forward and backward of this rank's share of `batch`, adding the detached losses to `total`."""

    @abc.abstractmethod
    def _eval_loss_sum(self, batch: Batch) -> torch.Tensor:
        """This rank's summed token loss of `batch` (zero where the rank holds no last stage)."""

    def _after_backward(self) -> None:  # noqa: B027 (an optional hook: the plain module has nothing to do)
        """Gradient work after the last microbatch, before the norm."""

    def _norm_skip(self) -> tuple:
        """Parameters whose gradients the global norm leaves out (second copies)."""
        return ()

    # -------------------------------------------------------------- helpers

    def model_labels(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """The labels the model's forward takes: on the chunked path it computes the loss itself."""
        return labels if self.loss_path.chunk_tokens is not None else None

    def _global_tokens(self, batch: Batch) -> torch.Tensor:
        n = (batch.labels != IGNORE_INDEX).sum().to(self.device, torch.float32)
        dist.all_reduce(n, group=self.dp_group)
        return n

    def _pieces(self, batch: Batch) -> Iterator[Batch]:
        """The rows one forward takes at a time, on the device: a microbatch, or with
        pipelining the pipeline_microbatches microbatches of one schedule call."""
        rows = self.plan.sequences_per_forward
        for i in range(0, batch.rows, rows):
            yield batch.slice(i, i + rows).to(self.device)

    def _doc_ids(self, b: Batch) -> Optional[torch.Tensor]:
        return b.doc_ids if self.cfg.training.document_masking else None


class PlainTrainModule(TrainModule):
    """The whole model on every rank; gradient accumulation over microbatches."""

    def _accumulate(self, batch: Batch, scale: torch.Tensor, step: int, total: torch.Tensor) -> None:
        model = self.parts[0]
        for i, b in enumerate(self._pieces(batch)):
            if hasattr(model, "set_requires_gradient_sync"):
                # Reduce-scatter gradients once, after the last microbatch.
                model.set_requires_gradient_sync(i == self.plan.microbatches - 1)
            out = model(b.tokens, doc_ids=self._doc_ids(b), labels=self.model_labels(b.labels))
            loss, rows = self.microbatch_loss(out, b.labels, scale, step, with_rows=self.sources is not None)
            if rows is not None:
                self.sources.add(rows, b.labels, b.sources)
            loss.backward()
            total += loss.detach()

    def _eval_loss_sum(self, batch: Batch) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for b in self._pieces(batch):
            out = self.parts[0](b.tokens, doc_ids=self._doc_ids(b), labels=self.model_labels(b.labels))
            total += self.microbatch_loss(out, b.labels)[0]
        return total


class PipelineTrainModule(TrainModule):
    """This rank's pipeline stages under a torch.distributed.pipelining schedule. torch calls the loss
    function with (logits, labels) only, on the last stage: a training step's scale and step ride in
    `_step_context`, each row's source and index in its labels (`tag_labels`)."""

    def __init__(
        self,
        parts: list[nn.Module],
        layout: StepLayout,
        *,
        stage_ids: list[int],
        n_stages: int,
        trainable: TrainablePlan,
        source_names: list[str],
        loss_hook: Optional[LossHook],
    ):
        if source_names and not SourceLosses.fit_pipeline(source_names, layout.plan.sequences_per_rank):
            source_names = []
        super().__init__(parts, layout, trainable=trainable, source_names=source_names, loss_hook=loss_hook)
        pcfg = self.cfg.parallel
        self.pipeline = pl.build_pipeline_schedule(
            parts,
            stage_ids,
            n_stages,
            self.pp_group,
            self.device,
            self.plan.pipeline_microbatches,
            self._loss_fn,
            pcfg.pp_schedule,
        )
        self.tied_sync = None
        # A frozen tied embedding has no gradients to sum (the plan is the same on every rank).
        if self.model_cfg.tie_embeddings and "tok_embeddings.weight" not in trainable.frozen:
            first, last = pl.tied_stage_ranks(layout.dims.pp, pcfg.pp_stages_per_rank, pcfg.pp_schedule)
            self.tied_sync = pl.TiedEmbeddingSync(parts, layout.mesh, first, last)
            log.info(
                "tied embeddings: pipeline ranks %d and %d hold the input and output copies; their "
                "gradients are summed every step",
                first,
                last,
            )
        self._step_context: Optional[tuple[torch.Tensor, int]] = None
        self._microbatch_rows: dict[int, tuple] = {}

    def _loss_fn(self, logits, labels: torch.Tensor) -> torch.Tensor:
        if self._step_context is None:  # evaluation
            return self.microbatch_loss(logits, labels)[0]
        scale, step = self._step_context
        if self.sources is None:
            return self.microbatch_loss(logits, labels, scale, step)[0]
        labels, sources, first_row = untag_labels(labels)
        loss, rows = self.microbatch_loss(logits, labels, scale, step, with_rows=True)
        # Kept per microbatch (by its first row): torch's schedules also call this on placeholder
        # outputs with the first microbatch's target (backward metadata inference, at the first step
        # and after each switch between training and eval), before the real call, which replaces it.
        self._microbatch_rows[first_row] = (rows, labels, sources)
        return loss

    def _accumulate(self, batch: Batch, scale: torch.Tensor, step: int, total: torch.Tensor) -> None:
        self._step_context = (scale, step)
        try:
            for b in self._pieces(batch):
                labels = tag_labels(b.labels, b.sources) if self.sources is not None else b.labels
                self._microbatch_rows = {}
                out = pl.pipeline_train_step(self.pipeline, b.tokens, self._ids(b), labels, self._stage_labels(b))
                if self.sources is not None and self.pipeline.has_last_stage:
                    self.sources.add_pipeline_step(self._microbatch_rows, self.pipeline.n_microbatches)
                if out is not None:
                    total += out.detach()
        finally:
            self._step_context = None

    def _eval_loss_sum(self, batch: Batch) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for b in self._pieces(batch):
            s = pl.pipeline_eval_step(self.pipeline, b.tokens, self._ids(b), b.labels, self._stage_labels(b))
            if s is not None:
                total += s
        return total

    def _after_backward(self) -> None:
        if self.tied_sync is not None:
            self.tied_sync.reduce_grads()

    def _norm_skip(self) -> tuple:
        return tuple(self.tied_sync.duplicates) if self.tied_sync is not None else ()

    def _stage_labels(self, b: Batch) -> Optional[torch.Tensor]:
        return self.model_labels(b.labels) if self.pipeline.has_last_stage else None

    def _ids(self, b: Batch) -> torch.Tensor:
        """What pipeline stages pass along: doc_ids (all zero for a batch without
        documents: one document per row), or plain positions without document masking."""
        if not self.cfg.training.document_masking:
            # Contiguous: pipeline stages send it to their peers, and gloo and NCCL take no strided views.
            return torch.arange(b.tokens.shape[1]).expand_as(b.tokens).contiguous()
        return b.doc_ids if b.doc_ids is not None else torch.zeros_like(b.tokens)


def build_train_module(
    layout: StepLayout, *, initialize: bool, source_names: list[str], loss_hook: Optional[LossHook] = None
) -> TrainModule:
    """Build this rank's model parts on the meta device (the whole model, or its pipeline stages),
    parallelize each from outside, materialize them, initialize them by (seed, parameter name)
    unless a checkpoint will overwrite every weight (`initialize`), and wrap them in the train module
    of the execution mode. Frozen parameters (`optim.frozen`, `optim.train_new_rows_only`) are
    frozen on the meta parts, before TP and FSDP2 carry the flag into their parameters."""
    cfg, model_cfg, dims, mesh, device = layout.cfg, layout.model_cfg, layout.dims, layout.mesh, layout.device
    pcfg, t = cfg.parallel, cfg.training
    trainable = resolve_trainable(cfg.optim, model_cfg, cfg.checkpoint.init_from)
    masked = attention_is_masked(t.document_masking, model_cfg.sliding_window, t.seq_len)
    attention = choose_attention(t.attention, device, masked, compiled=pcfg.compile)  # the trainer logs it
    if dims.pp > 1:
        n_stages = dims.pp * pcfg.pp_stages_per_rank
        ranges = pl.split_layers(model_cfg.n_layers, n_stages, pcfg.pp_layers_per_stage)
        stage_ids = pl.stage_ids_for_rank(
            mesh["pp"].get_local_rank(), dims.pp, pcfg.pp_stages_per_rank, pcfg.pp_schedule
        )
        parts = pl.build_stage_modules(model_cfg, stage_ids, n_stages, ranges, ids_are_doc_ids=t.document_masking)
    else:
        with torch.device("meta"):
            parts = [Transformer(model_cfg)]
    for part in parts:
        part.attention_impl = attention
        trainable.freeze(part)
        parallelize_llama(part, mesh, dims, pcfg, param_dtype=layout.param_dtype)
        part.to_empty(device=materialize_device(pcfg, device))
        if initialize:
            part.init_weights(t.seed)
        if materialize_device(pcfg, device) != device:  # CPU offload: the buffers compute on the device
            for module in part.modules():
                for name, buf in module.named_buffers(recurse=False):
                    module._buffers[name] = buf.to(device)
        part.train()
    common = dict(trainable=trainable, source_names=source_names, loss_hook=loss_hook)
    if dims.pp > 1:
        return PipelineTrainModule(parts, layout, stage_ids=stage_ids, n_stages=n_stages, **common)
    return PlainTrainModule(parts, layout, **common)
