"""The trainer's checkpointer: decides when a run saves (`maybe_save`), saves and resumes the
model, AdamW and the trainer's state under any parallel layout, and keeps the newest K.

A training checkpoint is an ordinary cptron checkpoint (see `cptron.checkpoint`), so
`cptron convert cptron-to-hf` exports it as it is:

    <run_dir>/checkpoints/step-00000100/
      .metadata, __<rank>_0.distcp   DCP tensors, each stored once with its global shape:
          model.<fqn>                           weights (tied output stored as model.tok_embeddings.weight)
          optimizer.state.<fqn>.<name>          AdamW exp_avg, exp_avg_sq, step (unless save_optimizer=false)
          optimizer.param_groups.<fqn>.<key>    hyperparameters at save time (for reference; not restored)
      cptron.json    format_version, model config, step, train_state, hf_config, hf_generation_config, source
      tokenizer/     the run's tokenizer files
      COMPLETE       written last

Keys are parameter names of the unwrapped model (`layers.3.attention.wq.weight`);
`torch.distributed.checkpoint.state_dict` removes the activation-checkpoint,
compile and FSDP wrappers. Each rank saves and loads only the keys its model parts
hold, so a checkpoint written with pp=2 loads at pp=1 and the reverse, and DCP
reshards FSDP/TP DTensors. On load the optimizer's hyperparameters (lr, betas,
weight decay) stay those of the current config; moments and step counts come from
the checkpoint.

With `async_save` the state is copied to CPU memory during `save` and written by a
background thread over a gloo group of its own; rank 0 adds the COMPLETE marker as
soon as DCP reports every rank's files durable. Until then the checkpoint is the
hidden `.step-N.incomplete` directory, which `latest()` never returns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from cptron import checkpoint as ckpt
from cptron.config import config_to_dict
from cptron.distributed import (
    barrier,
    broadcast_from_rank0,
    get_rank,
    get_world_size,
    is_distributed,
    local_errors,
    raise_on_every_rank,
)
from cptron.errors import CheckpointError, NonFiniteLossError, require
from cptron.hf import tokenizer_files
from cptron.models.config import ModelConfig
from cptron.train.initial_weights import init_source_meta
from cptron.train.model_state import OPTIMIZER_PREFIX, ModelPartsState, copy_duplicates

log = logging.getLogger(__name__)


BRANCH_CARRY = ("weights", "optimizer", "data", "step")
"""What a branch (checkpoint.branch_from) may carry over from its source checkpoint."""


@dataclass
class CheckpointConfig:
    """Saving, resuming, branching and the initial weights of a training run."""

    interval: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints and delete older ones (0: keep all); the newest is never deleted."""
    async_save: bool = False
    """Copy the state to CPU memory and write it in a background thread while training goes on (dcp.async_save)."""
    save_final: bool = True
    """Save a checkpoint after the last step."""
    folder: str = "checkpoints"
    """Directory of the checkpoints, relative to training.run_dir (or absolute)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the folder; false refuses to start if the folder holds checkpoints."""
    load_step: int = -1
    """Resume from the checkpoint of this step instead of the newest (-1: newest), e.g. to roll back past a loss spike."""
    init_from: Optional[str] = None
    """Initial weights at step 0: an HF model directory (config.json + safetensors) or a cptron checkpoint; ignored when resuming."""
    save_optimizer: bool = True
    """Store the AdamW moments and step counts (needed for an exact resume; false writes weights-only checkpoints)."""
    load_optimizer: bool = True
    """Restore the AdamW state when resuming; false starts it fresh (e.g. from a weights-only checkpoint)."""
    branch_from: Optional[str] = None
    """Start this run (its own run_dir) from a complete checkpoint of another run, under this config's schedule and mixture; the source is only read; ignored once this run has checkpoints of its own."""
    branch_carry: list[str] = field(default_factory=lambda: list(BRANCH_CARRY))
    """With branch_from, what carries over: weights (always), optimizer (AdamW moments and step counts), data (each source's position), step (the step counter: the schedule continues from it; without it the run counts from 0)."""
    save_on_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """On these signals (SLURM sends SIGTERM before killing a job, or SIGUSR1 with --signal) finish the current step, save a checkpoint and exit with code 75 so the same command resumes (under torchrun: see the README for --signals-to-handle and --shutdown-timeout); the same signal again after 5 s kills at once; [] (or '' on the command line): the default handling."""

    def validate(self) -> None:
        require(self.interval >= 0, "checkpoint.interval", self.interval, "an integer >= 0")
        require(self.keep_last >= 0, "checkpoint.keep_last", self.keep_last, "an integer >= 0")
        require(self.load_step >= -1, "checkpoint.load_step", self.load_step, "-1 (newest) or a step >= 0")
        require(
            self.load_step == -1 or self.resume,
            "checkpoint.load_step",
            self.load_step,
            "-1 when checkpoint.resume=false",
        )
        require(bool(self.folder), "checkpoint.folder", self.folder, "a directory path")
        require(
            self.init_from is None or Path(self.init_from).is_dir(),
            "checkpoint.init_from",
            self.init_from,
            "an existing HF model directory or cptron checkpoint",
        )
        carry = self.branch_carry
        require(
            all(c in BRANCH_CARRY for c in carry) and len(set(carry)) == len(carry) and "weights" in carry,
            "checkpoint.branch_carry",
            carry,
            f"distinct items of {list(BRANCH_CARRY)}, weights among them",
        )
        require(
            self.branch_from is None or not self.init_from,
            "checkpoint.branch_from",
            self.branch_from,
            "None when checkpoint.init_from is set (a branch takes its weights from its source checkpoint)",
        )
        require(
            self.branch_from is None or self.load_optimizer or "optimizer" not in carry,
            "checkpoint.load_optimizer",
            self.load_optimizer,
            "true with checkpoint.branch_from while checkpoint.branch_carry has optimizer (leave it out to start "
            "AdamW fresh)",
        )
        require(
            all(isinstance(n, str) and signal_number(n) is not None for n in self.save_on_signals),
            "checkpoint.save_on_signals",
            self.save_on_signals,
            "a list of signal names such as SIGTERM or SIGUSR1 (not SIGKILL or SIGSTOP)",
        )


