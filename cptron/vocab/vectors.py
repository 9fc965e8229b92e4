"""Word vectors in and out: the `WordVectors` table and the readers of the standard file formats.

Formats read by `load_vectors` (the format is picked from the file's first bytes and its suffix, or named):

* `vec`: the word2vec text format that fastText's `.vec` files use: a header `count dim`, then one line per
  word, `word v1 ... vd`; also gzip-compressed (`.vec.gz`, as fastText distributes them). Values are split
  off the right of each line, so a word may hold a space (fastText's Common Crawl vectors have a few).
* `word2vec-bin`: the word2vec C tool's binary format: the same header, then per word its UTF-8 bytes, a
  space and `dim` little-endian float32 values (with or without a newline after each record).
* `fasttext-bin`: a fastText model `.bin`, read by gensim's Facebook loader; the vectors of the model's
  vocabulary words are returned (subword n-grams included, as fastText's own `get_word_vector` gives them).
* `gensim`: a gensim `KeyedVectors` (or a Word2Vec/FastText/Doc2Vec model holding one) saved with `.save()`.
  Such files are Python pickles, which can run code when loaded, so auto-detection never opens one: it
  must be named with `format="gensim"` for a file you trust.

Files are untrusted input: a malformed header, a row with the wrong number of values, a non-numeric or
non-finite value, a duplicate word or a row count that disagrees with the header stops with one line
naming the file and the line (record, for binary files). Nothing is skipped silently.

Multilingual spaces prefix each word with its language and a colon (`eng:god`, `deu:gott`; ISO 639-3
codes); `WordVectors.restrict_language("deu")` keeps one language's words, prefix stripped. Token-level
spaces (FOCUS's auxiliary space) are keyed by the tokenizer's token strings verbatim (`▁Haus`, `ĠHaus`).
gensim is an optional dependency (`pip install cptron[vectors]`), imported only for `.bin` models and
gensim files.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cptron.errors import CptronError

log = logging.getLogger("cptron.vocab")

VectorFormat = Literal["auto", "vec", "word2vec-bin", "fasttext-bin", "gensim"]
FORMATS = ("auto", "vec", "word2vec-bin", "fasttext-bin", "gensim")

_FASTTEXT_MAGIC = (793712314).to_bytes(4, "little")  # first int32 of every fastText model file
_GZIP_MAGIC = b"\x1f\x8b"
_PICKLE_MAGIC = b"\x80"  # protocol 2+ pickles, which gensim's save() writes


def import_gensim():
    """gensim, or a CptronError that says which extra installs it."""
    try:
        import gensim  # an optional dependency (cptron[vectors]): only training and .bin/gensim files need it
    except ImportError as e:
        raise CptronError("this needs gensim: pip install 'cptron[vectors]' (or pip install 'gensim>=4.3')") from e
    return gensim


@dataclass
class WordVectors:
    """Words and their vectors: row i of `vectors` (float32, [len(words), dim]) belongs to `words[i]`."""

    words: list[str]
    vectors: torch.Tensor
    _index: Optional[dict[str, int]] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.vectors.dim() != 2 or self.vectors.shape[0] != len(self.words):
            raise CptronError(
                f"word vectors of shape {tuple(self.vectors.shape)} for {len(self.words)} words: expected [words, dim]"
            )
        self.vectors = self.vectors.to(torch.float32)

    def __len__(self) -> int:
        return len(self.words)

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return int(self.vectors.shape[1])

    def index(self) -> dict[str, int]:
        """word -> row, built on first use (the words are unique: the loaders refuse duplicates)."""
        if self._index is None:
            self._index = {w: i for i, w in enumerate(self.words)}
        return self._index

    def get(self, word: str) -> Optional[torch.Tensor]:
        """The word's vector, or None for a word not in the table."""
        row = self.index().get(word)
        return None if row is None else self.vectors[row]

    def restrict_language(self, prefix: str) -> WordVectors:
        """The words of one language of a multilingual space (`deu` or `deu:`), prefix stripped."""
        tag = prefix if prefix.endswith(":") else prefix + ":"
        rows = [i for i, w in enumerate(self.words) if w.startswith(tag)]
        if not rows:
            langs = sorted({w.split(":", 1)[0] for w in self.words if ":" in w})[:10]
            raise CptronError(f"no word has the language prefix {tag!r} (prefixes seen: {langs})")
        return WordVectors([self.words[i][len(tag) :] for i in rows], self.vectors[rows])

    def languages(self) -> list[str]:
        """Language prefixes present (`eng`, `deu`, ...), sorted; empty for a monolingual space."""
        return sorted({w.split(":", 1)[0] for w in self.words if ":" in w})


