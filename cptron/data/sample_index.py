"""Per-source sample indices: held-out split, shuffled document order, packed windows, and their cache layout.

A source is the concatenation of its shards' documents; document g of a source is
document g - start[k] of its shard k. A document is Megatron's: the sequences
between two document indices (one sequence per document in what `cptron data
tokenize` and Megatron's preprocessing write without sentence splitting; several
with `--split-sentences`), read as one run of tokens, since writers put a
document's sequences back to back.

Training stream of a source, epoch e: its training documents (not held out, not
empty) in an order shuffled by (seed, source, e), concatenated; window j covers
tokens [j * T, j * T + T + 1) of that stream (T = seq_len), so consecutive
windows share one token and every token but the first is a label exactly once
per epoch. The last partial window of an epoch is dropped (fewer than T tokens).
Samples take the windows in a second shuffled order, so that the windows of one
long document do not land in the same batch: sample (source, epoch, k) is window
perm_e[k].

The shuffles and the held-out split are seeded hashes (`cptron.data.shuffle`).

Cache layout, per source: `<cache>/<source>-<fingerprint>/` holds `source.json`
(sizes), `epoch-NNNNN.npy` and `validation.npy`: the bytes of an int64 header,
the document order, the D + 1 int64 document offsets and the window order
(int32 ids where they fit; see `pack`). The files are written atomically and
built by one process under a lock (`cptron.data.index_cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

from cptron.data.index_cache import CacheWriteError, atomic_save, atomic_write_json, load_or_build
from cptron.data.indexed import IndexedDataset, bin_path
from cptron.data.shuffle import held_out_mask, permutation, seed_words
from cptron.errors import ConfigError, CptronError

log = logging.getLogger("cptron.data")

INDEX_FORMAT = 2

_HEADER_WORDS = 4  # int64: documents, windows, bytes per document id, bytes per window id (0: no window order)


@dataclass
class PackedIndex:
    """One epoch's (or the validation set's) packing: documents in order, their offsets, the window order."""

    order: np.ndarray
    """Source document ids in stream order (int32 when they fit, else int64)."""
    offsets: np.ndarray
    """Token offset of each document in the stream, and the stream's length last (D + 1 entries, int64)."""
    windows: int
    """Number of windows."""
    perm: Optional[np.ndarray]
    """Sample k of the epoch is window perm[k] (int32 when they fit); None (validation): window k."""

    def window_of(self, k: np.ndarray) -> np.ndarray:
        """Window ids of the epoch's samples `k`."""
        k = np.asarray(k, dtype=np.int64)
        return k if self.perm is None else self.perm[k].astype(np.int64)

    @staticmethod
    def from_bytes(raw: np.ndarray, path: str) -> PackedIndex:
        """Views into `raw` (the uint8 array `pack` returns, usually memory-mapped)."""
        raw = raw.view(np.ndarray)  # plain views: indexing an np.memmap costs microseconds of Python each time
        at = 8 * _HEADER_WORDS
        d, w, id_bytes, perm_bytes = (int(v) for v in raw[:at].view(np.int64)) if len(raw) >= at else (-1,) * 4
        ok = d >= 0 and w >= 0 and id_bytes in (4, 8) and perm_bytes in (0, 4, 8)
        if not ok or len(raw) != at + _pad8(d * id_bytes) + 8 * (d + 1) + _pad8(w * perm_bytes):
            raise CptronError(
                f"sample index {path} is corrupt: {len(raw)} bytes do not match its header "
                f"({d} documents, {w} windows, {id_bytes}/{perm_bytes}-byte ids)"
            )
        order = raw[at : at + d * id_bytes].view(_int_of(id_bytes))
        at += _pad8(d * id_bytes)
        offsets = raw[at : at + 8 * (d + 1)].view(np.int64)
        at += 8 * (d + 1)
        perm = raw[at : at + w * perm_bytes].view(_int_of(perm_bytes)) if perm_bytes else None
        return PackedIndex(order, offsets, w, perm)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _int_of(width: int) -> type:
    return np.int32 if width == 4 else np.int64


