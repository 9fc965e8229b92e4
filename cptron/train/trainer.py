"""The training loop: the order of events of a run, and the set-up of its components.

`Trainer(cfg).run()` works on one CPU process and on a 3-D parallel GPU cluster alike. Set-up:
  1. process group and device (`cptron.distributed.setup_distributed`), then the run
     directory's lock (`cptron.train.run_lock`), held until `run` ends or `close`;
  2. the model config (from the init weights or the `model:` section), the mesh
     (`cptron.parallel.dims`) and the microbatch plan;
  3. the checkpointer, which knows whether this run resumes;
  4. the data loaders, then the train module: this rank's model parts, parallelized from
     outside, materialized, initialized by (seed, parameter name) unless a checkpoint will
     overwrite them, with their AdamW (`cptron.train.train_module`);
  5. resume from the newest complete checkpoint, else branch from another run's checkpoint, else
     load the initial weights (`cptron.train.branch` checks and states the LR schedule in force).

The loop only orders events; each component decides for itself: the train module runs a step,
the validator whether a step evaluates, the checkpointer whether it saves, the stop policy
whether the run saves and stops early, and the metrics what they report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from cptron.config import config_to_dict, validate_config
from cptron.data.build import build_data_loaders
from cptron.data.interface import BatchSource
from cptron.distributed import setup_distributed
from cptron.errors import ConfigError, NonFiniteLossError, require
from cptron.models.config import ModelConfig
from cptron.models.factorized import describe_parameters
from cptron.models.flex import resolve_attention
from cptron.parallel.dims import build_mesh, mixed_precision_dtype, resolve_parallel_dims
from cptron.parallel.parallelize import describe_parallelism
from cptron.train.branch import (
    architecture_source,
    branch_source,
    check_branch_location,
    fresh_start_note,
    resumed_schedule,
    schedule_record,
    start_branch,
)
from cptron.train.checkpointer import TrainCheckpointer
from cptron.train.config import JobConfig
from cptron.train.initial_weights import load_initial_weights, model_config_for_init, run_tokenizer_dir
from cptron.train.lr import apply_lr, build_lr_schedule
from cptron.train.memory_check import MemoryCheck
from cptron.train.metrics import RunMetrics
from cptron.train.optim import resolve_adamw_implementation
from cptron.train.report import ForgettingReport
from cptron.train.run_lock import RunDirLock
from cptron.train.stop import EXIT_RESUMABLE, StopPolicy
from cptron.train.train_module import LossHook, StepLayout, build_train_module, plan_microbatches
from cptron.train.validation import Validator

__all__ = ["EXIT_RESUMABLE", "NonFiniteLossError", "TrainResult", "Trainer"]

log = logging.getLogger("cptron.train")


@dataclass
class TrainResult:
    """What a run did.

    Two step numberings meet here. `last_step` and the keys of `eval_losses` count completed
    updates, as the log, metrics.jsonl and checkpoints do ("step N" is the state after N optimizer
    steps). The keys of `losses`, `grad_norms` and `source_losses` and the entries of
    `skipped_steps` are 0-based update indices, as the loss and grad hooks see them: `losses[i]`
    is the loss of the update logged (and named in messages) as step i + 1."""

    last_step: int
    """Optimizer steps completed when this invocation ended."""
    losses: dict[int, float] = field(default_factory=dict)
    """0-based update index -> the global mean token loss of that update (NaN/inf for a skipped one)."""
    grad_norms: dict[int, float] = field(default_factory=dict)
    """0-based update index -> the global gradient norm before clipping."""
    eval_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    """Updates completed (as logged) -> the held-out loss of each validation set."""
    skipped_steps: list[int] = field(default_factory=list)
    """0-based indices of the updates dropped for a non-finite loss or grad norm in the whole run
    (resumed runs included; the train state stores the same list)."""
    resumed_from: Optional[str] = None
    source_losses: dict[int, dict[str, float]] = field(default_factory=dict)
    """0-based update index -> the mean token loss of each data source present in its batch."""
    stopped_by: Optional[str] = None
    """Why the run stopped before training.steps after saving a checkpoint (a signal's name or
    "time limit"); None when it finished or `stop_at` ended it."""


class Trainer:
    """One training run (see the module docstring)."""

    def __init__(
        self,
        cfg: JobConfig,
        *,
        data_factory: Optional[Callable[[int, int], tuple[BatchSource, dict[str, Callable]]]] = None,
        loss_hook: Optional[LossHook] = None,
        grad_hook: Optional[Callable[[int, list[nn.Module]], None]] = None,
    ):
        """`data_factory(dp_rank, dp_size) -> (train source, {name: validation batches factory})`
        replaces the `data:` section (tests, benchmarks). `loss_hook(step, loss)` may
        transform each microbatch loss before backward (fault injection);
        `grad_hook(step, parts)` sees the accumulated gradients before clipping."""
        self._started = time.monotonic()  # training.time_limit_minutes counts set-up time too
        for section in (cfg.model, cfg.training, cfg.parallel, cfg.optim, cfg.lr, cfg.checkpoint, cfg.metrics):
            validate_config(section)
        cfg.validate()
        check_branch_location(cfg)  # before the lock: a branch source inside run_dir would be locked
        self.cfg, self.grad_hook = cfg, grad_hook
        t = cfg.training
        self.rank, self.world_size, self.device = setup_distributed(t.device)
        # Before anything reads or writes the run directory; refused on every rank if in use.
        self._run_lock = RunDirLock(t.run_dir)
        self._run_lock.acquire()
        try:
            self._set_up(cfg, data_factory, loss_hook)
        except BaseException:
            self.close()
            raise

    def _set_up(self, cfg: JobConfig, data_factory, loss_hook: Optional[LossHook]) -> None:
        t, init_from = cfg.training, cfg.checkpoint.init_from
        arch = architecture_source(cfg)
        mc = model_config_for_init(arch, cfg.model.pad_vocab_to_multiple_of, cfg.model) if arch else cfg.model
        mc.validate()
        require(t.seq_len <= mc.max_seq_len, "training.seq_len", t.seq_len, f"<= model.max_seq_len={mc.max_seq_len}")
        self.model_cfg = mc
        self.dims = resolve_parallel_dims(cfg.parallel, self.world_size, mc)
        self.mesh, self.dp_mesh = build_mesh(self.dims, self.device.type)
        self.param_dtype = mixed_precision_dtype(cfg.parallel, self.device)
        self.plan = plan_microbatches(cfg, self.dims, self.param_dtype)

        self.checkpointer = TrainCheckpointer(
            cfg.checkpoint, t.run_dir, model_cfg=mc, tokenizer_dir=run_tokenizer_dir(t.tokenizer, init_from)
        )
        latest = self.checkpointer.resume_path()
        branch = branch_source(cfg, latest)
        dp_rank = self.dp_mesh.get_local_rank()
        if data_factory is None:
            validate_config(cfg.data)
            self.data, val_sets = build_data_loaders(
                cfg.data,
                seq_len=t.seq_len,
                global_batch_size=t.global_batch_size,
                dp_rank=dp_rank,
                dp_size=self.dims.dp,
                vocab_size=mc.vocab_size,
                seed=t.seed,
                total_steps=t.steps,
                tokenizer=run_tokenizer_dir(t.tokenizer, init_from, latest or (branch and branch.path)),
            )
        else:
            self.data, val_sets = data_factory(dp_rank, self.dims.dp)
        # Weights that a checkpoint will overwrite are not initialized first:
        # initialization builds each full tensor on every rank, which is slow at 8B.
        layout = StepLayout(cfg, mc, self.dims, self.mesh, self.dp_mesh, self.device, self.param_dtype, self.plan)
        pp_rank = self.mesh["pp"].get_local_rank() if self.dims.pp > 1 else 0
        self.memory_check = MemoryCheck(cfg, self.world_size, self.device, mc, pp_rank, t.steps)
        self.module = build_train_module(
            layout,
            initialize=latest is None and branch is None and not init_from,
            source_names=list(self.data.source_names),
            loss_hook=loss_hook,
        )
        self.validator = Validator(self.module, val_sets or {}, t)
        domains = {name: cfg.data.domain_of(name) for name in val_sets or {}}
        self.report = ForgettingReport(domains, t.run_dir, rank=self.rank, eval_at_start=t.eval_at_start)
        self.lr_schedule = build_lr_schedule(cfg.lr, t.steps)
        self.lr = 0.0
        """The learning rate of the latest step."""

        self.step, self.skipped, self.resumed_from = 0, [], None
        self.start_note = fresh_start_note(cfg)
        """The start-up log's line on where the run starts and the LR schedule in force."""
        if latest is not None:
            self.start_note = resumed_schedule(cfg, latest)
            self.module.trainable.check_resume(latest, cfg.checkpoint.load_optimizer)
            self._restore_train_state(self.checkpointer.load(latest, self.parts, self.optimizers))
            # A checkpoint of a run that trained the old rows has moments there: new rows only moves none.
            self.module.trainable.zero_masked_moments(self.optimizers)
            self.resumed_from = str(latest)
            log.info("resumed from %s at step %d", latest, self.step)
        elif branch is not None:
            self.step, self.skipped, self.start_note = start_branch(
                branch, cfg, self.module, self.checkpointer, self.data
            )
            if "step" in cfg.checkpoint.branch_carry:  # the parent's step 0 is this branch's too
                state = branch.train_state
                self.report.load_state_dict(state.get("eval_baseline"), present="eval_baseline" in state)
        elif init_from:
            load_initial_weights(init_from, self.parts, mc)
        self.checkpointer.track(self.parts, self.optimizers, self.train_state, t.steps)
        # On every rank (it is the same everywhere): a mixture that runs out of data before
        # training.steps raises here on all ranks, not mid-run and not on rank 0 alone.
        self._log_setup(self.data.describe_plan(t.steps))

    @property
    def parts(self) -> list[nn.Module]:
        """This rank's model parts: the whole model, or its pipeline stages."""
        return self.module.parts

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """One AdamW per model part."""
        return self.module.optimizers

    def _log_setup(self, data_plan: Optional[str]) -> None:
        if self.rank != 0:
            return
        mc, t = self.model_cfg, self.cfg.training
        log.info(
            "model: %s (%d layers, dim %d, vocab %d padded to %d)",
            describe_parameters(mc),
            mc.n_layers,
            mc.dim,
            mc.vocab_size,
            mc.padded_vocab_size,
        )
        log.info(
            "world %d: %s",
            self.world_size,
            describe_parallelism(self.dims, self.cfg.parallel, self.param_dtype, self.device),
        )
        log.info(
            "optimizer: AdamW (%s); attention: %s",
            resolve_adamw_implementation(self.cfg.optim, self.device),
            attention_description(t.document_masking, self.device, mc, self.parts[0].attention_impl, t.attention),
        )
        log.info(
            "batch: %d sequences x %d tokens per step = %d ranks x %d microbatches x %d",
            t.global_batch_size,
            t.seq_len,
            self.dims.dp,
            self.plan.microbatches,
            t.micro_batch_size,
        )
        log.info("%s", self.start_note)
        if data_plan is not None:
            log.info("%s", data_plan)
        if (trainable := self.module.trainable.describe()) is not None:
            log.info("%s", trainable)

    # ------------------------------------------------------------------ state

    # RNG: each step reseeds torch's generators from (training.seed, step), so a resumed run
    # draws the same random numbers as the uninterrupted one without storing generator states.
    # Those differ per rank and could not be mapped onto a different layout anyway.

    def train_state(self) -> dict:
        return {
            "step": self.step,
            "data": self.data.state_dict(),
            "skipped_steps": list(self.skipped),  # 0-based update indices, as TrainResult.skipped_steps
            "rng": {"seed": self.cfg.training.seed, "policy": "reseeded from (seed, step) every step"},
            "world_size": self.world_size,
            "layout": self.dims.describe(),
            "trainable": self.module.trainable.state(),
            "lr": schedule_record(self.cfg),  # a resume is held to it (cptron.train.branch)
            "eval_baseline": self.report.state_dict(),  # step-0 held-out losses
        }

    def _restore_train_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped = list(state.get("skipped_steps", []))
        self.report.load_state_dict(state.get("eval_baseline"), present="eval_baseline" in state)
        self.data.load_state_dict(state["data"])
        saved_seed = state.get("rng", {}).get("seed", self.cfg.training.seed)
        if saved_seed != self.cfg.training.seed:
            raise ConfigError(
                f"training.seed={self.cfg.training.seed} is invalid for this resume: the checkpoint "
                f"was trained with seed {saved_seed}"
            )

    # ------------------------------------------------------------------ one step

    def train_step(self, batch) -> tuple[float, float, bool]:
        """One optimizer step at `self.step` (the caller advances it). Returns (loss, grad_norm, stepped)."""
        torch.manual_seed((self.cfg.training.seed * 1_000_003 + self.step) % (2**63))
        self.lr = apply_lr(self.optimizers, self.cfg.optim.lr, self.lr_schedule.factor(self.step))
        loss = self.module.forward_backward(batch, self.step)
        if self.grad_hook is not None:
            self.grad_hook(self.step, self.parts)
        norm, stepped = self.module.optim_step()
        return float(loss), norm, stepped

    # ------------------------------------------------------------------ the loop

    def run(self, stop_at: Optional[int] = None) -> TrainResult:
        """Train to training.steps. `stop_at` ends this invocation after that step
        without the final eval and save, as a preemption would (tests, job-time limits)."""
        self._run_lock.acquire()  # again after an earlier run() released it
        try:
            return self._run(stop_at)
        finally:
            self.close()

    def close(self) -> None:
        """End this rank's hold on the run directory (local; idempotent): finish deleting pruned
        checkpoints and release the run-directory lock. `run` does it; call it for a Trainer
        discarded without running."""
        if hasattr(self, "checkpointer"):
            self.checkpointer.finish_deletions()
        self._run_lock.release()

    def _run(self, stop_at: Optional[int]) -> TrainResult:
        t = self.cfg.training
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        result = TrainResult(last_step=self.step, resumed_from=self.resumed_from, skipped_steps=self.skipped)
        if self.step >= t.steps:
            # Its final evaluation and checkpoint were written by the invocation that reached the
            # step: doing them again would only append a duplicate record to metrics.jsonl.
            if self.rank == 0:
                log.info("already finished at step %d (training.steps=%d): nothing to do", self.step, t.steps)
            return result
        with self._running() as (metrics, stops):
            self._record_eval(self.validator.maybe_evaluate(self.step, start=True), result, metrics)
            while self.step < end and result.stopped_by is None:
                self._one_step(result, metrics)
                self._record_eval(self.validator.maybe_evaluate(self.step), result, metrics)
                if self.checkpointer.maybe_save(self.step):
                    metrics.paused()
                if self.step < end and (reason := stops.reason()) is not None:
                    self.checkpointer.maybe_save(self.step, stopping=True)
                    log.warning(
                        "stopped at step %d of %d (%s) after saving a checkpoint; run the same command to resume",
                        self.step,
                        t.steps,
                        reason,
                    )
                    result.stopped_by = reason
            if self.step == t.steps:
                self._record_eval(self.validator.maybe_evaluate(self.step, final=True), result, metrics)
                self.checkpointer.maybe_save(self.step, final=True)
                self.report.finish(self.step, self.data.drawn())
        result.last_step = self.step
        return result

    @contextlib.contextmanager
    def _running(self) -> Iterator[tuple[RunMetrics, StopPolicy]]:
        """The run's metrics and stop policy, and its one cleanup path."""
        cfg, t = self.cfg, self.cfg.training
        metrics = RunMetrics(
            cfg.metrics,
            t.run_dir,
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            dtype=self.param_dtype,
            model_cfg=self.model_cfg,
            seq_len=t.seq_len,
            global_batch_size=t.global_batch_size,
            total_steps=t.steps,
            start_step=self.step,
            run_config=config_to_dict(cfg),
        )
        try:
            with StopPolicy(
                cfg.checkpoint.save_on_signals,
                t.time_limit_minutes,
                self._started,
                rank=self.rank,
                world_size=self.world_size,
                device=self.device,
            ) as stops:
                yield metrics, stops
            # A background save still being written is completed: on normal exits, and after a
            # NonFiniteLossError, which every rank raises at the same step (the loss and norm are
            # global), so this collective wait is safe; the checkpoint is the last good state.
            self.checkpointer.wait()
        except NonFiniteLossError:
            self.checkpointer.wait()
            raise
        # Any other error may be this rank's alone: a collective wait could hang, so a pending
        # background save is left incomplete (it stays ignored).
        finally:
            metrics.close()

    def _one_step(self, result: TrainResult, metrics: RunMetrics) -> None:
        batch = next(self.data)
        with metrics.profiler.step(self.step + 1):
            loss, norm, stepped = self.train_step(batch)
        index = self.step  # TrainResult's keys are 0-based; the log counts completed updates
        self.step += 1
        self.memory_check.after_step(self.step)
        if not stepped:
            self._skip(index, loss, norm)
        result.losses[index], result.grad_norms[index] = loss, norm
        sources = self.module.sources.last if self.module.sources is not None else {}
        if self.module.sources is not None:
            result.source_losses[index] = dict(sources)
        metrics.train_step(
            self.step,
            {
                "loss": loss,
                **{f"loss/{n}": v for n, v in sources.items()},
                "grad_norm": norm,
                "lr": self.lr,
                "skipped_steps": len(self.skipped),
            },
        )

    def _skip(self, index: int, loss: float, norm: float) -> None:
        """Apply training.nonfinite to the update of 0-based `index` (logged as step index + 1),
        which was dropped; messages name it as the log does."""
        t = self.cfg.training
        self.skipped.append(index)
        msg = f"step {index + 1}: {nonfinite_description(loss, norm)}"
        if t.nonfinite == "stop":
            raise NonFiniteLossError(
                f"{msg}; stopped (training.nonfinite=stop): the weights stay those of step {index}, "
                "and the newest checkpoint is the last good state"
            )
        # max_skipped_steps is the most skips a run tolerates: one more stops it.
        if len(self.skipped) > t.max_skipped_steps:
            n = len(self.skipped)
            raise NonFiniteLossError(
                f"{msg}; {n} step{'s' if n > 1 else ''} skipped, more than training.max_skipped_steps="
                f"{t.max_skipped_steps}: steps {[i + 1 for i in self.skipped]}"
            )
        log.warning("%s; update skipped (%d of at most %d skipped steps)", msg, len(self.skipped), t.max_skipped_steps)

    def _record_eval(self, losses: Optional[dict[str, float]], result: TrainResult, metrics: RunMetrics) -> None:
        if losses is not None:
            result.eval_losses[self.step] = losses
            metrics.evaluation(self.step, losses, self.report.evaluation(self.step, losses))


