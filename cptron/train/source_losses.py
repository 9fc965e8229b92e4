"""Per-source training losses (`loss/<source>` in the metrics): the mean token loss of each data
source's rows of a step's batch, from the same per-token cross-entropy as the training loss.

Owns the accumulator of one step ([loss sum, labelled tokens] per source, reduced over the data
and pipeline groups) and the label tags that carry a row's source and index to a pipeline's
last stage, where torch's schedule calls the loss function with (logits, labels) only.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cptron.data.interface import IGNORE_INDEX

log = logging.getLogger("cptron.train")

TAG_SHIFT, SOURCE_BITS = 32, 12
"""Under pipelining each row's labels carry (row << 12 | source) << 32 to the last stage's loss function:
its source for the per-source losses and its row within the step's batch, which identifies the microbatch
whatever torch does to the targets (labels stay in [-100, 2**31); up to 4096 sources and 2**19 rows)."""
MAX_TAGGED_SOURCES = 1 << SOURCE_BITS
MAX_TAGGED_ROWS = 1 << (63 - TAG_SHIFT - SOURCE_BITS)


def tag_labels(labels: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """`labels` carrying each row's source and index (the bounds are checked at start-up)."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    return labels + (((rows << SOURCE_BITS) | sources) << TAG_SHIFT)[:, None]


def untag_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(labels, each row's source, the first row's index) of tagged labels."""
    tag = (labels[:, 0] + (1 << (TAG_SHIFT - 1))) >> TAG_SHIFT  # -100 + 2**31 >= 0: the tag alone remains
    return labels - (tag << TAG_SHIFT)[:, None], tag & ((1 << SOURCE_BITS) - 1), int(tag[0] >> SOURCE_BITS)


class SourceLosses:
    """The per-source losses of each training step, for data loaders that name their sources."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = list(names)
        self.device = device
        self.last: dict[str, float] = {}
        """The previous step's loss of each source present in its batch."""
        self._acc: Optional[torch.Tensor] = None

    @staticmethod
    def fit_pipeline(names: list[str], rows_per_rank: int) -> bool:
        """Whether the label tags can carry these sources and rows through a pipeline; warns if not."""
        if len(names) <= MAX_TAGGED_SOURCES and rows_per_rank < MAX_TAGGED_ROWS:
            return True
        log.warning(
            "per-source losses are off: under pipelining they handle up to %d sources and %d rows per rank and step",
            MAX_TAGGED_SOURCES,
            MAX_TAGGED_ROWS,
        )
        return False

    def start(self) -> None:
        """Begin a step: zero the accumulator."""
        self._acc = torch.zeros(2, len(self.names), device=self.device)

    def add(self, rows: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor) -> None:
        """Add a microbatch: per-row loss sums, its labels (for the token counts) and row sources."""
        acc = self._acc
        # A one-hot product rather than index_add_, whose CUDA kernel adds with atomics (run-to-run noise).
        onehot = F.one_hot(sources, acc.shape[1]).to(acc.dtype)
        per_row = torch.stack([rows.to(acc.dtype), (labels != IGNORE_INDEX).sum(1).to(acc.dtype)])
        acc += per_row @ onehot

    def add_pipeline_step(self, microbatches: dict[int, tuple], expected: int) -> None:
        """Add the (rows, labels, sources) of one pipeline schedule call's microbatches, keyed by their
        first row. A count other than `expected` makes this step's values NaN (not an error raised
        here: only last-stage ranks see it, and the others would wait)."""
        if len(microbatches) != expected:
            log.warning(
                "per-source losses saw %d of %d microbatches of a pipeline step; this step's "
                "loss/<source> values are NaN",
                len(microbatches),
                expected,
            )
            self._acc[0] = float("nan")
        for rows, labels, sources in microbatches.values():
            self.add(rows, labels, sources)

    def finish(self, groups: list) -> dict[str, float]:
        """End a step: sum over `groups` (process groups; None entries are skipped) and set `last`."""
        acc, self._acc = self._acc, None
        for group in groups:
            if group is not None:
                dist.all_reduce(acc, group=group)
        sums, counts = acc.tolist()
        self.last = {n: s / c for n, s, c in zip(self.names, sums, counts) if c > 0}
        return self.last
