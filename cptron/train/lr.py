"""Learning-rate schedules: the LR multiplier as a pure function of the optimizer step.

A schedule keeps no state beyond the step it is asked about, so a resumed run
gets exactly the LR it would have had without the interruption.

Every schedule is a chain of `Phase`s (warmup, stable, decay, ...), each a start
step, a length, the multipliers it moves between and a shape. A new schedule,
such as the "infinite" schedule for continual pretraining (Ibrahim et al., 2024,
"Simple and Scalable Strategies to Continually Pre-train Large Language
Models"), is a new function that lists its phases and a new entry in
`SCHEDULES`; the trainer only ever calls `build_lr_schedule` and `apply_lr`.
(Re-warming from pretrained weights is any schedule's warmup, from step 0.)
`first_difference` tells whether two schedules agree on the steps a run has
already taken, which is what a resume may and may not change.

Step convention. Phase step `start + k` (k = 0 .. length-1) sits at progress
(k + 1) / length: the last step of a phase takes the phase's end value, and the
next phase moves on from there. So with warmup the first update never has LR 0,
the last warmup step has exactly the peak, and the last decay step has exactly
the floor. Steps after the last phase keep its end value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Protocol

import torch

from cptron.errors import require

# ---------------------------------------------------------------- shapes


def _inverse_sqrt_fraction(t: float, length: int, timescale: float) -> float:
    # 1/sqrt(1 + x/timescale) decays from 1 at x=0; rescaled so the phase ends exactly at its end value.
    tail = 1.0 / math.sqrt(1.0 + length / timescale)
    return (1.0 - 1.0 / math.sqrt(1.0 + t * length / timescale)) / (1.0 - tail)


def _exponential_fraction(t: float, start: float, end: float) -> float:
    # start * (end/start)**t written as a fraction of the way from start to end: exactly 1 at t = 1.
    ratio = end / start
    return t if ratio == 1.0 else (ratio**t - 1.0) / (ratio - 1.0)


# How far (0 -> 1) a phase has moved from its start value to its end value at progress t in [0, 1].
SHAPES: dict[str, Callable[[float, Phase], float]] = {
    "linear": lambda t, ph: t,
    "cosine": lambda t, ph: 0.5 * (1.0 - math.cos(math.pi * t)),
    "constant": lambda t, ph: 0.0,
    # The "1 - sqrt" cooldown of Hagele et al., 2024 ("Scaling Laws and Compute-Optimal Training
    # Beyond Fixed Training Durations") when the phase decays.
    "sqrt": lambda t, ph: math.sqrt(t),
    # Reciprocal square-root decay (Vaswani et al., 2017; the cooldown of the infinite schedules of
    # Ibrahim et al., 2024) with `timescale` steps, pinned to both ends of the phase.
    "inverse_sqrt": lambda t, ph: _inverse_sqrt_fraction(t, ph.length, ph.timescale),
    # Geometric decay start * (end / start)**t, the annealing of Ibrahim et al., 2024 (both ends > 0).
    "exponential": lambda t, ph: _exponential_fraction(t, ph.start_factor, ph.end_factor),
}


@dataclass(frozen=True)
class Phase:
    """One stretch of a schedule: the multiplier moves from start_factor to end_factor over `length` steps."""

    start: int
    length: int
    start_factor: float
    end_factor: float
    shape: str = "linear"
    timescale: Optional[float] = None  # steps; the inverse_sqrt shape only

    def __post_init__(self) -> None:
        where = f"lr phase starting at step {self.start}"
        require(self.shape in SHAPES, f"{where}: shape", self.shape, f"one of {sorted(SHAPES)}")
        require(self.length >= 1, f"{where}: length", self.length, "an integer >= 1")
        for name in ("start_factor", "end_factor"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"{where}: {name}", value, "a finite float >= 0")
        require(
            self.shape != "constant" or self.start_factor == self.end_factor,
            f"{where}: end_factor",
            self.end_factor,
            f"start_factor={self.start_factor} for a constant phase",
        )
        require(
            self.shape != "inverse_sqrt" or (self.timescale is not None and self.timescale > 0),
            f"{where}: timescale",
            self.timescale,
            "a float > 0 for the inverse_sqrt shape",
        )
        require(
            self.shape != "exponential" or min(self.start_factor, self.end_factor) > 0,
            f"{where}: end_factor",
            self.end_factor,
            f"a float > 0, as start_factor={self.start_factor} must be, for the exponential shape (it never reaches 0)",
        )

    @property
    def end(self) -> int:
        """First step after this phase."""
        return self.start + self.length

    def factor(self, step: int) -> float:
        moved = SHAPES[self.shape]((step - self.start + 1) / self.length, self)
        # This form gives exactly end_factor at moved == 1, so boundary steps hit the peak and the floor.
        return self.start_factor * (1.0 - moved) + self.end_factor * moved


class LRSchedule(Protocol):
    def factor(self, step: int) -> float:
        """Multiplier of the peak LR for optimizer update number `step` (0-based)."""
        ...


@dataclass(frozen=True)
class PhasedSchedule:
    """Contiguous phases from step 0; after the last one the multiplier stays at its end value."""

    phases: tuple[Phase, ...]
    final_factor: float

    def __post_init__(self) -> None:
        expected_start = 0
        for phase in self.phases:
            require(
                phase.start == expected_start,
                "lr phase start",
                phase.start,
                f"{expected_start} (phases must be contiguous from step 0)",
            )
            expected_start = phase.end

    def factor(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step={step} is invalid: expected an optimizer step >= 0")
        for phase in self.phases:  # a handful of phases: a linear scan is the readable choice
            if step < phase.end:
                return phase.factor(step)
        return self.final_factor

    def piece(self, step: int) -> Phase | float:
        """The phase that holds optimizer update `step`, or the final value after the last phase."""
        return next((p for p in self.phases if step < p.end), self.final_factor)

    def describe(self, total_steps: Optional[int] = None) -> str:
        """The phases in the log's step numbering (update i is step i + 1), e.g. "steps 1-10 linear
        0 -> 1; steps 11-110 cosine 1 -> 0.5; from step 111: 0.5"; the value after the last phase
        only if a run of `total_steps` reaches it."""
        parts = []
        for p in self.phases:
            steps = f"step {p.end}" if p.length == 1 else f"steps {p.start + 1}-{p.end}"
            what = (
                f"constant {p.start_factor:g}"
                if p.shape == "constant"
                else f"{p.shape} {p.start_factor:g} -> {p.end_factor:g}"
            )
            parts.append(f"{steps} {what}")
        end = self.phases[-1].end if self.phases else 0
        if total_steps is None or end < total_steps:
            parts.append(f"from step {end + 1}: {self.final_factor:g}")
        return "; ".join(parts)


def chain(start_factor: float, specs: Sequence[tuple]) -> PhasedSchedule:
    """Phases laid end to end from step 0, each starting where the previous one ended.

    `specs` are (length, end_factor, shape[, timescale]). A zero-length phase jumps straight to its
    end value, so e.g. warmup_steps=0 starts the next phase at the peak with no special case.
    `start_factor` is the value before step 0.
    """
    phases, step, value = [], 0, start_factor
    for spec in specs:
        length, end_factor, shape, *rest = spec
        if length > 0:
            phases.append(Phase(step, length, value, end_factor, shape, rest[0] if rest else None))
        step, value = step + length, end_factor
    return PhasedSchedule(tuple(phases), value)


def first_difference(a: LRSchedule, b: LRSchedule, steps: int) -> Optional[int]:
    """The first optimizer update of 0 .. steps-1 whose multiplier differs between `a` and `b`, else None.

    Phased schedules are compared stretch by stretch between their phases' boundaries: where both
    run the same phase, or both hold one value, the stretch is equal without visiting its steps, so
    a resume at step 10^6 costs no pass over a million steps unless a phase really changed.
    """
    if not (isinstance(a, PhasedSchedule) and isinstance(b, PhasedSchedule)):
        return next((s for s in range(steps) if a.factor(s) != b.factor(s)), None)
    cuts = {0, steps} | {x for sched in (a, b) for p in sched.phases for x in (p.start, p.end) if x < steps}
    ordered = sorted(cuts)
    for lo, hi in zip(ordered, ordered[1:]):
        pa, pb = a.piece(lo), b.piece(lo)
        if pa == pb or (_flat_value(pa) is not None and _flat_value(pa) == _flat_value(pb)):
            continue
        for step in range(lo, hi):
            if a.factor(step) != b.factor(step):
                return step
    return None


def _flat_value(piece: Phase | float) -> Optional[float]:
    """The one multiplier a constant phase or the final stretch gives every step, else None."""
    if isinstance(piece, Phase):
        return piece.start_factor if piece.shape == "constant" else None
    return piece


# ---------------------------------------------------------------- config


@dataclass
class LRConfig:
    """Learning-rate schedule: a multiplier of the optimizer's peak LR as a function of the step."""

    schedule: str = "cosine"
    """Shape of the schedule: cosine, linear, constant, wsd (warmup-stable-decay) or infinite (warmup, cooldown, constant, annealing); see cptron.train.lr.SCHEDULES."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from warmup_start_ratio to the peak (the last warmup step is at the peak)."""
    decay_steps: Optional[int] = None
    """Length of the decay to the floor: after warmup (cosine, linear; None: to the end), at the end (wsd; None: decay_fraction) or from anneal_start (infinite; None: to the end)."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of the peak LR (reached on the last decay step and kept after it)."""
    warmup_start_ratio: float = 0.0
    """Multiplier the warmup ramps up from; the first update gets ratio + (1 - ratio) / warmup_steps."""
    decay_fraction: float = 0.1
    """wsd only, when decay_steps is None: fraction of the total steps spent decaying at the end of training."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """wsd only: shape of the final decay (1-sqrt is the cooldown of Hagele et al., 2024)."""
    constant_ratio: float = 0.5
    """infinite only: the LR of the constant phase as a fraction of the peak, where the cooldown ends."""
    cooldown_steps: int = 0
    """infinite only: steps of the cooldown from the peak to constant_ratio after warmup (0: straight to it)."""
    cooldown_shape: Literal["cosine", "inverse_sqrt"] = "cosine"
    """infinite only: shape of the cooldown to the constant LR."""
    anneal_start: Optional[int] = None
    """infinite only: optimizer steps done when the final annealing to min_lr_ratio begins, chosen when the run is resumed or branched (e.g. the resumed step); None: the LR stays constant."""
    anneal_shape: Literal["exponential", "inverse_sqrt"] = "exponential"
    """infinite only: shape of the final annealing (exponential needs min_lr_ratio > 0); its length is decay_steps."""
    inverse_sqrt_timescale: Optional[float] = None
    """infinite only, inverse_sqrt cooldown or annealing: steps tau of 1/sqrt(1 + x/tau), x the steps into the phase; None: a tenth of the phase."""

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible field (build_lr_schedule checks those needing total_steps)."""
        require(self.schedule in SCHEDULES, "lr.schedule", self.schedule, f"one of {sorted(SCHEDULES)}")
        require(self.warmup_steps >= 0, "lr.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(
            self.decay_steps is None or self.decay_steps >= 1,
            "lr.decay_steps",
            self.decay_steps,
            "None or an integer >= 1",
        )
        require(
            self.schedule != "constant" or self.decay_steps is None,
            "lr.decay_steps",
            self.decay_steps,
            "None for lr.schedule='constant' (it never decays)",
        )
        for name in ("min_lr_ratio", "warmup_start_ratio"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"lr.{name}", value, "a float in [0, 1]")
        require(0.0 < self.decay_fraction <= 1.0, "lr.decay_fraction", self.decay_fraction, "a float in (0, 1]")
        require(
            self.decay_shape in _WSD_DECAY_SHAPES,
            "lr.decay_shape",
            self.decay_shape,
            f"one of {sorted(_WSD_DECAY_SHAPES)}",
        )
        require(0.0 <= self.constant_ratio <= 1.0, "lr.constant_ratio", self.constant_ratio, "a float in [0, 1]")
        require(self.cooldown_steps >= 0, "lr.cooldown_steps", self.cooldown_steps, "an integer >= 0")
        for name, shapes in (("cooldown_shape", ("cosine", "inverse_sqrt")), ("anneal_shape", _ANNEAL_SHAPES)):
            require(getattr(self, name) in shapes, f"lr.{name}", getattr(self, name), f"one of {sorted(shapes)}")
        require(
            self.anneal_start is None or self.anneal_start >= 0,
            "lr.anneal_start",
            self.anneal_start,
            "None or a step >= 0",
        )
        tau = self.inverse_sqrt_timescale
        require(
            tau is None or (math.isfinite(tau) and tau > 0),
            "lr.inverse_sqrt_timescale",
            tau,
            "None or a float > 0",
        )
        # Fields of the infinite schedule are refused elsewhere rather than silently ignored.
        for name, unset in (("cooldown_steps", 0), ("anneal_start", None)):
            require(
                self.schedule == "infinite" or getattr(self, name) == unset,
                f"lr.{name}",
                getattr(self, name),
                f"{unset} unless lr.schedule='infinite'",
            )


