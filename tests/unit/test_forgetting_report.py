"""The forgetting and learning report's parts: the domain tags of the data config, the derived metrics of an
evaluation, the step-0 losses in the train state, and the summary's text. The report of a real run is checked
against its metrics.jsonl in tests/distributed/test_trainer_report.py."""
from __future__ import annotations

import json
import math

import pytest

from cptron.config import parse_config
from cptron.data.config import DataConfig, ReplayConfig, SourceConfig
from cptron.errors import ConfigError, CptronError
from cptron.train.config import JobConfig
from cptron.train.report import ForgettingReport, eval_metrics, format_report, perplexity


def test_domains_default_to_the_replay_list_and_explicit_tags_win():
    cfg = DataConfig(
        sources={"web": SourceConfig(paths=["/x"]), "wiki": SourceConfig(paths=["/y"], domain="old"),
                 "med": SourceConfig(paths=["/z"]), "code": SourceConfig(paths=["/c"], domain="new")},
        replay=ReplayConfig(fraction=0.25, sources=["web", "code"]))
    assert {n: cfg.domain_of(n) for n in cfg.sources} == {"web": "old", "wiki": "old", "med": "new", "code": "new"}
    assert cfg.domain_of("not-a-source") == "new" and DataConfig(replay=ReplayConfig(sources=["en"])).domain_of("en") == "old"


def test_a_bad_domain_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"data\.sources\.web\.domain='mid' is invalid: expected one of \['old', 'new'\]"):
        parse_config(JobConfig, ["--data.sources.web.paths", "/x", "--data.sources.web.domain", "mid"])
    with pytest.raises(ConfigError, match=r"data\.sources\.web\.domain='mid' is invalid: expected old, new or none"):
        SourceConfig(paths=["/x"], domain="mid").validate("web")
    cfg = parse_config(JobConfig, ["--data.sources.web.paths", "/x", "--data.sources.web.domain", "old"])
    assert cfg.data.sources["web"].domain == "old"


def test_eval_metrics_are_the_changes_since_step0_per_set_and_per_domain():
    domains = {"en": "old", "fr": "old", "de": "new"}
    base = {"en": 2.0, "fr": 3.0, "de": 5.0}
    got = eval_metrics({"en": 2.5, "fr": 2.75, "de": 4.0}, base, domains)
    assert got["forgetting/en"] == 0.5 and got["forgetting/fr"] == -0.25 and got["learning/de"] == 1.0
    assert "learning/en" not in got and "forgetting/de" not in got
    assert got["ppl/en"] == math.exp(2.5) and got["ppl/de"] == math.exp(4.0)
    assert got["domain/old/loss"] == (2.5 + 2.75) / 2 and got["domain/old/ppl"] == math.exp((2.5 + 2.75) / 2)
    assert got["domain/old/forgetting"] == (0.5 - 0.25) / 2 and got["domain/new/learning"] == 1.0
    without = eval_metrics({"en": 2.5, "de": 4.0}, None, domains)
    assert sorted(without) == ["domain/new/loss", "domain/new/ppl", "domain/old/loss", "domain/old/ppl",
                               "ppl/de", "ppl/en"], "no baseline: no change is invented"
    # A set added after step 0 (a new source on resume) has no change of its own, nor in its domain's mean.
    added = eval_metrics({"en": 2.5, "fr": 2.0, "de": 4.0}, {"en": 2.0, "de": 5.0}, domains)
    assert "forgetting/fr" not in added and added["domain/old/forgetting"] == 0.5


def test_perplexity_survives_a_diverged_loss():
    assert perplexity(1.0) == math.e and perplexity(1e4) == math.inf and math.isnan(perplexity(math.nan))


def test_step0_losses_travel_through_json_and_the_first_eval_sets_them():
    report = ForgettingReport({"en": "old", "de": "new"}, "/nonexistent", rank=1, eval_at_start=True)
    assert report.state_dict() is None
    report.evaluation(0, {"en": 2.0, "de": math.inf})
    report.evaluation(2, {"en": 1.0, "de": 4.0})  # a later eval does not move the baseline
    state = json.loads(json.dumps(report.state_dict(), allow_nan=False))  # the checkpointer refuses NaN
    again = ForgettingReport({"en": "old", "de": "new"}, "/nonexistent", rank=1, eval_at_start=True)
    again.load_state_dict(state)
    assert again.baseline == {"en": 2.0, "de": math.inf}
    assert again.evaluation(4, {"en": 2.5, "de": 4.0})["forgetting/en"] == 0.5
    with pytest.raises(CptronError, match="train_state.eval_baseline=.* is malformed"):
        again.load_state_dict({"en": "lots"})


def test_a_checkpoint_without_step0_losses_is_named_in_the_report(tmp_path):
    report = ForgettingReport({"en": "old"}, str(tmp_path), rank=0, eval_at_start=True)
    report.load_state_dict(None, present=False)
    assert report.evaluation(6, {"en": 2.0}) == {"ppl/en": math.exp(2.0), "domain/old/loss": 2.0,
                                                  "domain/old/ppl": math.exp(2.0)}
    text = report.finish(6, {})
    assert "not computed: the checkpoint resumed from holds no step-0 losses" in text
    assert (tmp_path / "report.md").read_text() == text
    assert "Not counted: the run's data source does not report what it drew per source." in text


def test_the_summary_table():
    text = format_report(step=10, domains={"en": "old", "fr": "old", "de": "new"},
                         baseline={"en": 2.0, "fr": 3.0, "de": 5.0}, final={"en": 2.5, "fr": 2.75, "de": 4.0},
                         drawn={"en": {"samples": 25, "tokens": 400, "epochs": 0.5},
                                "de": {"samples": 75, "tokens": 1200, "epochs": 1.25}}, no_baseline="")
    lines = text.splitlines()
    assert "| en | old | 2.0000 | 2.5000 | 7.39 | 12.18 | forgetting +0.5000 |" in lines
    assert "| de | new | 5.0000 | 4.0000 | 148.41 | 54.60 | learning +1.0000 |" in lines
    assert "| mean of old | old | 2.5000 | 2.6250 | 12.18 | 13.80 | forgetting +0.1250 |" in lines
    assert not any(line.startswith("| mean of new") for line in lines), "one set: its row says it"
    assert "| de | 75 | 75.0% | 1,200 | 1.250 |" in lines and "| en | 25 | 25.0% | 400 | 0.500 |" in lines
    sets = text.split("## Data drawn")[0].splitlines()
    assert [line.split("|")[1].strip() for line in sets if line.startswith("| ") and not line.startswith("| set ")
            ] == ["en", "fr", "de", "mean of old"], "old sets, then new ones, each by name; then the means"
    assert "No validation sets" in format_report(step=1, domains={}, baseline=None, final=None, drawn={},
                                                 no_baseline="x")
