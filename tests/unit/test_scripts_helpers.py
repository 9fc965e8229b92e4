"""cptron.testing.scripts: the runner the standalone scripts drive the `cptron` CLI with, and its helpers.

Most commands here are `python -c <code>` through the runner's launcher option: the runner's handling of
exit codes and output is the same, and they start in milliseconds instead of importing cptron.cli."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from cptron.testing.scripts import REPO, run_cli, tokenize_bible, torchrun, write_yaml

FAIL = "import sys; print('o' * 5000 + 'END OF STDOUT'); print('END OF STDERR', file=sys.stderr); sys.exit(3)"


def test_a_failing_quiet_command_exits_naming_the_code_after_the_tail_of_its_output(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("train", "x.yaml", "--more", launcher=("-c", FAIL))
    assert str(exc.value.code) == f"python -c {FAIL} train x.yaml failed with exit code 3"
    err = capsys.readouterr().err
    # The last 4,000 characters of stdout, then of stderr.
    assert err == "o" * (4000 - len("END OF STDOUT\n")) + "END OF STDOUT\n" + "END OF STDERR\n"


def test_a_failing_echoed_command_names_the_script_and_the_command_above(capfd):
    with pytest.raises(SystemExit) as exc:
        run_cli("a", "b", launcher=("-c", "import sys; sys.exit(5)"), echo=True, script="quickstart")
    assert exc.value.code == "quickstart: the command above failed with exit code 5"
    assert capfd.readouterr().out == "\n$ python -c import sys; sys.exit(5) a b\n"


def test_a_script_that_fails_this_way_exits_with_status_1_and_the_message_on_stderr():
    code = "from cptron.testing.scripts import run_cli; run_cli(launcher=('-c', 'raise SystemExit(7)'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "python -c raise SystemExit(7) failed with exit code 7"


def test_a_quiet_command_returns_its_stdout_from_the_repository_root(capsys):
    code = "import os, sys; print(os.getcwd()); print(sys.argv[1:])"
    out = run_cli("x", "y z", launcher=("-c", code))
    assert out == f"{REPO}\n['x', 'y z']\n"
    assert capsys.readouterr().out == ""
    assert run_cli("x", launcher=("-c", code), print_stdout=True) == f"{REPO}\n['x']\n"
    assert capsys.readouterr().out == f"{REPO}\n['x']\n"


def test_an_echoed_cptron_command_prints_the_command_then_streams_its_output(capfd):
    assert run_cli("data", "tokenize", "--help", echo=True) == ""
    out = capfd.readouterr().out
    assert out.startswith("\n$ cptron data tokenize --help\nusage: cptron data tokenize [CONFIG.yaml]"), out[:200]


def test_torchrun_runs_cptron_cli_on_n_processes_and_echoes_as_torchrun(capfd):
    launcher = torchrun(3)
    assert launcher == ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m", "cptron.cli")
    with pytest.raises(SystemExit, match="exit code 2"):  # torchrun rejects the option before any process starts
        run_cli("train", launcher=(*launcher[:2], "--no-such-option", *launcher[2:]), echo=True)
    assert capfd.readouterr().out.startswith(
        "\n$ torchrun --no-such-option --standalone --nproc_per_node=3 -m cptron.cli train\n"
    )


def test_tokenize_bible_runs_data_tokenize_into_data_lang_bible(tmp_path):
    calls = []
    tokenize_bible("de", tmp_path / "tok", tmp_path / "data", run=lambda *args: calls.append(args))
    assert calls == [
        (
            "data",
            "tokenize",
            "configs/data/bible-de.yaml",
            "--tokenizer",
            str(tmp_path / "tok" / "tokenizer.json"),
            "--output_prefix",
            str(tmp_path / "data" / "de" / "bible"),
            "--progress",
            "false",
        )
    ]
    assert (REPO / "configs/data/bible-de.yaml").is_file()


def test_write_yaml_keeps_the_key_order_and_returns_the_path(tmp_path):
    cfg = {"training": {"steps": 3, "run_dir": "r"}, "optim": {"lr": 0.001}}
    path = tmp_path / "c.yaml"
    assert write_yaml(path, cfg) == str(path)
    assert yaml.safe_load(path.read_text()) == cfg
    assert path.read_text().splitlines()[:3] == ["training:", "  steps: 3", "  run_dir: r"]