_WSD_DECAY_SHAPES = {"linear": "linear", "cosine": "cosine", "1-sqrt": "sqrt"}
_ANNEAL_SHAPES = ("exponential", "inverse_sqrt")


# ---------------------------------------------------------------- schedules


def _warmup(cfg: LRConfig) -> tuple:
    return (cfg.warmup_steps, 1.0, "linear")


def _warmup_then_decay(cfg: LRConfig, total_steps: int, shape: str) -> PhasedSchedule:
    decay = cfg.decay_steps if cfg.decay_steps is not None else total_steps - cfg.warmup_steps
    if cfg.decay_steps is not None:
        require(
            cfg.warmup_steps + decay <= total_steps,
            "lr.warmup_steps + lr.decay_steps",
            f"{cfg.warmup_steps} + {decay}",
            f"at most the total_steps={total_steps} of training",
        )
    return chain(cfg.warmup_start_ratio, [_warmup(cfg), (decay, cfg.min_lr_ratio, shape)])


def cosine_schedule(cfg: LRConfig, total_steps: int) -> PhasedSchedule:
    """Linear warmup, then half a cosine from the peak down to min_lr_ratio (Loshchilov & Hutter, 2017)."""
    return _warmup_then_decay(cfg, total_steps, "cosine")


def linear_schedule(cfg: LRConfig, total_steps: int) -> PhasedSchedule:
    """Linear warmup, then a straight line from the peak down to min_lr_ratio."""
    return _warmup_then_decay(cfg, total_steps, "linear")


