"""`cptron plot`: the loss curves of one or more training runs, overlaid in one PNG.

Reads each run directory's metrics.jsonl (`cptron.train.metrics`; the keys of its eval rows are
`cptron.train.report`'s) and draws four panels, one colour per run and one line style per
source or set, so a run is compared with another at a glance:
  - training loss per source (`loss/<source>`; `loss` for a run with one source), smoothed by
    a debiased exponential moving average (`smoothing`; 0 draws the logged values);
  - validation loss per set (`val/<set>`), its domain named where the rows give it;
  - forgetting of the old domain and learning of the new one since step 0
    (`domain/old/forgetting`, `domain/new/learning`);
  - the learning rate each logged step actually ran with (`lr`): re-warming, branches and
    resumed schedules as they happened, beside the curves they shaped.
metrics.jsonl is untrusted: a truncated last line (a run killed mid-write) is skipped with a
warning, any other malformed line is an error naming the file and line. matplotlib draws on a
`Figure` of its own (the Agg canvas, no pyplot state, no display).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cptron.errors import CptronError, require

log = logging.getLogger("cptron.plot")

STYLES = ("-", "--", ":", "-.")


@dataclass
class PlotConfig:
    """Draw the training and validation loss curves of one or more runs into one PNG.

    Usage: cptron plot RUN_DIR [RUN_DIR ...] -o curves.png [--labels a,b]. Run directories may be
    given positionally (before any option) and -o stands for --output."""

    runs: list[str] = field(default_factory=list)
    """Run directories (each with the metrics.jsonl of a `cptron train` run), overlaid in this order."""
    output: str = "curves.png"
    """PNG file to write (-o)."""
    labels: list[str] = field(default_factory=list)
    """Legend name of each run, in the order of runs; empty: each run directory's name."""
    smoothing: float = 0.6
    """Weight of the exponential moving average over the logged training losses, in [0, 1); 0: no smoothing."""
    dpi: int = 120
    """Resolution of the PNG in dots per inch."""

    def validate(self) -> None:
        require(bool(self.runs), "runs", self.runs, "at least one run directory (cptron plot RUN_DIR [RUN_DIR ...])")
        for run in self.runs:
            require(Path(run).is_dir(), "runs", run, "an existing run directory")
        require(
            not self.labels or len(self.labels) == len(self.runs),
            "labels",
            self.labels,
            f"one label per run ({len(self.runs)}) or none",
        )
        require(self.output.lower().endswith(".png"), "output", self.output, "a path ending in .png")
        require(0 <= self.smoothing < 1, "smoothing", self.smoothing, "a weight in [0, 1)")
        require(10 <= self.dpi <= 1200, "dpi", self.dpi, "an integer in [10, 1200]")


def plot_arguments(argv: list[str]) -> list[str]:
    """`cptron plot`'s own argument forms as the options the config parser reads: positional run
    directories become --runs, -o becomes --output. A value follows its option, as the parser reads it."""
    runs, out, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "-o":
            require(i < len(argv), "-o", "", "the PNG file to write")
            out += ["--output", argv[i]]
            i += 1
        elif token.startswith("--"):
            out.append(token)
            if "=" not in token and i < len(argv) and not argv[i].startswith("--") and argv[i] != "-o":
                out.append(argv[i])
                i += 1
        elif token.startswith("-"):  # -h, or an option the parser names in its error
            out.append(token)
        else:
            require("," not in token, "runs", token, "a run directory without ',' (lists are comma-separated)")
            runs.append(token)
    return (["--runs", ",".join(runs)] if runs else []) + out


# ---------------------------------------------------------------- reading


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl, checked (see the module docstring)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CptronError(f"{run_dir}: no metrics.jsonl: expected the directory of a `cptron train` run")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CptronError(f"{path}: unreadable: {e}") from e
    lines, records = text.split("\n"), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if number == len(lines):  # no newline after it: the write was cut off
                log.warning("%s:%d: skipped a truncated last line (a run stopped while writing it)", path, number)
                continue
            raise CptronError(f"{path}:{number}: malformed line ({e}): expected one JSON object per line") from None
        bad = _malformed(record)
        if bad:
            raise CptronError(f"{path}:{number}: malformed record: {bad}")
        records.append(record)
    if not records:
        raise CptronError(f"{path}: no records: expected at least one logged step")
    return records


