"""The replay-aware mixture loader: an exactly resumable `BatchSource` over named token-shard sources.

Every rank computes the same global sample sequence and keeps the rows of its
slice (`dp_slice`), so the order depends on (seed, data config, step) only, never
on the data-parallel size. Sample n of the run is chosen in two steps:

1. which source: the quota interleave (`cptron.data.mixture`) of the shares in
   force; a *segment* is a stretch of samples with constant shares, and it
   restarts whenever a stage starts or a source reaches its cap;
2. which window: the source's next position p, i.e. sample p mod W of epoch
   p div W of the source's own shuffled, packed stream (`cptron.data.sample_index`).

Sources advance only when drawn, so a change of weights (a stage, or a resume with
allow_mixture_change) continues every source where it stopped: within an epoch
no sample is lost or repeated. The state is the per-source positions, the
consumed samples, the step, the segment's counts and fingerprints of the config.
`cptron.data.build` opens the sources and builds the loader from a DataConfig.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

import numpy as np
import torch

from cptron.data.config import DataConfig
from cptron.data.interface import Batch, BatchSource, dp_slice
from cptron.data.mixture import (
    QuotaScheduler,
    exact,
    format_shares,
    mixture_description,
    resolve_stages,
    shares,
    stage_at,
    stages_description,
)
from cptron.data.sample_index import SourceIndex
from cptron.errors import ConfigError, CptronError

log = logging.getLogger("cptron.data")

STATE_FORMAT = 1

PREBUILT_EPOCHS = 8
"""Most epochs per source built up front; later ones are built when first reached."""


@dataclass(frozen=True)
class SampleRef:
    """Identity of one training sample (a row of a global batch)."""

    index: int
    """Position in the run's global sample sequence (0-based)."""
    source: str
    epoch: int
    """Epoch of the source the sample belongs to."""
    position: int
    """Position of the sample within its source's epoch (0 .. windows_per_epoch - 1)."""
    window: int
    """Window of the epoch's packed stream: tokens [window * seq_len, window * seq_len + seq_len + 1)."""


@dataclass(frozen=True)
class Piece:
    """A run of tokens of one document inside a sample, in the sample's order."""

    source: str
    doc: int
    """Document id within the source (shards concatenated in path order)."""
    shard: str
    """Shard prefix that holds the document."""
    shard_doc: int
    """Document index within the shard (Megatron's document: `IndexedDataset.document(shard_doc)`)."""
    offset: int
    """First token of the piece within the document."""
    length: int


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def batch_from_windows(windows: np.ndarray, input_doc_ids: np.ndarray, sources: Optional[np.ndarray] = None) -> Batch:
    """`Batch.from_windows` for int64 numpy windows [rows, seq_len + 1] and the document ids of the inputs
    [rows, seq_len]: sliced in numpy and wrapped without a further copy.

    Same result, but torch's strided copies run on its intra-op thread pool, which
    on small shared hosts costs milliseconds per batch where numpy takes microseconds.
    """
    return Batch(
        torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
        torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),
        torch.from_numpy(input_doc_ids),
        None if sources is None else torch.from_numpy(sources),
    )


def _step(x: float) -> str:
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"


def _cap(src_cfg, windows: int, name: str) -> Optional[int]:
    caps = []
    if src_cfg.epochs is not None:
        caps.append(math.floor(exact(src_cfg.epochs) * windows))
    if src_cfg.max_samples is not None:
        caps.append(int(src_cfg.max_samples))
    if not caps:
        return None
    cap = min(caps)
    if cap < 1:
        raise ConfigError(
            f"data.sources.{name}.epochs={src_cfg.epochs!r} is invalid: expected a cap of at least "
            f"one sample (the source has {windows} windows per epoch)"
        )
    return cap


