"""Token shards in Megatron's IndexedDataset format (`<prefix>.bin` + `<prefix>.idx`), plus a JSON sidecar.

A shard is a pair of files that megatron-core's `IndexedDataset` reads unchanged:

* `<prefix>.bin`: the raw tokens of every sequence, back to back, in one integer dtype.
* `<prefix>.idx` (little endian):
  the 9-byte magic `MMIDIDX\\x00\\x00`; version, uint64 = 1; the dtype code, uint8
  (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16);
  the sequence count S, uint64; the document-index count D, uint64; then
  S int32 sequence lengths (tokens), S int64 sequence pointers (byte offsets into
  the .bin), and D int64 document indices: sequence-index boundaries of the
  documents, 0 first and S last, so a shard holds D - 1 documents. Multimodal
  shards append S int8 sequence modes; they are read, never written.

This module owns the format constants, the shard paths, reading the sidecar,
`IndexedDataset` (the reader), `best_dtype` and `shard_prefixes`. It reads shards
whose documents span several sequences, as Megatron's builder writes with
`end_document()`. Writing shards lives in `cptron.data.indexed_writer`.

`<prefix>.json` (the sidecar) is cptron's addition, ignored by Megatron. It
records the tokenizer fingerprint, the vocabulary size and the largest token id,
so a loader can refuse a shard made with another tokenizer without scanning it.

Opening a shard reads and checks the index only (O(index size)). The .bin is
memory-mapped and scanned only by `max_token_id()` when there is no sidecar.
"""

from __future__ import annotations

import glob as globlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from cptron.errors import CptronError, require

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
SIDECAR_FORMAT_VERSION = 1
_SCAN_BLOCK = 1 << 24  # tokens per block when scanning a whole .bin
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_INT_DTYPES = {
    np.dtype(np.uint8),
    np.dtype(np.int8),
    np.dtype(np.int16),
    np.dtype(np.uint16),
    np.dtype(np.int32),
    np.dtype(np.int64),
}

# Megatron's own cut-off: below it uint16 holds every id with room for a few added tokens.
UINT16_VOCAB_LIMIT = 65_500


def best_dtype(vocab_size: int) -> np.dtype:
    """The smallest token dtype Megatron uses for `vocab_size`: uint16 below 65,500, else int32."""
    require(vocab_size >= 1, "vocab_size", vocab_size, "an integer >= 1")
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def sidecar_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.json"


