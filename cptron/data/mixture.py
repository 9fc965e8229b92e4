"""Mixture arithmetic: source shares per stage, and the interleave that keeps every prefix on target.

Weights are exact rationals (`fractions.Fraction`): a YAML weight of 0.1 is 1/10,
not the nearest binary float, so the interleave's bound holds for any number of
samples instead of drifting once n times the rounding error reaches 1.

The interleave is the quota method of Balinski and Young ("The quota method of
apportionment", American Mathematical Monthly 82(7), 1975): sample n + 1 goes to
the source with the largest w / (c + 1) among those that would not exceed their
upper quota ceil(w * (n + 1)). It is house-monotone (a prefix of the sequence is
the apportionment of the prefix) and satisfies quota, so after every n samples
each source's count c satisfies floor(w * n) <= c <= ceil(w * n).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from cptron.errors import ConfigError, CptronError, invalid, require


def exact(value: float | int | Fraction) -> Fraction:
    """`value` as the rational its decimal text denotes (0.1 -> 1/10)."""
    if isinstance(value, (int, Fraction)):
        return Fraction(value)
    require(math.isfinite(value), "weight", value, "a finite number")
    return Fraction(repr(float(value)))


def format_shares(names: Sequence[str], shares: Sequence[Fraction]) -> str:
    """A stable text key of a mixture, e.g. 'code=1/4,web=3/4' (stored in the loader state)."""
    return ",".join(f"{n}={s.numerator}/{s.denominator}" for n, s in zip(names, shares))


class QuotaScheduler:
    """Deterministic interleave of sources with shares summing to 1 (the quota method, see module doc).

    The state is the per-source counts since the scheduler started; constructing it with
    the same shares and counts continues the same sequence.
    """

    def __init__(self, shares: Sequence[Fraction], counts: Optional[Sequence[int]] = None):
        if any(s < 0 for s in shares) or sum(shares) != 1:
            raise CptronError(f"mixture shares {[str(s) for s in shares]} must be >= 0 and sum to 1")
        den = math.lcm(*(s.denominator for s in shares))
        self.numerators = [s.numerator * (den // s.denominator) for s in shares]
        self.denominator = den
        self.counts = [0] * len(shares) if counts is None else [int(c) for c in counts]
        if len(self.counts) != len(shares) or any(c < 0 for c in self.counts):
            raise CptronError(f"scheduler counts {self.counts} do not fit {len(shares)} shares")
        self.total = sum(self.counts)

    def copy(self) -> QuotaScheduler:
        clone = object.__new__(QuotaScheduler)
        clone.numerators, clone.denominator = self.numerators, self.denominator
        clone.counts, clone.total = list(self.counts), self.total
        return clone

    def next(self) -> int:
        """The source index of the next sample."""
        upper = self.total + 1
        den, nums, counts = self.denominator, self.numerators, self.counts
        best, best_num, best_next = -1, 0, 1
        for i, num in enumerate(nums):
            c = counts[i]
            # eligible: one more sample keeps c + 1 <= ceil(w * (n + 1)), i.e. c < w * (n + 1)
            if c * den < num * upper and (best < 0 or num * best_next > best_num * (c + 1)):
                best, best_num, best_next = i, num, c + 1
        counts[best] += 1
        self.total = upper
        return best


@dataclass(frozen=True)
class Stage:
    """One resolved stage: from `start_step` on, these relative weights and this replay fraction apply."""

    index: int
    """0 for the base mixture, i for data.stages[i - 1]."""
    start_step: int
    weights: Mapping[str, Fraction]
    """Relative weight of every source (before the replay split)."""
    replay_fraction: Optional[Fraction]


def base_weights(cfg, natural: Mapping[str, int]) -> dict[str, Fraction]:
    """Relative weight of each source: its configured weight, or its natural size (samples, capped)."""
    out = {}
    for name in sorted(cfg.sources):
        weight = cfg.sources[name].weight
        out[name] = exact(weight) if weight is not None else Fraction(int(natural[name]))
    return out


def stage_weights(base: Mapping[str, Fraction], stage) -> dict[str, Fraction]:
    """`base` with a StageConfig's replacement weights, then its scale factors, applied."""
    out = dict(base)
    for name, w in stage.weights.items():
        out[name] = exact(w)
    for name, f in stage.scale.items():
        out[name] = out[name] * exact(f)
    return out


