"""`cptron lr-plot`: the figure holds one line per schedule (plus the branch step's marker) with the
LR the schedule gives, the PNG is written, and the command runs and fails as the CLI does."""
import json
import logging

import pytest

from cptron import checkpoint as ckpt
from cptron.cli import main
from cptron.config import dump_yaml
from cptron.train.branch import schedule_record
from cptron.train.config import JobConfig
from cptron.train.lr import LRConfig, build_lr_schedule
from cptron.train.lr_plot import LRPlotConfig, lr_figure, run_lr_plot

PARENT_LR = LRConfig(schedule="infinite", warmup_steps=20, cooldown_steps=80, constant_ratio=0.5)
BRANCH_LR = LRConfig(schedule="infinite", warmup_steps=20, cooldown_steps=80, constant_ratio=0.5, anneal_start=600,
                     min_lr_ratio=0.05)


def plot_config(tmp_path, lr=BRANCH_LR, steps=900, **fields) -> LRPlotConfig:
    cfg = LRPlotConfig(output=str(tmp_path / "lr.png"), **fields)
    cfg.training.steps, cfg.training.run_dir, cfg.lr, cfg.optim.lr = steps, str(tmp_path / "decay"), lr, 2e-4
    return cfg


def lines(fig):
    (ax,) = fig.axes
    return ax, {line.get_label(): line for line in ax.get_lines()}


def assert_follows(line, lr: LRConfig, total: int, peak: float, offset: int = 0):
    s = build_lr_schedule(lr, total)
    xs, ys = line.get_xdata(), line.get_ydata()
    assert len(xs) > 100
    for x, y in zip(xs, ys):
        assert y == pytest.approx(peak * s.factor(x - offset - 1), rel=1e-12)


def test_one_schedule_one_line_with_its_phases(tmp_path):
    cfg = plot_config(tmp_path)
    ax, drawn = lines(lr_figure(cfg))
    assert list(drawn) == ["decay"]
    assert_follows(drawn["decay"], BRANCH_LR, 900, 2e-4)
    assert drawn["decay"].get_xdata()[0] == 1 and drawn["decay"].get_xdata()[-1] == 900
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["warmup to 1", "cosine 1 to 0.5", "constant 0.5", "exponential 0.5 to 0.05"]


def test_a_branch_with_its_parent_and_the_branch_step(tmp_path):
    parent = JobConfig(lr=PARENT_LR)
    parent.training.steps, parent.training.run_dir, parent.optim.lr = 1000, str(tmp_path / "base"), 3e-4
    dump_yaml(parent, str(tmp_path / "parent.yaml"))
    cfg = plot_config(tmp_path, parent=str(tmp_path / "parent.yaml"), branch_step=600)
    ax, drawn = lines(lr_figure(cfg))
    assert list(drawn) == ["parent (base)", "decay (branch)", "branch at step 600"]
    assert_follows(drawn["parent (base)"], PARENT_LR, 1000, 3e-4)
    assert_follows(drawn["decay (branch)"], BRANCH_LR, 900, 2e-4)
    assert drawn["decay (branch)"].get_xdata()[0] == 601  # the branch's own steps only
    assert list(drawn["branch at step 600"].get_xdata()) == [600, 600]

    # Without the step counter the branch counts from 0: drawn from the branch step on.
    cfg.checkpoint.branch_carry = ["weights", "optimizer", "data"]
    _, drawn = lines(lr_figure(cfg))
    line = drawn["decay (branch, steps counted from 0)"]
    assert line.get_xdata()[0] == 601 and line.get_xdata()[-1] == 1500
    assert_follows(line, BRANCH_LR, 900, 2e-4, offset=600)


def test_the_parent_schedule_comes_from_the_branch_source_checkpoint(tmp_path):
    parent = JobConfig(lr=PARENT_LR)
    parent.training.steps = 5000
    source = tmp_path / "base" / "checkpoints" / ckpt.step_dir_name(600)
    source.mkdir(parents=True)
    meta = {"format_version": ckpt.FORMAT_VERSION, "step": 600,
            "train_state": {"step": 600, "lr": schedule_record(parent)}}
    (source / ckpt.META_FILE).write_text(json.dumps(meta))
    (source / ckpt.COMPLETE_MARKER).write_text("complete\n")
    before = sorted(p.name for p in source.parent.iterdir())
    cfg = plot_config(tmp_path)
    cfg.checkpoint.branch_from = str(source)
    _, drawn = lines(lr_figure(cfg))
    assert list(drawn) == [f"parent ({source.name})", "decay (branch)", "branch at step 600"]
    assert_follows(drawn[f"parent ({source.name})"], PARENT_LR, 5000, parent.optim.lr)
    assert sorted(p.name for p in source.parent.iterdir()) == before


def test_the_png_is_written_and_logged(tmp_path, caplog):
    cfg = plot_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="cptron"):
        out = run_lr_plot(cfg)
    assert out == tmp_path / "lr.png" and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote the LR schedule of 900 steps to {out}" in caplog.text


# ---------------------------------------------------------------- the command


def test_cli_help_run_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["lr-plot", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: cptron lr-plot [CONFIG.yaml]") and "--output STR" in text and "--parent" in text

    cfg = JobConfig(lr=BRANCH_LR)
    cfg.training.steps = 700
    dump_yaml(cfg, str(tmp_path / "train.yaml"))
    out = tmp_path / "plots" / "lr.png"
    assert main(["lr-plot", str(tmp_path / "train.yaml"), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    short = tmp_path / "short.png"  # -o, as `cptron plot` takes it, with overrides after it
    assert main(["lr-plot", str(tmp_path / "train.yaml"), "-o", str(short), "--training.steps", "800"]) == 0
    assert short.stat().st_size > 10_000
    assert main(["lr-plot", str(tmp_path / "train.yaml"), "-o"]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    assert main(["lr-plot", str(tmp_path / "train.yaml"), "--lr.anneal_start", "800"]) == 2
    err = capsys.readouterr().err
    assert err == ("cptron lr-plot: error: lr.anneal_start=800 is invalid: expected a step in [100, 700): after "
                   "warmup and cooldown, before the end of training\n")
    assert main(["lr-plot", str(tmp_path / "train.yaml"), "--parent", str(tmp_path / "none.yaml"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cptron lr-plot: error: parent='{tmp_path / 'none.yaml'}' is invalid: expected a "
                          "readable train config") and err.count("\n") == 1