def read_sidecar(path_prefix: str | os.PathLike) -> Optional[dict]:
    """The parsed `<prefix>.json`, or None when the shard has none (written by another tool)."""
    path = sidecar_path(path_prefix)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CptronError(f"cannot read shard sidecar {path}: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CptronError(f"shard sidecar {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CptronError(f"shard sidecar {path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if version != SIDECAR_FORMAT_VERSION:
        raise CptronError(f"shard sidecar {path} has format_version={version!r}: expected {SIDECAR_FORMAT_VERSION}")
    return data


def _map_file(path: str) -> tuple[Optional[mmap.mmap], memoryview]:
    """A read-only memory map of `path` (an empty file, which mmap refuses, maps to an empty view)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return None, memoryview(b"")
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return mapped, memoryview(mapped)


class IndexedDataset:
    """A read-only, memory-mapped token shard; item i is sequence i (a view into the .bin, no copy)."""

    def __init__(self, path_prefix: str | os.PathLike, *, verify: bool = True):
        self.path_prefix = os.fspath(path_prefix)
        self._idx_file, self._bin_file = idx_path(self.path_prefix), bin_path(self.path_prefix)
        missing = [p for p in (self._idx_file, self._bin_file) if not os.path.isfile(p)]
        if missing:
            raise CptronError(
                f"missing shard {self.path_prefix}: {' and '.join(missing)} not found "
                "(a shard needs both <prefix>.bin and <prefix>.idx)"
            )
        self._idx_map, idx_view = _map_file(self._idx_file)
        self._read_index(idx_view)
        self._bin_map, bin_view = _map_file(self._bin_file)
        self._tokens = np.frombuffer(bin_view, dtype=np.uint8)  # bytes; typed views are cut per sequence
        self._check_bin_size(verify)
        self.sidecar: Optional[dict] = read_sidecar(self.path_prefix)
        if self.sidecar is not None:
            self._check_sidecar()
        self._max_token_id: Optional[int] = None

    # ------------------------------------------------------------ opening and checks

    def _read_index(self, view: memoryview) -> None:
        path = self._idx_file
        if len(view) < _HEADER.size:
            if bytes(view[:9]) != INDEX_MAGIC[: len(view)]:
                raise CptronError(
                    f"{path} is not a Megatron index: wrong magic {bytes(view[:9])!r} (expected {INDEX_MAGIC!r})"
                )
            raise CptronError(f"{path} is truncated: {len(view)} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, code, n_seq, n_doc_idx = _HEADER.unpack_from(view, 0)
        if magic != INDEX_MAGIC:
            raise CptronError(f"{path} is not a Megatron index: wrong magic {magic!r} (expected {INDEX_MAGIC!r})")
        if version != INDEX_VERSION:
            raise CptronError(f"{path} has unsupported index version {version}: expected {INDEX_VERSION}")
        if code not in DTYPE_CODES:
            raise CptronError(
                f"{path} has unknown dtype code {code}: expected one of "
                + ", ".join(f"{c} ({d.name})" for c, d in DTYPE_CODES.items())
            )
        self.dtype: np.dtype = DTYPE_CODES[code]
        if self.dtype not in _INT_DTYPES:
            raise CptronError(f"{path} stores {self.dtype.name} values: expected an integer token dtype")
        body = len(view) - _HEADER.size
        expected = 12 * n_seq + 8 * n_doc_idx
        # Megatron's multimodal shards add one int8 mode per sequence after the document indices.
        if body not in (expected, expected + n_seq):
            raise CptronError(
                f"{path} is truncated or has wrong counts: its header says {n_seq} sequences and "
                f"{n_doc_idx} document indices, which take {expected} bytes after the header, but the "
                f"file has {body}"
            )
        if n_doc_idx < 1:
            raise CptronError(f"{path} has wrong counts: 0 document indices (expected at least [0])")
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(view, dtype="<i4", count=n_seq, offset=offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(view, dtype="<i8", count=n_seq, offset=offset)
        offset += 8 * n_seq
        self.document_indices = np.frombuffer(view, dtype="<i8", count=n_doc_idx, offset=offset)
        offset += 8 * n_doc_idx
        self.sequence_modes = (
            np.frombuffer(view, dtype=np.int8, count=n_seq, offset=offset)
            if body == expected + n_seq and n_seq
            else None
        )
        docs = self.document_indices
        if docs[0] != 0 or docs[-1] != n_seq:
            raise CptronError(
                f"{path} has wrong counts: document indices run from {docs[0]} to {docs[-1]}, "
                f"expected 0 to the sequence count {n_seq}"
            )
        if n_doc_idx > 1 and bool((np.diff(docs) < 0).any()):
            raise CptronError(f"{path} has decreasing document indices: expected sequence boundaries in order")

    def _check_bin_size(self, verify: bool) -> None:
        n, itemsize, size = len(self.sequence_lengths), self.dtype.itemsize, self._tokens.nbytes
        if n == 0:
            return
        if verify:  # every sequence, O(number of sequences)
            lengths = self.sequence_lengths.astype(np.int64)
            if bool((lengths < 0).any()) or bool((self.sequence_pointers < 0).any()):
                raise CptronError(f"{self._idx_file} has negative sequence lengths or pointers")
            if bool((self.sequence_pointers % itemsize).any()):
                raise CptronError(
                    f"{self._idx_file} has sequence pointers that are not multiples of the "
                    f"{itemsize}-byte {self.dtype.name} tokens"
                )
            ends = self.sequence_pointers + lengths * itemsize
            worst = int(np.argmax(ends))
        else:  # shards are written contiguously, so the last sequence ends last
            ends, worst = None, n - 1
        end = int(self.sequence_pointers[worst]) + int(self.sequence_lengths[worst]) * itemsize
        if end > size:
            raise CptronError(
                f"{self._bin_file} is truncated: the index says sequence {worst} ends at byte "
                f"{end}, but the .bin has {size} bytes"
            )

    def _check_sidecar(self) -> None:
        side, path = self.sidecar, sidecar_path(self.path_prefix)
        if side.get("dtype") != self.dtype.name:
            raise CptronError(
                f"{path} says dtype {side.get('dtype')!r} but {self._idx_file} stores "
                f"{self.dtype.name}: the sidecar belongs to another shard"
            )
        actual = {"token_count": self.num_tokens, "document_count": self.num_documents, "sequence_count": len(self)}
        for key, value in actual.items():
            if side.get(key) != value:
                raise CptronError(
                    f"{path} says {key}={side.get(key)!r} but the index {self._idx_file} has "
                    f"{value}: the sidecar belongs to another shard"
                )
        max_id, vocab = side.get("max_token_id"), side.get("vocab_size")
        if isinstance(max_id, int) and isinstance(vocab, int) and max_id >= vocab:
            raise CptronError(f"{path} says max_token_id={max_id}, not below its vocab_size={vocab}")

    # ------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def tokenizer_fingerprint(self) -> Optional[str]:
        return None if self.sidecar is None else self.sidecar.get("tokenizer_fingerprint")

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `idx` (to its end when length is None), as a view."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {self.path_prefix} ({n} sequences)")
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for sequence {idx} of "
                f"{self.path_prefix} ({seq_len} tokens)"
            )
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._tokens.data, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(int(idx))

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences concatenated; a view when it has one sequence)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if last - first == 1:
            return self.get(first)
        parts = [self.get(i) for i in range(first, last)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def max_token_id(self) -> int:
        """The largest token id (-1 for a shard without tokens): from the sidecar, else one scan of the .bin."""
        if self.sidecar is not None and isinstance(self.sidecar.get("max_token_id"), int):
            return self.sidecar["max_token_id"]
        if self._max_token_id is None:
            self._max_token_id = self.scan_max_token_id()
        return self._max_token_id

    def _contiguous_tokens(self) -> Optional[np.ndarray]:
        """Every token as one typed view when the sequences lie back to back from byte 0 (as everything
        Megatron and cptron write does), else None."""
        itemsize = self.dtype.itemsize
        starts = self.sequence_pointers // itemsize
        if (
            len(self) == 0
            or int(self.sequence_pointers[0]) != 0
            or not bool((np.diff(starts) == self.sequence_lengths[:-1]).all())
        ):
            return None
        return np.frombuffer(self._tokens.data, dtype=self.dtype, count=self.num_tokens)

    def scan_max_token_id(self) -> int:
        """The largest token id read from the .bin itself (-1 without tokens), whatever the sidecar says:
        a sidecar understating it would pass every check and fail the embedding lookup at step 1."""
        if self.num_tokens == 0:
            return -1
        tokens, best = self._contiguous_tokens(), -1
        if tokens is not None:
            for lo in range(0, tokens.size, _SCAN_BLOCK):  # blocks bound the temporary memory of max()
                best = max(best, int(tokens[lo : lo + _SCAN_BLOCK].max()))
            return best
        for i in range(len(self)):
            if self.sequence_lengths[i]:
                best = max(best, int(self.get(i).max()))
        return best

    def _first_token_at_least(self, limit: int) -> Optional[tuple[int, int]]:
        """(sequence, position) of the first token id >= limit, or None."""
        tokens = self._contiguous_tokens()
        if tokens is not None:
            starts = self.sequence_pointers // self.dtype.itemsize
            for lo in range(0, tokens.size, _SCAN_BLOCK):
                bad = np.flatnonzero(tokens[lo : lo + _SCAN_BLOCK] >= limit)
                if bad.size:
                    pos = lo + int(bad[0])
                    # the last sequence starting at or before pos (skipping empty ones that start there too)
                    seq = int(np.searchsorted(starts, pos, side="right")) - 1
                    return seq, pos - int(starts[seq])
            return None
        for i in range(len(self)):
            bad = np.flatnonzero(self.get(i) >= limit)
            if bad.size:
                return i, int(bad[0])
        return None

    def check_vocab(self, vocab_size: int) -> None:
        """Raise CptronError naming the shard and the first offending id if any token id is >= vocab_size."""
        if self.max_token_id() < vocab_size:
            return
        found = self._first_token_at_least(vocab_size)
        if found is None:
            raise CptronError(
                f"{sidecar_path(self.path_prefix)} says max_token_id={self.max_token_id()} >= "
                f"vocab_size={vocab_size}, but no such id is in {self._bin_file}: stale sidecar"
            )
        seq, pos = found
        raise CptronError(
            f"{self._bin_file}: token id {int(self.get(seq)[pos])} at sequence {seq}, position {pos} "
            f"is >= vocab_size={vocab_size} (largest id {self.max_token_id()}); was it tokenized "
            "with another tokenizer?"
        )

    def __getstate__(self) -> dict:
        # Memory maps do not pickle; a copy sent to a spawned worker reopens the files.
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"], verify=False)

    def close(self) -> None:
        """Release the memory maps (views handed out before must not be used afterwards)."""
        self.sequence_lengths = self.sequence_pointers = self.document_indices = self.sequence_modes = None
        self._tokens = None
        for m in (self._idx_map, self._bin_map):
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a view is still alive; the map closes when it is collected
                    pass
        self._idx_map = self._bin_map = None

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, {len(self)} sequences, {self.num_documents} documents, "
            f"{self.dtype.name})"
        )


def _strip_suffix(path: str) -> str:
    for suffix in (".idx", ".bin", ".json"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def shard_prefixes(path_or_glob_or_dir: str | os.PathLike) -> list[str]:
    """Sorted shard prefixes named by a directory (its `*.idx`), a glob, a prefix, or the
    `output_prefix` of `cptron data tokenize` (its `<prefix>_NNNNN` shards). Raises if none is found."""
    spec = os.fspath(path_or_glob_or_dir)
    if os.path.isdir(spec):
        found = globlib.glob(os.path.join(globlib.escape(spec), "*.idx"))
        where = f"directory {spec} has no *.idx shard"
    elif globlib.has_magic(spec):
        found = [m for m in globlib.glob(spec) if m.endswith((".idx", ".bin")) or os.path.isfile(idx_path(m))]
        where = f"glob {spec!r} matches no shard (.idx/.bin files or their prefixes)"
    elif os.path.isfile(idx_path(_strip_suffix(spec))) or os.path.isfile(bin_path(_strip_suffix(spec))):
        found = [spec]
        where = ""
    else:
        found = globlib.glob(globlib.escape(spec) + "_[0-9]*.idx")
        where = f"no shard at {spec}: neither {spec}.idx nor {spec}_NNNNN.idx exists"
    prefixes = sorted({_strip_suffix(p) for p in found})
    if not prefixes:
        raise CptronError(where)
    return prefixes


__all__ = [
    "best_dtype",
    "IndexedDataset",
    "read_sidecar",
    "shard_prefixes",
    "DTYPE_CODES",
    "INDEX_MAGIC",
    "bin_path",
    "idx_path",
    "sidecar_path",
]
