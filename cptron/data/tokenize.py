"""`cptron data tokenize`: text files -> Megatron token shards (<prefix>_00000.bin/.idx/.json, ...).

Owns the config, tokenizer loading, the worker processes, shard writing and `run_tokenize`;
reading documents out of the input files lives in `cptron.data.readers`.

Documents are read in input order by the main process, sent in fixed-size chunks
to worker processes, and written back in the order they were read. So the output
bytes depend on the inputs, the tokenizer and the config, never on the number of
workers. One document is one sequence, optionally with BOS prepended and
(by default) EOS appended. A document never spans two shards.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer
from tqdm import tqdm

from cptron.data.indexed import best_dtype
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.data.readers import InputFormat, expand_inputs, import_pyarrow_parquet, input_format_of, read_documents
from cptron.errors import CptronError, require

log = logging.getLogger("cptron.data.tokenize")

_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_MAX_EMPTY_EXAMPLES = 5


@dataclass
class TokenizeConfig:
    """Tokenize jsonl / jsonl.gz / parquet / plain-text files into Megatron .bin/.idx token shards."""

    inputs: list[str] = field(default_factory=list)
    """Input files or globs, comma-separated; documents keep this order (each glob's matches sorted)."""
    input_format: InputFormat = "auto"
    """Format of the inputs; auto picks by extension (.jsonl/.json[.gz] jsonl, .parquet, anything else text)."""
    text_field: str = "text"
    """Key (jsonl) or column (parquet) holding a document's text."""
    text_unit: Literal["line", "file"] = "line"
    """Plain text only: one document per line, or one document per file."""
    tokenizer: str = ""
    """HF tokenizer.json, SentencePiece model (.model, or any non-JSON file), or a directory holding either."""
    eos: bool = True
    """Append the EOS id to every document."""
    bos: bool = False
    """Prepend the BOS id to every document."""
    eos_token: Optional[str] = None
    """EOS token string; none: tokenizer_config.json beside tokenizer.json, or the SentencePiece model's EOS."""
    bos_token: Optional[str] = None
    """BOS token string; none: found the same way as eos_token."""
    output_prefix: str = ""
    """Shards are written as <output_prefix>_00000.bin/.idx/.json, <output_prefix>_00001..., in order."""
    shard_size_tokens: int = 1_000_000_000
    """Tokens per shard; a shard closes before the document that would overflow it (documents never split)."""
    workers: int = 1
    """Tokenizer processes, one thread each (1: this process; 0: one per CPU core); output does not depend on it."""
    chunk_docs: int = 1000
    """Documents per task sent to a worker."""
    overwrite: bool = False
    """Replace existing <output_prefix>_NNNNN shards (all of them, once the new ones are complete)."""
    progress: bool = True
    """Show a progress bar over the input bytes."""

    def validate(self) -> None:
        require(bool(self.inputs), "inputs", self.inputs, "at least one input file or glob")
        require(all(bool(p) for p in self.inputs), "inputs", self.inputs, "no empty paths")
        require(
            bool(self.tokenizer),
            "tokenizer",
            self.tokenizer,
            "a tokenizer.json, a SentencePiece .model or a directory holding one",
        )
        require(bool(self.text_field), "text_field", self.text_field, "a non-empty field name")
        require(
            bool(self.output_prefix) and not self.output_prefix.endswith(("/", os.sep)),
            "output_prefix",
            self.output_prefix,
            "a path prefix such as out/corpus (shards become out/corpus_00000.bin, ...)",
        )
        require(self.shard_size_tokens >= 1, "shard_size_tokens", self.shard_size_tokens, "an integer >= 1")
        require(self.workers >= 0, "workers", self.workers, "an integer >= 0 (0: one per CPU core)")
        require(self.chunk_docs >= 1, "chunk_docs", self.chunk_docs, "an integer >= 1")


# ------------------------------------------------------------------ tokenizers


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of the tokenizer file's bytes: equal fingerprints mean the same tokenizer file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_tokenizer_file(path: str | os.PathLike) -> tuple[Path, str]:
    """(file, kind) for a tokenizer.json / .model path or a directory holding one; kind is 'hf' or 'sentencepiece'."""
    p = Path(path)
    if p.is_dir():
        for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "sentencepiece")):
            if (p / name).is_file():
                return p / name, kind
        raise CptronError(f"tokenizer directory {p} holds neither tokenizer.json nor tokenizer.model")
    if not p.is_file():
        raise CptronError(
            f"tokenizer {p} not found: expected a tokenizer.json, a SentencePiece .model or a directory holding one"
        )
    if p.suffix == ".json":
        return p, "hf"
    if p.suffix == ".model":
        return p, "sentencepiece"
    # Other names (e.g. tokenizer.model.v1): tokenizer.json is a JSON object, a SentencePiece model a protobuf.
    with open(p, "rb") as fh:
        head = fh.read(64).lstrip()
    return p, "hf" if head.startswith(b"{") else "sentencepiece"


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a worker process needs to rebuild the tokenizer (small and picklable)."""

    path: str
    kind: str
    vocab_size: int
    eos_id: Optional[int]
    bos_id: Optional[int]
    fingerprint: str


class DocumentEncoder:
    """Encodes texts to token ids without special tokens; BOS/EOS are added from the spec's ids."""

    def __init__(self, spec: TokenizerSpec, threads: Optional[int] = None):
        self.spec = spec
        self.threads = threads
        if spec.kind == "hf":
            self._tok = Tokenizer.from_file(spec.path)
            # encode_batch_fast skips the offsets, which we never use (tokenizers >= 0.21)
            self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        else:
            self._tok = spm.SentencePieceProcessor(model_file=spec.path)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.spec.kind == "hf":
            return [e.ids for e in self._batch(texts, add_special_tokens=False)]
        if self.threads:
            return self._tok.encode(texts, out_type=int, add_bos=False, add_eos=False, num_threads=self.threads)
        return self._tok.encode(texts, out_type=int, add_bos=False, add_eos=False)

    def decode(self, ids: list[int]) -> str:
        if self.spec.kind == "hf":
            return self._tok.decode(list(ids), skip_special_tokens=True)
        keep = [i for i in ids if i not in (self.spec.eos_id, self.spec.bos_id)]
        return self._tok.decode(keep)

    def encode_chunk(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens of the documents back to back, per-document lengths); a document that encodes to no
        tokens gets length 0 and no BOS/EOS, so the caller can count it as empty."""
        ids = self.encode(texts)
        content = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=best_dtype(self.spec.vocab_size), count=int(content.sum()))
        n_bos, n_eos = int(self.spec.bos_id is not None), int(self.spec.eos_id is not None)
        if not n_bos + n_eos:
            return tokens, content
        # Place each document's tokens after its BOS and before its EOS without a Python loop per token.
        nonempty = content > 0
        lengths = content + (n_bos + n_eos) * nonempty
        ends = np.cumsum(lengths)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=tokens.dtype)
        starts = ends - lengths
        content_starts = np.cumsum(content) - content
        out[np.arange(tokens.size) + np.repeat(starts + n_bos - content_starts, content)] = tokens
        if n_bos:
            out[starts[nonempty]] = self.spec.bos_id
        if n_eos:
            out[ends[nonempty] - 1] = self.spec.eos_id
        return out, lengths


def _special_from_hf_configs(tokenizer_file: Path, key: str) -> Optional[str]:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = tokenizer_file.parent / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (json.JSONDecodeError, AttributeError) as e:
            raise CptronError(f"{path} is not a JSON object: {e}") from e
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return None


def _hf_special_id(tok, file: Path, what: str, given: Optional[str], candidates: tuple[str, ...]) -> int:
    if given is not None:
        tid = tok.token_to_id(given)
        if tid is None:
            raise CptronError(f"{what}_token={given!r} is not a token of {file}")
        return tid
    configured = _special_from_hf_configs(file, f"{what}_token")
    if configured is not None:
        tid = tok.token_to_id(configured)
        if tid is None:
            raise CptronError(
                f"{file.parent}'s tokenizer config names {what}_token={configured!r}, which is not a token of {file}"
            )
        return tid
    for name in candidates:
        tid = tok.token_to_id(name)
        if tid is not None:
            return tid
    raise CptronError(
        f"cannot tell the {what.upper()} token of {file} (no tokenizer_config.json beside it and "
        f"none of {list(candidates)} in its vocabulary): set --{what}_token"
    )


def _sp_special_id(sp, file: Path, what: str, given: Optional[str]) -> int:
    if given is not None:
        tid = sp.piece_to_id(given)
        if sp.id_to_piece(tid) != given:
            raise CptronError(f"{what}_token={given!r} is not a piece of {file}")
        return tid
    tid = sp.eos_id() if what == "eos" else sp.bos_id()
    if tid < 0:
        raise CptronError(f"SentencePiece model {file} defines no {what.upper()} id: set --{what}_token")
    return tid


def load_tokenizer_spec(cfg: TokenizeConfig) -> TokenizerSpec:
    """Locate the tokenizer, read its vocabulary size and the BOS/EOS ids the config asks for."""
    file, kind = resolve_tokenizer_file(cfg.tokenizer)
    try:
        if kind == "hf":
            tok = Tokenizer.from_file(str(file))
            vocab_size = tok.get_vocab_size(with_added_tokens=True)
            eos = _hf_special_id(tok, file, "eos", cfg.eos_token, _EOS_CANDIDATES) if cfg.eos else None
            bos = _hf_special_id(tok, file, "bos", cfg.bos_token, _BOS_CANDIDATES) if cfg.bos else None
        else:
            sp = spm.SentencePieceProcessor(model_file=str(file))
            vocab_size = sp.get_piece_size()
            eos = _sp_special_id(sp, file, "eos", cfg.eos_token) if cfg.eos else None
            bos = _sp_special_id(sp, file, "bos", cfg.bos_token) if cfg.bos else None
    except CptronError:
        raise
    except Exception as e:  # the libraries raise their own types for unreadable files
        raise CptronError(f"cannot load {kind} tokenizer {file}: {e}") from e
    return TokenizerSpec(str(file), kind, vocab_size, eos, bos, tokenizer_fingerprint(file))


# ------------------------------------------------------------------ workers

# One encoder per worker process, built by the pool initializer: pool tasks can only reach
# per-process state through a module global.
_WORKER_ENCODER: Optional[DocumentEncoder] = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _WORKER_ENCODER
    # One core per worker: the pool already spreads the work, so no tokenizer threads on top.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = DocumentEncoder(spec, threads=1)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER_ENCODER.encode_chunk(texts)


def _result_of(future):
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise CptronError(
            f"a tokenizer worker process died ({e}); out of memory? try fewer --workers or a smaller --chunk_docs"
        ) from e


class _ShardSink:
    """Writes encoded chunks into consecutive shards of at most `shard_size` tokens, under temporary
    names until `publish()`: the shards of an earlier run stay intact unless this one completes."""

    def __init__(self, prefix: str, spec: TokenizerSpec, shard_size: int, overwrite: bool):
        self.prefix, self.spec, self.shard_size, self.overwrite = prefix, spec, shard_size, overwrite
        self.writer: Optional[IndexedDatasetWriter] = None
        self.shards: list[str] = []
        self.staged: list[tuple[str, str]] = []
        """(temporary, final) names of the finalized shards' files, in publishing order."""
        self.documents = self.tokens = 0

    def _open(self) -> IndexedDatasetWriter:
        name = f"{self.prefix}_{len(self.shards):05d}"
        self.writer = IndexedDatasetWriter(
            name, vocab_size=self.spec.vocab_size, tokenizer_fingerprint=self.spec.fingerprint, overwrite=self.overwrite
        )
        self.shards.append(name)
        return self.writer

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        lengths = lengths[lengths > 0]  # empty documents have no tokens in `flat`
        doc, pos = 0, 0
        while doc < len(lengths):
            w = self.writer or self._open()
            cum = np.cumsum(lengths[doc:])
            fit = int(np.searchsorted(cum, self.shard_size - w.num_tokens, side="right"))
            if fit == 0 and w.num_tokens == 0:
                fit = 1  # a document longer than a shard gets a shard of its own
            if fit:
                n_tokens = int(cum[fit - 1])
                w.add_documents(flat[pos : pos + n_tokens], lengths[doc : doc + fit])
                doc, pos = doc + fit, pos + n_tokens
                self.documents += fit
                self.tokens += n_tokens
            if doc < len(lengths):  # the next document does not fit: close this shard
                self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.finalize(publish=False)
            self.staged += self.writer.staged()
            self.writer = None

    def publish(self, old: list[str]) -> None:
        """Move every new shard into place, then remove the files of `old` shards not replaced."""
        for tmp, final in self.staged:
            os.replace(tmp, final)
        new = {final for _, final in self.staged}
        self.staged = []
        for f in old:  # stale higher-numbered shards would otherwise be read with the new ones
            if f not in new:
                try:
                    os.remove(f)
                except FileNotFoundError:
                    pass

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        for tmp, _ in self.staged:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        self.staged = []


