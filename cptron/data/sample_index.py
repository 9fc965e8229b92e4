"""Per-source sample indices: held-out split, shuffled document order, packed windows, and their cache.

A source is the concatenation of its shards' sequences (one sequence is one
document); document g of a source is sequence g - start[k] of its shard k.

Training stream of a source, epoch e: its training documents (not held out, not
empty) in an order shuffled by (seed, source, e), concatenated; window j covers
tokens [j * T, j * T + T + 1) of that stream (T = seq_len), so consecutive
windows share one token and every token but the first is a label exactly once
per epoch. The last partial window of an epoch is dropped (fewer than T tokens).
Samples take the windows in a second shuffled order, so that the windows of one
long document do not land in the same batch. Sample (source, epoch, k) is
window perm_e[k].

Shuffles sort a 64-bit mix of each item under a key derived from (seed,
source, purpose, epoch) instead of using a NumPy generator, whose streams may
change between NumPy versions: the order must survive an upgrade on resume.

Cache layout, per source: `<cache>/<source>-<fingerprint>/` holds `source.json`
(sizes), `epoch-NNNNN.npy` and `validation.npy`, int64 arrays
[D, W, order(D), ends(D), perm(W)] (validation: no perm). Files are written
under a temporary name and renamed, and the first process to need a missing
file builds it under an O_EXCL lock while the others wait and then map it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

import numpy as np

from cptron.data.indexed import IndexedDataset
from cptron.errors import ConfigError, CptronError

log = logging.getLogger("cptron.data")

INDEX_FORMAT = 1
LOCK_WAIT_S = 900.0
"""How long a process waits for another one's index build before building itself."""

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (a bijection of uint64, so distinct inputs never tie)."""
    x = np.asarray(x, dtype=np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def key64(*parts) -> np.uint64:
    """A 64-bit key from JSON-serializable parts."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def shuffle_order(items: np.ndarray, key: np.uint64) -> np.ndarray:
    """Positions of `items` (distinct int64 ids) in their order shuffled under `key`."""
    return np.argsort(mix64(items.astype(np.uint64) ^ key), kind="stable")


def held_out_mask(doc_ids: np.ndarray, fraction: Fraction, seed: int, source: str) -> np.ndarray:
    """True for the documents held out for validation: a hash of (seed, source, document) below `fraction`."""
    if fraction <= 0:
        return np.zeros(len(doc_ids), dtype=bool)
    threshold = np.uint64(min(int(fraction * 2**64), 2**64 - 1))
    return mix64(doc_ids.astype(np.uint64) ^ key64("held-out", seed, source)) < threshold


@dataclass
class PackedIndex:
    """One epoch's (or the validation set's) packing: documents in order, their end offsets, window order."""

    order: np.ndarray
    """Source document ids in stream order."""
    ends: np.ndarray
    """Cumulative end offset (tokens) of each document in the stream."""
    perm: Optional[np.ndarray]
    """Sample k of the epoch is window perm[k] (None for validation: window k)."""
    windows: int
    """Number of windows."""

    @staticmethod
    def from_array(arr: np.ndarray, with_perm: bool, path: str) -> "PackedIndex":
        d, w = (int(arr[0]), int(arr[1])) if len(arr) >= 2 else (-1, -1)
        if d < 0 or w < 0 or len(arr) != 2 + 2 * d + (w if with_perm else 0):
            raise CptronError(f"sample index {path} is corrupt: {len(arr)} entries do not match its header "
                              f"({d} documents, {w} windows); delete it to rebuild")
        return PackedIndex(arr[2:2 + d], arr[2 + d:2 + 2 * d], arr[2 + 2 * d:] if with_perm else None, w)


