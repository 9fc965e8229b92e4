"""The `data:` section of a training config: named sources, replay, stages, validation.

A YAML example (every field is documented on its dataclass below):

    data:
      sources:
        web:     {paths: [/data/fineweb], weight: 3}          # old pretraining data
        code:    {paths: ["/data/stack/*.idx"], weight: 1}    # old pretraining data
        medical: {paths: [/data/pubmed_], epochs: 4}          # the new domain
      replay: {fraction: 0.25, sources: [web, code]}          # 25% old data, spread 3:1
      stages:
        - {start_fraction: 0.9, replay_fraction: 0.1}         # last 10%: more domain data
      validation: {held_out_fraction: 0.001, num_batches: 20}

`sources` is a mapping of names to `SourceConfig` sections. On the command
line, set one field of one source (`--data.sources.web.paths /x,/y`; a new name
adds a source), a stage's field (`--data.stages.0.replay_fraction 0.2`), or a
whole value as a YAML flow mapping (`--data.sources '{web: {paths: [/x]}}'`).
A source's `domain` (old: replayed sources by default; new: the others) tags its
validation set for the forgetting/learning report (`cptron.train.report`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from cptron.data.mixture import check_mixture_config
from cptron.errors import require

SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _finite_at_least(value, low: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


@dataclass
class SourceConfig:
    """One named data source: token shards that are shuffled, packed and sampled as one stream."""

    paths: list[str] = field(default_factory=list)
    """Shards of this source: prefixes, globs or directories of Megatron .bin/.idx files."""
    weight: Optional[float] = None
    """Relative sampling weight; none: proportional to the source's size in samples (times its epochs cap)."""
    epochs: Optional[float] = None
    """Cap on the samples drawn, in passes over the source (e.g. 4 or 0.5); none: it cycles without end."""
    max_samples: Optional[int] = None
    """Cap on the samples drawn from this source (with epochs, the smaller cap applies); none: no cap."""
    held_out_fraction: Optional[float] = None
    """Fraction of this source's documents held out for validation; none: data.validation.held_out_fraction."""
    domain: Optional[Literal["old", "new"]] = None
    """Domain of this source's validation set in the forgetting/learning report: old (the base's domain, replayed or only held out) or new (the CPT target); none: old if named in data.replay.sources, else new."""

    def validate(self, name: str = "source") -> None:
        where = f"data.sources.{name}"
        require(self.domain in (None, "old", "new"), f"{where}.domain", self.domain, "old, new or none")
        require(
            bool(self.paths) and all(isinstance(p, str) and p for p in self.paths),
            f"{where}.paths",
            self.paths,
            "a non-empty list of shard paths, globs or directories",
        )
        if self.weight is not None:
            require(_finite_at_least(self.weight, 0), f"{where}.weight", self.weight, "a finite number >= 0")
        if self.epochs is not None:
            require(
                _finite_at_least(self.epochs, 0) and self.epochs > 0,
                f"{where}.epochs",
                self.epochs,
                "a number > 0 or none",
            )
        if self.max_samples is not None:
            require(self.max_samples >= 1, f"{where}.max_samples", self.max_samples, "an integer >= 1 or none")
        if self.held_out_fraction is not None:
            require(
                _finite_at_least(self.held_out_fraction, 0) and self.held_out_fraction < 1,
                f"{where}.held_out_fraction",
                self.held_out_fraction,
                "a fraction in [0, 1)",
            )


@dataclass
class ReplayConfig:
    """Split every batch between replayed old pretraining data and the new data."""

    fraction: Optional[float] = None
    """Share of samples from the replay `sources` (spread by their weights); none: weights apply across all sources."""
    sources: list[str] = field(default_factory=list)
    """Names of the old (replayed) sources; every other source is new data and shares the rest."""

    def validate(self) -> None:
        if self.fraction is not None:
            require(
                _finite_at_least(self.fraction, 0) and self.fraction <= 1,
                "data.replay.fraction",
                self.fraction,
                "a fraction in [0, 1] or none",
            )
            require(
                bool(self.sources),
                "data.replay.sources",
                self.sources,
                "the names of the replayed sources when data.replay.fraction is set",
            )
        require(
            len(set(self.sources)) == len(self.sources), "data.replay.sources", self.sources, "each source named once"
        )


@dataclass
class StageConfig:
    """A change of the mixture from a given step on (relative to the base weights, not to the previous stage)."""

    start_step: Optional[int] = None
    """Optimizer step at which this stage starts (give this or start_fraction)."""
    start_fraction: Optional[float] = None
    """Fraction of the run's total steps at which this stage starts, e.g. 0.9 for the last 10% (needs total steps)."""
    weights: dict[str, float] = field(default_factory=dict)
    """New weights of the sources named (in the units of data.sources.<name>.weight); others keep theirs."""
    scale: dict[str, float] = field(default_factory=dict)
    """Factors multiplying the named sources' weights, e.g. {medical: 3} to upsample a domain 3x."""
    replay_fraction: Optional[float] = None
    """Replay fraction during this stage; none: data.replay.fraction."""

    def validate(self) -> None:
        """Checked by DataConfig.validate, which knows the stage's index and the source names."""

    def check(self, where: str) -> None:
        require(
            (self.start_step is None) != (self.start_fraction is None),
            f"{where}.start_step",
            self.start_step,
            "exactly one of start_step and start_fraction",
        )
        if self.start_step is not None:
            require(self.start_step >= 0, f"{where}.start_step", self.start_step, "an integer >= 0")
        if self.start_fraction is not None:
            require(
                _finite_at_least(self.start_fraction, 0) and self.start_fraction <= 1,
                f"{where}.start_fraction",
                self.start_fraction,
                "a fraction in [0, 1]",
            )
        for key, table in (("weights", self.weights), ("scale", self.scale)):
            for name, value in table.items():
                require(_finite_at_least(value, 0), f"{where}.{key}.{name}", value, "a finite number >= 0")
        if self.replay_fraction is not None:
            require(
                _finite_at_least(self.replay_fraction, 0) and self.replay_fraction <= 1,
                f"{where}.replay_fraction",
                self.replay_fraction,
                "a fraction in [0, 1]",
            )