class MixtureLoader(BatchSource):
    """This rank's per-step batches of the replay-aware mixture (a `cptron.data.interface.BatchSource`).

    Ledger: `last_samples` holds the `SampleRef` of each row of the last batch;
    `describe(ref)` lists the document pieces of a sample.
    """

    packs_documents = True
    """Rows hold several documents; Batch.doc_ids tells them apart (for document masking)."""

    @property
    def source_names(self) -> list[str]:
        """Names of the sources, in the order Batch.sources indexes them."""
        return list(self.names)

    def __init__(
        self,
        cfg: DataConfig,
        sources: dict[str, SourceIndex],
        *,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        total_steps: Optional[int] = None,
    ):
        self.cfg, self.seq_len, self.global_batch_size = cfg, int(seq_len), int(global_batch_size)
        self.rows = dp_slice(self.global_batch_size, dp_rank, dp_size)
        self.seed = int(seed)
        self.names = sorted(sources)
        self.sources = [sources[n] for n in self.names]
        self.windows = [s.windows_per_epoch for s in self.sources]
        self.caps = [_cap(cfg.sources[n], w, n) for n, w in zip(self.names, self.windows)]
        natural = {n: (c if c is not None else w) for n, c, w in zip(self.names, self.caps, self.windows)}
        self.stages = resolve_stages(cfg, natural, total_steps)
        if total_steps is not None and all(c is not None for c in self.caps):
            need, have = int(total_steps) * self.global_batch_size, sum(self.caps)
            if need > have:
                raise ConfigError(
                    f"data.sources: their caps (epochs/max_samples) allow {have} samples, but "
                    f"{total_steps} steps of {self.global_batch_size} need {need}: expected "
                    "larger caps or a source without a cap"
                )
        self._replay_sources = set(cfg.replay.sources)
        self._config = {
            "seq_len": self.seq_len,
            "seed": self.seed,
            "mixture": mixture_description(cfg),
            "stages": stages_description(cfg),
        }
        data = {n: s.data_fingerprint for n, s in zip(self.names, self.sources)}
        self._fingerprints = {
            "data": _digest([self.seq_len, self.seed, data]),
            "mixture": _digest(self._config["mixture"]),
            "stages": _digest(self._config["stages"]),
        }
        self._shares_cache: dict[tuple, tuple[str, list[Fraction]]] = {}
        self.step = 0
        self.consumed_samples = 0
        self.positions = [0] * len(self.names)
        self._segment_key: Optional[str] = None
        self._segment_start = 0
        self._scheduler: Optional[QuotaScheduler] = None
        self._pending_counts: Optional[list[int]] = None  # a restored segment's counts, used by the next step
        self._stage_index = self.stages[0].index
        self._last: Optional[tuple] = None

    # ------------------------------------------------------------ mixture bookkeeping

    def _active(self) -> tuple[bool, ...]:
        return tuple(c is None or p < c for p, c in zip(self.positions, self.caps))

    def _stage_shares(self, stage, live: set[str], where: str) -> Optional[dict[str, Fraction]]:
        """The share of each source under `stage` when only the `live` sources may give samples; None
        when none of them can (the callers say why, in their own terms)."""
        try:
            return shares(stage.weights, stage.replay_fraction, self._replay_sources, active=live, where=where)
        except CptronError:
            return None

    def _shares_for(self, step: int) -> tuple[str, list[Fraction], int]:
        stage = stage_at(self.stages, step)
        active = self._active()
        cache_key = (stage.index, active)
        if cache_key not in self._shares_cache:
            live = {n for n, a in zip(self.names, active) if a}
            table = self._stage_shares(stage, live, f"data (stage {stage.index}, step {step})")
            if table is None:
                done = [f"{n} (cap {c})" for n, a, c in zip(self.names, active, self.caps) if not a]
                raise CptronError(
                    f"data: no samples left at step {step}: sources {done} reached their caps "
                    f"(epochs/max_samples) and the others have weight 0 in stage {stage.index}; "
                    "raise the caps or give an uncapped source a weight"
                ) from None
            values = [table[n] for n in self.names]
            self._shares_cache[cache_key] = (format_shares(self.names, values), values)
        key, values = self._shares_cache[cache_key]
        return key, values, stage.index

    def _sync_segment(self, step: int) -> None:
        """Start a new segment when the shares in force differ from the current segment's."""
        key, values, stage_index = self._shares_for(step)
        self._stage_index = stage_index
        if key != self._segment_key or self._scheduler is None:
            counts = None
            if key == self._segment_key and self._pending_counts is not None:
                counts = self._pending_counts  # a restored segment continues
            else:
                self._segment_start = self.consumed_samples
            self._scheduler = QuotaScheduler(values, counts)
            self._segment_key = key
        self._pending_counts = None

    def _schedule(self) -> tuple[list[int], list[int]]:
        """Source index and source position of every row of the next global batch; advances the state."""
        src, pos = [], []
        self._sync_segment(self.step)
        for _ in range(self.global_batch_size):
            i = self._scheduler.next()
            src.append(i)
            pos.append(self.positions[i])
            self.positions[i] += 1
            self.consumed_samples += 1
            if self.caps[i] is not None and self.positions[i] == self.caps[i]:
                self._sync_segment(self.step)  # the source is done: the others share its part
        self.step += 1
        return src, pos

    def expected_epochs(self, total_steps: int) -> dict[str, int]:
        """How many epochs of each source `total_steps` steps reach (at most PREBUILT_EPOCHS), assuming no
        cap runs out; an underestimate only means an epoch is built when first reached."""
        need = [0] * len(self.names)
        for k, stage in enumerate(self.stages):
            end = self.stages[k + 1].start_step if k + 1 < len(self.stages) else total_steps
            samples = max(0, min(end, total_steps) - stage.start_step) * self.global_batch_size
            if samples:
                table = shares(stage.weights, stage.replay_fraction, self._replay_sources)
                for i, name in enumerate(self.names):
                    need[i] += math.ceil(table[name] * samples) + 1
        out = {}
        for name, n, cap, w in zip(self.names, need, self.caps, self.windows):
            n = n if cap is None else min(n, cap)
            out[name] = max(1, min(PREBUILT_EPOCHS, -(-n // w)))
        return out

    def plan(self, total_steps: int) -> list[dict[str, Any]]:
        """What the rest of the run (from the current step to `total_steps`) takes from each source.

        One entry per stretch of constant shares: a stage, split where a capped source runs out.
        Each has "stage", "start_step", "end_step", "shares" {name: Fraction}, "samples"
        {name: Fraction} and "ran_out" (the capped sources whose last sample ends the stretch);
        the interleave delivers each count to within one sample.
        """
        left = [None if c is None else Fraction(c - p) for c, p in zip(self.caps, self.positions)]
        out = []
        for k, stage in enumerate(self.stages):
            end = min(self.stages[k + 1].start_step if k + 1 < len(self.stages) else total_steps, total_steps)
            at = Fraction(max(stage.start_step, self.step) * self.global_batch_size)
            stop = Fraction(end * self.global_batch_size)
            while at < stop:
                live = {n for n, r in zip(self.names, left) if r is None or r > 0}
                table = self._stage_shares(stage, live, f"data (stage {stage.index})")
                if table is None:
                    done = [
                        f"{n} (cap {c})" for n, r, c in zip(self.names, left, self.caps) if r is not None and r <= 0
                    ]
                    raise CptronError(
                        f"data: the mixture runs out of samples at step {_step(float(at / self.global_batch_size))} "
                        f"of {total_steps}: {', '.join(done)} reach their caps (epochs/max_samples) and the other "
                        f"sources have weight 0 in stage {stage.index}; raise the caps, lower training.steps or give "
                        "an uncapped source a weight"
                    ) from None
                span = stop - at
                for n, r in zip(self.names, left):  # the first capped source to run out ends the stretch
                    if r is not None and r > 0 and table[n] > 0:
                        span = min(span, r / table[n])
                samples = {n: table[n] * span for n in self.names}
                for i, n in enumerate(self.names):
                    if left[i] is not None:
                        left[i] = max(Fraction(0), left[i] - samples[n])
                ran_out = [
                    n for i, n in enumerate(self.names) if left[i] is not None and left[i] == 0 and samples[n] > 0
                ]
                out.append(
                    {
                        "stage": stage.index,
                        "start_step": float(at / self.global_batch_size),
                        "end_step": float((at + span) / self.global_batch_size),
                        "shares": table,
                        "samples": samples,
                        "ran_out": ran_out,
                    }
                )
                at += span
        return out

    def describe_plan(self, total_steps: int) -> str:
        """A table of the sources and of what the rest of the run takes from each (for the log)."""
        rows = [
            f"data: {len(self.names)} source(s), {self.global_batch_size} samples of seq_len + 1 = "
            f"{self.seq_len + 1} tokens per step, steps {self.step}..{total_steps}"
        ]
        width = max(len(n) for n in self.names)
        for name, source, w, cap in zip(self.names, self.sources, self.windows, self.caps):
            meta = source.meta or {}
            rows.append(
                f"  {name:<{width}}  {len(source.prefixes)} shard(s), {meta.get('train_documents', 0):,} "
                f"documents, {meta.get('train_tokens', 0):,} tokens = {w:,} samples per epoch"
                + (f", capped at {cap:,}" if cap is not None else "")
                + (f"; {meta['validation_documents']:,} held out" if meta.get("validation_documents") else "")
            )
        total = dict.fromkeys(self.names, Fraction(0))
        for part in self.plan(total_steps):
            total = {n: total[n] + part["samples"][n] for n in self.names}
            mix = ", ".join(f"{n} {float(part['shares'][n]):.1%}" for n in self.names)
            ends = f"; {', '.join(part['ran_out'])} reach(es) the cap" if part["ran_out"] else ""
            rows.append(
                f"  steps {_step(part['start_step'])}..{_step(part['end_step'])} (stage {part['stage']}): {mix}{ends}"
            )
        for name, p, w in zip(self.names, self.positions, self.windows):
            n = float(total[name])
            rows.append(
                f"  {name:<{width}}  ~{n:,.0f} more samples; {(p + n) / w:.2f} epochs of it by the end"
                + (" (repeats data)" if p + n > w else "")
            )
        return "\n".join(rows)

    def drawn(self) -> dict[str, dict[str, float]]:
        """Samples drawn from each source so far (global, from the positions: exact under resume), the
        tokens they train on (seq_len each) and the epochs of the source they amount to."""
        return {
            n: {"samples": p, "tokens": p * self.seq_len, "epochs": p / w}
            for n, p, w in zip(self.names, self.positions, self.windows)
        }

    @property
    def current_shares(self) -> dict[str, float]:
        """Share of each source in the mixture for the next step (for logging)."""
        _, values, _ = self._shares_for(self.step)
        return {n: float(v) for n, v in zip(self.names, values)}

    # ------------------------------------------------------------ batches

    def __iter__(self) -> Iterator[Batch]:
        return self

    def _snapshot(self) -> tuple:
        scheduler = None if self._scheduler is None else self._scheduler.copy()
        return (
            self.step,
            self.consumed_samples,
            list(self.positions),
            self._segment_key,
            self._segment_start,
            scheduler,
            self._pending_counts,
            self._stage_index,
        )

    def _restore(self, snap: tuple) -> None:
        (
            self.step,
            self.consumed_samples,
            self.positions,
            self._segment_key,
            self._segment_start,
            self._scheduler,
            self._pending_counts,
            self._stage_index,
        ) = snap

    def __next__(self) -> Batch:
        # A failed step (an unreadable shard, no samples left) leaves the state as it was: nothing is
        # counted as consumed that was not delivered.
        snap = self._snapshot()
        try:
            return self._next_batch()
        except BaseException:
            self._restore(snap)
            raise

    def _next_batch(self) -> Batch:
        first = self.consumed_samples
        src, pos = self._schedule()
        lo, hi = self.rows
        n_rows, span = hi - lo, self.seq_len + 1
        tokens = np.empty((n_rows, span), dtype=np.int64)
        doc_ids = np.empty((n_rows, self.seq_len), dtype=np.int64)
        src_rows = np.asarray(src[lo:hi], dtype=np.int64)
        pos_rows = np.asarray(pos[lo:hi], dtype=np.int64)
        windows_per_epoch = np.asarray(self.windows, dtype=np.int64)[src_rows]
        epochs, ks = pos_rows // windows_per_epoch, pos_rows % windows_per_epoch
        windows = np.empty(n_rows, dtype=np.int64)
        for i, epoch in sorted({(int(i), int(e)) for i, e in zip(src_rows, epochs)}):
            rows = np.flatnonzero((src_rows == i) & (epochs == epoch))
            source, index = self.sources[i], self.sources[i].epoch(epoch)
            windows[rows] = index.window_of(ks[rows])
            source.read(index, windows[rows], tokens, doc_ids, None if len(rows) == n_rows else rows)
        self._last = (first + lo, src_rows, epochs, ks, windows)
        return batch_from_windows(tokens, doc_ids, src_rows)

    @property
    def last_samples(self) -> list[SampleRef]:
        """The ledger of the last batch: one SampleRef per row of this rank's slice."""
        if self._last is None:
            return []
        start, src, epochs, ks, windows = self._last
        return [
            SampleRef(start + r, self.names[i], e, k, w)
            for r, (i, e, k, w) in enumerate(zip(src.tolist(), epochs.tolist(), ks.tolist(), windows.tolist()))
        ]

    def describe(self, ref: SampleRef) -> list[Piece]:
        """The document pieces of sample `ref`, in order (they add up to seq_len + 1 tokens)."""
        i = self.names.index(ref.source)
        source = self.sources[i]
        p = source.pieces(source.epoch(ref.epoch), np.array([ref.window]))
        return [
            Piece(ref.source, d, source.prefixes[s], q, o, n)
            for d, s, q, o, n in zip(
                p["doc"].tolist(),
                p["shard"].tolist(),
                p["shard_doc"].tolist(),
                p["offset"].tolist(),
                p["length"].tolist(),
            )
        ]

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        counts = self._scheduler.counts if self._scheduler is not None else None
        if counts is None and self._pending_counts is not None:
            counts = self._pending_counts
        return {
            "kind": "mixture",
            "format": STATE_FORMAT,
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "stage": self._stage_index,
            "fingerprint": dict(self._fingerprints),
            "config": self._config,
            "segment": {
                "start": self._segment_start,
                "shares": self._segment_key,
                "counts": None if counts is None else dict(zip(self.names, counts)),
            },
            "sources": {
                n: {
                    "position": p,
                    "epoch": p // w,
                    "exhausted": c is not None and p >= c,
                    "data_fingerprint": s.data_fingerprint,
                }
                for n, p, w, c, s in zip(self.names, self.positions, self.windows, self.caps, self.sources)
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != "mixture" or state.get("format") != STATE_FORMAT:
            raise CptronError(
                f"data state was not saved by the mixture loader (format {STATE_FORMAT}): "
                f"kind={state.get('kind') if isinstance(state, dict) else state!r}"
            )
        try:
            self._load_state(state)
        except CptronError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CptronError(
                f"data state is malformed ({type(e).__name__}: {e}): expected what MixtureLoader.state_dict() returns"
            ) from e

    def _load_state(self, state: dict[str, Any]) -> None:
        # Everything is checked before anything is assigned: a refused state leaves the loader as it was.
        old = state["config"]
        for key in ("seq_len", "seed"):
            if old[key] != self._config[key]:
                raise CptronError(
                    f"data: {key} changed since the checkpoint ({old[key]} -> {self._config[key]}): "
                    "every source's sample order depends on it, so the run cannot continue"
                )
        saved = state["sources"]
        for n, s in zip(self.names, self.sources):
            if n in saved and saved[n]["data_fingerprint"] != s.data_fingerprint:
                raise CptronError(
                    f"data.sources.{n}: its shards or held-out split changed since the checkpoint (data "
                    f"fingerprint {saved[n]['data_fingerprint']} -> {s.data_fingerprint}, shards {s.prefixes[:3]}"
                    f"{'...' if len(s.prefixes) > 3 else ''}): its sample order cannot continue; restore the "
                    "data or rename the source to start it afresh"
                )
        if old["mixture"] != self._config["mixture"]:
            diff = _differences(old["mixture"], self._config["mixture"])
            if not self.cfg.allow_mixture_change:
                raise CptronError(
                    f"data mixture changed since the checkpoint: {'; '.join(diff)}. Set "
                    "data.allow_mixture_change=true to continue every source from its position "
                    "with the new mixture"
                )
            log.warning(
                "data mixture changed since the checkpoint (%s); continuing each source from its "
                "position (allow_mixture_change)",
                "; ".join(diff),
            )
        if old["stages"] != self._config["stages"]:
            log.info("data stages changed since the checkpoint; the new schedule applies from step %d", state["step"])
        positions = [int(saved[n]["position"]) if n in saved else 0 for n in self.names]
        seg, counts = state["segment"], state["segment"]["counts"]
        pending = [int(counts[n]) for n in self.names] if counts is not None and list(counts) == self.names else None
        values = (
            int(state["step"]),
            int(state["consumed_samples"]),
            positions,
            seg["shares"] if pending is not None else None,
            int(seg["start"]),
            None,
            pending,
            int(state["stage"]),
        )
        self._restore(values)
        self._last = None


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{sub} added")
            elif k not in new:
                out.append(f"{sub} removed")
            else:
                out += _differences(old[k], new[k], sub)
        return out
    return [] if old == new else [f"{path} {old!r} -> {new!r}"]


__all__ = ["MixtureLoader", "SampleRef", "Piece"]