def pack(
    doc_ids: Optional[np.ndarray],
    lengths: np.ndarray,
    seq_len: int,
    doc_seed: np.ndarray,
    window_seed: Optional[np.ndarray],
) -> np.ndarray:
    """Documents `doc_ids` (with `lengths`; None: all of range(len(lengths))) in an order shuffled under
    `doc_seed`, and (with `window_seed`) an order of their windows, as the bytes (uint8) of: an int64
    header [D, W, id bytes, window-id bytes], the ids, the D + 1 int64 offsets, the window order;
    ids are int32 when they fit, and each part is padded to 8 bytes."""
    d = len(lengths)
    largest = d - 1 if doc_ids is None else (int(doc_ids.max()) if d else 0)
    id_bytes = 4 if largest < 2**31 else 8
    windows = max(int(lengths.sum(dtype=np.int64)) - 1, 0) // seq_len
    perm_bytes = 0 if window_seed is None else (4 if windows <= 2**31 else 8)
    at = 8 * _HEADER_WORDS
    out = np.zeros(at + _pad8(d * id_bytes) + 8 * (d + 1) + _pad8(windows * perm_bytes), dtype=np.uint8)
    out[:at].view(np.int64)[:] = [d, windows, id_bytes, perm_bytes]
    pos = permutation(d, doc_seed)
    out[at : at + d * id_bytes].view(_int_of(id_bytes))[:] = pos if doc_ids is None else doc_ids[pos]
    at += _pad8(d * id_bytes)
    np.cumsum(np.take(lengths, pos), dtype=np.int64, out=out[at + 8 : at + 8 * (d + 1)].view(np.int64))
    at += 8 * (d + 1)
    if perm_bytes:
        out[at : at + windows * perm_bytes].view(_int_of(perm_bytes))[:] = permutation(windows, window_seed)
    return out


_CHUNK = 1 << 22


def _one_sequence_per_document(shard: IndexedDataset) -> bool:
    """True when the document indices are 0, 1, ..., n (checked in chunks: no O(n) temporaries)."""
    docs = shard.document_indices
    if shard.num_documents != len(shard):
        return False
    for lo in range(0, len(docs), _CHUNK):
        hi = min(lo + _CHUNK, len(docs))
        if not np.array_equal(docs[lo:hi], np.arange(lo, hi, dtype=docs.dtype)):
            return False
    return True