@dataclass
class ValidationConfig:
    """Held-out documents per source, used as one validation set per source."""

    held_out_fraction: float = 0.0
    """Fraction of each source's documents held out (by a hash of seed, source and document); 0: none."""
    num_batches: int = 10
    """Global batches per validation set at most (fewer when a source's held-out data runs out)."""

    def validate(self) -> None:
        require(
            _finite_at_least(self.held_out_fraction, 0) and self.held_out_fraction < 1,
            "data.validation.held_out_fraction",
            self.held_out_fraction,
            "a fraction in [0, 1)",
        )
        require(self.num_batches >= 1, "data.validation.num_batches", self.num_batches, "an integer >= 1")


@dataclass
class DataConfig:
    """Training data: a deterministic, resumable mixture of named token-shard sources."""

    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Named sources (YAML mapping of name -> {paths, weight, epochs, max_samples, held_out_fraction})."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay of old pretraining data: which sources are old and what share of samples they get."""
    stages: list[StageConfig] = field(default_factory=list)
    """Mixture changes during the run (YAML list of {start_step|start_fraction, weights, scale, replay_fraction})."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Held-out validation documents per source."""
    seed: Optional[int] = None
    """Shuffle seed of the data order and the held-out split; none: the run's seed."""
    cache_dir: Optional[str] = None
    """Directory for the sample-index cache; none: a .cptron-index directory beside each source's first shard."""
    allow_mixture_change: bool = False
    """On resume, accept changed weights, replay, caps or sources: each source continues from its position."""
    allow_tokenizer_mismatch: bool = False
    """Train on shards whose recorded tokenizer differs from the model's or from each other's (warn, not refuse)."""

    def domain_of(self, name: str) -> str:
        """ "old" or "new": the source's explicit domain, else old when it is replayed (for a validation
        set that no configured source names, e.g. a test's, the replay list alone decides)."""
        src = self.sources.get(name)
        if src is not None and src.domain is not None:
            return src.domain
        return "old" if name in self.replay.sources else "new"

    def validate(self) -> None:
        for name, src in self.sources.items():
            require(
                isinstance(name, str) and bool(SOURCE_NAME.match(name)),
                "data.sources",
                name,
                "source names of letters, digits, '_', '.' and '-' (they name cache files)",
            )
            require(isinstance(src, SourceConfig), f"data.sources.{name}", src, "a mapping of SourceConfig fields")
            src.validate(name)
        self.replay.validate()
        self.validation.validate()
        names = set(self.sources)
        unknown = [n for n in self.replay.sources if n not in names]
        require(
            not unknown or not names,
            "data.replay.sources",
            self.replay.sources,
            f"names of sources in data.sources {sorted(names)} (unknown: {unknown})",
        )
        # Weights are normalized within each replay group (or across all sources without replay),
        # so a group mixes explicit weights and sizes never.
        old = set(self.replay.sources) if self.replay.fraction is not None else set()
        groups = [sorted(names & old), sorted(names - old)] if old else [sorted(names)]
        given = {n for n, s in self.sources.items() if s.weight is not None}
        for group in groups:
            some = [n for n in group if n in given]
            require(
                not some or len(some) == len(group),
                "data.sources",
                f"weights given for {some} only",
                f"a weight for every source of {group} or for none (none: proportional to size)"
                + (" (replayed and new sources are separate groups)" if old else ""),
            )
        steps = []
        for i, stage in enumerate(self.stages):
            where = f"data.stages[{i}]"
            stage.check(where)
            for key in ("weights", "scale"):
                bad = [n for n in getattr(stage, key) if n not in names]
                require(
                    not bad or not names,
                    f"{where}.{key}",
                    getattr(stage, key),
                    f"names of sources in data.sources {sorted(names)} (unknown: {bad})",
                )
            sized = [n for n in stage.weights if n in names and n not in given]
            require(
                not sized,
                f"{where}.weights",
                stage.weights,
                f"scale (factors) for {sized}, whose data.sources.<name>.weight is none (proportional to size)",
            )
            require(
                stage.replay_fraction is None or self.replay.fraction is not None,
                f"{where}.replay_fraction",
                stage.replay_fraction,
                "data.replay.fraction to be set too (it names the replayed sources)",
            )
            if stage.start_step is not None:
                steps.append(stage.start_step)
        require(
            steps == sorted(set(steps)),
            "data.stages",
            [s.start_step for s in self.stages],
            "stages in increasing order of distinct start_step",
        )
        fractions = [s.start_fraction for s in self.stages if s.start_fraction is not None]
        require(
            fractions == sorted(set(fractions)),
            "data.stages",
            fractions,
            "stages in increasing order of distinct start_fraction",
        )
        if names:
            check_mixture_config(self)


__all__ = ["DataConfig", "SourceConfig", "ReplayConfig", "StageConfig", "ValidationConfig"]
