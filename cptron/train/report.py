"""The forgetting and learning report of a continual-pretraining run, and its per-source accounting.

Each validation set belongs to a domain (`DataConfig.domain_of`): old (the base's domain,
replayed or only held out) or new (the CPT target). Measured against the run's step-0 losses
(the evaluation before any update, training.eval_at_start), the change of an old set is its
forgetting, loss now - loss at step 0, and the change of a new set its learning, loss at step 0
- loss now: positive numbers are forgetting and learning, as Ibrahim et al. (2024, "Simple and
Scalable Strategies to Continually Pre-train Large Language Models") measure them. Every
evaluation's row adds, per set, `ppl/<set>` and `forgetting/<set>` or `learning/<set>`, and per
domain the mean over its sets, `domain/<old|new>/loss`, `domain/<old|new>/ppl` (the exp of that
mean: the geometric mean of the sets' perplexities) and `domain/old/forgetting` or
`domain/new/learning`. Source names hold no '/', so these keys never meet a set's.

The step-0 losses travel in the checkpoint's train state, so a resumed run reports what the
uninterrupted one does. Without them (eval_at_start false, or a checkpoint written before the
report existed) no change is computed, and the log and the report say why.

At the end of the run rank 0 logs a summary table and writes it to run_dir/report.md: per set its
domain, the loss and perplexity at step 0 and at the end and the change, and per source the samples
and tokens the run drew and the epochs of the source they amount to (`BatchSource.drawn`, the
loader's checkpointed positions, exact under resume).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

from cptron.errors import CptronError

log = logging.getLogger("cptron.train")

DOMAINS = ("old", "new")
CHANGE = {"old": "forgetting", "new": "learning"}
"""The name of the change since step 0 on each domain's sets."""


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (a diverged run)."""
    return math.inf if loss >= 709.0 else math.exp(loss)  # NaN stays NaN


def change(domain: str, loss: float, baseline: float) -> float:
    """Forgetting (old: loss - baseline) or learning (new: baseline - loss): positive is forgetting and learning."""
    return loss - baseline if domain == "old" else baseline - loss


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def domain_summary(
    losses: dict[str, float], baseline: Optional[dict[str, float]], domains: dict[str, str]
) -> dict[str, dict[str, float]]:
    """Per domain with sets: {"loss": mean loss, "ppl": exp of it, and the mean change over the sets
    that have a step-0 loss, when any does}."""
    out = {}
    for domain in DOMAINS:
        names = [n for n in losses if domains[n] == domain]
        if not names:
            continue
        mean = _mean([losses[n] for n in names])
        entry = {"loss": mean, "ppl": perplexity(mean)}
        known = [n for n in names if baseline is not None and n in baseline]
        if known:
            entry[CHANGE[domain]] = _mean([change(domain, losses[n], baseline[n]) for n in known])
        out[domain] = entry
    return out


def eval_metrics(
    losses: dict[str, float], baseline: Optional[dict[str, float]], domains: dict[str, str]
) -> dict[str, float]:
    """What an evaluation's row adds to the held-out losses (see the module docstring for the keys)."""
    out = {}
    for name, loss in losses.items():
        out[f"ppl/{name}"] = perplexity(loss)
        if baseline is not None and name in baseline:
            out[f"{CHANGE[domains[name]]}/{name}"] = change(domains[name], loss, baseline[name])
    for domain, entry in domain_summary(losses, baseline, domains).items():
        out.update({f"domain/{domain}/{key}": value for key, value in entry.items()})
    return out


