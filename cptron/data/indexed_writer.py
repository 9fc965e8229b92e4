"""Writing Megatron .bin/.idx shards and their JSON sidecar (`IndexedDatasetWriter`).

The format is described in `cptron.data.indexed`, which also reads the shards back.
cptron writes one sequence per document unless told the sequences of a document
(`add_document(tokens, sequence_lengths=...)`), as Megatron's builder does with
`end_document()`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cptron.data.indexed import (
    _HEADER,
    _INT_DTYPES,
    DTYPE_CODES,
    INDEX_MAGIC,
    INDEX_VERSION,
    SIDECAR_FORMAT_VERSION,
    best_dtype,
    bin_path,
    idx_path,
    sidecar_path,
)
from cptron.errors import CptronError

_CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}


class IndexedDatasetWriter:
    """Writes one shard (one sequence per document, unless a document is given as several sequences);
    nothing appears under the final names until finalize().

    Tokens stream to `<prefix>.bin` under a temporary name. finalize() writes the
    index and the sidecar, then renames the .bin, the sidecar and last the .idx
    into place, so a shard whose .idx exists is complete. An exception inside
    the `with` block removes the temporary files.
    """

    def __init__(
        self,
        path_prefix: str | os.PathLike,
        *,
        vocab_size: int,
        tokenizer_fingerprint: Optional[str] = None,
        dtype: Any = None,
        overwrite: bool = False,
    ):
        self.path_prefix = os.fspath(path_prefix)
        self.vocab_size = int(vocab_size)
        self.dtype = best_dtype(self.vocab_size) if dtype is None else np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE or self.dtype not in _INT_DTYPES:
            raise CptronError(
                f"dtype={self.dtype.name} is invalid for shard {self.path_prefix}: expected one of "
                + ", ".join(sorted(d.name for d in _INT_DTYPES))
            )
        if self.vocab_size - 1 > np.iinfo(self.dtype).max:
            raise CptronError(
                f"dtype={self.dtype.name} cannot hold the ids of vocab_size={self.vocab_size} "
                f"for shard {self.path_prefix}"
            )
        self.tokenizer_fingerprint = tokenizer_fingerprint
        finals = [bin_path(self.path_prefix), idx_path(self.path_prefix), sidecar_path(self.path_prefix)]
        existing = [p for p in finals if os.path.exists(p)]
        if existing and not overwrite:
            raise CptronError(f"shard {self.path_prefix} exists ({', '.join(existing)}); pass overwrite to replace it")
        Path(self.path_prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._tmp = {p: p + tag for p in finals}
        self._bin = open(self._tmp[finals[0]], "wb")
        self._lengths: list[int] = []
        self._doc_index: Optional[list[int]] = None
        """Document boundaries (sequence indices), kept from the first document of several sequences on."""
        self._max_id = -1
        self._tokens = 0
        self._done = False

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    @property
    def num_documents(self) -> int:
        return len(self._lengths) if self._doc_index is None else len(self._doc_index) - 1

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def add_document(
        self, tokens: Sequence[int] | np.ndarray, sequence_lengths: Optional[Sequence[int] | np.ndarray] = None
    ) -> None:
        """Append one document; ids must lie in [0, vocab_size). It is one sequence, or the sequences of
        `sequence_lengths` (e.g. sentences, as Megatron's `--split-sentences` writes), which add up to it."""
        if self._done:
            raise CptronError(f"shard {self.path_prefix} is already finalized")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise CptronError(f"a document for shard {self.path_prefix} must be 1-D, got shape {arr.shape}")
        doc = self.num_documents
        if sequence_lengths is None:
            lens = np.array([arr.size], dtype=np.int64)
        else:
            lens = np.asarray(sequence_lengths, dtype=np.int64)
            if lens.ndim != 1 or not len(lens) or int(lens.sum()) != arr.size or bool((lens < 0).any()):
                raise CptronError(
                    f"document {doc} for shard {self.path_prefix}: sequence_lengths {lens.tolist()} "
                    f"must be one or more counts >= 0 that add up to its {arr.size} tokens"
                )
        self._check_ids(arr, np.array([arr.size]), doc)
        if bool((lens > np.iinfo(np.int32).max).any()):
            raise CptronError(
                f"document {doc} for shard {self.path_prefix} has a sequence of {int(lens.max())} "
                "tokens: more than an int32 sequence length holds"
            )
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        if len(lens) > 1 and self._doc_index is None:
            self._doc_index = list(range(len(self._lengths) + 1))
        self._lengths.extend(lens.tolist())
        if self._doc_index is not None:
            self._doc_index.append(len(self._lengths))
        self._tokens += int(arr.size)

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int] | np.ndarray) -> None:
        """Append several documents given back to back in `tokens`, with their lengths (one bounds check)."""
        if self._done:
            raise CptronError(f"shard {self.path_prefix} is already finalized")
        arr, lens = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if arr.ndim != 1 or lens.ndim != 1 or int(lens.sum()) != arr.size or bool((lens < 0).any()):
            raise CptronError(
                f"documents for shard {self.path_prefix}: lengths (sum {int(lens.sum())}) must be "
                f">= 0 and add up to the {arr.size} tokens given"
            )
        if bool((lens > np.iinfo(np.int32).max).any()):
            raise CptronError(f"a document for shard {self.path_prefix} has more tokens than an int32 length holds")
        self._check_ids(arr, lens, self.num_documents)
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        first = len(self._lengths)
        self._lengths.extend(lens.tolist())
        if self._doc_index is not None:
            self._doc_index.extend(range(first + 1, len(self._lengths) + 1))
        self._tokens += arr.size

    def _check_ids(self, arr: np.ndarray, lengths: np.ndarray, first: int) -> None:
        """Raise naming the document (numbered from `first`, with `lengths` tokens each) of a bad id."""
        if not arr.size:
            return
        if arr.dtype.kind not in "iu":
            raise CptronError(
                f"document {first} for shard {self.path_prefix} has {arr.dtype} values: expected integer token ids"
            )
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = int(np.argmax((arr < 0) | (arr >= self.vocab_size)))
            doc = first + int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
            raise CptronError(
                f"document {doc} for shard {self.path_prefix} has token id {int(arr[bad])}: "
                f"expected ids in [0, vocab_size={self.vocab_size})"
            )
        self._max_id = max(self._max_id, hi)

    def sidecar(self) -> dict:
        return {
            "format_version": SIDECAR_FORMAT_VERSION,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "max_token_id": self._max_id,
            "token_count": self._tokens,
            "document_count": self.num_documents,
            "sequence_count": len(self._lengths),
        }

    def finalize(self, publish: bool = True) -> dict:
        """Write the index and sidecar, move the three files into place, and return the sidecar.

        With publish=False the files stay under their temporary names (`staged()` lists them): a caller
        writing a set of shards moves them into place only once every shard is complete, so that a
        failed run leaves the shards it would replace as they were."""
        if self._done:
            raise CptronError(f"shard {self.path_prefix} is already finalized")
        try:
            self._bin.close()
            n = len(self._lengths)
            if n == 0:  # megatron-core cannot map an empty .bin
                raise CptronError(f"shard {self.path_prefix} has no documents: refusing to write an empty shard")
            lengths = np.asarray(self._lengths, dtype="<i4")
            pointers = np.zeros(n, dtype="<i8")
            if n > 1:
                np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
            documents = (
                np.arange(n + 1, dtype="<i8") if self._doc_index is None else np.asarray(self._doc_index, dtype="<i8")
            )
            idx_tmp = self._tmp[idx_path(self.path_prefix)]
            with open(idx_tmp, "wb") as fh:
                fh.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, _CODE_OF_DTYPE[self.dtype], n, len(documents)))
                fh.write(lengths.tobytes())
                fh.write(pointers.tobytes())
                fh.write(documents.tobytes())
            side = self.sidecar()
            with open(self._tmp[sidecar_path(self.path_prefix)], "w", encoding="utf-8") as fh:
                json.dump(side, fh, indent=2)
                fh.write("\n")
            if publish:
                for tmp, final in self.staged():
                    os.replace(tmp, final)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return side

    def staged(self) -> list[tuple[str, str]]:
        """(temporary, final) names of the shard's files, in the order they must be moved into place."""
        # The .idx goes last: readers (and shard_prefixes) take its presence to mean "complete".
        order = (bin_path(self.path_prefix), sidecar_path(self.path_prefix), idx_path(self.path_prefix))
        return [(self._tmp[final], final) for final in order]

    def abort(self) -> None:
        """Drop everything written so far; the final names are left as they were."""
        self._done = True
        if not self._bin.closed:
            self._bin.close()
        for tmp in self._tmp.values():
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass


__all__ = ["IndexedDatasetWriter"]
