"""The `cptron` command end to end: help, start-up validation, presets in configs/, a round trip."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from cptron import checkpoint as ckpt
from cptron.cli import COMMANDS, main
from cptron.config import field_docs, parse_config
from cptron.config.introspect import dotted_fields

REPO = Path(__file__).resolve().parents[2]


def test_overview_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for path in COMMANDS:
        assert " ".join(path) in out
    assert main(["convert"]) == 0 and "convert verify" in capsys.readouterr().out


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: "-".join(p))
def test_help_documents_every_field(path, capsys):
    cls, _ = COMMANDS[path]
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for dotted in dotted_fields(cls):
        assert f"--{dotted}" in out, dotted
    for doc in field_docs(cls).values():
        assert doc.split()[0] in out


@pytest.mark.parametrize("argv, needle", [
    (["init", "--output", "x", "--model.n_heads", "4", "--model.n_kv_heads", "3"], "model.n_kv_heads=3"),
    (["init", "--output", "x", "--model.preset", "llama9"], "model.preset='llama9'"),
    (["init", "--output", "x", "--model.dim", "abc"], "model.dim='abc'"),
    (["convert", "hf-to-cptron", "--inptu", "x"], "inptu"),
    (["convert", "cptron-to-hf", "--input", "a", "--output", "b", "--max_shard_size", "lots"], "max_shard_size"),
    (["convert", "hf-to-cptron", "--input", "/nonexistent", "--output", "b"], "input='/nonexistent'"),
    (["convert", "hf-to-cptron", "--input", ".", "--output", "b", "--dtype", "int8"], "dtype='int8'"),
])
def test_invalid_values_fail_at_startup_naming_the_field(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_unknown_command_is_refused(capsys):
    assert main(["trian"]) == 2
    assert "unknown command" in capsys.readouterr().err


# Each shipped preset, with the command it is written for.
PRESET_COMMANDS = {
    "configs/init/tiny.yaml": ("init",),
    "configs/init/llama3.2-1b.yaml": ("init",),
    "configs/convert/hf-to-cptron-tp8.yaml": ("convert", "hf-to-cptron"),
    "configs/convert/cptron-to-hf.yaml": ("convert", "cptron-to-hf"),
    "configs/data/bible-en.yaml": ("data", "tokenize"),
    "configs/data/bible-de.yaml": ("data", "tokenize"),
    "configs/train/quickstart-base.yaml": ("train",),
    "configs/train/quickstart-cpt.yaml": ("train",),
}


def test_every_shipped_yaml_preset_parses_for_its_command():
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped == set(PRESET_COMMANDS), "register new presets in PRESET_COMMANDS"
    for rel, path in PRESET_COMMANDS.items():
        cls, _ = COMMANDS[path]
        required = {"init": ["--output", "o"], "hf-to-cptron": ["--input", str(REPO), "--output", "o"],
                    "cptron-to-hf": ["--input", "i", "--output", "o"],
                    "tokenize": ["--tokenizer", "tokenizer.json"],
                    # the CPT preset starts from the base run's checkpoint, which this test has not made
                    "train": ["--checkpoint.init_from", "none"]}[path[-1]]
        cfg = parse_config(cls, [str(REPO / rel), *required], allow_positional_yaml=True)
        if path == ("init",):
            assert cfg.model.preset in ("tiny", "llama3.2-1b")


def test_init_export_import_verify_round_trip(tmp_path, capsys):
    cp, hf, cp2 = tmp_path / "cp", tmp_path / "hf", tmp_path / "cp2"
    assert main(["init", str(REPO / "configs/init/tiny.yaml"), "--output", str(cp),
                 "--model.tie_embeddings", "true", "--model.pad_vocab_to_multiple_of", "96",
                 "--model.vocab_size", "2000", "--seed", "11"]) == 0
    assert main(["convert", "cptron-to-hf", "--input", str(cp), "--output", str(hf), "--progress", "false"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.vocab_size == 2000 and model.config.tie_word_embeddings
    assert main(["convert", "hf-to-cptron", "--input", str(hf), "--output", str(cp2),
                 "--pad_vocab_to_multiple_of", "96", "--progress", "false"]) == 0
    a, b = ckpt.load_model(cp), ckpt.load_model(cp2)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    capsys.readouterr()
    assert main(["convert", "verify", "--checkpoint", str(cp), "--hf", str(hf)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_fails_on_a_different_model(tmp_path, capsys):
    assert main(["init", "--model.preset", "tiny", "--output", str(tmp_path / "a"), "--seed", "1"]) == 0
    assert main(["init", "--model.preset", "tiny", "--output", str(tmp_path / "b"), "--seed", "2"]) == 0
    assert main(["convert", "cptron-to-hf", "--input", str(tmp_path / "b"), "--output", str(tmp_path / "hf"),
                 "--progress", "false"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "verify", "--checkpoint", str(tmp_path / "a"), "--hf", str(tmp_path / "hf")])
    assert exit_info.value.code == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([Path(sys.executable).parent / "cptron", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("cptron ")


def test_verify_and_output_path_problems_exit_2_with_a_message(tmp_path, capsys):
    assert main(["convert", "verify", "--checkpoint", str(tmp_path), "--hf", str(tmp_path / "nope")]) == 2
    assert "hf=" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["init", "--model.preset", "tiny", "--output", str(tmp_path / "afile" / "sub")]) == 2
    assert "afile" in capsys.readouterr().err
