"""cptron.config: defaults < YAML < CLI, presets, type checks, errors that name the field, help."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from cptron.config import (
    config_from_dict,
    config_to_dict,
    dump_yaml,
    field_docs,
    format_help,
    parse_config,
    validate_config,
)
from cptron.data.config import DataConfig, SourceConfig, StageConfig
from cptron.errors import ConfigError
from cptron.models.config import PRESETS, ModelConfig


@dataclass
class OptimConfig:
    """AdamW settings."""

    lr: float = 3e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW beta1, beta2."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule."""
    fused: bool = False
    """Use the fused AdamW kernel."""

    def validate(self) -> None:
        if self.lr < 0:
            raise ConfigError(f"optim.lr={self.lr!r} is invalid: expected a float >= 0")


@dataclass
class Job:
    """A training job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    seed: int = 0
    """Random seed."""
    steps: Optional[int] = None
    """Stop after this many steps; none means one epoch."""
    compile: bool = True
    """Compile the model."""
    data_paths: list[str] = field(default_factory=list)
    """Token shard prefixes."""
    weights: list[float] = field(default_factory=lambda: [1.0])
    """Mixture weights."""


@dataclass
class BaseConfig:
    a: int = 1
    """Field a of the base."""


@dataclass
class DerivedConfig(BaseConfig):
    b: str = "x"
    """Field b of the subclass."""


@dataclass
class Source:
    path: str
    """Shard prefix."""
    weight: float = 1.0
    """Sampling weight."""


@dataclass
class Mixture:
    run_name: str
    """Required name of the run."""
    sources: list[Source] = field(default_factory=list)
    """Datasets to mix."""


def write_yaml(tmp_path, data, name="job.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def config_error(argv, yaml_path=None, **kw):
    with pytest.raises(ConfigError) as info:
        parse_config(Job, argv, yaml_path, **kw)
    return str(info.value)


# ---------------------------------------------------------------- errors naming the field

def test_unknown_field_names_it_and_suggests_close_match():
    msg = config_error(["--optim.lrr", "1"])
    assert "optim.lrr" in msg and "optim.lr" in msg.replace("optim.lrr", "")


def test_wrong_type_names_field_value_and_expectation():
    msg = config_error(["--model.dim", "abc"])
    assert "model.dim='abc' is invalid: expected an integer" in msg


def test_int_field_rejects_fraction():
    assert "model.n_layers='3.5'" in config_error(["--model.n_layers", "3.5"])


def test_negative_lr_rejected_by_section_validate():
    assert "optim.lr" in config_error(["--optim.lr", "-1"])


def test_heads_not_divisible_by_kv_heads_rejected_at_startup():
    msg = config_error(["--model.n_heads", "4", "--model.n_kv_heads", "3"])
    assert "model.n_kv_heads" in msg and "model.n_heads=4" in msg


def test_unknown_preset_names_field_and_choices():
    msg = config_error(["--model.preset", "llama9"])
    assert "model.preset" in msg and "llama9" in msg and "llama3-8b" in msg


def test_literal_violation_lists_choices():
    msg = config_error(["--optim.schedule", "cosin"])
    assert "optim.schedule='cosin'" in msg and "cosine" in msg and "linear" in msg


def test_yaml_unknown_key_names_dotted_key_and_file(tmp_path):
    path = write_yaml(tmp_path, {"model": {"dimm": 8}})
    msg = config_error([], path)
    assert "model.dimm" in msg and "model.dim" in msg.replace("model.dimm", "") and path in msg


def test_yaml_bad_value_names_field_and_file(tmp_path):
    path = write_yaml(tmp_path, {"optim": {"fused": "maybe"}})
    msg = config_error([], path)
    assert "optim.fused='maybe'" in msg and path in msg


def test_yaml_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- a\n- b\n")
    assert path in config_error([], path)


def test_yaml_section_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path, {"optim": 3})
    assert "optim" in config_error([], path)


def test_missing_yaml_file_named(tmp_path):
    path = str(tmp_path / "absent.yaml")
    assert path in config_error([], path)


def test_missing_value_after_option():
    assert "model.dim" in config_error(["--model.dim"])
    assert "model.dim" in config_error(["--model.dim", "--seed", "1"])


def test_section_given_as_a_value():
    assert "--model.<field>" in config_error(["--model", "x"])


def test_stray_positional_named():
    assert "'extra'" in config_error(["--seed", "1", "extra"])
    assert "'cfg.yaml'" in config_error(["cfg.yaml"])  # positional YAML not allowed by default


def test_second_positional_is_an_error(tmp_path):
    path = write_yaml(tmp_path, {"seed": 3})
    assert "'more'" in config_error([path, "more"], allow_positional_yaml=True)


def test_required_field_missing_is_named():
    with pytest.raises(ConfigError, match="run_name is required"):
        parse_config(Mixture, [])


def test_two_yaml_paths_is_an_error(tmp_path):
    a, b = write_yaml(tmp_path, {}, "a.yaml"), write_yaml(tmp_path, {}, "b.yaml")
    msg = config_error([b], a, allow_positional_yaml=True)
    assert a in msg and b in msg


# ---------------------------------------------------------------- values and precedence

def test_defaults_when_nothing_given():
    job = parse_config(Job, [])
    assert job == Job()


def test_yaml_then_cli_precedence(tmp_path):
    path = write_yaml(tmp_path, {"seed": 5, "steps": 100, "optim": {"lr": 1e-3, "schedule": "linear"}})
    job = parse_config(Job, ["--optim.lr", "2e-4", "--seed=7"], path)
    assert job.seed == 7 and job.optim.lr == 2e-4  # CLI beats YAML
    assert job.steps == 100 and job.optim.schedule == "linear"  # YAML beats defaults
    assert job.model == ModelConfig()


def test_yaml_float_written_without_dot(tmp_path):
    # PyYAML reads 3e-4 as a string; the field's type still makes it a float
    path = write_yaml(tmp_path, "optim:\n  lr: 3e-5\n")
    assert parse_config(Job, [], path).optim.lr == pytest.approx(3e-5)


def test_positional_yaml(tmp_path):
    path = write_yaml(tmp_path, {"seed": 11})
    assert parse_config(Job, [path, "--steps", "4"], allow_positional_yaml=True).seed == 11


def test_preset_then_override_regardless_of_order():
    for argv in (["--model.preset", "llama3-8b", "--model.n_layers", "2"],
                 ["--model.n_layers", "2", "--model.preset", "llama3-8b"]):
        model = parse_config(Job, argv).model
        assert model.dim == 4096 and model.n_layers == 2 and model.n_kv_heads == 8
        assert model.preset == "llama3-8b"


def test_yaml_preset_with_cli_and_yaml_overrides(tmp_path):
    path = write_yaml(tmp_path, {"model": {"n_heads": 16, "preset": "llama3.2-1b"}})
    model = parse_config(Job, ["--model.n_layers", "3"], path).model
    assert (model.dim, model.n_heads, model.n_layers) == (2048, 16, 3)
    assert model.tie_embeddings is True and model.vocab_size == PRESETS["llama3.2-1b"].vocab_size


def test_cli_preset_replaces_yaml_preset(tmp_path):
    path = write_yaml(tmp_path, {"model": {"preset": "llama3-8b", "n_layers": 1}})
    model = parse_config(Job, ["--model.preset", "tiny"], path).model
    assert (model.dim, model.n_layers, model.preset) == (64, 1, "tiny")


@pytest.mark.parametrize("raw,expected", [("true", True), ("false", False), ("1", True), ("0", False),
                                          ("yes", True), ("no", False), ("TRUE", True)])
def test_bool_spellings(raw, expected):
    assert parse_config(Job, ["--optim.fused", raw]).optim.fused is expected


def test_bare_flag_means_true():
    job = parse_config(Job, ["--optim.fused", "--seed", "2"])
    assert job.optim.fused is True and job.seed == 2
    assert parse_config(Job, ["--model.tie_embeddings"]).model.tie_embeddings is True


def test_bool_rejects_other_words():
    assert "optim.fused='maybe'" in config_error(["--optim.fused", "maybe"])


def test_optional_accepts_none_and_value():
    assert parse_config(Job, ["--steps", "12"]).steps == 12
    assert parse_config(Job, ["--steps", "none"]).steps is None
    assert parse_config(Job, ["--model.preset", "null"]).model.preset is None
    assert "steps='x'" in config_error(["--steps", "x"])


def test_lists_and_tuples_from_cli_and_yaml(tmp_path):
    job = parse_config(Job, ["--data_paths", "a/b, c/d", "--weights", "0.25,0.75",
                             "--optim.betas", "0.8,0.99"])
    assert job.data_paths == ["a/b", "c/d"] and job.weights == [0.25, 0.75]
    assert job.optim.betas == (0.8, 0.99)
    path = write_yaml(tmp_path, {"data_paths": ["x"], "weights": [1, "2e-1"]})
    job = parse_config(Job, [], path)
    assert job.data_paths == ["x"] and job.weights == [1.0, 0.2]
    assert "optim.betas" in config_error(["--optim.betas", "0.9"])  # wrong arity
    assert "weights" in config_error(["--weights", "1,a"])


def test_dashes_in_option_names():
    assert parse_config(Job, ["--model.n-layers", "5"]).model.n_layers == 5


def test_negative_number_is_a_value():
    assert parse_config(Job, ["--seed", "-3"]).seed == -3


def test_list_of_dataclasses_from_yaml(tmp_path):
    path = write_yaml(tmp_path, {"sources": [{"path": "a", "weight": "0.5"}, {"path": "b"}]})
    mix = parse_config(Mixture, ["--run_name", "r1"], path)
    assert mix == Mixture("r1", [Source("a", 0.5), Source("b", 1.0)])
    bad = write_yaml(tmp_path, {"run_name": "r", "sources": [{"path": "a", "wieght": 2}]}, "bad.yaml")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.wieght"):
        parse_config(Mixture, [], bad)


# ---------------------------------------------------------------- dicts, YAML dumps

def test_dict_round_trip_preserves_config(tmp_path):
    job = parse_config(Job, ["--model.preset", "mistral-7b", "--model.n_layers", "2", "--steps", "9",
                             "--optim.betas", "0.5,0.6", "--data_paths", "p,q"])
    data = config_to_dict(job)
    assert data["optim"]["betas"] == [0.5, 0.6] and data["model"]["sliding_window"] == 4096
    assert config_from_dict(Job, data) == job
    path = tmp_path / "out" / "job.yaml"
    dump_yaml(job, str(path))
    assert parse_config(Job, [], str(path)) == job


def test_config_from_dict_checks_values():
    with pytest.raises(ConfigError, match="optim.lr"):
        config_from_dict(Job, {"optim": {"lr": -0.1}})
    with pytest.raises(ConfigError, match="model.bogus"):
        config_from_dict(Job, {"model": {"bogus": 1}})


# ---------------------------------------------------------------- docs and help

def test_every_model_field_has_a_docstring():
    docs = field_docs(ModelConfig)
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    assert sorted(docs) == sorted(names)
    assert all(docs[n].strip() for n in names)
    assert docs["dim"] == "Hidden size (d_model)."


def test_field_docs_walks_base_classes():
    assert field_docs(DerivedConfig) == {"a": "Field a of the base.", "b": "Field b of the subclass."}


def test_help_lists_every_field_with_type_default_and_doc():
    text = format_help(Job, "cptron train", "Train a model.")
    assert "Train a model." in text
    for name, doc in field_docs(ModelConfig).items():
        assert f"--model.{name} " in text
        assert " ".join(doc.split()) in " ".join(text.split())
    assert "--optim.lr FLOAT  (default: 0.0003)" in text
    assert "--optim.schedule {cosine,linear,constant}  (default: cosine)" in text
    assert "--steps INT|none  (default: none)" in text
    assert "Peak learning rate." in text and "Random seed." in text


def test_help_flag_prints_and_exits(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(Job, ["--seed", "1", "--help"], prog="cptron train")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cptron train") and "--model.n_kv_heads" in out


# ---------------------------------------------------------------- mappings and lists of sections

@dataclass
class DataJob:
    data: DataConfig = field(default_factory=DataConfig)
    """The data section."""


TWO_SOURCES = {"data": {"sources": {"web": {"paths": ["/w"], "weight": 3}, "med": {"paths": ["/m"], "weight": 1}},
                        "replay": {"fraction": 0.25, "sources": ["web"]},
                        "stages": [{"start_fraction": 0.9, "replay_fraction": 0.1}]}}


def data_error(argv, yaml_path=None):
    with pytest.raises(ConfigError) as info:
        parse_config(DataJob, argv, yaml_path)
    return str(info.value)


def test_cli_sets_one_field_of_a_source_from_yaml(tmp_path):
    path = write_yaml(tmp_path, TWO_SOURCES)
    data = parse_config(DataJob, ["--data.sources.web.paths", "/x,/y"], path).data
    assert data.sources["web"] == SourceConfig(paths=["/x", "/y"], weight=3.0)
    assert data.sources["med"] == SourceConfig(paths=["/m"], weight=1.0)


def test_cli_creates_a_source_from_the_defaults_and_validation_checks_it():
    data = parse_config(DataJob, ["--data.sources.new.paths", "/n", "--data.sources.new.epochs", "2"]).data
    assert data.sources == {"new": SourceConfig(paths=["/n"], epochs=2.0)}
    assert "data.sources.new.paths=[] is invalid" in data_error(["--data.sources.new.weight", "2"])


def test_source_names_keep_their_dots_and_dashes():
    argv = ["--data.sources.web.en.paths", "/a", "--data.sources.my-web.paths", "/b",
            "--data.sources.my-web.held-out-fraction", "0.1"]
    sources = parse_config(DataJob, argv).data.sources
    assert sources == {"web.en": SourceConfig(paths=["/a"]), "my-web": SourceConfig(paths=["/b"], held_out_fraction=0.1)}


def test_unknown_item_fields_are_named_with_a_suggestion():
    msg = data_error(["--data.sources.web.pathz", "/x"])
    assert "'data.sources.web.pathz'" in msg and "did you mean data.sources.web.paths?" in msg
    msg = data_error(["--data.sourcs.web.paths", "/x"])
    assert "'data.sourcs.web.paths'" in msg and "did you mean data.sources.web.paths?" in msg
    msg = data_error(["--data.sources.web", "/x"])
    assert "'data.sources.web'" in msg and "--data.sources.<name>.<field>" in msg and "held_out_fraction" in msg
    msg = data_error(["--data.stages.0.replay_fractio", "0.2"])
    assert "did you mean data.stages.0.replay_fraction" in msg
    msg = data_error(["--data.seed.x", "1"])
    assert "'data.seed.x'" in msg and "--data.seed VALUE" in msg


def test_whole_mapping_in_yaml_flow_style_replaces_the_file_then_item_options_apply(tmp_path):
    path = write_yaml(tmp_path, TWO_SOURCES)
    whole = ["--data.sources", "{web: {paths: [/a]}, med: {paths: [/b]}}"]
    for argv in (whole + ["--data.sources.med.weight", "1", "--data.sources.web.weight", "2"],
                 ["--data.sources.med.weight", "1", "--data.sources.web.weight", "2"] + whole):
        data = parse_config(DataJob, argv, path).data
        assert data.sources == {"web": SourceConfig(paths=["/a"], weight=2.0),
                                "med": SourceConfig(paths=["/b"], weight=1.0)}
    data = parse_config(DataJob, ['--data.sources={"web": {"paths": ["/j"]}}']).data  # JSON is YAML too
    assert data.sources == {"web": SourceConfig(paths=["/j"])}


@pytest.mark.parametrize("argv, needles", [
    (["--data.sources", "/x"], ["--data.sources='/x' is invalid", "YAML flow mapping", "--data.sources.<name>.<field>"]),
    (["--data.sources", "{web: {paths: [/a]"], ["YAML flow mapping", "'{NAME: {FIELD: VALUE}}'"]),
    (["--data.sources"], ["--data.sources: missing value"]),
    (["--data.sources", "{web: {paths: [/a], wieght: 1}}"], ["data.sources.web.wieght is not a field",
                                                             "data.sources.web.weight"]),
    (["--data.stages", "0.9"], ["--data.stages='0.9' is invalid", "YAML flow list", "--data.stages.<index>.<field>"]),
])
def test_bad_whole_values_name_the_option_and_the_other_spelling(argv, needles):
    msg = data_error(argv)
    for needle in needles:
        assert needle in msg


def test_indexed_stage_options_change_or_append_one_stage(tmp_path):
    path = write_yaml(tmp_path, TWO_SOURCES)
    stages = parse_config(DataJob, ["--data.stages.0.replay_fraction", "0.2"], path).data.stages
    assert stages == [StageConfig(start_fraction=0.9, replay_fraction=0.2)]
    argv = ["--data.stages.1.start_fraction", "0.95", "--data.stages.1.scale", "med=2"]
    stages = parse_config(DataJob, argv, path).data.stages
    assert stages == [StageConfig(start_fraction=0.9, replay_fraction=0.1),
                      StageConfig(start_fraction=0.95, scale={"med": 2.0})]
    msg = data_error(["--data.stages.3.start_fraction", "0.95"], path)
    assert "index 3 is invalid" in msg and "below 1" in msg
    assert "<index> counts from 0" in data_error(["--data.stages.last.start_step", "1"], path)
    assert "data.stages[0].replay_fraction='abc'" in data_error(["--data.stages.0.replay_fraction", "abc"], path)
    stages = parse_config(DataJob, ["--data.stages", "[{start_step: 5}]"], path).data.stages
    assert stages == [StageConfig(start_step=5)]


def test_list_of_sections_from_yaml_is_typed(tmp_path):
    path = write_yaml(tmp_path, TWO_SOURCES)
    data = parse_config(DataJob, [], path).data
    assert data.stages == [StageConfig(start_fraction=0.9, replay_fraction=0.1)]
    assert all(isinstance(s, SourceConfig) for s in data.sources.values())


def test_cli_item_overrides_survive_a_yaml_dump(tmp_path):
    path = write_yaml(tmp_path, TWO_SOURCES)
    cfg = parse_config(DataJob, ["--data.sources.web.epochs", "4", "--data.stages.0.scale", "med=3"], path)
    dumped = tmp_path / "dumped.yaml"
    dump_yaml(cfg, str(dumped))
    assert parse_config(DataJob, [], str(dumped)) == cfg


@pytest.mark.parametrize("data, needle", [
    ({"data": {"sources": {"web": {"paths": ["/w"], "wieght": 3}}}}, "data.sources.web.wieght is not a field"),
    ({"data": {"sources": {"web": {"paths": ["/w"], "weight": "x"}}}}, "data.sources.web.weight='x'"),
    ({"data": {"sources": ["web"]}}, "expected a mapping of names to mappings of SourceConfig fields"),
    ({"data": {"stages": [{"start_step": 1, "bogus": 1}]}}, r"data.stages[0].bogus is not a field"),
])
def test_errors_inside_nested_sections_name_the_yaml_file(tmp_path, data, needle):
    path = write_yaml(tmp_path, data)
    msg = data_error([], path)
    assert needle in msg and f"(in {path})" in msg


def test_list_item_errors_name_the_yaml_file(tmp_path):
    bad = write_yaml(tmp_path, {"run_name": "r", "sources": [{"path": "a", "wieght": 2}]})
    with pytest.raises(ConfigError, match=r"sources\[0\]\.wieght.*\(in .*\.yaml\)"):
        parse_config(Mixture, [], bad)


def test_a_bad_source_fails_with_the_message_data_config_gives():
    msg = data_error(["--data.sources.web.paths", "/w", "--data.sources.web.weight", "-1"])
    direct = DataConfig(sources={"web": SourceConfig(paths=["/w"], weight=-1.0)})
    with pytest.raises(ConfigError) as info:
        direct.validate()
    assert msg == str(info.value) and "data.sources.web.weight=-1.0" in msg


@dataclass
class Named:
    x: int = 0
    """A number."""

    def validate(self, name: str = "?") -> None:
        if self.x < 0:
            raise ConfigError(f"items.{name}.x={self.x} is invalid: expected >= 0")


@dataclass
class Plain:
    y: int = 0
    """Another number."""

    def validate(self) -> None:
        if self.y < 0:
            raise ConfigError(f"y={self.y} is invalid: expected >= 0")


@dataclass
class Holder:
    """No validate of its own: only validate_config reaches the items."""

    items: dict[str, Named] = field(default_factory=dict)
    """Named items."""
    plain: dict[str, Plain] = field(default_factory=dict)
    """Items whose validate takes no argument."""
    maybe: Optional[dict[str, Named]] = None
    """An optional mapping."""


def test_validate_config_descends_into_mapping_values_with_their_keys():
    with pytest.raises(ConfigError, match=r"items\.b\.x=-1"):
        parse_config(Holder, ["--items.a.x", "1", "--items.b.x", "-1"])
    with pytest.raises(ConfigError, match="y=-2"):
        parse_config(Holder, ["--plain.p.y", "-2"])
    with pytest.raises(ConfigError, match=r"items\.k\.x=-3"):
        validate_config(Holder(maybe={"k": Named(-3)}))
    validate_config(Holder(items={"a": Named(1)}, plain={"p": Plain(2)}))


def test_optional_mapping_of_sections_from_the_cli():
    assert parse_config(Holder, ["--maybe", "none"]).maybe is None
    assert parse_config(Holder, ["--maybe.a.x", "2"]).maybe == {"a": Named(2)}
    assert parse_config(Holder, ["--maybe", "{a: {x: 1}}", "--maybe.b.x", "3"]).maybe == {"a": Named(1), "b": Named(3)}


def test_help_shows_a_mapping_of_sections_as_one_block_of_item_fields():
    text = format_help(DataJob, "cptron train")
    line = next(t for t in text.splitlines() if t.startswith("  --data.sources "))
    assert "KEY=VALUE" not in line and "{NAME: {FIELD: VALUE}" in line
    assert text.count("\ndata.sources.<name>:") == 1 and text.count("\ndata.stages.<index>:") == 1
    flat = " ".join(text.split())
    for name, doc in field_docs(SourceConfig).items():
        assert f"--data.sources.<name>.{name} " in text and " ".join(doc.split()) in flat
    for name in field_docs(StageConfig):
        assert f"--data.stages.<index>.{name} " in text
    assert "--data.sources.<name>.<field> VALUE" in flat
