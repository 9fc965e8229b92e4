"""Held-out evaluation during a run: which steps evaluate, and the losses of every validation set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from cptron.train.config import TrainingConfig
from cptron.train.train_module import TrainModule


class Validator:
    """Evaluates the validation sets before the first step of a fresh run (eval_at_start), every
    eval_every steps, and after the last step; a run without validation sets never evaluates."""

    def __init__(self, module: TrainModule, val_sets: dict[str, Callable], cfg: TrainingConfig):
        self.module, self.val_sets, self.cfg = module, val_sets, cfg

    def evaluate(self) -> dict[str, float]:
        """The mean token loss of every validation set (at most training.eval_batches batches each)."""
        return self.module.evaluate(self.val_sets, self.cfg.eval_batches)

    def maybe_evaluate(self, step: int, *, start: bool = False, final: bool = False) -> Optional[dict[str, float]]:
        """The held-out losses at `step` if an evaluation is due there, else None: `start` before
        the first step of a fresh run, `final` after the last step, otherwise every eval_every steps."""
        c = self.cfg
        if not self.val_sets:
            return None
        if start:
            due = step == 0 and c.eval_at_start
        else:
            due = final or (c.eval_every > 0 and step % c.eval_every == 0 and step < c.steps)
        return self.evaluate() if due else None
