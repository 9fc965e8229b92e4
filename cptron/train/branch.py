"""Where a run starts, and under which learning rate, and what the start-up log says about it.

A run starts from its own newest checkpoint (a resume), from a checkpoint of another run (a
branch, `checkpoint.branch_from`), from pretrained weights (`checkpoint.init_from`, re-warmed by
the schedule's warmup from step 0) or from a fresh initialization. This module owns:

- the schedule a checkpoint records (`schedule_record`, part of the train state) and the rule
  that a resumed run never silently takes another one (`resumed_schedule`): a change that leaves
  the LR of every step already taken as it was is allowed and logged (setting or moving
  lr.anneal_start of an infinite schedule to the resumed step or later, extending training.steps
  under a schedule whose past does not depend on it); any other is refused at start-up, naming
  the fields and both values. The judge is `cptron.train.lr.first_difference`, not a list of
  fields, so every schedule gets the same rule;
- branching (`branch_source`, `start_branch`): a new run directory starts from a complete
  checkpoint of another run with its weights and, per `checkpoint.branch_carry`, its AdamW state,
  its data position and its step counter, under this config's schedule and mixture, e.g. a decay
  branch from a constant-phase checkpoint, a re-warm or a new replay mixture (Ibrahim et al.,
  2024; Hu et al., 2024). The source is only read: it must lie outside this run's directory,
  whose lock, metrics and checkpoint pruning belong to this run, and a source left mid-write
  (a sibling `.step-N.incomplete`/`.old`, which reading would repair) is refused. Once the branch
  has a checkpoint of its own, it resumes from that and the source is no longer needed.

Data position. The mixture loader's step selects the data stage and counts the shares'
interleave, so it must equal the trainer's step. Carrying the data without the step counter
keeps every source's position and restarts the interleave at step 0 (as a new stage would);
carrying the step without the data starts every source from its beginning at that step.
The loader itself refuses what cannot continue (another seq_len or seed, changed shards) and a
changed mixture unless data.allow_mixture_change, as on a resume: sources new to the mixture
start at position 0, dropped ones are left where they were.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cptron import checkpoint as ckpt
from cptron.config import config_from_dict, config_to_dict
from cptron.data.interface import BatchSource
from cptron.data.loader import STATE_FORMAT, MixtureLoader
from cptron.distributed import local_errors, raise_on_every_rank
from cptron.errors import CheckpointError, ConfigError, CptronError, invalid
from cptron.train.checkpointer import TrainCheckpointer
from cptron.train.config import JobConfig
from cptron.train.lr import LRConfig, LRSchedule, build_lr_schedule, first_difference
from cptron.train.train_module import TrainModule

log = logging.getLogger("cptron.train")

_CARRIED = {
    "weights": "weights",
    "optimizer": "optimizer state",
    "data": "data position",
    "step": "step counter",
}


# ---------------------------------------------------------------- the schedule in force


def schedule_record(cfg: JobConfig) -> dict[str, Any]:
    """What a checkpoint records of the LR schedule (in its train state): the lr section, the
    total steps the schedule was built for and the peak LR it multiplies."""
    return {"config": config_to_dict(cfg.lr), "total_steps": cfg.training.steps, "peak": cfg.optim.lr}


def describe_schedule(cfg: JobConfig, schedule: Optional[LRSchedule] = None) -> str:
    """The schedule of `cfg` for the log: its name, peak and phases."""
    schedule = schedule or build_lr_schedule(cfg.lr, cfg.training.steps)
    phases = schedule.describe(cfg.training.steps) if hasattr(schedule, "describe") else "a custom schedule"
    text = f"{cfg.lr.schedule} schedule, peak {cfg.optim.lr:g} x ({phases})"
    if cfg.lr.schedule == "infinite" and cfg.lr.anneal_start is None:
        text += "; no annealing yet (set lr.anneal_start when resuming or branching)"
    return text


def fresh_start_note(cfg: JobConfig) -> str:
    """The start-up line of a run from step 0: the schedule, and whether it re-warms pretrained weights."""
    text = f"LR from step 0: {describe_schedule(cfg)}"
    init_from, warmup = cfg.checkpoint.init_from, cfg.lr.warmup_steps
    if init_from:
        text += f"; re-warmed from the pretrained weights of {init_from}" + (
            f" over {warmup} warmup steps" if warmup else " with no warmup (lr.warmup_steps=0)"
        )
    return text


def resumed_schedule(cfg: JobConfig, path: Path) -> str:
    """Collective, before loading: the start-up line of a resume from `path`; ConfigError on every
    rank if the config's schedule would change the LR of a step the checkpoint has taken."""
    note, error = local_errors(lambda: _held_schedule(cfg, path))
    raise_on_every_rank(error, error_type=ConfigError)
    return note