def _num(x: Optional[float], fmt: str = "{:.4f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _signed(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def format_report(
    *,
    step: int,
    domains: dict[str, str],
    baseline: Optional[dict[str, float]],
    final: Optional[dict[str, float]],
    drawn: dict[str, dict[str, float]],
    no_baseline: str,
) -> str:
    """The summary as Markdown (also what the log shows). `no_baseline` says why there is no step-0 loss."""
    lines = [
        f"# Continual-pretraining report: step {step}",
        "",
        "Forgetting (old sets) = loss now - loss at step 0; learning (new sets) = loss at step 0 - loss now.",
        "Positive values are forgetting and learning. Losses are mean token losses (nats) of the held-out sets.",
        "",
        "## Forgetting and learning per validation set",
        "",
    ]
    if not final:
        lines.append("No validation sets: nothing to compare (set data.validation.held_out_fraction).")
    else:
        if baseline is None:
            lines += [f"Change since step 0 not computed: {no_baseline}.", ""]
        lines += [
            f"| set | domain | loss step 0 | loss step {step} | ppl step 0 | ppl step {step} | change |",
            "|---|---|---|---|---|---|---|",
        ]
        names = sorted(final, key=lambda n: (DOMAINS.index(domains[n]), n))
        for name in names:
            domain, before = domains[name], (baseline or {}).get(name)
            delta = None if before is None else change(domain, final[name], before)
            lines.append(
                f"| {name} | {domain} | {_num(before)} | {_num(final[name])} | "
                f"{_num(None if before is None else perplexity(before), '{:.2f}')} | {perplexity(final[name]):.2f} | "
                f"{CHANGE[domain]} {_signed(delta)} |"
            )
        for domain, entry in domain_summary(final, baseline, domains).items():
            sets = [n for n in final if domains[n] == domain]
            if len(sets) < 2:  # the set's own row says it
                continue
            known = all(n in (baseline or {}) for n in sets)
            before = _mean([baseline[n] for n in sets]) if known else None
            lines.append(
                f"| mean of {domain} | {domain} | {_num(before)} | {_num(entry['loss'])} | "
                f"{_num(None if before is None else perplexity(before), '{:.2f}')} | {entry['ppl']:.2f} | "
                f"{CHANGE[domain]} {_signed(entry.get(CHANGE[domain]))} |"
            )
    lines += ["", "## Data drawn per source", ""]
    if not drawn:
        lines.append("Not counted: the run's data source does not report what it drew per source.")
    else:
        total = sum(d["samples"] for d in drawn.values()) or 1
        lines += [
            "Samples of seq_len + 1 tokens; tokens: the seq_len each trains on; epochs: passes over the source.",
            "",
            "| source | samples | share | tokens | epochs |",
            "|---|---|---|---|---|",
        ]
        for name, d in sorted(drawn.items()):
            lines.append(
                f"| {name} | {int(d['samples']):,} | {d['samples'] / total:.1%} | {int(d['tokens']):,} | "
                f"{d['epochs']:.3f} |"
            )
    return "\n".join(lines) + "\n"


class ForgettingReport:
    """The trainer's report component: adds the change since step 0 to every evaluation's row, keeps
    the step-0 losses in the train state, and writes the summary at the end (see the module docstring)."""

    def __init__(self, domains: dict[str, str], run_dir: str, *, rank: int, eval_at_start: bool):
        self.domains, self.run_dir, self.rank = dict(domains), run_dir, rank
        self.baseline: Optional[dict[str, float]] = None
        """The held-out losses of the evaluation at step 0, before any update; None without one."""
        self.latest: Optional[dict[str, float]] = None
        """The held-out losses of the latest evaluation of this invocation."""
        self._no_baseline = (
            "training.eval_at_start is false, so there is no step-0 evaluation"
            if not eval_at_start
            else "no step-0 evaluation was recorded"
        )
        self._told = False
        if rank == 0 and domains:
            sets = ", ".join(f"{n} ({d})" for n, d in sorted(domains.items()))
            log.info("validation sets: %s; forgetting (old) and learning (new) measured from step 0", sets)

    def evaluation(self, step: int, losses: dict[str, float]) -> dict[str, float]:
        """The derived metrics of the evaluation at `step` (0: it becomes the baseline)."""
        if step == 0 and self.baseline is None:
            self.baseline = dict(losses)
        self.latest = dict(losses)
        if self.baseline is None and not self._told and self.rank == 0:
            log.info("forgetting/learning since step 0 not computed: %s", self._no_baseline)
            self._told = True
        return eval_metrics(losses, self.baseline, self.domains)

    def state_dict(self) -> Optional[dict[str, float | str]]:
        """The step-0 losses for the train state (JSON without NaN: a non-finite loss as its string)."""
        if self.baseline is None:
            return None
        return {n: v if math.isfinite(v) else str(v) for n, v in self.baseline.items()}

    def load_state_dict(self, state: Optional[dict], *, present: bool = True) -> None:
        """Restore the step-0 losses; `present` false: the checkpoint predates the report."""
        if state is None:
            self.baseline = None
            if not present:
                self._no_baseline = "the checkpoint resumed from holds no step-0 losses (written before the report)"
            return
        try:
            self.baseline = {str(n): float(v) for n, v in state.items()}
        except (AttributeError, TypeError, ValueError) as e:
            raise CptronError(f"train_state.eval_baseline={state!r} is malformed: expected {{set: loss}} ({e})") from e

    def finish(self, step: int, drawn: dict[str, dict[str, float]]) -> Optional[str]:
        """On rank 0: log the summary and write run_dir/report.md; returns its text (None elsewhere)."""
        if self.rank != 0:
            return None
        text = format_report(
            step=step,
            domains=self.domains,
            baseline=self.baseline,
            final=self.latest,
            drawn=drawn,
            no_baseline=self._no_baseline,
        )
        path = Path(self.run_dir) / "report.md"
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            raise CptronError(f"writing {path} failed: {e.strerror or e}") from e
        log.info("forgetting and learning report (also in %s):\n%s", path, text)
        return text


__all__ = ["ForgettingReport", "eval_metrics", "format_report", "perplexity", "change", "domain_summary"]
