"""cptron.config: defaults < YAML < CLI, presets, type checks, errors that name the field, help."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from cptron.config import (config_from_dict, config_to_dict, dump_yaml, field_docs, format_help,
                           parse_config)
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
