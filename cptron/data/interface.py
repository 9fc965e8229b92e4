"""What the trainer needs from a data loader, and the simplest loader that provides it.

A training data source is a stateful iterator. Each `next(source)` returns this
data-parallel rank's slice of the global batch of one optimizer step. Its state
is a small JSON-serializable dict, saved in every trainer checkpoint, and
restoring it continues the exact sequence of samples.

The global sample order is a function of (seed, data config, step), never of the
data-parallel size: rank r of R takes rows [r * B/R, (r+1) * B/R) of global batch
B. So a run resumed on a different number of ranks (same global batch) sees the
same samples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from cptron.errors import ConfigError, CptronError, require

IGNORE_INDEX = -100
"""Label value that contributes no loss (torch cross_entropy's ignore_index)."""


@dataclass
class Batch:
    """Rows of packed token windows. All tensors are [rows, seq_len] int64 on the CPU."""

    tokens: torch.Tensor
    """Input token ids."""
    labels: torch.Tensor
    """Target ids (the next token); IGNORE_INDEX where no loss is taken."""
    doc_ids: Optional[torch.Tensor] = None
    """Document index of each token within its row (packed documents); None: one document per row."""
    sources: Optional[torch.Tensor] = None
    """[rows] index of each row's source in the loader's `source_names` (per-source losses); None: one source."""

    def __post_init__(self):
        if self.tokens.shape != self.labels.shape or self.tokens.dim() != 2:
            raise CptronError(
                f"Batch: tokens {tuple(self.tokens.shape)} and labels {tuple(self.labels.shape)} "
                "must both be [rows, seq_len]"
            )
        if self.doc_ids is not None and self.doc_ids.shape != self.tokens.shape:
            raise CptronError(
                f"Batch: doc_ids {tuple(self.doc_ids.shape)} must match tokens {tuple(self.tokens.shape)}"
            )
        if self.sources is not None:
            if tuple(self.sources.shape) != (self.tokens.shape[0],):
                raise CptronError(
                    f"Batch: sources {tuple(self.sources.shape)} must hold one index per row ({self.tokens.shape[0]})"
                )
            self.sources = self.sources.long()

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(
            self.tokens[start:stop],
            self.labels[start:stop],
            None if self.doc_ids is None else self.doc_ids[start:stop],
            None if self.sources is None else self.sources[start:stop],
        )

    def to(self, device) -> Batch:
        return Batch(
            self.tokens.to(device),
            self.labels.to(device),
            None if self.doc_ids is None else self.doc_ids.to(device),
            None if self.sources is None else self.sources.to(device),
        )

    @staticmethod
    def from_windows(windows: torch.Tensor | np.ndarray, doc_ids=None) -> Batch:
        """Build from packed windows of seq_len + 1 tokens: inputs are [:-1], labels [1:].
        `doc_ids`, if given, are [rows, seq_len + 1] like the windows."""
        w = torch.as_tensor(np.asarray(windows), dtype=torch.int64)
        d = None if doc_ids is None else torch.as_tensor(np.asarray(doc_ids), dtype=torch.int64)
        labels = w[:, 1:].clone()
        if d is not None:
            # A label from the next document is still a valid target: the model is
            # taught to emit the next document's first token after EOS, as in
            # Megatron's and torchtitan's packing. Only the input side is masked.
            d = d[:, :-1].contiguous()
        return Batch(w[:, :-1].contiguous(), labels, d)


@runtime_checkable
class BatchSource(Protocol):
    """A stateful iterator over this rank's per-step batches (see the module docstring): everything
    the trainer uses of its data. Subclass it to inherit the defaults of the optional members."""

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream, JSON-serializable and the same on every rank (checkpointed)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`, possibly saved under another data-parallel size."""

    @property
    def source_names(self) -> list[str]:
        """Names of the sources that `Batch.sources` indexes (per-source losses); [] for one source."""
        return []

    def describe_plan(self, total_steps: int) -> Optional[str]:
        """A description of what the next `total_steps` steps take from the data, for the start-up
        log; None when there is nothing to say. Raises when the data cannot last that long."""
        return None

    def drawn(self) -> dict[str, dict[str, float]]:
        """What the run has drawn from each named source so far, all ranks together: {name: {"samples",
        "tokens", "epochs"}}; {} when the source does not count it (the report says so)."""
        return {}


def dp_slice(global_batch: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch that data-parallel rank `dp_rank` takes."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} is invalid for dp_size={dp_size}")
    require(
        global_batch % dp_size == 0,
        "global_batch_size",
        global_batch,  # an int: repr is str
        f"a multiple of the data-parallel size {dp_size}",
    )
    per = global_batch // dp_size
    return dp_rank * per, (dp_rank + 1) * per


class InMemoryTokenSource(BatchSource):
    """Random windows of seq_len + 1 tokens from one token array held in memory.

    Step s draws the global batch's window offsets from a generator seeded by
    (seed, s), so the samples depend on (seed, step) only. Used by tests,
    benchmarks and the trainer's `data.kind=memory` mode; real runs use the
    replay-aware mixture in `cptron.data`.
    """

    def __init__(self, tokens, seq_len: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64).flatten()
        if self.tokens.numel() < seq_len + 2:
            raise ConfigError(
                f"in-memory token source has {self.tokens.numel()} tokens: expected at least "
                f"seq_len + 2 = {seq_len + 2}"
            )
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.rows = dp_slice(global_batch, dp_rank, dp_size)
        self.step = 0
        self._fingerprint = hashlib.sha256(
            json.dumps([self.tokens.numel(), int(self.tokens.sum()), seq_len, global_batch, seed]).encode()
        ).hexdigest()[:16]

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.global_batch,), generator=g)
        starts = starts[self.rows[0] : self.rows[1]]
        windows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        self.step += 1
        return Batch.from_windows(windows)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "memory", "step": self.step, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "memory" or state.get("fingerprint") != self._fingerprint:
            raise CptronError(
                f"data state {state!r} was saved by a different data source "
                f"(expected an in-memory source with fingerprint {self._fingerprint})"
            )
        self.step = int(state["step"])
