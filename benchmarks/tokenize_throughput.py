"""Throughput of `cptron data tokenize` against the tokenizer's own batch encode, on the same text.

    python benchmarks/tokenize_throughput.py [--mb 4] [--tokenizer bpe|sentencepiece] [--workers 1,2] [--repeats 5]

The shipped Bible text (English and German verses, one document per line) is
repeated to about `--mb` MB and written to a plain-text file. Then, in this
process:

* baseline: the tokenizer encodes the same lines, already in memory, in batches of
  `chunk_docs` documents with its own batch call (tokenizers' `encode_batch_fast`, or
  SentencePiece's list `encode`), no special tokens. Nothing is read or written.
* cptron: `run_tokenize` on the file, for each worker count: reading, chunking,
  worker processes, EOS, writing the .bin/.idx/.json shard.

Tokenizer threads are off (TOKENIZERS_PARALLELISM=false, one SentencePiece thread)
so that both sides use one core per worker and "tokens/s per worker" means tokens
per second per core (EOS tokens are not counted, so both sides count the same
tokens). Each figure is the best of `--repeats` runs. The ratio printed last is
cptron's single-worker tokens/s over the baseline's: 1.0 means the framework costs
nothing on top of the tokenizer.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: one core per worker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cptron.data.tokenize import (
    DocumentEncoder,
    TokenizeConfig,
    load_tokenizer_spec,
    run_tokenize,
)
from cptron.testing.fixtures import (
    bible_text,
    mistral_sentencepiece_path,
    train_bpe_tokenizer,
)


def build_corpus(path: Path, target_mb: float) -> list[str]:
    verses = bible_text("en") + bible_text("de")
    block = "\n".join(verses) + "\n"
    repeats = max(1, round(target_mb * 1e6 / len(block.encode("utf-8"))))
    path.write_text(block * repeats, encoding="utf-8")
    return verses * repeats


def encode_all(encoder: DocumentEncoder, batches: list[list[str]]) -> None:
    for batch in batches:  # each result dropped at once, as cptron drops each chunk once written
        encoder.encode(batch)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="size of the repeated text (MB)")
    ap.add_argument("--tokenizer", choices=["bpe", "sentencepiece"], default="bpe",
                    help="bpe: a 4096-id byte-level BPE trained on the Bible text; sentencepiece: Mistral-7B v1")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts for cptron")
    ap.add_argument("--chunk-docs", type=int, default=1000, help="documents per batch on both sides")
    ap.add_argument("--repeats", type=int, default=5, help="runs per figure; the best is reported")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    work = Path(tempfile.mkdtemp(prefix="cptron-tokenize-bench-"))
    try:
        if args.tokenizer == "bpe":
            train_bpe_tokenizer(work / "tok", vocab_size=4096)
            tokenizer = str(work / "tok" / "tokenizer.json")
        else:
            tokenizer = str(mistral_sentencepiece_path())
        corpus = work / "corpus.txt"
        lines = build_corpus(corpus, args.mb)
        size_mb = corpus.stat().st_size / 1e6
        cfg = TokenizeConfig(inputs=[str(corpus)], tokenizer=tokenizer, output_prefix=str(work / "out" / "c"),
                             chunk_docs=args.chunk_docs, overwrite=True, progress=False)
        spec = load_tokenizer_spec(cfg)
        encoder = DocumentEncoder(spec, threads=1)
        batches = [lines[i: i + args.chunk_docs] for i in range(0, len(lines), args.chunk_docs)]
        tokens = sum(len(ids) for batch in batches for ids in encoder.encode(batch))
        base_s, secs, documents = float("inf"), {w: float("inf") for w in workers}, {}
        for _ in range(args.repeats):  # interleaved, so drifting load on a shared machine hits both sides
            base_s = min(base_s, _timed(lambda: encode_all(encoder, batches)))
            for w in workers:
                cfg.workers = w
                secs[w] = min(secs[w], _timed(lambda w=w: documents.update({w: run_tokenize(cfg)["documents"]})))
        print(f"text: {size_mb:.1f} MB, {len(lines)} documents, {tokens} tokens without EOS; "
              f"tokenizer: {spec.kind} {Path(tokenizer).name} (vocab {spec.vocab_size}); best of {args.repeats}")
        print(f"baseline  tokenizer batch encode (in memory, 1 thread): {tokens / base_s:12,.0f} tokens/s")
        ratios = {}
        for w in workers:
            assert documents[w] == len(lines), "cptron skipped documents the baseline encoded"
            ratios[w] = base_s / (secs[w] * w)  # same text on both sides, so a ratio of times is one of tokens/s
            print(f"cptron    data tokenize, {w} worker(s) (file -> shard): {tokens / secs[w]:12,.0f} tokens/s = "
                  f"{tokens / secs[w] / w:,.0f} per worker ({secs[w]:.2f} s; EOS not counted)")
        for w in workers[1:]:
            print(f"ratio cptron per-worker tokens/s with {w} workers / tokenizer batch encode: {ratios[w]:.3f}")
        print(f"ratio cptron ({workers[0]} worker) tokens/s / tokenizer batch encode: {ratios[workers[0]]:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