def constant_schedule(cfg: LRConfig, total_steps: int) -> PhasedSchedule:
    """Linear warmup, then the peak for the rest of training."""
    return chain(cfg.warmup_start_ratio, [_warmup(cfg)])


def wsd_schedule(cfg: LRConfig, total_steps: int) -> PhasedSchedule:
    """Warmup-stable-decay (Hu et al., 2024, MiniCPM): warmup, the peak, then a decay at the end of training.

    The decay covers the last `decay_steps` steps, or round(decay_fraction * total_steps) (at least 1)
    when decay_steps is None, so a run can be branched from any stable-phase checkpoint.
    """
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, round(cfg.decay_fraction * total_steps))
    stable = total_steps - cfg.warmup_steps - decay
    decay_field = "lr.decay_steps" if cfg.decay_steps is not None else "round(lr.decay_fraction * total_steps)"
    require(
        stable >= 0,
        f"lr.warmup_steps + {decay_field}",
        f"{cfg.warmup_steps} + {decay}",
        f"at most the total_steps={total_steps} of training",
    )
    return chain(
        cfg.warmup_start_ratio,
        [_warmup(cfg), (stable, 1.0, "constant"), (decay, cfg.min_lr_ratio, _WSD_DECAY_SHAPES[cfg.decay_shape])],
    )


