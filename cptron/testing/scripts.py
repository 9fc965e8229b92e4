"""Helpers of the standalone scripts (examples/, benchmarks/) that drive the `cptron` CLI step by step.

Each step of such a script is one `cptron` command run in a subprocess from the repository root, as a
user would type it. Nothing here imports more than the standard library at import time, so a script's
``--help`` stays instant.

* :func:`run_cli` -- one `cptron` (or `torchrun ... -m cptron.cli`) command; exits the script on failure.
* :func:`torchrun` -- the launcher prefix that runs `cptron.cli` under torchrun on this machine.
* :func:`tokenize_bible` -- `cptron data tokenize` of a shipped Bible (configs/data/bible-<lang>.yaml).
* :func:`write_yaml` -- a config dict written as YAML, for `cptron train <file>`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["CPTRON", "REPO", "run_cli", "tokenize_bible", "torchrun", "write_yaml"]

# Repo layout: <root>/cptron/testing/scripts.py; the commands name configs/ relative to <root>.
REPO = Path(__file__).resolve().parents[2]
CPTRON = ("-m", "cptron.cli")
TAIL_CHARS = 4000  # of stdout and of stderr each, shown when a quiet command fails


def torchrun(nproc: int) -> tuple[str, ...]:
    """`python -m torch.distributed.run` (torchrun) on this machine, `nproc` processes, `cptron.cli` as the module."""
    return ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *CPTRON)


def run_cli(
    *args: str,
    launcher: tuple[str, ...] = CPTRON,
    echo: bool = False,
    print_stdout: bool = False,
    script: str = "",
) -> str:
    """Run `python <launcher> <args>` in the repository root and return its stdout.

    echo=True prints the command first (``$ cptron <args>``, or ``$ torchrun <options> -m cptron.cli <args>``)
    and lets its output stream to this terminal (it returns ""). Otherwise the command runs quietly: its
    stdout is captured and returned, and printed too when print_stdout=True.

    A failing command exits the script: SystemExit with a message naming the exit code (prefixed with
    ``<script>: `` when script is given), after the last 4,000 characters of its stdout and of its stderr
    went to stderr when the output was captured.
    """
    shown = _shown(launcher)
    command = [sys.executable, *launcher, *args]
    if echo:
        print(f"\n$ {shown} " + " ".join(args), flush=True)
        code, stdout, what = subprocess.run(command, cwd=REPO).returncode, "", "the command above"
    else:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        code, stdout, what = proc.returncode, proc.stdout, " ".join([shown, *args[:2]])
        if code != 0:
            sys.stderr.write(proc.stdout[-TAIL_CHARS:] + proc.stderr[-TAIL_CHARS:])
    if code != 0:
        prefix = f"{script}: " if script else ""
        raise SystemExit(f"{prefix}{what} failed with exit code {code}")
    if print_stdout:
        print(stdout, end="")
    return stdout


def _shown(launcher: tuple[str, ...]) -> str:
    """How a command line names its launcher: cptron, torchrun with its options, or python with its arguments."""
    if launcher == CPTRON:
        return "cptron"
    if launcher[:2] == ("-m", "torch.distributed.run"):
        return "torchrun " + " ".join(launcher[2:])
    return "python " + " ".join(launcher)


def tokenize_bible(lang: str, tokenizer_dir: Path, data: Path, run: Callable[..., str] = run_cli) -> None:
    """`cptron data tokenize configs/data/bible-<lang>.yaml` with `<tokenizer_dir>/tokenizer.json` into the
    shards `<data>/<lang>/bible.{bin,idx}` (a training source's path is then `<data>/<lang>`); `run` runs the
    command (e.g. run_cli with echo=True)."""
    run(
        "data",
        "tokenize",
        f"configs/data/bible-{lang}.yaml",
        "--tokenizer",
        str(tokenizer_dir / "tokenizer.json"),
        "--output_prefix",
        str(data / lang / "bible"),
        "--progress",
        "false",
    )


def write_yaml(path: Path, cfg: dict) -> str:
    """Write `cfg` to `path` as YAML in the dict's own key order, and return the path as a string (a command
    argument)."""
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)