def eval_losses(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """Step -> {validation set: held-out loss} of a run's evaluations (its metrics.jsonl, checked)."""
    return {
        r["step"]: {k.removeprefix("val/"): v for k, v in r.items() if k.startswith("val/")}
        for r in read_metrics(run_dir)
        if r.get("kind") == "eval"
    }


def _malformed(record) -> str:
    """What is wrong with one record, or ""."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    step, kind = record.get("step"), record.get("kind")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step={step!r}: expected an integer >= 0"
    if not isinstance(kind, str):
        return f"kind={kind!r}: expected a string"
    for key, value in record.items():
        if key not in ("step", "kind") and not _number(value):
            return f"{key}={value!r}: expected a number"
    return ""


@dataclass
class RunCurves:
    """The curves of one run: metric key -> (steps, values), finite values only, in step order."""

    name: str
    train: dict[str, tuple[list[int], list[float]]]
    eval: dict[str, tuple[list[int], list[float]]]
    domains: dict[str, str]
    """Validation set -> old/new, where the eval rows give it (their forgetting/ or learning/ keys)."""


def run_curves(run_dir: str | Path, name: str) -> RunCurves:
    """The curves of one run directory (the last record of a step wins)."""
    rows: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for record in read_metrics(run_dir):
        if record["kind"] in rows:
            rows[record["kind"]][record["step"]] = record
    out, domains = {}, {}
    for kind, by_step in rows.items():
        curves: dict[str, tuple[list[int], list[float]]] = {}
        for step in sorted(by_step):
            for key, value in by_step[step].items():
                if kind == "eval" and key.split("/")[0] in ("forgetting", "learning"):
                    domains[key.split("/", 1)[1]] = "old" if key.startswith("forgetting/") else "new"
                if key in ("step", "kind", "time") or not math.isfinite(value):
                    continue
                steps, values = curves.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
        out[kind] = curves
    return RunCurves(name, out["train"], out["eval"], domains)


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, divided by the weight its start has so the first point is not pulled to 0."""
    out, average, mass = [], 0.0, 0.0
    for v in values:
        average = weight * average + (1 - weight) * v
        mass = weight * mass + (1 - weight)
        out.append(average / mass)
    return out


# ---------------------------------------------------------------- drawing


def _train_keys(run: RunCurves) -> dict[str, str]:
    """Curve key -> source name of a run's training-loss curves."""
    per_source = {k: k.split("/", 1)[1] for k in run.train if k.startswith("loss/")}
    if per_source:
        return per_source
    return {"loss": "all"} if "loss" in run.train else {}


def draw_curves(runs: list[RunCurves], smoothing: float = 0.0):
    """The figure of `runs` (see the module docstring): a matplotlib Figure with four axes (2 x 2)."""
    try:  # deferred: only this command needs matplotlib
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as e:
        raise CptronError(f"cptron plot needs matplotlib (pip install matplotlib): {e}") from e
    colors = colormaps["tab10"].colors
    fig = Figure(figsize=(14, 9), layout="constrained")
    (train_ax, val_ax), (change_ax, lr_ax) = fig.subplots(2, 2)
    sources = sorted({s for run in runs for s in _train_keys(run).values()})
    sets = sorted({k.split("/", 1)[1] for run in runs for k in run.eval if k.startswith("val/")})
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for key, source in sorted(_train_keys(run).items()):
            steps, values = run.train[key]
            style = STYLES[sources.index(source) % len(STYLES)]
            train_ax.plot(steps, smooth(values, smoothing), style, color=color, label=f"{run.name}: {source}")
        for name in sets:
            if f"val/{name}" in run.eval:
                steps, values = run.eval[f"val/{name}"]
                domain = f" ({run.domains[name]})" if name in run.domains else ""
                style = STYLES[sets.index(name) % len(STYLES)]
                val_ax.plot(steps, values, style, color=color, marker="o", ms=3, label=f"{run.name}: {name}{domain}")
        for style, key in (("-", "domain/old/forgetting"), ("--", "domain/new/learning")):
            if key in run.eval:
                steps, values = run.eval[key]
                what = "forgetting (old)" if "old" in key else "learning (new)"
                change_ax.plot(steps, values, style, color=color, marker="o", ms=3, label=f"{run.name}: {what}")
        if "lr" in run.train:
            lr_ax.plot(*run.train["lr"], "-", color=color, label=run.name)
    titles = (
        f"training loss per source (EMA {smoothing:g})" if smoothing else "training loss per source",
        "validation loss per set",
        "change since step 0 (positive: forgot / learned)",
        "learning rate (as logged)",
    )
    for ax, title in zip((train_ax, val_ax, change_ax, lr_ax), titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, color="gray")
    train_ax.set_ylabel("loss (nats/token)")
    val_ax.set_ylabel("held-out loss (nats/token)")
    change_ax.set_ylabel("loss change (nats/token)")
    lr_ax.set_ylabel("learning rate")
    return fig


def run_plot(cfg: PlotConfig):
    """Read every run, draw the figure and write cfg.output; returns the figure."""
    names = cfg.labels or [Path(r).resolve().name for r in cfg.runs]
    runs = [run_curves(r, n) for r, n in zip(cfg.runs, names)]
    fig = draw_curves(runs, cfg.smoothing)
    out = Path(cfg.output)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=cfg.dpi)
        os.replace(tmp, out)
    except OSError as e:
        raise CptronError(f"writing {out} failed: {e.strerror or e}") from e
    lines = sum(len(ax.get_lines()) for ax in fig.axes)
    log.info("wrote %s: %d run(s), %d curves (%s)", out, len(runs), lines, ", ".join(names))
    return fig


__all__ = ["PlotConfig", "RunCurves", "draw_curves", "plot_arguments", "read_metrics", "run_curves", "run_plot"]