def infinite_schedule(cfg: LRConfig, total_steps: int) -> PhasedSchedule:
    """The infinite schedule of Ibrahim et al., 2024 ("Simple and Scalable Strategies to Continually
    Pre-train Large Language Models"): warmup, a cooldown to a constant LR, a constant phase of open
    length, and a final annealing that starts at a step chosen later (lr.anneal_start), so one run
    can be continued on new data, or annealed, from any constant-phase checkpoint.

    With w = warmup_steps, c = cooldown_steps, r = constant_ratio, m = min_lr_ratio,
    s = anneal_start, L = decay_steps (None: total_steps - s), a = warmup_start_ratio, and x the
    steps completed within a phase (x = 1 on its first update), the multiplier is
      warmup     updates 0 .. w-1:       a + (1 - a) x / w
      cooldown   updates w .. w+c-1:     cosine:        r + (1 - r) (1 + cos(pi x / c)) / 2
                                         inverse_sqrt:  1 - (1 - r) g(x) / g(c)
      constant   updates w+c .. s-1:     r (for ever while s is None)
      annealing  updates s .. s+L-1:     exponential:   r (m / r)^(x / L)
                                         inverse_sqrt:  r - (r - m) g(x) / g(L)
      after:                             m
    where g(x) = 1 - 1 / sqrt(1 + x / tau) and tau = inverse_sqrt_timescale (None: a tenth of the
    phase's length).
    """
    ramp = cfg.warmup_steps + cfg.cooldown_steps
    require(
        ramp <= total_steps,
        "lr.warmup_steps + lr.cooldown_steps",
        f"{cfg.warmup_steps} + {cfg.cooldown_steps}",
        f"at most the total_steps={total_steps} of training",
    )
    specs = [_warmup(cfg), (cfg.cooldown_steps, cfg.constant_ratio, cfg.cooldown_shape, _tau(cfg, cfg.cooldown_steps))]
    start = cfg.anneal_start
    if start is not None:
        require(
            ramp <= start < total_steps,
            "lr.anneal_start",
            start,
            f"a step in [{ramp}, {total_steps}): after warmup and cooldown, before the end of training",
        )
        length = cfg.decay_steps if cfg.decay_steps is not None else total_steps - start
        require(
            start + length <= total_steps,
            "lr.anneal_start + lr.decay_steps",
            f"{start} + {length}",
            f"at most the total_steps={total_steps} of training",
        )
        require(
            cfg.anneal_shape != "exponential" or min(cfg.min_lr_ratio, cfg.constant_ratio) > 0,
            "lr.min_lr_ratio" if cfg.min_lr_ratio <= 0 else "lr.constant_ratio",
            min(cfg.min_lr_ratio, cfg.constant_ratio),
            "a float > 0 for lr.anneal_shape='exponential' (an exponential never reaches 0)",
        )
        specs += [
            (start - ramp, cfg.constant_ratio, "constant"),
            (length, cfg.min_lr_ratio, cfg.anneal_shape, _tau(cfg, length)),
        ]
    return chain(cfg.warmup_start_ratio, specs)


