"""Mixture arithmetic and the data config: the interleave bound, shares, stages, validation messages."""
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cptron.config import config_from_dict, config_to_dict, format_help
from cptron.data.config import DataConfig, ReplayConfig, SourceConfig, StageConfig
from cptron.data.mixture import QuotaScheduler, exact, resolve_stages, shares, stage_at
from cptron.errors import ConfigError, CptronError


def _normalized(weights):
    total = sum(weights)
    return [Fraction(w) / total for w in weights]


def _assert_quota(seq, weights):
    counts = [0] * len(weights)
    for n, i in enumerate(seq, start=1):
        counts[i] += 1
        for c, w in zip(counts, weights):
            assert math.floor(w * n) <= c <= math.ceil(w * n), (n, counts, weights)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=7).filter(lambda ws: sum(ws) > 0),
       st.integers(1, 600))
def test_every_prefix_is_within_one_of_its_quota(raw, n):
    weights = _normalized(raw)
    sched = QuotaScheduler(weights)
    _assert_quota([sched.next() for _ in range(n)], weights)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.001, 1000, allow_nan=False), min_size=2, max_size=5), st.integers(1, 400))
def test_float_weights_are_exact_decimals_and_keep_the_bound(raw, n):
    weights = _normalized([exact(w) for w in raw])
    sched = QuotaScheduler(weights)
    _assert_quota([sched.next() for _ in range(n)], weights)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=2, max_size=5), st.integers(0, 200), st.integers(1, 200))
def test_restoring_the_counts_continues_the_same_sequence(raw, cut, more):
    weights = _normalized(raw)
    full = QuotaScheduler(weights)
    expected = [full.next() for _ in range(cut + more)]
    first = QuotaScheduler(weights)
    head = [first.next() for _ in range(cut)]
    resumed = QuotaScheduler(weights, counts=list(first.counts))
    assert head + [resumed.next() for _ in range(more)] == expected


def test_long_run_stays_exact_where_floats_would_drift():
    weights = [exact(0.1), exact(0.2), exact(0.7)]
    assert weights == [Fraction(1, 10), Fraction(1, 5), Fraction(7, 10)]
    sched = QuotaScheduler(weights, counts=[10**9, 2 * 10**9, 7 * 10**9])
    for _ in range(20):
        sched.next()
    n = sched.total
    for c, w in zip(sched.counts, weights):
        assert math.floor(w * n) <= c <= math.ceil(w * n)


def test_scheduler_rejects_shares_that_do_not_sum_to_one():
    with pytest.raises(CptronError, match="sum to 1"):
        QuotaScheduler([Fraction(1, 2), Fraction(1, 3)])


def test_replay_fraction_is_spread_over_old_sources_by_weight():
    w = {"web": Fraction(3), "code": Fraction(1), "med": Fraction(5)}
    s = shares(w, Fraction(1, 4), {"web", "code"})
    assert s == {"web": Fraction(3, 16), "code": Fraction(1, 16), "med": Fraction(3, 4)}
    # a replay group whose sources are exhausted hands its part to the rest
    assert shares(w, Fraction(1, 4), {"web", "code"}, active={"med"}) == {
        "web": 0, "code": 0, "med": 1}
    with pytest.raises(CptronError, match="sum to zero"):
        shares({"web": Fraction(0), "med": Fraction(1)}, Fraction(1, 4), {"web"}, strict=True)


def _cfg(**stages_kw):
    return DataConfig(sources={"web": SourceConfig(paths=["w"], weight=3.0),
                               "med": SourceConfig(paths=["m"], weight=1.0)},
                      **stages_kw)


