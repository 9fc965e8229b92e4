"""`cptron plot` on real runs: one PNG whose figure holds one line per run and source (training), per run and
validation set, and per run and domain (forgetting/learning), with the values of metrics.jsonl; the command's
own argument forms; and metrics.jsonl treated as untrusted input (a truncated last line is skipped with a note,
any other malformed line is an error naming the file and line, exit status 2)."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest

from cptron.cli import main
from cptron.data.config import DataConfig, ReplayConfig, SourceConfig
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.errors import CptronError
from cptron.testing.distributed import run_distributed
from cptron.testing.training import VOCAB, PackedSource, make_train_config
from cptron.train.metrics import MetricsConfig
from cptron.train.plot_runs import PlotConfig, plot_arguments, read_metrics, run_plot, smooth
from cptron.train.trainer import Trainer


def _train(rank, world_size, run_dir, paths, replay):
    cfg = make_train_config(run_dir, steps=4, eval_every=2)
    cfg.metrics = MetricsConfig(log_every=1, jsonl=True, progress_bar="off")
    if paths is None:  # one source, no per-source losses: the plot draws `loss`
        val = {"heldout": lambda: [next(PackedSource(16, 8, rank, world_size, seed=5))]}
        return Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), val)).run().last_step
    cfg.data = DataConfig(sources={"en": SourceConfig(paths=[paths["en"]]), "de": SourceConfig(paths=[paths["de"]])},
                          replay=ReplayConfig(fraction=replay, sources=["en"]))
    cfg.data.validation.held_out_fraction = 0.1
    return Trainer(cfg).run().last_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    rng = np.random.default_rng(3)
    paths = {}
    for name, (lo, hi) in {"en": (3, 60), "de": (200, VOCAB)}.items():
        with IndexedDatasetWriter(str(root / "data" / name / "part"), vocab_size=VOCAB) as w:
            for _ in range(100):
                w.add_document(rng.integers(lo, hi, int(rng.integers(5, 40))))
        paths[name] = str(root / "data" / name)
    out = {}
    for name, replay in (("replay25", 0.25), ("replay50", 0.5), ("single", None)):
        out[name] = str(root / name)
        assert run_distributed(_train, 1, out[name], None if name == "single" else paths, replay)[0] == 4
    return out


def _records(run_dir, kind):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["kind"] == kind]


def test_the_figure_of_two_runs_holds_one_line_per_run_and_curve(runs, tmp_path):
    output = tmp_path / "sub" / "curves.png"
    fig = run_plot(PlotConfig(runs=[runs["replay25"], runs["replay50"]], output=str(output), smoothing=0.0))
    assert output.is_file() and output.stat().st_size > 20_000
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_ax, val_ax, change_ax, lr_ax = fig.axes
    assert len(train_ax.get_lines()) == 4 and len(val_ax.get_lines()) == 4 and len(change_ax.get_lines()) == 4
    assert [line.get_label() for line in lr_ax.get_lines()] == ["replay25", "replay50"]
    labels = {line.get_label() for line in val_ax.get_lines()}
    assert labels == {"replay25: en (old)", "replay25: de (new)", "replay50: en (old)", "replay50: de (new)"}
    # The drawn values are metrics.jsonl's (no smoothing asked for).
    evals = _records(runs["replay50"], "eval")
    line = next(x for x in val_ax.get_lines() if x.get_label() == "replay50: en (old)")
    assert list(line.get_xdata()) == [r["step"] for r in evals] == [0, 2, 4]
    assert list(line.get_ydata()) == [r["val/en"] for r in evals]
    line = next(x for x in change_ax.get_lines() if x.get_label() == "replay25: forgetting (old)")
    assert list(line.get_ydata()) == [r["domain/old/forgetting"] for r in _records(runs["replay25"], "eval")]
    line = next(x for x in train_ax.get_lines() if x.get_label() == "replay25: de")
    assert list(line.get_ydata()) == [r["loss/de"] for r in _records(runs["replay25"], "train")]
    # The LR panel draws each step's logged LR.
    line = next(x for x in lr_ax.get_lines() if x.get_label() == "replay50")
    train = _records(runs["replay50"], "train")
    assert list(line.get_xdata()) == [r["step"] for r in train] and list(line.get_ydata()) == [r["lr"] for r in train]


def test_a_run_with_one_source_draws_its_loss_and_labels_name_the_runs(runs, tmp_path):
    fig = run_plot(PlotConfig(runs=[runs["single"], runs["replay25"]], labels=["base", "cpt"],
                              output=str(tmp_path / "c.png")))
    train_ax, val_ax, change_ax, _ = fig.axes
    assert sorted(x.get_label() for x in train_ax.get_lines()) == ["base: all", "cpt: de", "cpt: en"]
    assert sorted(x.get_label() for x in val_ax.get_lines()) == ["base: heldout (new)", "cpt: de (new)",
                                                                 "cpt: en (old)"]
    assert len(change_ax.get_lines()) == 3  # the single run's one new set: learning only
    smoothed = next(x for x in train_ax.get_lines() if x.get_label() == "base: all").get_ydata()
    raw = [r["loss"] for r in _records(runs["single"], "train")]
    assert list(smoothed) == smooth(raw, 0.6) and smoothed[0] == pytest.approx(raw[0], rel=1e-12)
    assert abs(smoothed[-1] - raw[-1]) > 1e-6, "smoothed by default"


def test_smoothing_is_a_debiased_moving_average():
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])
    assert smooth([2.0, 4.0], 0.5) == pytest.approx([2.0, (0.25 * 2 + 0.5 * 4) / 0.75])


def test_the_command_takes_run_directories_and_dash_o(runs, tmp_path, capsys):
    output = tmp_path / "cli.png"
    assert main(["plot", runs["replay25"], runs["replay50"], "-o", str(output), "--labels", "a,b"]) == 0
    assert output.stat().st_size > 20_000
    assert plot_arguments(["r1", "r2", "-o", "x.png", "--dpi", "80"]) == ["--runs", "r1,r2", "--output", "x.png",
                                                                         "--dpi", "80"]
    assert plot_arguments(["--labels", "a,b", "r1", "r2"]) == ["--runs", "r1,r2", "--labels", "a,b"]
    assert plot_arguments(["--runs", "r1", "--smoothing=0"]) == ["--runs", "r1", "--smoothing=0"]
    with pytest.raises(SystemExit) as exit_info:
        main(["plot", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "cptron plot RUN_DIR [RUN_DIR ...] -o curves.png" in out and "[CONFIG.yaml]" not in out


def _bad(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert "nowhere' is invalid: expected an existing run directory" in _bad(capsys, ["plot", str(tmp_path / "nowhere"), "-o", out])
    (tmp_path / "empty").mkdir()
    assert "empty: no metrics.jsonl" in _bad(capsys, ["plot", str(tmp_path / "empty"), "-o", out])
    assert "runs=[] is invalid" in _bad(capsys, ["plot", "-o", out])
    assert "labels=['a'] is invalid: expected one label per run (2)" in _bad(
        capsys, ["plot", runs["replay25"], runs["replay50"], "--labels", "a", "-o", out])
    assert "output='x.svg' is invalid" in _bad(capsys, ["plot", runs["replay25"], "-o", "x.svg"])
    lines = open(os.path.join(runs["replay25"], "metrics.jsonl")).read().splitlines(keepends=True)
    for name, text, needle in [
        ("middle", lines[0] + '{"step": 1, "kind": "tr\n' + "".join(lines[1:]), "metrics.jsonl:2: malformed line"),
        ("string", lines[0] + '{"step": 1, "kind": "train", "loss": "low"}\n', "metrics.jsonl:2: malformed record: loss='low'"),
        ("nostep", '{"kind": "train", "loss": 1.0}\n', "metrics.jsonl:1: malformed record: step=None"),
        ("list", "[1, 2]\n", "metrics.jsonl:1: malformed record: expected a JSON object, got list"),
        ("blank", "\n", "metrics.jsonl: no records"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
        assert needle in _bad(capsys, ["plot", str(tmp_path / name), "-o", out]), name


def test_a_truncated_last_line_is_skipped_with_a_note(runs, tmp_path, caplog):
    killed = tmp_path / "killed"
    shutil.copytree(runs["replay25"], killed)
    text = (killed / "metrics.jsonl").read_text()
    (killed / "metrics.jsonl").write_text(text + '{"step": 5, "kind": "train", "loss": 6.1')  # cut off mid-write
    with caplog.at_level(logging.WARNING, logger="cptron.plot"):
        records = read_metrics(killed)
    assert len(records) == len(text.splitlines()) and records[-1] == json.loads(text.splitlines()[-1])
    last = len(text.splitlines()) + 1
    assert any(f"metrics.jsonl:{last}: skipped a truncated last line" in r.getMessage() for r in caplog.records)
    # The same bytes followed by a newline were written whole: an error, not a truncation.
    (killed / "metrics.jsonl").write_text(text + '{"step": 5, "kind": "train", "loss": 6.1\n')
    with pytest.raises(CptronError, match=rf"metrics\.jsonl:{last}: malformed line"):
        read_metrics(killed)