def _tau(cfg: LRConfig, length: int) -> float:
    return cfg.inverse_sqrt_timescale if cfg.inverse_sqrt_timescale is not None else max(length, 1) / 10


# schedule name -> builder(cfg, total_steps); a new schedule is one more entry (and its config fields).
SCHEDULES: dict[str, Callable[[LRConfig, int], LRSchedule]] = {
    "cosine": cosine_schedule,
    "linear": linear_schedule,
    "constant": constant_schedule,
    "wsd": wsd_schedule,
    "infinite": infinite_schedule,
}


def build_lr_schedule(cfg: LRConfig, total_steps: int) -> LRSchedule:
    """The schedule `cfg` describes for a run of `total_steps` optimizer steps (ConfigError if it does not fit)."""
    require(isinstance(total_steps, int) and total_steps >= 1, "total_steps", total_steps, "an integer >= 1")
    cfg.validate()
    require(
        cfg.warmup_steps <= total_steps,
        "lr.warmup_steps",
        cfg.warmup_steps,
        f"at most the total_steps={total_steps} of training",
    )
    return SCHEDULES[cfg.schedule](cfg, total_steps)


def apply_lr(optimizers: Iterable[torch.optim.Optimizer], peak_lr: float, factor: float) -> float:
    """Set every param group's LR to peak_lr * factor and return that LR.

    A group with an "lr_scale" entry gets that multiple of it (e.g. a larger LR for newly added
    embedding rows). A tensor LR (as compiled or capturable optimizers keep it) is filled in place,
    so graphs that captured the tensor see the new value.
    """
    lr = peak_lr * factor
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            value = lr * group.get("lr_scale", 1.0)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value
    return lr
