"""`cptron lr-plot`: the learning rate a train config gives each step, with its phases marked,
and for a branch also its parent's schedule and the step it branches at.

Owns the figure only. The schedules come from `cptron.train.lr`; a branch's parent schedule from
`--parent` (the parent's train config), else from what checkpoint.branch_from recorded
(`cptron.train.branch.schedule_record`), else from the config.yaml of the source's run.
matplotlib draws on its Agg canvas through `Figure` alone: pyplot, and so any display, is never
touched. Steps are numbered as the log numbers them: step n is the state after n updates, and
its LR is that of update n - 1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cptron import checkpoint as ckpt
from cptron.config import config_from_dict, load_yaml
from cptron.errors import ConfigError, CptronError, require
from cptron.train.config import JobConfig
from cptron.train.lr import LRConfig, LRSchedule, PhasedSchedule, build_lr_schedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("cptron")

MAX_POINTS = 2000
"""Steps sampled per curve (plus every phase boundary, so corners stay sharp)."""


@dataclass
class LRPlotConfig(JobConfig):
    """Draw the learning rate of a train config over its training.steps, phases marked (and a branch's parent schedule)."""

    output: str = "lr.png"
    """PNG file to write."""
    parent: Optional[str] = None
    """Train config (YAML) of the run this one branches from, drawn too; default: the schedule that checkpoint.branch_from recorded, else its run's config.yaml."""
    branch_step: Optional[int] = None
    """The parent's step this run branches at, marked on the plot; default: the step of checkpoint.branch_from."""

    def validate(self) -> None:
        super().validate()
        require(self.output.lower().endswith(".png"), "output", self.output, "a path ending in .png")
        require(self.branch_step is None or self.branch_step >= 0, "branch_step", self.branch_step, "a step >= 0")


@dataclass(frozen=True)
class Curve:
    """One schedule to draw: its steps s = 1 .. total_steps are drawn at x = offset + s, from first on."""

    label: str
    schedule: LRSchedule
    peak: float
    total_steps: int
    offset: int = 0
    first: int = 1

    def points(self) -> tuple[list[int], list[float]]:
        """(x, LR) at evenly spaced steps and at every phase boundary."""
        lo, hi = self.first, self.total_steps
        steps = {lo, hi} | {lo + (hi - lo) * i // MAX_POINTS for i in range(MAX_POINTS + 1)}
        if isinstance(self.schedule, PhasedSchedule):
            steps |= {
                s for p in self.schedule.phases for s in (p.start, p.start + 1, p.end, p.end + 1) if lo <= s <= hi
            }
        ordered = sorted(steps)
        return [self.offset + s for s in ordered], [self.peak * self.schedule.factor(s - 1) for s in ordered]


@dataclass(frozen=True)
class _Parent:
    lr: LRConfig
    total_steps: int
    peak: float
    where: str


def lr_figure(cfg: LRPlotConfig) -> Figure:
    """The figure: one line per schedule, plus a vertical line at the branch step when known."""
    from matplotlib.figure import Figure

    t = cfg.training
    schedule = build_lr_schedule(cfg.lr, t.steps)
    parent = _parent(cfg)
    k = cfg.branch_step if cfg.branch_step is not None else _branch_step(cfg.checkpoint.branch_from)
    carries_step = "step" in cfg.checkpoint.branch_carry
    if k is not None and carries_step:
        require(k < t.steps, "branch_step", k, f"less than training.steps={t.steps} (the branch counts on from it)")
    branch_name = Path(t.run_dir).name or "this run"
    if k is None:
        main = Curve(branch_name, schedule, cfg.optim.lr, t.steps)
    elif carries_step:
        main = Curve(f"{branch_name} (branch)", schedule, cfg.optim.lr, t.steps, first=k + 1)
    else:
        main = Curve(f"{branch_name} (branch, steps counted from 0)", schedule, cfg.optim.lr, t.steps, offset=k)
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if parent is not None:
        curve = Curve(
            f"parent ({parent.where})",
            build_lr_schedule(parent.lr, parent.total_steps),
            parent.peak,
            parent.total_steps,
        )
        ax.plot(*curve.points(), color="0.55", linestyle="--", label=curve.label)
    ax.plot(*main.points(), color="C0", linewidth=2, label=main.label)
    if k is not None:
        ax.axvline(k, color="C3", linestyle=":", label=f"branch at step {k}")
    _mark_phases(ax, main)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{cfg.lr.schedule} schedule, peak {cfg.optim.lr:g}, {t.steps} steps")
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize="small")
    return fig


def _mark_phases(ax, curve: Curve) -> None:
    """Shade each phase of `curve` inside its drawn range and name it at the top of the axes."""
    if not isinstance(curve.schedule, PhasedSchedule):
        return
    spans = [(p.start, p.end, _phase_label(p)) for p in curve.schedule.phases]
    end = spans[-1][1] if spans else 0
    if end < curve.total_steps:
        spans.append((end, curve.total_steps, f"{curve.schedule.final_factor:g} x peak"))
    for i, (start, stop, label) in enumerate(spans):
        lo, hi = max(start, curve.first - 1), min(stop, curve.total_steps)
        if lo >= hi:
            continue
        ax.axvspan(curve.offset + lo, curve.offset + hi, color="C0", alpha=0.04 + 0.06 * (i % 2), linewidth=0)
        ax.text(
            curve.offset + (lo + hi) / 2,
            0.98,
            label,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize="x-small",
            rotation=90 if hi - lo < curve.total_steps / 8 else 0,
        )


def _phase_label(phase) -> str:
    if phase.shape == "constant":
        return f"constant {phase.start_factor:g}"
    if phase.end_factor > phase.start_factor:
        return f"warmup to {phase.end_factor:g}"
    return f"{phase.shape} {phase.start_factor:g} to {phase.end_factor:g}"


def _source_state(branch_from: str) -> Optional[dict]:
    """The train state in the source checkpoint's cptron.json, read as a file: `ckpt.read_meta`
    would repair an interrupted write, and plotting never writes to another run."""
    try:
        state = json.loads((Path(branch_from) / ckpt.META_FILE).read_text())["train_state"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None


def _branch_step(branch_from: Optional[str]) -> Optional[int]:
    if not branch_from:
        return None
    step = (_source_state(branch_from) or {}).get("step")
    if isinstance(step, int):
        return step
    m = ckpt.STEP_DIR_RE.match(Path(branch_from).name)
    return int(m.group(1)) if m else None


def _parent(cfg: LRPlotConfig) -> Optional[_Parent]:
    """The parent's schedule: --parent, else the branch source's record, else its run's config.yaml."""
    if cfg.parent is not None:
        return _parent_from_yaml(Path(cfg.parent), "parent")
    source = cfg.checkpoint.branch_from
    if not source:
        return None
    try:
        record = (_source_state(source) or {})["lr"]
        lr = config_from_dict(LRConfig, record["config"])
        return _Parent(lr, int(record["total_steps"]), float(record["peak"]), Path(source).name)
    except (CptronError, KeyError, TypeError, ValueError):
        pass
    for run_dir in Path(source).parents[:3]:
        if (run_dir / "config.yaml").is_file():
            return _parent_from_yaml(run_dir / "config.yaml", "checkpoint.branch_from")
    log.warning(
        "checkpoint.branch_from=%s records no schedule and no config.yaml of its run was found: drawing this "
        "run's schedule alone (pass --parent PARENT_CONFIG)",
        source,
    )
    return None


def _parent_from_yaml(path: Path, field: str) -> _Parent:
    try:
        parent = config_from_dict(JobConfig, load_yaml(str(path)), validate=False)
        build_lr_schedule(parent.lr, parent.training.steps)
    except (CptronError, OSError) as e:
        raise ConfigError(f"{field}={str(path)!r} is invalid: expected a readable train config ({e})") from e
    return _Parent(parent.lr, parent.training.steps, parent.optim.lr, Path(parent.training.run_dir).name or str(path))


def lr_plot_arguments(argv: list[str]) -> list[str]:
    """`-o FILE` (as `cptron plot` takes it) as --output FILE; every other argument as it is."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "-o":
            require(i + 1 < len(argv), "-o", "", "the PNG file to write")
            out += ["--output", argv[i + 1]]
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def run_lr_plot(cfg: LRPlotConfig) -> Path:
    """`cptron lr-plot`: write the figure to cfg.output and say where."""
    out = Path(cfg.output)
    fig = lr_figure(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    log.info("wrote the LR schedule of %s steps to %s", cfg.training.steps, out)
    return out


__all__ = ["Curve", "LRPlotConfig", "lr_figure", "lr_plot_arguments", "run_lr_plot"]