def shares(
    weights: Mapping[str, Fraction],
    replay_fraction: Optional[Fraction],
    replay_sources,
    active=None,
    where: str = "data",
    strict: bool = False,
) -> dict[str, Fraction]:
    """Each source's share of samples (summing to 1), given relative weights and the replay split.

    Sources not in `active` (exhausted caps) get 0 and the others share their part;
    when a whole replay group is gone the other group takes all (with `strict`, a replay
    group with a positive share but only zero weights raises instead). Raises
    CptronError when no source with a positive weight is left.
    """
    names = sorted(weights)
    live = {n: (weights[n] if active is None or n in active else Fraction(0)) for n in names}
    if replay_fraction is None:
        groups = [(names, Fraction(1))]
    else:
        old = [n for n in names if n in set(replay_sources)]
        new = [n for n in names if n not in set(replay_sources)]
        groups = [(old, replay_fraction), (new, 1 - replay_fraction)]
        sums = [sum((live[n] for n in g), Fraction(0)) for g, _ in groups]
        if not strict and any(part > 0 and total == 0 for (_, part), total in zip(groups, sums)):
            # one group has nothing left: the groups that still have data share everything
            alive = [(g, Fraction(1)) for (g, _), total in zip(groups, sums) if total > 0]
            groups = [([n for g, _ in alive for n in g], Fraction(1))] if alive else [(names, Fraction(1))]
    out = {n: Fraction(0) for n in names}
    for group, part in groups:
        total = sum((live[n] for n in group), Fraction(0))
        if part == 0:
            continue
        if total == 0:
            raise CptronError(
                f"{where}: the source weights sum to zero: expected at least one source "
                f"with weight > 0 and samples left among {group}"
            )
        for n in group:
            out[n] = part * live[n] / total
    return out


def resolve_stages(cfg, natural: Mapping[str, int], total_steps: Optional[int]) -> list[Stage]:
    """The base mixture and every configured stage with its start step, in order."""
    base = base_weights(cfg, natural)
    replay = None if cfg.replay.fraction is None else exact(cfg.replay.fraction)
    stages = [Stage(0, 0, base, replay)]
    for i, st in enumerate(cfg.stages):
        where = f"data.stages[{i}]"
        if st.start_step is not None:
            start = int(st.start_step)
        else:
            if total_steps is None:
                raise invalid(
                    f"{where}.start_fraction",
                    st.start_fraction,
                    "start_step, since the total number of steps is not known",
                )
            start = math.floor(exact(st.start_fraction) * int(total_steps))
        rf = replay if st.replay_fraction is None else exact(st.replay_fraction)
        stages.append(Stage(i + 1, start, stage_weights(base, st), rf))
    later = sorted(stages[1:], key=lambda s: s.start_step)
    starts = [s.start_step for s in later]
    if len(set(starts)) != len(starts):
        raise ConfigError(f"data.stages start at steps {starts}: expected distinct start steps")
    if later and later[0].start_step == 0:  # a stage from step 0 replaces the base mixture
        return later
    return [stages[0]] + later


def stage_at(stages: Sequence[Stage], step: int) -> Stage:
    """The stage in force at optimizer step `step`."""
    i = bisect.bisect_right([s.start_step for s in stages], step) - 1
    return stages[max(i, 0)]


def check_mixture_config(cfg) -> None:
    """Raise ConfigError if the base mixture or a stage leaves a group with only zero weights.

    Sizes are not known yet; natural weights count as 1 here and are checked for
    emptiness when the shards are opened.
    """
    natural = {n: 1 for n in cfg.sources}
    base = base_weights(cfg, natural)
    replay_sources = set(cfg.replay.sources)
    replay = None if cfg.replay.fraction is None else exact(cfg.replay.fraction)
    plans = [("data.sources", base, replay)]
    for i, st in enumerate(cfg.stages):
        rf = replay if st.replay_fraction is None else exact(st.replay_fraction)
        plans.append((f"data.stages[{i}]", stage_weights(base, st), rf))
    for where, weights, rf in plans:
        if rf is not None:
            new = [n for n in weights if n not in replay_sources]
            if rf < 1 and not new:
                raise ConfigError(
                    f"{where}: replay fraction {float(rf)} leaves {float(1 - rf)} of the samples "
                    "to new sources, but every source is in data.replay.sources: expected "
                    "at least one new source (or replay fraction 1)"
                )
        try:
            shares(weights, rf, replay_sources, where=where, strict=True)
        except CptronError as e:
            raise ConfigError(f"{e} (weights { ({n: float(w) for n, w in weights.items()}) })") from None


def mixture_description(cfg) -> dict:
    """What decides the mixture (not the data order): compared on resume."""
    return {
        "sources": {
            n: {"weight": s.weight, "epochs": s.epochs, "max_samples": s.max_samples}
            for n, s in sorted(cfg.sources.items())
        },
        "replay": {"fraction": cfg.replay.fraction, "sources": sorted(cfg.replay.sources)},
    }


def stages_description(cfg) -> list:
    return [
        {
            "start_step": s.start_step,
            "start_fraction": s.start_fraction,
            "weights": dict(sorted(s.weights.items())),
            "scale": dict(sorted(s.scale.items())),
            "replay_fraction": s.replay_fraction,
        }
        for s in cfg.stages
    ]


__all__ = [
    "QuotaScheduler",
    "Stage",
    "exact",
    "shares",
    "resolve_stages",
    "stage_at",
    "base_weights",
    "stage_weights",
    "check_mixture_config",
    "format_shares",
    "mixture_description",
    "stages_description",
]