# ------------------------------------------------------------------ format detection


def _detect_format(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head:
        raise CptronError(f"{path}: empty file: expected word vectors")
    if head.startswith(_FASTTEXT_MAGIC):
        return "fasttext-bin"
    if head.startswith(_GZIP_MAGIC):
        return "vec"
    if head.startswith(_PICKLE_MAGIC):
        raise CptronError(
            f"{path} looks like a gensim file, a Python pickle that can run code when loaded: for a file you "
            "trust, load it with format='gensim' (cptron.vocab.vectors.load_vectors) and save_vectors() it as .vec"
        )
    if path.suffix == ".bin":
        return "word2vec-bin"
    if path.suffix in (".vec", ".txt"):
        return "vec"
    # Unknown suffix: both word2vec formats start with the text header; text rows are valid UTF-8 without NULs.
    body = head.split(b"\n", 1)[1] if b"\n" in head else b""
    try:
        body.decode("utf-8")
        text = b"\x00" not in body
    except UnicodeDecodeError as e:
        text = e.start >= len(body) - 3 and b"\x00" not in body  # only a character cut at the 4 KB boundary
    return "vec" if text else "word2vec-bin"


def _parse_header(line: bytes, path: Path) -> tuple[int, int]:
    try:
        fields = line.decode("utf-8").split()
        count, dim = (int(f) for f in fields)
    except (UnicodeDecodeError, ValueError):
        shown = line[:60].decode("utf-8", "replace").rstrip()
        raise CptronError(f"{path}:1: bad header {shown!r}: expected 'count dim' (two integers)") from None
    if count < 0 or dim < 1:
        raise CptronError(f"{path}:1: bad header {count} {dim}: expected count >= 0 and dim >= 1")
    return count, dim


def _check_fits(path: Path, count: int, dim: int, row_bytes: int, expansion: int = 1) -> None:
    """Refuse a header that promises more rows than the file can hold, before allocating count x dim floats."""
    size = os.path.getsize(path)
    if count * row_bytes > size * expansion:
        raise CptronError(f"{path}:1: header says {count} rows of {dim} values, more than a file of {size} bytes holds")


def _add_word(word: str, seen: dict[str, int], where: str, row: int) -> None:
    if not word:
        raise CptronError(f"{where}: empty word")
    first = seen.setdefault(word, row)
    if first != row:
        raise CptronError(f"{where}: duplicate word {word!r} (first at row {first + 1})")


def _check_finite(values: np.ndarray, where: str) -> None:
    if not np.isfinite(values).all():
        raise CptronError(f"{where}: non-finite value (NaN or inf) in the vector")


# ------------------------------------------------------------------ readers


def _read_vec(path: Path, max_words: int, progress: bool) -> WordVectors:
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw  # type: ignore[assignment]
        bar = tqdm(
            total=os.path.getsize(path), unit="B", unit_scale=True, desc=f"reading {path.name}", disable=not progress
        )
        try:
            count, dim = _parse_header(stream.readline(), path)
            # a text row takes 2+ bytes per value ("0 "); gzip expands at most about 1032-fold
            _check_fits(path, count, dim, 2 * dim, 1032 if compressed else 1)
            n = count if not max_words else min(count, max_words)
            out = np.empty((n, dim), dtype=np.float32)
            words: list[str] = []
            seen: dict[str, int] = {}
            for line_no, line in enumerate(stream, 2):
                row = line_no - 2
                if row >= n:
                    if row >= count and line.strip():
                        raise CptronError(f"{path}:{line_no}: more rows than the header's count {count}")
                    if max_words:
                        break
                    continue
                where = f"{path}:{line_no}"
                try:
                    text = line.decode("utf-8").rstrip("\r\n").rstrip(" ")
                except UnicodeDecodeError as e:
                    raise CptronError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                parts = text.rsplit(" ", dim)
                # A word may hold a space, but one that ends in a number is a row with too many values.
                extra = sum(map(_is_number, parts[0].split(" ")[1:])) if " " in parts[0] else 0
                if len(parts) != dim + 1 or not parts[0].strip() or extra:
                    raise CptronError(f"{where}: {len(parts) - 1 + extra} values: expected a word and {dim} values")
                try:
                    out[row] = np.array(parts[1:], dtype=np.float32)
                except ValueError:
                    bad = next(p for p in parts[1:] if not _is_number(p))
                    raise CptronError(f"{where}: non-numeric value {bad[:30]!r}") from None
                _check_finite(out[row], where)
                _add_word(parts[0], seen, where, row)
                words.append(parts[0])
                if row % 10000 == 0:
                    bar.update(raw.tell() - bar.n)
        except (OSError, EOFError) as e:  # a corrupt or cut-off .gz
            raise CptronError(f"{path}: cannot read ({e})") from e
        finally:
            bar.close()
    if len(words) != n:
        raise CptronError(f"{path}: {len(words)} rows but the header says {count}: file cut short?")
    return WordVectors(words, torch.from_numpy(out))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_word2vec_bin(path: Path, max_words: int, progress: bool) -> WordVectors:
    with open(path, "rb") as raw:
        fh = io.BufferedReader(raw, buffer_size=1 << 20)
        count, dim = _parse_header(fh.readline(), path)
        _check_fits(path, count, dim, 4 * dim + 2)  # a binary record: 4 bytes per value, a word and a space
        n = count if not max_words else min(count, max_words)
        out = np.empty((n, dim), dtype=np.float32)
        words: list[str] = []
        seen: dict[str, int] = {}
        record_bytes = 4 * dim
        for row in tqdm(range(n), desc=f"reading {path.name}", unit="word", disable=not progress):
            where = f"{path}: record {row + 1} (byte {fh.tell()})"
            chunks = []
            while True:  # the word runs to the first space; the C tool ends each record with a newline
                byte = fh.read(1)
                if not byte:
                    raise CptronError(f"{where}: file ends after {row} of the header's {count} words")
                if byte == b" ":
                    break
                if byte == b"\n" and not chunks:
                    continue
                chunks.append(byte)
                if len(chunks) > 10_000:
                    raise CptronError(f"{where}: no space after 10000 bytes: not a word2vec binary record")
            try:
                word = b"".join(chunks).decode("utf-8")
            except UnicodeDecodeError as e:
                raise CptronError(f"{where}: word is not valid UTF-8 ({e.reason})") from None
            data = fh.read(record_bytes)
            if len(data) != record_bytes:
                raise CptronError(f"{where}: {len(data)} bytes of values for {word!r}: expected {record_bytes}")
            out[row] = np.frombuffer(data, dtype="<f4")
            _check_finite(out[row], f"{where} {word!r}")
            _add_word(word, seen, where, row)
            words.append(word)
        if not max_words and fh.read(1).strip():
            raise CptronError(f"{path}: data after the header's {count} words")
    return WordVectors(words, torch.from_numpy(out))


def _from_keyed_vectors(kv, path: Path, max_words: int) -> WordVectors:
    words = [str(w) for w in kv.index_to_key]
    vectors = np.asarray(kv.vectors, dtype=np.float32)
    if max_words:
        words, vectors = words[:max_words], vectors[:max_words]
    seen: dict[str, int] = {}
    for row, word in enumerate(words):
        _add_word(word, seen, f"{path}: word {row + 1}", row)
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise CptronError(f"{path}: word {bad[0] + 1} ({words[bad[0]]!r}): non-finite value (NaN or inf) in the vector")
    return WordVectors(words, torch.from_numpy(np.ascontiguousarray(vectors)))


def _read_fasttext_bin(path: Path, max_words: int) -> WordVectors:
    import_gensim()
    from gensim.models.fasttext import load_facebook_vectors

    try:
        kv = load_facebook_vectors(str(path))
    except Exception as e:  # gensim raises struct.error, ValueError, NotImplementedError ... on bad files
        raise CptronError(f"{path}: not a readable fastText .bin model ({type(e).__name__}: {e})") from None
    return _from_keyed_vectors(kv, path, max_words)


def _read_gensim(path: Path, max_words: int) -> WordVectors:
    import_gensim()
    from gensim.utils import SaveLoad

    try:
        obj = SaveLoad.load(str(path))
    except Exception as e:  # unpickling errors of any type
        raise CptronError(f"{path}: not a readable gensim file ({type(e).__name__}: {e})") from None
    kv = getattr(obj, "wv", obj)  # a whole Word2Vec/FastText/Doc2Vec model holds its KeyedVectors in .wv
    if not hasattr(kv, "index_to_key") or not hasattr(kv, "vectors"):
        raise CptronError(f"{path}: a gensim {type(obj).__name__}: expected KeyedVectors or a model holding them")
    return _from_keyed_vectors(kv, path, max_words)


def load_vectors(
    path: str | os.PathLike, format: VectorFormat = "auto", *, max_words: int = 0, progress: bool = False
) -> WordVectors:
    """Word vectors from `path` in `format` (auto: picked from the file's first bytes and suffix).

    `max_words` keeps the first n words (files list the most frequent first); 0 keeps all.
    """
    p = Path(path)
    if format not in FORMATS:
        raise CptronError(f"vector format {format!r} is unknown: expected one of {', '.join(FORMATS)}")
    if not p.is_file():
        raise CptronError(f"word vectors {p} not found")
    if max_words < 0:
        raise CptronError(f"max_words={max_words} is invalid: expected an integer >= 0 (0: all)")
    fmt = _detect_format(p) if format == "auto" else format
    log.info("reading word vectors %s (format %s%s)", p, fmt, ", detected" if format == "auto" else "")
    if fmt == "vec":
        wv = _read_vec(p, max_words, progress)
    elif fmt == "word2vec-bin":
        wv = _read_word2vec_bin(p, max_words, progress)
    elif fmt == "fasttext-bin":
        wv = _read_fasttext_bin(p, max_words)
    else:
        wv = _read_gensim(p, max_words)
    if not len(wv):
        raise CptronError(f"{p}: no word vectors in the file")
    log.info("read %d word vectors of dim %d from %s", len(wv), wv.dim, p)
    return wv


# ------------------------------------------------------------------ writer


def save_vectors(wv: WordVectors, path: str | os.PathLike) -> Path:
    """Write `wv` in the word2vec text format (fastText `.vec`), values exact to float32 (9 significant digits).

    Written to a temporary file and renamed, so a failed write never leaves a partial file at `path`.
    """
    p = Path(path)
    for row, word in enumerate(wv.words):
        if not word or any(c.isspace() for c in word):
            raise CptronError(f"cannot write {p}: word {row + 1} ({word!r}) is empty or holds whitespace")
    values = wv.vectors.detach().to("cpu", torch.float32).numpy()
    if not np.isfinite(values).all():
        raise CptronError(f"cannot write {p}: the vectors hold NaN or inf")
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(f"{len(wv)} {wv.dim}\n")
        for word, row in zip(wv.words, values.tolist()):
            fh.write(word + " " + " ".join(f"{x:.9g}" for x in row) + "\n")
    os.replace(tmp, p)
    return p


__all__ = ["FORMATS", "VectorFormat", "WordVectors", "import_gensim", "load_vectors", "save_vectors"]