def pack(doc_ids: np.ndarray, lengths: np.ndarray, seq_len: int, doc_key: np.uint64,
         window_key: Optional[np.uint64]) -> np.ndarray:
    """The int64 array [D, W, order, ends, perm?] of documents `doc_ids` (with `lengths`) packed into windows."""
    pos = shuffle_order(doc_ids, doc_key)
    order = doc_ids[pos]
    ends = np.cumsum(lengths[pos], dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    windows = max(total - 1, 0) // seq_len
    parts = [np.array([len(order), windows], dtype=np.int64), order.astype(np.int64), ends]
    if window_key is not None:
        parts.append(shuffle_order(np.arange(windows, dtype=np.int64), window_key).astype(np.int64))
    return np.concatenate(parts)


def _atomic_save(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _lock_is_stale(lock: str) -> bool:
    """True when the lock's builder is a dead process on this host (a crash left the lock behind)."""
    try:
        host, pid = open(lock, encoding="utf-8").read().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False


def load_or_build(path: str, build: Callable[[], None], wait_s: float = LOCK_WAIT_S) -> None:
    """Make sure `path` exists: build it (`build` writes it atomically) unless another process is at it."""
    if os.path.exists(path):
        return
    lock = path + ".lock"
    deadline = time.monotonic() + wait_s
    while not os.path.exists(path):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_is_stale(lock) or time.monotonic() > deadline:
                log.warning("taking over index build lock %s (its builder is gone or too slow)", lock)
                try:
                    os.remove(lock)
                except FileNotFoundError:
                    pass
            else:
                time.sleep(0.05)
            continue
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
            os.close(fd)
            if not os.path.exists(path):  # another builder may have finished between our checks
                build()
        finally:
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass


class SourceIndex:
    """The shards of one source, its fingerprint, and its cached per-epoch and validation indices."""

    def __init__(self, name: str, prefixes: list[str], *, seq_len: int, seed: int, held_out_fraction: Fraction,
                 cache_dir: Optional[str]):
        self.name, self.prefixes, self.seq_len, self.seed = name, prefixes, int(seq_len), int(seed)
        self.held_out_fraction = Fraction(held_out_fraction)
        self.shards = [IndexedDataset(p) for p in prefixes]
        counts = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_documents = int(self.shard_starts[-1])
        self.data_fingerprint = self._fingerprint()
        root = cache_dir if cache_dir is not None else os.path.join(os.path.dirname(os.path.abspath(prefixes[0])),
                                                                     ".cptron-index")
        self.dir = os.path.join(root, f"{name}-{self.data_fingerprint[:16]}")
        self.meta: Optional[dict] = None
        self._epochs: dict[int, PackedIndex] = {}

    def _fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([INDEX_FORMAT, self.name, self.seq_len, self.seed, str(self.held_out_fraction)]).encode())
        for shard in self.shards:  # content identity, not paths: moved data keeps its cache and its run state
            h.update(json.dumps([len(shard), shard.num_tokens, shard.dtype.name]).encode())
            h.update(np.ascontiguousarray(shard.sequence_lengths).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------ building (one process)

    def check_vocab(self, vocab_size: int) -> None:
        for shard in self.shards:
            shard.check_vocab(vocab_size)

    def _split(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lengths = np.concatenate([s.sequence_lengths for s in self.shards]).astype(np.int64)
        ids = np.arange(len(lengths), dtype=np.int64)
        held = held_out_mask(ids, self.held_out_fraction, self.seed, self.name)
        return lengths, ids[~held & (lengths > 0)], ids[held & (lengths > 0)]

    def _path(self, what: str) -> str:
        return os.path.join(self.dir, what)

    def _build_meta(self) -> None:
        lengths, train, val = self._split()
        train_tokens, val_tokens = int(lengths[train].sum()), int(lengths[val].sum())
        meta = {"format": INDEX_FORMAT, "source": self.name, "fingerprint": self.data_fingerprint,
                "shards": [os.path.basename(p) for p in self.prefixes], "seq_len": self.seq_len,
                "train_documents": int(len(train)), "train_tokens": train_tokens,
                "windows": max(train_tokens - 1, 0) // self.seq_len,
                "validation_documents": int(len(val)), "validation_tokens": val_tokens,
                "validation_windows": max(val_tokens - 1, 0) // self.seq_len}
        _atomic_write_json(self._path("source.json"), meta)

    def _build_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        lengths, train, _ = self._split()
        arr = pack(train, lengths[train], self.seq_len, key64("documents", self.seed, self.name, epoch),
                   key64("windows", self.seed, self.name, epoch))
        _atomic_save(self._path(f"epoch-{epoch:05d}.npy"), arr)
        log.info("built sample index of source %s epoch %d (%d documents, %d windows) in %.2f s", self.name,
                 epoch, arr[0], arr[1], time.perf_counter() - t0)

    def _build_validation(self) -> None:
        lengths, _, val = self._split()
        arr = pack(val, lengths[val], self.seq_len, key64("validation", self.seed, self.name), None)
        _atomic_save(self._path("validation.npy"), arr)

    def _ensure_dir(self) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise CptronError(f"cannot create the sample-index cache {self.dir} for source {self.name}: "
                              f"{e.strerror or e}; set data.cache_dir to a writable directory") from e

    def prepare(self) -> None:
        """Build (if missing) the sizes, epoch 0 and the validation index; done by one rank first."""
        self._ensure_dir()
        load_or_build(self._path("source.json"), self._build_meta)
        load_or_build(self._path("epoch-00000.npy"), lambda: self._build_epoch(0))
        load_or_build(self._path("validation.npy"), self._build_validation)

    # ------------------------------------------------------------ reading (every process)

    def load(self) -> None:
        """Read the sizes (building what is missing, e.g. in a node-local cache) and check them."""
        self.prepare()
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
                f"seq_len + 1 = {self.seq_len + 1} tokens")

    @property
    def windows_per_epoch(self) -> int:
        return int(self.meta["windows"])

    def epoch(self, epoch: int) -> PackedIndex:
        """Epoch `epoch`'s index, memory-mapped (built on first use)."""
        index = self._epochs.get(epoch)
        if index is None:
            path = self._path(f"epoch-{epoch:05d}.npy")
            self._ensure_dir()
            load_or_build(path, lambda: self._build_epoch(epoch))
            index = PackedIndex.from_array(np.load(path, mmap_mode="r"), True, path)
            if index.windows != self.windows_per_epoch:
                raise CptronError(f"sample index {path} has {index.windows} windows, expected "
                                  f"{self.windows_per_epoch}; delete {self.dir} to rebuild")
            if len(self._epochs) >= 2:  # keep the current epoch and the one before
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = index
        return index

    def validation(self) -> PackedIndex:
        path = self._path("validation.npy")
        load_or_build(path, self._build_validation)
        return PackedIndex.from_array(np.load(path, mmap_mode="r"), False, path)

    def locate(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, sequence index) of source document ids `docs`."""
        shard = np.searchsorted(self.shard_starts, docs, side="right") - 1
        return shard, docs - self.shard_starts[shard]

    def pieces(self, index: PackedIndex, windows: np.ndarray) -> dict[str, np.ndarray]:
        """The document pieces that make up `windows` (window ids of `index`), as flat arrays in row order:
        row, doc, shard, sequence, offset, length, and k (the piece's number within its row)."""
        span = self.seq_len + 1
        starts = np.asarray(windows, dtype=np.int64) * self.seq_len
        first = np.searchsorted(index.ends, starts, side="right")
        last = np.searchsorted(index.ends, starts + span - 1, side="right")
        counts = last - first + 1
        row = np.repeat(np.arange(len(starts)), counts)
        offsets_in_row = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
        j = first[row] + offsets_in_row
        doc_end = np.asarray(index.ends[j], dtype=np.int64)
        doc_start = np.where(j > 0, np.asarray(index.ends[np.maximum(j - 1, 0)], dtype=np.int64), 0)
        lo = np.maximum(doc_start, starts[row])
        hi = np.minimum(doc_end, starts[row] + span)
        doc = np.asarray(index.order[j], dtype=np.int64)
        shard, seq = self.locate(doc)
        return {"row": row, "doc": doc, "shard": shard, "sequence": seq, "offset": lo - doc_start,
                "length": hi - lo, "k": offsets_in_row}

    def read(self, index: PackedIndex, windows: np.ndarray, tokens_out: np.ndarray,
             doc_ids_out: np.ndarray) -> None:
        """Fill rows of `tokens_out`/`doc_ids_out` ([len(windows), seq_len + 1]) with the windows' tokens
        and per-row document numbers (0 at the row's first document, +1 at each boundary)."""
        p = self.pieces(index, windows)
        flat = tokens_out.reshape(-1)
        pos = 0
        shards = self.shards
        for sh, seq, off, n in zip(p["shard"].tolist(), p["sequence"].tolist(), p["offset"].tolist(),
                                   p["length"].tolist()):
            flat[pos:pos + n] = shards[sh].get(seq, off, n)
            pos += n
        if pos != flat.size:
            raise CptronError(f"source {self.name}: windows read {pos} tokens, expected {flat.size} "
                              "(a corrupt sample index?)")
        doc_ids_out.reshape(-1)[:] = np.repeat(p["k"], p["length"])


__all__ = ["SourceIndex", "PackedIndex", "pack", "mix64", "key64", "held_out_mask", "shuffle_order",
           "load_or_build", "INDEX_FORMAT"]