def existing_shard_files(prefix: str) -> list[str]:
    """Files of earlier `<prefix>_NNNNN` shards (including temporary files of an interrupted write)."""
    found = globlib.glob(globlib.escape(prefix) + "_[0-9][0-9][0-9][0-9][0-9]*")
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"_\d{5,}\.(bin|idx|json)(\.tmp-\d+)?$")
    return sorted(f for f in found if pattern.fullmatch(os.path.basename(f)))


# ------------------------------------------------------------------ the command


def run_tokenize(cfg: TokenizeConfig) -> dict:
    """Tokenize `cfg.inputs` into shards; returns a summary (counts, shards, throughput)."""
    cfg.validate()
    files = expand_inputs(cfg.inputs)
    if any(input_format_of(f, cfg.input_format) == "parquet" for f in files):
        import_pyarrow_parquet()
    spec = load_tokenizer_spec(cfg)
    old = existing_shard_files(cfg.output_prefix)
    if old and not cfg.overwrite:
        raise CptronError(
            f"output {cfg.output_prefix} has shards already ({old[0]}, ... {len(old)} files); "
            "pass --overwrite true to replace them"
        )
    workers = cfg.workers or os.cpu_count() or 1
    log.info(
        "tokenizing %d file(s) with %s tokenizer %s (vocab %d, %s) using %d worker(s)",
        len(files),
        spec.kind,
        spec.path,
        spec.vocab_size,
        best_dtype(spec.vocab_size).name,
        workers,
    )

    start = time.perf_counter()
    pool = None
    if workers > 1:  # before the progress bar starts its monitor thread: fork a thread-free process
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (OOM-killed) fails the run
        # with BrokenProcessPool instead of leaving its task to wait forever.
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec,))
        pool.submit(int).result()  # with fork, the first task forks every worker: do it now, thread-free
    total_bytes = sum(os.path.getsize(f) for f in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not cfg.progress)
    sink = _ShardSink(cfg.output_prefix, spec, cfg.shard_size_tokens, cfg.overwrite)
    empty, empty_examples = 0, []
    try:
        if pool is not None:
            submit = lambda texts: pool.submit(_encode_in_worker, texts)  # noqa: E731
            wait = _result_of
        else:
            # One SentencePiece thread, as in the pool; HF tokenizers' own threads follow TOKENIZERS_PARALLELISM.
            encoder = DocumentEncoder(spec, threads=1)
            submit, wait = encoder.encode_chunk, (lambda result: result)
        pending: deque = deque()
        max_pending = 2 * workers  # bounds memory while keeping every worker busy

        def drain(keep: int) -> None:
            nonlocal empty
            while len(pending) > keep:
                handle, where = pending.popleft()
                flat, lengths = wait(handle)
                for (path, line_no), n in zip(where, lengths.tolist()):
                    if n == 0:  # text with no tokens (e.g. only characters the normalizer drops)
                        empty += 1
                        if len(empty_examples) < _MAX_EMPTY_EXAMPLES:
                            empty_examples.append(f"{path}:{line_no}")
                sink.add(flat, lengths)
                bar.set_postfix(docs=sink.documents, tokens=sink.tokens, refresh=False)

        texts, where = [], []
        for path in files:
            done = 0
            for line_no, text, pos in read_documents(path, cfg.input_format, cfg.text_field, cfg.text_unit):
                if not text or text.isspace():
                    empty += 1
                    if len(empty_examples) < _MAX_EMPTY_EXAMPLES:
                        empty_examples.append(f"{path}:{line_no}")
                    continue
                texts.append(text)
                where.append((path, line_no))
                if len(texts) >= cfg.chunk_docs:
                    bar.update(pos - done)
                    done = pos
                    pending.append((submit(texts), where))
                    texts, where = [], []
                    drain(max_pending)
            bar.update(os.path.getsize(path) - done)
        if texts:
            pending.append((submit(texts), where))
        drain(0)
        if sink.documents == 0:
            named = ", ".join(files[:3]) + (f", ... ({len(files) - 3} more)" if len(files) > 3 else "")
            raise CptronError(
                f"no non-empty document in {len(files)} input file(s) ({empty} empty): nothing to "
                f"write; check --text_field and --input_format ({named})"
            )
        sink.close()
        sink.publish(old)
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.perf_counter() - start
    if empty:
        log.warning("skipped %d empty document(s), e.g. %s", empty, ", ".join(empty_examples))
    summary = {
        "output_prefix": cfg.output_prefix,
        "shards": sink.shards,
        "documents": sink.documents,
        "tokens": sink.tokens,
        "empty_documents": empty,
        "empty_examples": empty_examples,
        "input_files": files,
        "input_bytes": total_bytes,
        "tokenizer": spec.path,
        "tokenizer_kind": spec.kind,
        "tokenizer_fingerprint": spec.fingerprint,
        "vocab_size": spec.vocab_size,
        "dtype": best_dtype(spec.vocab_size).name,
        "eos_id": spec.eos_id,
        "bos_id": spec.bos_id,
        "workers": workers,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(sink.tokens / seconds, 1) if seconds > 0 else None,
    }
    log.info(
        "wrote %d documents, %d tokens in %d shard(s) %s_*; %d empty document(s) skipped; %.0f tokens/s",
        sink.documents,
        sink.tokens,
        len(sink.shards),
        cfg.output_prefix,
        empty,
        summary["tokens_per_second"] or 0,
    )
    return summary


__all__ = [
    "TokenizeConfig",
    "run_tokenize",
    "tokenizer_fingerprint",
    "load_tokenizer_spec",
    "DocumentEncoder",
    "TokenizerSpec",
    "existing_shard_files",
]