def document_spans(shard: IndexedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(token counts, element offsets of the first tokens) of the shard's documents (int64). Raises
    CptronError naming the shard if a document's sequences are not back to back in the .bin (no known
    writer does that; the loader reads a document as one run of tokens)."""
    lengths = shard.sequence_lengths.astype(np.int64)
    starts = shard.sequence_pointers // shard.dtype.itemsize
    bounds = shard.document_indices.astype(np.int64)
    n = len(lengths)
    within = np.ones(max(n - 1, 0), dtype=bool)  # pair (i, i + 1) lies inside one document
    inner = bounds[(bounds > 0) & (bounds < n)]
    within[inner - 1] = False
    gaps = np.flatnonzero(within & (starts[1:] != starts[:-1] + lengths[:-1])) if n > 1 else np.empty(0, int)
    if len(gaps):
        i = int(gaps[0])
        doc = int(np.searchsorted(bounds, i, side="right") - 1)
        raise CptronError(
            f"{shard.path_prefix}: document {doc} is not stored contiguously (its sequence {i + 1} "
            f"starts at token {int(starts[i + 1])}, not right after sequence {i} at "
            f"{int(starts[i] + lengths[i])}); rewrite the shard, e.g. with cptron data tokenize"
        )
    cumulative = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cumulative[1:])
    doc_lengths = cumulative[bounds[1:]] - cumulative[bounds[:-1]]
    doc_starts = np.zeros(len(doc_lengths), dtype=np.int64)
    nonempty = bounds[1:] > bounds[:-1]
    doc_starts[nonempty] = starts[bounds[:-1][nonempty]]
    return doc_lengths, doc_starts


class SourceIndex:
    """The shards of one source, its fingerprint, and its cached per-epoch and validation indices."""

    def __init__(
        self,
        name: str,
        prefixes: list[str],
        *,
        seq_len: int,
        seed: int,
        held_out_fraction: Fraction,
        cache_dir: Optional[str],
    ):
        self.name, self.prefixes, self.seq_len, self.seed = name, prefixes, int(seq_len), int(seed)
        self.held_out_fraction = Fraction(held_out_fraction)
        self.shards = [IndexedDataset(p) for p in prefixes]
        self._itemsize = [s.dtype.itemsize for s in self.shards]
        self._views: Optional[list[np.ndarray]] = None
        # Shards whose documents span several sequences; their (token counts, first-token element
        # offsets) per document are built once into the cache and memory-mapped (`_spans`). Elsewhere
        # the index's own arrays serve, without a copy.
        self._multi = [not _one_sequence_per_document(s) for s in self.shards]
        self._documents: dict[int, np.ndarray] = {}
        counts = np.array([s.num_documents for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_documents = int(self.shard_starts[-1])
        self.data_fingerprint = self._fingerprint()
        root = (
            cache_dir
            if cache_dir is not None
            else os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), ".cptron-index")
        )
        self.dir = os.path.join(root, f"{name}-{self.data_fingerprint[:16]}")
        self.meta: Optional[dict] = None
        self._split_memo: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None
        self._split_lock = threading.Lock()
        self._epochs: dict[int, PackedIndex] = {}

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([INDEX_FORMAT, self.name, self.seq_len, self.seed, str(self.held_out_fraction)]).encode())
        for shard, multi in zip(self.shards, self._multi):  # content identity, not paths: moved data keeps
            # its cache and its run state
            h.update(json.dumps([len(shard), shard.num_tokens, shard.dtype.name, shard.tokenizer_fingerprint]).encode())
            h.update(memoryview(np.ascontiguousarray(shard.sequence_lengths)))
            if multi:  # the grouping into documents decides the packing
                h.update(b"documents")
                h.update(memoryview(np.ascontiguousarray(shard.document_indices)))
        return h.hexdigest()

    def _spans(self, k: int) -> Optional[np.ndarray]:
        """[token counts, first-token element offsets] (int64, 2 x documents) of shard k's documents,
        memory-mapped from the cache (built there by the first process to need it); None when each of
        its documents is one sequence."""
        if not self._multi[k]:
            return None
        spans = self._documents.get(k)
        if spans is None:
            self._ensure_dir()
            path = self._path(f"documents-{k:05d}.npy")

            def build() -> None:
                lengths, starts = document_spans(self.shards[k])
                atomic_save(path, np.stack([lengths, starts]))

            load_or_build(path, build)
            spans = np.load(path, mmap_mode="r").view(np.ndarray)
            if spans.shape != (2, self.shards[k].num_documents):
                raise CptronError(
                    f"document index {path} has shape {spans.shape}, expected "
                    f"(2, {self.shards[k].num_documents}); delete {self.dir} to rebuild"
                )
            self._documents[k] = spans
        return spans

    def document_lengths(self, k: int) -> np.ndarray:
        """Token counts of shard k's documents."""
        spans = self._spans(k)
        return self.shards[k].sequence_lengths if spans is None else spans[0]

    # ------------------------------------------------------------ building (one process)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise CptronError naming the shard, its largest token id and `vocab_size` if an id is >= vocab_size.
        The largest ids are the scanned ones recorded in the cache (source.json, after prepare_meta), so the
        tokens are read once per source, never per step, and a sidecar understating them cannot hide them."""
        path, meta = self._path("source.json"), {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                meta = json.load(fh)
        largest = meta.get("shard_max_token_ids")
        if not isinstance(largest, list) or len(largest) != len(self.shards):
            # a cache written before the scan existed: scan now, and record it for the next run
            largest = self._scan_max_token_ids()
            if meta:
                atomic_write_json(path, {**meta, "shard_max_token_ids": largest, "max_token_id": max(largest)})
        for shard, real in zip(self.shards, largest):
            if real >= vocab_size:
                side = (shard.sidecar or {}).get("max_token_id")
                claim = f" (its sidecar says max_token_id={side})" if side not in (None, real) else ""
                raise CptronError(
                    f"{bin_path(shard.path_prefix)} holds token id {real} >= vocab_size={vocab_size} of the "
                    f"model{claim}; was it tokenized with another tokenizer?"
                )

    def _scan_max_token_ids(self) -> list[int]:
        return [shard.scan_max_token_id() for shard in self.shards]

    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lengths of all documents, training document ids, held-out document ids); kept while building."""
        with self._split_lock:  # epochs of one source may be built on several threads
            if self._split_memo is None:
                lengths = np.concatenate([self.document_lengths(k) for k in range(len(self.shards))])
                if self.held_out_fraction > 0:
                    ids = np.arange(len(lengths), dtype=np.int64)
                    held = held_out_mask(ids, self.held_out_fraction, self.seed, self.name)
                    train, val = ids[~held & (lengths > 0)], ids[held & (lengths > 0)]
                else:
                    train, val = np.flatnonzero(lengths > 0), np.empty(0, dtype=np.int64)
                self._split_memo = lengths, train, val
            return self._split_memo

    def _path(self, what: str) -> str:
        return os.path.join(self.dir, what)

    def _build_meta(self) -> None:
        lengths, train, val = self._split()
        train_tokens = int((lengths if len(train) == len(lengths) else lengths[train]).sum(dtype=np.int64))
        val_tokens = int(lengths[val].sum(dtype=np.int64))
        largest = self._scan_max_token_ids()
        meta = {
            "format": INDEX_FORMAT,
            "source": self.name,
            "fingerprint": self.data_fingerprint,
            "shards": [os.path.basename(p) for p in self.prefixes],
            "seq_len": self.seq_len,
            "train_documents": int(len(train)),
            "train_tokens": train_tokens,
            "windows": max(train_tokens - 1, 0) // self.seq_len,
            "validation_documents": int(len(val)),
            "validation_tokens": val_tokens,
            "validation_windows": max(val_tokens - 1, 0) // self.seq_len,
            "shard_max_token_ids": largest,
            "max_token_id": max(largest),
        }
        atomic_write_json(self._path("source.json"), meta)

    def _build_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        lengths, train, _ = self._split()
        everything = len(train) == len(lengths)  # nothing held out or empty: skip two gathers
        raw = pack(
            None if everything else train,
            lengths if everything else lengths[train],
            self.seq_len,
            seed_words("documents", self.seed, self.name, epoch),
            seed_words("windows", self.seed, self.name, epoch),
        )
        atomic_save(self._path(f"epoch-{epoch:05d}.npy"), raw)
        log.info(
            "built sample index of source %s epoch %d (%d documents) in %.2f s",
            self.name,
            epoch,
            len(train),
            time.perf_counter() - t0,
        )

    def _build_validation(self) -> None:
        lengths, _, val = self._split()
        raw = pack(val, lengths[val], self.seq_len, seed_words("validation", self.seed, self.name), None)
        atomic_save(self._path("validation.npy"), raw)

    def _ensure_dir(self) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise CptronError(
                f"cannot create the sample-index cache {self.dir} for source {self.name}: "
                f"{e.strerror or e}; set data.cache_dir to a writable directory"
            ) from e

    def prepare_meta(self) -> None:
        """Build what is missing of the sizes (source.json) and the validation index."""
        self._ensure_dir()
        load_or_build(self._path("source.json"), self._build_meta)
        if self.held_out_fraction > 0:
            load_or_build(self._path("validation.npy"), self._build_validation)

    def prepare_epoch(self, epoch: int) -> None:
        """Build epoch `epoch`'s index if it is missing (safe to call from several threads at once)."""
        load_or_build(self._path(f"epoch-{epoch:05d}.npy"), lambda: self._build_epoch(epoch))

    def release(self) -> None:
        """Drop what building needed: O(documents) memory."""
        self._split_memo = None

    def prepare(self, epochs=(0,)) -> None:
        """Build what is missing of the sizes, the validation index and `epochs`."""
        try:
            self.prepare_meta()
            for epoch in epochs:
                self.prepare_epoch(epoch)
        finally:
            self.release()

    def _open_packed(self, path: str, build: Callable[[], None]) -> PackedIndex:
        """The index file at `path`, memory-mapped; built if missing, rebuilt once if a crash left it short."""
        self._ensure_dir()
        for attempt in (0, 1):
            try:
                load_or_build(path, build)
                return PackedIndex.from_bytes(np.load(path, mmap_mode="r"), path)
            except CacheWriteError:  # a full disk: a rebuild would fail the same way
                raise
            except (CptronError, ValueError, EOFError) as e:  # np.load: ValueError/EOFError on a cut header
                if attempt:
                    raise CptronError(f"sample index {path} is unreadable after a rebuild: {e}") from e
                log.warning("rebuilding the unreadable sample index %s: %s", path, e)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            finally:
                self._split_memo = None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ reading (every process)

    def load(self) -> None:
        """Read the sizes (building what is missing, e.g. in a node-local cache) and check them."""
        self.prepare()
        self.load_meta()

    def load_meta(self) -> None:
        """Read the sizes from the cache and check them."""
        path = self._path("source.json")
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
        if meta.get("fingerprint") != self.data_fingerprint or meta.get("format") != INDEX_FORMAT:
            raise CptronError(f"sample-index cache {path} belongs to other data; delete {self.dir}")
        self.meta = meta
        if meta["windows"] < 1:
            raise ConfigError(
                f"data.sources.{self.name} is empty: its training documents hold {meta['train_tokens']} tokens "
                f"in {meta['train_documents']} documents ({self.num_documents} in {len(self.prefixes)} shards "
                f"{self.prefixes[:3]}{'...' if len(self.prefixes) > 3 else ''}), fewer than one window of "
                f"seq_len + 1 = {self.seq_len + 1} tokens"
            )

    @property
    def windows_per_epoch(self) -> int:
        return int(self.meta["windows"])

    def epoch(self, epoch: int) -> PackedIndex:
        """Epoch `epoch`'s index, memory-mapped (built on first use)."""
        index = self._epochs.get(epoch)
        if index is None:
            path = self._path(f"epoch-{epoch:05d}.npy")
            index = self._open_packed(path, lambda: self._build_epoch(epoch))
            if index.windows != self.windows_per_epoch:
                raise CptronError(
                    f"sample index {path} has {index.windows} windows, expected "
                    f"{self.windows_per_epoch}; delete {self.dir} to rebuild"
                )
            if len(self._epochs) >= 2:  # keep the current epoch and the one before
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = index
        return index

    def validation(self) -> PackedIndex:
        return self._open_packed(self._path("validation.npy"), self._build_validation)

    def _token_views(self) -> list[np.ndarray]:
        """Each shard's whole .bin as one read-only typed array (memory-mapped once, on first read)."""
        if self._views is None:
            views = []
            for shard in self.shards:
                path = bin_path(shard.path_prefix)
                n = os.path.getsize(path) // shard.dtype.itemsize
                # a plain ndarray view: slicing an np.memmap costs microseconds of Python per slice
                views.append(
                    np.memmap(path, dtype=shard.dtype, mode="r", shape=(n,)).view(np.ndarray)
                    if n
                    else np.empty(0, dtype=shard.dtype)
                )
            self._views = views
        return self._views

    def locate(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, document index within the shard) of source document ids `docs`."""
        shard = np.searchsorted(self.shard_starts, docs, side="right") - 1
        return shard, docs - self.shard_starts[shard]

    def pieces(self, index: PackedIndex, windows: np.ndarray) -> dict[str, np.ndarray]:
        """The document pieces that make up `windows` (window ids of `index`), as flat arrays in row order:
        row, doc, shard, shard_doc (the document's index within its shard), offset, length, and k (the
        piece's number within its row)."""
        span = self.seq_len + 1
        starts = np.asarray(windows, dtype=np.int64) * self.seq_len
        offsets = index.offsets
        first = np.searchsorted(offsets, starts, side="right") - 1  # the document holding the window's first token
        counts = np.searchsorted(offsets, starts + self.seq_len, side="right") - first  # ... through its last
        row = np.repeat(np.arange(len(starts)), counts)
        k = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
        j = first[row] + k
        doc_start, doc_end = offsets[j], offsets[j + 1]
        lo = np.maximum(doc_start, starts[row])
        hi = np.minimum(doc_end, starts[row] + span)
        doc = index.order[j]
        shard, shard_doc = self.locate(doc)
        return {
            "row": row,
            "doc": doc,
            "shard": shard,
            "shard_doc": shard_doc,
            "offset": lo - doc_start,
            "length": hi - lo,
            "k": k,
        }

    def read(
        self,
        index: PackedIndex,
        windows: np.ndarray,
        tokens_out: np.ndarray,
        doc_ids_out: np.ndarray,
        rows: Optional[np.ndarray] = None,
    ) -> None:
        """Write `windows` (window ids of `index`) into rows `rows` (default: all, in order) of `tokens_out`
        ([batch, seq_len + 1]) and their per-token document numbers (0 at the row's first document, +1 at each
        boundary) into the same rows of `doc_ids_out`, which holds the first doc_ids_out.shape[1] positions."""
        span = self.seq_len + 1
        p = self.pieces(index, windows)
        lengths = p["length"]
        if int(lengths.sum()) != len(windows) * span:
            raise CptronError(
                f"source {self.name}: windows hold {int(lengths.sum())} tokens, expected "
                f"{len(windows) * span} (a corrupt sample index?)"
            )
        # Source element offsets, vectorized per shard, and destination offsets in the flat batch,
        # so that the loop below only copies: one slice assignment per piece.
        shard = p["shard"]
        starts = np.empty(len(shard), dtype=np.int64)
        for k in np.unique(shard) if len(self.shards) > 1 else (0,):
            sel = shard == k if len(self.shards) > 1 else slice(None)
            spans, docs = self._spans(k), p["shard_doc"][sel]
            first = self.shards[k].sequence_pointers[docs] // self._itemsize[k] if spans is None else spans[1][docs]
            starts[sel] = first + p["offset"][sel]
        row_of_piece = p["row"] if rows is None else np.asarray(rows, dtype=np.int64)[p["row"]]
        within = np.cumsum(lengths) - lengths - (p["row"] * span)
        dest = row_of_piece * span + within
        views, flat = self._token_views(), tokens_out.reshape(-1)
        for k, start, at, n in zip(shard.tolist(), starts.tolist(), dest.tolist(), lengths.tolist()):
            flat[at : at + n] = views[k][start : start + n]
        width = doc_ids_out.shape[1]
        numbers = np.repeat(p["k"], lengths).reshape(len(windows), span)[:, :width]
        if rows is None:
            doc_ids_out[:] = numbers
        else:
            doc_ids_out[rows] = numbers


__all__ = [
    "SourceIndex",
    "PackedIndex",
    "document_spans",
    "pack",
    "INDEX_FORMAT",
]