def _held_schedule(cfg: JobConfig, path: Path) -> str:
    try:
        state = ckpt.read_meta(path)["train_state"]
        step, record = int(state["step"]), state.get("lr")
    except (CptronError, KeyError, TypeError, ValueError):
        return f"LR: {describe_schedule(cfg)} (the checkpoint's step is unreadable; its load says why)"
    new = build_lr_schedule(cfg.lr, cfg.training.steps)
    here = f"LR from step {step}: {describe_schedule(cfg, new)}"
    if record is None:
        return f"{here} (checkpoint {path} records no schedule to hold the run to)"
    try:
        old_cfg = config_from_dict(LRConfig, record["config"])
        old_total, old_peak = int(record["total_steps"]), float(record["peak"])
        old = build_lr_schedule(old_cfg, old_total)
    except (CptronError, KeyError, TypeError, ValueError) as e:  # raised as ConfigError by resumed_schedule
        raise ConfigError(
            f"checkpoint {path}: train_state.lr is unreadable ({e}): expected what schedule_record writes"
        ) from e
    changes = [
        f"lr.{f.name} {getattr(old_cfg, f.name)!r} -> {getattr(cfg.lr, f.name)!r}"
        for f in dataclasses.fields(LRConfig)
        if getattr(old_cfg, f.name) != getattr(cfg.lr, f.name)
    ]
    if old_total != cfg.training.steps:
        changes.append(f"training.steps {old_total} -> {cfg.training.steps}")
    if old_peak != cfg.optim.lr:
        changes.append(f"optim.lr {old_peak!r} -> {cfg.optim.lr!r}")
    if not changes:
        return f"{here}, the checkpoint's schedule"
    # The peak multiplies every step, so a new peak changes the first one already taken.
    first = (0 if step > 0 else None) if old_peak != cfg.optim.lr else first_difference(old, new, step)
    if first is not None:
        raise ConfigError(
            f"{'; '.join(changes)} since checkpoint {path}: the LR of step {first + 1}, already taken, would "
            f"change ({old_peak * old.factor(first):.6g} -> {cfg.optim.lr * new.factor(first):.6g}); a resumed "
            "run keeps its schedule: restore the checkpoint's values, or branch from it into a new run_dir "
            "with checkpoint.branch_from"
        )
    return f"schedule changed since checkpoint {path} ({'; '.join(changes)}), steps 1-{step} unchanged; {here}"


# ---------------------------------------------------------------- branching


@dataclass(frozen=True)
class BranchSource:
    """The checkpoint a branch starts from, as read at start-up."""

    path: Path
    step: int
    """Optimizer steps the source had taken."""
    train_state: dict


def architecture_source(cfg: JobConfig) -> Optional[str]:
    """Collective: the checkpoint or HF directory whose architecture the run has: init_from; for a
    branch its own newest checkpoint, else its source; None: the model section."""
    c = cfg.checkpoint
    if c.init_from or c.branch_from is None:
        return c.init_from
    own = ckpt.latest_complete_checkpoint(Path(cfg.training.run_dir) / c.folder)
    if own is not None:
        return str(own)
    if not ckpt.is_complete(c.branch_from):
        raise invalid("checkpoint.branch_from", c.branch_from, _SOURCE_EXPECTED)
    return c.branch_from


_SOURCE_EXPECTED = (
    "a complete checkpoint directory of another run (e.g. runs/base/checkpoints/step-00001000, with COMPLETE)"
)


def branch_source(cfg: JobConfig, resumed: Optional[Path]) -> Optional[BranchSource]:
    """Collective: the checkpoint this run branches from now (None: no branch_from, or the run
    resumes from a checkpoint of its own), checked on every rank before anything is loaded."""
    if cfg.checkpoint.branch_from is None or resumed is not None:
        return None
    source, error = local_errors(lambda: _read_source(cfg))
    raise_on_every_rank(error, error_type=CheckpointError)
    return source


def check_branch_location(cfg: JobConfig) -> None:
    """Refuse a branch_from inside this run's directory, or containing it, before the run locks or
    writes anything there: the run would resume, lock, log into and prune its own source."""
    c, t = cfg.checkpoint, cfg.training
    if c.branch_from is None:
        return
    src, run_dir = Path(c.branch_from).resolve(), Path(t.run_dir).resolve()
    if src == run_dir or run_dir in src.parents or src in run_dir.parents:
        raise invalid(
            "checkpoint.branch_from",
            c.branch_from,
            f"a checkpoint outside training.run_dir={t.run_dir} (a branch needs a run directory of its own: "
            "its lock, metrics and checkpoint pruning would reach the source)",
        )