def signal_number(name: str) -> Optional[int]:
    """The number of the catchable signal `name` (e.g. "SIGTERM" or "TERM"), else None."""
    name = name.upper()
    sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
        return None
    return int(sig)


class TrainCheckpointer:
    """Saves and restores training state under `<run_dir>/<cfg.folder>`; every method that
    touches checkpoints is collective (all ranks call it, in the same order)."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str | os.PathLike,
        *,
        model_cfg: ModelConfig,
        tokenizer_dir: Optional[str] = None,
        hf_meta: Optional[dict] = None,
    ):
        """`tokenizer_dir`: tokenizer files copied into every checkpoint; None: those of the
        checkpoint resumed from. `hf_meta`: {"hf_config": config.json dict, "hf_generation_config":
        dict or None} kept for export; None: taken from init_from, or the checkpoint resumed from."""
        cfg.validate()
        self.cfg = cfg
        self.folder = Path(run_dir) / cfg.folder
        self.model_cfg = model_cfg
        self._tokenizer_explicit = tokenizer_dir is not None
        self._tokenizer_files: list[Path] = []
        if tokenizer_dir is not None:
            self._tokenizer_files = tokenizer_files(Path(tokenizer_dir))
            if not self._tokenizer_files:
                raise CheckpointError(
                    f"tokenizer directory {tokenizer_dir} holds no tokenizer files "
                    "(tokenizer.json, tokenizer.model, ...)"
                )
        unknown = sorted(set(hf_meta or {}) - {"hf_config", "hf_generation_config", "source"})
        if unknown:
            raise ValueError(f"hf_meta keys {unknown} are not known: expected hf_config, hf_generation_config, source")
        self._source_explicit = hf_meta is not None
        self._source = (
            dict(hf_meta) if hf_meta is not None else (init_source_meta(cfg.init_from) if cfg.init_from else {})
        )
        self._pending: Optional[ckpt.PendingCheckpointWrite] = None
        self._async_group = None
        self._deletions: list[threading.Thread] = []
        self.last_save_blocking_s = 0.0
        """Seconds the last `save` held the caller (staging only, with async_save)."""
        self.last_saved_step: Optional[int] = None
        """The step of the checkpoint this run saved or resumed from last."""
        self._run: Optional[tuple[list[nn.Module], list[torch.optim.Optimizer], Callable[[], dict], int]] = None

    # -------------------------------------------------------------- where to resume

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint in the folder (rank 0's view, on every rank)."""
        self.wait()
        return broadcast_from_rank0(ckpt.latest_complete_checkpoint(self.folder))

    def resume_path(self) -> Optional[Path]:
        """The checkpoint this run resumes from per the config (load_step, resume), or None.

        With resume=false and checkpoints already in the folder, raises rather than
        letting the new run overwrite and prune them."""
        if self.cfg.load_step >= 0:
            path = self.folder / ckpt.step_dir_name(self.cfg.load_step)
            _, error = local_errors(lambda: ckpt.read_meta(path))
            raise_on_every_rank(
                error and f"checkpoint.load_step={self.cfg.load_step}: {error}", error_type=CheckpointError
            )
            return path
        latest = self.latest()
        if latest is not None and not self.cfg.resume:
            raise CheckpointError(
                f"checkpoint.resume=false, but {self.folder} already holds checkpoints (newest "
                f"{latest.name}) that this run would overwrite and prune: use a new run_dir or "
                "checkpoint.folder, delete them, or set checkpoint.resume=true"
            )
        return latest

    # -------------------------------------------------------------- when to save

    def track(
        self,
        model_parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        train_state: Callable[[], dict],
        total_steps: int,
    ) -> None:
        """What `maybe_save` saves: a run's model parts and optimizers, its train state, and its length."""
        self._run = (model_parts, optimizers, train_state, total_steps)

    def maybe_save(self, step: int, *, final: bool = False, stopping: bool = False) -> bool:
        """Collective: save the tracked run at `step` if a checkpoint is due: every `interval` steps
        before the last; after the last (`final`) with save_final; before an early stop (`stopping`).
        A step is never saved twice. Returns whether it saved."""
        if self._run is None:
            raise RuntimeError("TrainCheckpointer.maybe_save needs track() first")
        parts, optimizers, train_state, total_steps = self._run
        if step == self.last_saved_step:
            return False
        if final:
            due = self.cfg.save_final
        else:
            due = stopping or (self.cfg.interval > 0 and step % self.cfg.interval == 0 and step < total_steps)
        if not due:
            return False
        _refuse_non_finite(step, parts)
        self.save(step, parts, optimizers, train_state())
        return True

    # -------------------------------------------------------------- saving

    def save(
        self, step: int, model_parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], train_state: dict
    ) -> Path:
        """Collective: checkpoint `step`. `train_state` (JSON, the same on every rank) goes to
        cptron.json. Returns the checkpoint path; with async_save it becomes complete in the
        background (`wait()` makes sure)."""
        start = time.perf_counter()
        self.wait()
        if len(model_parts) != len(optimizers):
            raise ValueError(f"{len(model_parts)} model parts but {len(optimizers)} optimizers: expected one each")
        self._check_train_state(train_state)
        path = self.folder / ckpt.step_dir_name(step)
        state = self._collect(model_parts, optimizers if self.cfg.save_optimizer else None)
        meta = {
            "model": config_to_dict(self.model_cfg),
            "step": step,
            "train_state": train_state,
            "optimizer_saved": self.cfg.save_optimizer,
            "saved_by": "cptron train",
            "world_size": get_world_size(),
            **self._source,
        }
        tok = list(self._tokenizer_files) or None
        if self.cfg.async_save:
            self._pending = ckpt.write_checkpoint_async(
                path,
                state,
                meta,
                tokenizer_files=tok,
                overwrite=True,
                process_group=self._async_process_group(),
                on_complete=self._prune,
            )
        else:
            ckpt.write_checkpoint(path, state, meta, tokenizer_files=tok, overwrite=True)
            if get_rank() == 0:
                self._prune(path)
            self._completed(path)
        self.last_save_blocking_s = time.perf_counter() - start
        self.last_saved_step = step
        log.info(
            "checkpoint %s %s in %.2f s",
            path,
            "staged" if self.cfg.async_save else "written",
            self.last_save_blocking_s,
        )
        return path

    def wait(self) -> None:
        """Collective: finish a pending async save; raises CheckpointError if it failed (the
        previous checkpoint then stays the newest complete one)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            start = time.perf_counter()
            self._completed(pending.wait())
            log.info("checkpoint %s complete (waited %.2f s)", pending.path, time.perf_counter() - start)

    def destroy_async_group(self) -> None:
        """Not collective: destroy the gloo group of async saves once no save is pending, before the
        default group goes, so that no group is left for interpreter shutdown to tear down (which can
        abort the process: "terminate called without an active exception"). A save still being
        written (after an error, when `wait` was not safe) keeps it: its threads may still use it."""
        if self._async_group is not None and self._pending is None:
            if dist.is_initialized():
                dist.destroy_process_group(self._async_group)
            self._async_group = None

    def _completed(self, path: Path) -> None:
        if not self._tokenizer_explicit and self._tokenizer_files:
            # Their source may be an older checkpoint that pruning removes; `path` is the newest.
            self._tokenizer_files = [path / ckpt.TOKENIZER_DIR / f.name for f in self._tokenizer_files]

    def _check_train_state(self, train_state: dict) -> None:
        text, error = None, None
        try:
            text = json.dumps(train_state, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            error = f"train_state is not JSON-serializable: {e}"
        raise_on_every_rank(error, error_type=CheckpointError)
        if text != broadcast_from_rank0(text):
            error = (
                "train_state differs from rank 0's; it must be identical on every rank "
                "(per-rank state such as a data position belongs in a rank-independent form)"
            )
        raise_on_every_rank(error, error_type=CheckpointError)

    def _collect(self, parts: list[nn.Module], optimizers) -> dict[str, dict]:
        state = ModelPartsState(parts, self.model_cfg.tie_embeddings)
        optim = state.optimizer_entries(optimizers, prefix="")[0] if optimizers is not None else {}
        return {"model": state.model_entries(prefix=""), "optimizer": optim}

    def _async_process_group(self):
        if not is_distributed():
            return None
        if self._async_group is None:  # collective, on the first async save of every rank
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _prune(self, newest: Path) -> None:
        """Rank 0, after `newest` is complete: delete complete checkpoints older than the
        keep_last newest and stale staging directories. Never raises: the new checkpoint is
        safe, and a failed deletion only costs disk space."""
        try:
            self._prune_unsafe(newest)
        except Exception as e:
            log.warning("pruning old checkpoints in %s failed: %s: %s", self.folder, type(e).__name__, e)

    def _prune_unsafe(self, newest: Path) -> None:
        newest_step = int(ckpt.STEP_DIR_RE.match(newest.name).group(1))
        complete = sorted(
            (int(m.group(1)), d)
            for d in self.folder.iterdir()
            if (m := ckpt.STEP_DIR_RE.match(d.name)) and ckpt.is_complete(d)
        )
        newer = [d for s, d in complete if s > newest_step]
        if newer:
            log.warning(
                "%s holds %s, newer than the checkpoint just written (%s); a resume picks the newest",
                self.folder,
                newer[-1].name,
                newest.name,
            )
        doomed = []
        if self.cfg.keep_last > 0:
            older = [d for s, d in complete if s < newest_step]
            doomed = older[: max(0, len(older) - (self.cfg.keep_last - 1))]
        for hidden in self.folder.glob(".step-*.incomplete"):  # writes of killed runs; never readable
            m = ckpt.STEP_DIR_RE.match(hidden.name[1 : -len(".incomplete")])
            if m and int(m.group(1)) < newest_step:
                doomed.append(hidden)
        for d in doomed:
            # Renamed first, so a crash mid-deletion never leaves a COMPLETE but partial step-N.
            os.replace(d, d.parent / f".{d.name.lstrip('.')}.deleting")
            log.info("removed old checkpoint %s (keep_last=%d)", d, self.cfg.keep_last)
        trash = list(self.folder.glob(".*.deleting"))
        if trash:
            # In the background, off the training step; not a daemon, and joined by
            # `finish_deletions` at the end of a run: a daemon thread is cut off at process exit,
            # leaving a whole checkpoint behind.
            thread = threading.Thread(
                target=lambda: [shutil.rmtree(t, ignore_errors=True) for t in trash],
                name="prune-checkpoints",
            )
            thread.start()
            self._deletions.append(thread)

    def finish_deletions(self) -> None:
        """Not collective: wait until the checkpoints this rank pruned are deleted (end of a run)."""
        start = time.perf_counter()
        while self._deletions:
            self._deletions.pop().join()
        if time.perf_counter() - start > 1.0:
            log.info("deleting pruned checkpoints took another %.1f s", time.perf_counter() - start)

    # -------------------------------------------------------------- loading

    def load(
        self,
        path: str | os.PathLike,
        model_parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        *,
        load_optimizer: Optional[bool] = None,
    ) -> dict:
        """Collective: restore model parts (and optimizers if `load_optimizer`, default
        checkpoint.load_optimizer) from the training checkpoint `path`, resharding to the current
        layout; returns its train_state."""
        load_optimizer = self.cfg.load_optimizer if load_optimizer is None else load_optimizer
        self.wait()
        path = Path(path)
        if len(model_parts) != len(optimizers):
            raise ValueError(f"{len(model_parts)} model parts but {len(optimizers)} optimizers: expected one each")
        meta, error = local_errors(lambda: ckpt.read_meta(path))
        if error is None and "train_state" not in meta:
            error = (
                f"checkpoint {path} has no train_state: it was not written by the trainer; start from its "
                "weights with checkpoint.init_from instead"
            )
        raise_on_every_rank(error, error_type=CheckpointError)
        state = ModelPartsState(model_parts, self.model_cfg.tie_embeddings)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        want: dict[str, Any] = state.model_entries(copies)
        optim_sds = None
        if load_optimizer:
            # Only the state; hyperparameters stay those of the current config.
            optim, optim_sds = state.optimizer_entries(optimizers, state_only=True, copies=copies)
            want.update(optim)
        stored, error = local_errors(lambda: _stored_entries(path))
        raise_on_every_rank(error and error + _rollback_hint(path), error_type=CheckpointError)
        raise_on_every_rank(_missing_or_misshaped(want, stored, path), error_type=CheckpointError)
        try:
            ckpt.load_state(path, want)
        except CheckpointError as e:  # raised on every rank: by load_state's own check, or gathered by DCP
            raise CheckpointError(f"{e}{_rollback_hint(path)}") from e
        copy_duplicates(copies)
        state.apply(optimizers, optim_sds)
        barrier()  # nobody prunes or overwrites what a slower rank still reads
        self.last_saved_step = meta.get("step")
        self._adopt_sources(path, meta)
        log.info(
            "loaded %s (step %s%s)",
            path,
            meta.get("step"),
            "" if load_optimizer else ", optimizer state not restored",
        )
        return meta["train_state"]

    def load_branch(
        self,
        path: str | os.PathLike,
        model_parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        *,
        optimizer: bool,
    ) -> dict:
        """Collective: `load` from another run's checkpoint (read only; nothing is written beside
        it): its weights, and its AdamW state if `optimizer`. Returns its train_state."""
        train_state = self.load(path, model_parts, optimizers, load_optimizer=optimizer)
        self.last_saved_step = None  # this run has saved nothing yet: its start step may still be saved
        return train_state

    def _adopt_sources(self, path: Path, meta: dict) -> None:
        if not self._tokenizer_explicit and (path / ckpt.TOKENIZER_DIR).is_dir():
            self._tokenizer_files = tokenizer_files(path / ckpt.TOKENIZER_DIR)
        if not self._source_explicit and not self.cfg.init_from:
            self._source = {k: meta[k] for k in ("hf_config", "hf_generation_config", "source") if k in meta}


def _missing_or_misshaped(want: dict[str, Any], stored: dict[str, Optional[torch.Size]], path: Path) -> Optional[str]:
    missing = [k for k in want if k not in stored]
    optim = [k for k in missing if k.startswith(OPTIMIZER_PREFIX)]
    if optim:
        return (
            f"checkpoint {path} has no optimizer state for {optim[0]} ({len(optim)} entries missing): it was "
            "saved without it (save_optimizer=false) or for other parameters; set "
            "checkpoint.load_optimizer=false to start the optimizer fresh"
        )
    if missing:
        return f"checkpoint {path} lacks {missing[0]} ({len(missing)} entries missing): it holds another model"
    for key, value in want.items():
        if isinstance(value, torch.Tensor) and stored[key] is not None and tuple(value.shape) != tuple(stored[key]):
            return f"checkpoint {path}: {key} has shape {list(stored[key])}, the model expects {list(value.shape)}"
    return None


def _stored_entries(path: Path) -> dict[str, Optional[torch.Size]]:
    """Every key of the DCP checkpoint at `path`: global shape for tensors, None otherwise."""
    md = ckpt.read_dcp_metadata(path)
    return {k: (v.size if isinstance(v, TensorStorageMetadata) else None) for k, v in md.state_dict_metadata.items()}


def _rollback_hint(path: Path) -> str:
    """Where a resume can go back to when the DCP files of the checkpoint at `path` are damaged:
    the newest older checkpoint beside it that is complete and whose files check out."""
    m = ckpt.STEP_DIR_RE.match(path.name)
    if m is None:
        return ""
    step = int(m.group(1))
    try:
        older = sorted(
            ((int(o.group(1)), d) for d in path.parent.iterdir() if (o := ckpt.STEP_DIR_RE.match(d.name))),
            reverse=True,
        )
    except OSError:
        return ""
    for s, d in older:
        if s < step and ckpt.is_complete(d) and _intact(d):
            return f"; the older checkpoint {d} is intact: roll back to it with checkpoint.load_step={s}"
    return f"; {path.parent} holds no older intact checkpoint to roll back to"


def _intact(path: Path) -> bool:
    try:
        json.loads((path / ckpt.META_FILE).read_text())
        ckpt.read_dcp_metadata(path)
    except (OSError, ValueError, CheckpointError):
        return False
    return True


def _refuse_non_finite(step: int, parts: list[nn.Module]) -> None:
    """A NaN/inf weight never reaches a checkpoint (the newest one stays the last good state)."""
    for part in parts:
        for name, p in part.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if not torch.isfinite(local).all():
                raise NonFiniteLossError(f"refusing to save step {step}: parameter {name} is not finite")
