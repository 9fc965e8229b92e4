"""Reading documents out of text, jsonl(.gz) and parquet files, for `cptron data tokenize`.

Owns the input side: the `InputFormat` choices, picking a file's format, expanding the
input files and globs, and the per-format readers, each yielding `Document`s
(line or row number, text or None, bytes of the file consumed so far).
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
from collections.abc import Iterator
from typing import Literal, Optional

from cptron.errors import CptronError

InputFormat = Literal["auto", "jsonl", "parquet", "text"]

_TEXT_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def input_format_of(path: str, fmt: InputFormat) -> str:
    if fmt != "auto":
        return fmt
    if path.endswith(_TEXT_EXTS):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by `patterns` in order (each glob's matches sorted); CptronError for anything missing."""
    files: list[str] = []
    for pattern in patterns:
        if globlib.has_magic(pattern):
            matches = sorted(m for m in globlib.glob(pattern, recursive=True) if os.path.isfile(m))
            if not matches:
                raise CptronError(f"input glob {pattern!r} matches no file")
            files += matches
        elif os.path.isdir(pattern):
            raise CptronError(f"input {pattern} is a directory: expected a file or a glob such as {pattern}/*.jsonl")
        elif not os.path.isfile(pattern):
            raise CptronError(f"input {pattern} not found")
        else:
            files.append(pattern)
    return files


def import_pyarrow_parquet():
    try:  # an optional dependency (cptron[parquet]), for parquet input only
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CptronError("parquet input needs pyarrow: pip install pyarrow (or cptron[parquet])") from e
    return pq


def _decode_line(raw: bytes, path: str, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CptronError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None


# A reader yields (line or row number, text or None, bytes of the file consumed so far).
Document = tuple[int, Optional[str], int]


def _read_text(path: str, unit: str) -> Iterator[Document]:
    with open(path, "rb") as raw:
        if unit == "file":
            data = raw.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CptronError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            yield 1, text, len(data)
            return
        consumed = 0
        for line_no, line in enumerate(raw, 1):
            consumed += len(line)
            yield line_no, _decode_line(line, path, line_no).rstrip("\r\n"), consumed


def _read_jsonl(path: str, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as raw:
        compressed = path.endswith(".gz")
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        consumed = 0
        try:
            for line_no, line in enumerate(stream, 1):
                # progress counts bytes of the file on disk: compressed ones from the raw file's position
                consumed = raw.tell() if compressed else consumed + len(line)
                text = _decode_line(line, path, line_no)
                if not text or text.isspace():
                    yield line_no, None, consumed
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    raise CptronError(f"{path}:{line_no}: bad JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise CptronError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                if text_field not in record:
                    raise CptronError(
                        f"{path}:{line_no}: missing text field {text_field!r} (the record has "
                        f"{sorted(record)[:10]}); set --text_field"
                    )
                value = record[text_field]
                if value is not None and not isinstance(value, str):
                    raise CptronError(
                        f"{path}:{line_no}: field {text_field!r} holds {type(value).__name__}: expected a string"
                    )
                yield line_no, value, consumed
        except (OSError, EOFError) as e:  # a corrupt or cut-off .gz
            raise CptronError(f"{path}: cannot read ({e})") from e


def _read_parquet(path: str, text_field: str) -> Iterator[Document]:
    pq = import_pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise CptronError(f"{path}: not a readable parquet file ({e})") from e
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise CptronError(f"{path}: missing text column {text_field!r} (columns: {schema.names}); set --text_field")
    column_type = schema.field(text_field).type
    if str(column_type) not in ("string", "large_string", "string_view"):
        raise CptronError(f"{path}: column {text_field!r} has type {column_type}: expected strings")
    total_rows, size = max(pf.metadata.num_rows, 1), os.path.getsize(path)
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, value, size * row // total_rows


def read_documents(path: str, input_format: InputFormat, text_field: str, text_unit: str) -> Iterator[Document]:
    fmt = input_format_of(path, input_format)
    if fmt == "jsonl":
        return _read_jsonl(path, text_field)
    if fmt == "parquet":
        return _read_parquet(path, text_field)
    return _read_text(path, text_unit)


__all__ = [
    "InputFormat",
    "Document",
    "input_format_of",
    "expand_inputs",
    "read_documents",
]