def test_stage_starts_resolve_exactly_and_stage_at_picks_the_latest():
    cfg = _cfg(stages=[StageConfig(start_fraction=0.29, scale={"med": 3.0}),
                       StageConfig(start_step=50, weights={"web": 0.5})])
    stages = resolve_stages(cfg, {"web": 1, "med": 1}, total_steps=100)
    assert [s.start_step for s in stages] == [0, 29, 50]  # 0.29 * 100 is 28.999... in floats
    assert stage_at(stages, 28).index == 0
    assert stage_at(stages, 29).weights == {"web": 3, "med": 3}
    assert stage_at(stages, 10**6).weights == {"web": Fraction(1, 2), "med": 1}
    with pytest.raises(ConfigError, match="start_fraction=0.29 is invalid"):
        resolve_stages(cfg, {"web": 1, "med": 1}, total_steps=None)


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: setattr(c.sources["web"], "weight", -1.0), "data.sources.web.weight=-1.0 is invalid"),
    (lambda c: setattr(c.sources["web"], "weight", 0.0) or setattr(c.sources["med"], "weight", 0.0),
     "sum to zero"),
    (lambda c: setattr(c.sources["web"], "weight", None), "a weight for every source of ['med', 'web'] or for none"),
    (lambda c: setattr(c.sources["med"], "epochs", 0.0), "data.sources.med.epochs=0.0 is invalid"),
    (lambda c: setattr(c.sources["med"], "paths", []), "data.sources.med.paths=[] is invalid"),
    (lambda c: setattr(c, "replay", ReplayConfig(fraction=0.3, sources=["wbe"])), "unknown: ['wbe']"),
    (lambda c: setattr(c, "replay", ReplayConfig(fraction=1.5, sources=["web"])), "data.replay.fraction=1.5"),
    (lambda c: setattr(c, "replay", ReplayConfig(fraction=0.3, sources=["web", "med"])),
     "expected at least one new source"),
    (lambda c: c.stages.append(StageConfig(start_step=3, scale={"mde": 2.0})), "unknown: ['mde']"),
    (lambda c: c.stages.append(StageConfig(start_step=3, start_fraction=0.5)),
     "exactly one of start_step and start_fraction"),
    (lambda c: c.stages.extend([StageConfig(start_step=9), StageConfig(start_step=3)]), "increasing order"),
    (lambda c: c.stages.append(StageConfig(start_step=3, weights={"web": 0.0, "med": 0.0})),
     "data.stages[0]: the source weights sum to zero"),
    (lambda c: c.stages.append(StageConfig(start_step=3, replay_fraction=0.5)), "replay_fraction=0.5 is invalid"),
    (lambda c: c.sources.update({"bad name": SourceConfig(paths=["x"], weight=1.0)}), "source names of"),
])
def test_invalid_data_configs_name_the_field(mutate, needle):
    cfg = _cfg()
    mutate(cfg)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        cfg.validate()


def test_stage_weights_need_explicit_source_weights():
    cfg = DataConfig(sources={"a": SourceConfig(paths=["x"]), "b": SourceConfig(paths=["y"])},
                     stages=[StageConfig(start_step=1, weights={"a": 2.0})])
    with pytest.raises(ConfigError, match="expected scale"):
        cfg.validate()
    cfg.stages = [StageConfig(start_step=1, scale={"a": 2.0})]
    cfg.validate()


@dataclass
class _Job:
    data: DataConfig = field(default_factory=DataConfig)
    """The data section."""


def test_data_config_round_trips_through_the_config_system():
    raw = {"data": {"sources": {"web": {"paths": ["/d/web"], "weight": 3},
                                "med": {"paths": ["/d/med/*.idx"], "weight": 1, "epochs": 4}},
                    "replay": {"fraction": 0.25, "sources": ["web"]},
                    "stages": [{"start_fraction": 0.9, "scale": {"med": 2}}],
                    "validation": {"held_out_fraction": 0.01, "num_batches": 3}}}
    job = config_from_dict(_Job, raw)
    assert isinstance(job.data.sources["med"], SourceConfig) and job.data.sources["med"].epochs == 4.0
    assert isinstance(job.data.stages[0], StageConfig) and job.data.stages[0].scale == {"med": 2.0}
    assert config_from_dict(_Job, config_to_dict(job)) == job
    with pytest.raises(ConfigError, match="data.sources.web.wieght is not a field"):
        config_from_dict(_Job, {"data": {"sources": {"web": {"paths": ["x"], "wieght": 1}}}})
    text = format_help(_Job)
    for name in ("--data.sources", "--data.stages", "--data.replay.fraction", "--data.allow_mixture_change",
                 "--data.validation.held_out_fraction"):
        assert name in text


def test_the_yaml_example_in_the_config_docs_parses():
    import yaml

    import cptron.data.config as module
    doc = module.__doc__
    block = doc[doc.index("    data:"):doc.index("`sources` is")]
    job = config_from_dict(_Job, yaml.safe_load(block))
    assert set(job.data.sources) == {"web", "code", "medical"}
    assert job.data.replay.fraction == 0.25 and job.data.stages[0].start_fraction == 0.9
    weights = {n: s.weight for n, s in job.data.sources.items()}
    assert weights == {"web": 3.0, "code": 1.0, "medical": None}