def _read_source(cfg: JobConfig) -> BranchSource:
    c, t = cfg.checkpoint, cfg.training
    path = Path(c.branch_from)
    if not path.is_dir():  # before read_meta, which would move a finished hidden copy into place
        raise invalid("checkpoint.branch_from", c.branch_from, _SOURCE_EXPECTED)
    for side in ckpt.side_dirs(path):
        if side.exists():
            raise CheckpointError(
                f"checkpoint.branch_from={c.branch_from}: {side} is left from an interrupted write of it, which "
                "reading would repair, and a branch never writes to its source: resume the source run once, "
                "or branch from another checkpoint"
            )
    meta = ckpt.read_meta(path)
    state = meta.get("train_state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(
            f"checkpoint.branch_from={c.branch_from} has no train state: it was not written by `cptron train`; "
            "start from its weights with checkpoint.init_from instead"
        )
    step = state["step"]
    if "step" in c.branch_carry and t.steps <= step:
        raise invalid(
            "training.steps",
            t.steps,
            f"more than the {step} steps of the branch source {c.branch_from}, since checkpoint.branch_carry "
            "carries the step counter (the branch counts on from it)",
        )
    if "data" in c.branch_carry and not isinstance(state.get("data"), dict):
        raise CheckpointError(
            f"checkpoint.branch_from={c.branch_from} records no data position: leave data out of "
            "checkpoint.branch_carry"
        )
    return BranchSource(path, step, state)


def start_branch(
    source: BranchSource,
    cfg: JobConfig,
    module: TrainModule,
    checkpointer: TrainCheckpointer,
    data: BatchSource,
) -> tuple[int, list[int], str]:
    """Collective: load what checkpoint.branch_carry carries from `source` into this run.
    Returns (the step the branch starts at, the skipped updates it inherits, the start-up line)."""
    carry = cfg.checkpoint.branch_carry
    optimizer, step_carried = "optimizer" in carry, "step" in carry
    step = source.step if step_carried else 0
    # Checked before the weights load, the slow part.
    module.trainable.check_resume(source.path, optimizer)
    _, error = local_errors(lambda: _carry_data(source, cfg, data, step))
    raise_on_every_rank(error)
    checkpointer.load_branch(source.path, module.parts, module.optimizers, optimizer=optimizer)
    # A source that trained rows this run freezes has moments there: they must not move.
    module.trainable.zero_masked_moments(module.optimizers)
    skipped = list(source.train_state.get("skipped_steps", [])) if step_carried else []
    carried = ", ".join(_CARRIED[c] for c in carry)
    left = [_CARRIED[c] for c in _CARRIED if c not in carry]
    note = (
        f"branched from {source.path} at step {source.step}: {carried} carried"
        + (f"; not carried: {', '.join(left)}" if left else "")
        + f"; LR from step {step}: {describe_schedule(cfg)}"
    )
    return step, skipped, note


def plan_branch_data(cfg: JobConfig, data: BatchSource) -> Optional[str]:
    """For `cptron data plan` of a branch that has no checkpoint of its own yet (one process, no
    collectives): move `data` to where the branch will start, by the rules `start_branch` follows,
    and return the line that says so; None without checkpoint.branch_from."""
    if cfg.checkpoint.branch_from is None:
        return None
    check_branch_location(cfg)
    source = _read_source(cfg)
    carry = cfg.checkpoint.branch_carry
    step = source.step if "step" in carry else 0
    _carry_data(source, cfg, data, step)
    kept = [_CARRIED[c] for c in ("data", "step") if c in carry]
    return (
        f"branching from {source.path} at step {source.step}: "
        + (", ".join(kept) + " carried" if kept else "no data position or step counter carried")
        + f"; the branch starts at step {step}"
    )


def _carry_data(source: BranchSource, cfg: JobConfig, data: BatchSource, step: int) -> None:
    saved = source.train_state["data"] if "data" in cfg.checkpoint.branch_carry else None
    mixture = isinstance(data, MixtureLoader)
    if saved is None:
        if not mixture or step == 0:
            return
        state = _moved(data.state_dict(), step, cfg.training.global_batch_size)
    else:
        moved = mixture and saved.get("step") != step
        state = _moved(saved, step, cfg.training.global_batch_size) if moved else saved
    try:
        data.load_state_dict(state)
    except CptronError as e:
        raise CptronError(
            f"checkpoint.branch_from={source.path}: its data position cannot carry over: {e}; or leave data out "
            "of checkpoint.branch_carry to start every source from its beginning"
        ) from e


def _moved(state: dict, step: int, global_batch_size: int) -> dict:
    """A mixture loader's state moved to `step`: every source keeps its position, and the
    interleave of the shares starts afresh there, as at a new stage."""
    if state.get("kind") != "mixture" or state.get("format") != STATE_FORMAT:
        raise CptronError(
            f"the data state (kind {state.get('kind')!r}, format {state.get('format')!r}) is not the mixture "
            f"loader's format {STATE_FORMAT}: its position cannot move to step {step}"
        )
    consumed = step * global_batch_size
    return {
        **state,
        "step": step,
        "consumed_samples": consumed,
        "segment": {"start": consumed, "shares": None, "counts": None},
    }


__all__ = [
    "BranchSource",
    "plan_branch_data",
    "architecture_source",
    "branch_source",
    "check_branch_location",
    "describe_schedule",
    "fresh_start_note",
    "resumed_schedule",
    "schedule_record",
    "start_branch",
]