def nonfinite_description(loss: float, norm: float) -> str:
    """Which of a step's loss and grad norm is non-finite, e.g. "non-finite grad norm inf (loss 2.3 is finite)"."""
    if not math.isfinite(loss) and not math.isfinite(norm):
        return f"non-finite loss {loss} and grad norm {norm}"
    if not math.isfinite(loss):
        return f"non-finite loss {loss} (grad norm {norm} is finite)"
    if not math.isfinite(norm):
        return f"non-finite grad norm {norm} (loss {loss} is finite)"
    return f"update dropped with a finite loss {loss} and grad norm {norm}"


def attention_description(
    document_masking: bool, device: torch.device, mc: ModelConfig, attention: str = "sdpa", requested: str = ""
) -> str:
    """The attention kernel a run uses, for the start-up log; `attention` is the kernel the model
    runs (`requested` "auto" is resolved here, and the log says it chose)."""
    masked = document_masking or mc.sliding_window is not None
    if attention == "auto":
        attention, requested = resolve_attention("auto", device.type, masked), "auto"
    chosen = " [training.attention=auto]" if requested == "auto" else ""
    return _attention_kernel(document_masking, device, mc, attention, masked) + chosen


def _attention_kernel(document_masking: bool, device: torch.device, mc: ModelConfig, attention: str, masked: bool):
    if attention == "flex" and masked:
        masks = (["document"] if document_masking else []) + (
            [f"sliding-window ({mc.sliding_window} tokens)"] if mc.sliding_window is not None else []
        )
        kernel = (
            "torch.compile'd kernel" if device.type != "cpu" else "torch's dense reference on CPU, slower than sdpa"
        )
        return f"FlexAttention with a block-sparse {' and '.join(masks)} causal mask ({kernel})"
    if document_masking:
        what = "SDPA with a boolean block-diagonal causal mask (documents masked; no flash kernel)"
    elif mc.sliding_window is not None:
        what = f"SDPA with a sliding-window causal mask ({mc.sliding_window} tokens)"
    else:
        what = "SDPA causal (is_causal: flash kernel eligible on CUDA)"
    if device.type == "cuda":
        enabled = [
            name
            for name, on in (
                ("flash", torch.backends.cuda.flash_sdp_enabled()),
                ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                ("math", torch.backends.cuda.math_sdp_enabled()),
            )
            if on
        ]
        what += f"; SDPA backends enabled: {', '.join(enabled)}"
    return what
