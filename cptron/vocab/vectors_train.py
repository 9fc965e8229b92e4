"""`cptron vocab vectors`: word vectors trained here, for the word-vector initialization methods.

Nothing can be downloaded at run time, and few language pairs have ready vectors, so the vectors that
WECHSEL, FOCUS and OFA need can be built from text with gensim (an optional dependency, cptron[vectors]):

* `mono`: word vectors of one language's text: skip-gram with negative sampling (Mikolov et al., 2013),
  gensim `Word2Vec`, or its subword-aware variant (Bojanowski et al., 2017), gensim `FastText`.
  WECHSEL's source and target spaces.
* `tokens`: the same on text encoded by a tokenizer, each token string a "word" (kept verbatim: `▁Haus`,
  `ĠHaus`, `<0x41>`): FOCUS's auxiliary token-level space (Dobler and de Melo, 2023).
* `aligned`: one multilingual space from sentence-aligned text (`lang=path` inputs, line i of every file the
  same sentence), words prefixed by their language (`eng:God`, `deu:Gott`): the kind of resource OFA's
  ColexNet+ vectors are (Liu et al., 2023), built there from a parallel Bible corpus.
  The method is sentence-ID skip-gram (Levy, Søgaard and Goldberg, 2017): every word of every language
  predicts the ID of its sentence, so translations, which share sentences, share contexts. This is the
  PV-DBOW model of Le and Mikolov (2014) with the roles read the other way round: a sentence's vector
  predicts its words, and the words' output vectors are the word vectors. It beat the alternative of
  skip-gram over each sentence pair's words concatenated and shuffled on the shipped English/German Bible
  text (43 lowercased translation pairs, mutual 10-nearest neighbours, 100 dims: 43/43 in 11 s vs 42/43 in
  17-20 s),
  and each word yields one training pair instead of a window's worth, so it is the faster of the two.

Words are the `\\w+` runs of the text (letters, digits and underscores, any script), case kept unless
`lowercase`, since the tokens these vectors are matched with are cased. Training is deterministic under
`seed` with `workers=1` (gensim draws every random number from seeded generators, and one worker thread
sees the sentences in a fixed order); more workers are faster but not reproducible. The output is a `.vec`
file (word2vec text format, read back by `cptron.vocab.vectors.load_vectors`) and a JSON report beside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from cptron.data.readers import InputFormat, expand_inputs, read_documents
from cptron.errors import CptronError, require
from cptron.vocab.vectors import WordVectors, import_gensim, save_vectors

log = logging.getLogger("cptron.vocab")

_WORD = re.compile(r"\w+")
_LANG = re.compile(r"[a-z][a-z0-9_-]*")
# gensim truncates longer sentences silently: longer documents are cut into pieces of this many words.
_GENSIM_MAX_WORDS = 10_000
# Words the automatic epoch count aims to train on. Skip-gram sees a window of contexts per word, sentence-ID
# one context per word, so the latter needs more passes: on the shipped EN/DE Bible text (147k words) its
# translation-pair hit rate was 0.71 after 10 epochs, 0.77 after 20, 0.96 after 30, 1.00 after 50, 0.98 after 100.
_AUTO_WORDS = {"mono": 5_000_000, "tokens": 5_000_000, "aligned": 7_500_000}
_AUTO_EPOCHS = (5, 100)


@dataclass
class VocabVectorsConfig:
    """Train word vectors: monolingual, token-level (a tokenizer's tokens), or multilingual from aligned text."""

    mode: Literal["mono", "tokens", "aligned"] = "mono"
    """mono: words of one text; tokens: token strings of `tokenizer` on the text; aligned: `lang=path` inputs."""
    inputs: list[str] = field(default_factory=list)
    """Text files or globs, comma-separated (as data tokenize); aligned: lang=path per language, e.g. eng=web.txt."""
    input_format: InputFormat = "auto"
    """Format of every input; auto picks by extension (.jsonl/.json[.gz] jsonl, .parquet, anything else text)."""
    text_field: str = "text"
    """Key (jsonl) or column (parquet) holding a document's text."""
    text_unit: Literal["line", "file"] = "line"
    """Plain text only: one document (aligned: one sentence) per line, or per file."""
    tokenizer: str = ""
    """tokens mode: tokenizer.json, SentencePiece .model or a directory holding one, whose tokens get vectors."""
    output: str = ""
    """The .vec file to write (word2vec text format); the JSON report goes beside it with suffix .json."""
    algorithm: Literal["word2vec", "fasttext"] = "word2vec"
    """mono and tokens: skip-gram word2vec, or fastText (skip-gram with character n-grams, better for rare words)."""
    dim: int = 100
    """Vector length; 100 suits the small corpora this is built for (300, fastText's, pays off at 100M+ words)."""
    window: int = 5
    """mono and tokens: most words on each side that count as context (word2vec's default)."""
    min_count: int = 3
    """Words seen fewer times (per language) get no vector: rarer ones are mostly noise on small corpora."""
    epochs: int = 0
    """Passes over the text; 0: enough to train on about 5M words (mono, tokens) or 7.5M (aligned), within 5..100."""
    buckets: int = 2_000_000
    """fastText: hash buckets of the character n-grams (fastText's default; memory: 2 x buckets x dim x 4 bytes)."""
    negative: int = 5
    """Negative samples per training pair (word2vec's default)."""
    sample: float = 1e-3
    """Downsampling threshold of frequent words (word2vec's default); 0 keeps every occurrence."""
    lowercase: bool = False
    """mono and aligned: lowercase the words first (off: the tokens these vectors are matched with are cased)."""
    max_documents: int = 0
    """Most documents read from each input (aligned: from each language); 0: all."""
    seed: int = 0
    """Seed of gensim's initialization and sampling."""
    workers: int = 1
    """gensim training threads; 1 is deterministic under `seed`, more are faster but not reproducible."""
    overwrite: bool = False
    """Replace `output` and its report if they exist."""
    progress: bool = True
    """Show a bar while reading the text and log every training epoch with its time and the time left."""

    def validate(self) -> None:
        require(bool(self.inputs), "inputs", self.inputs, "at least one text file or glob")
        require(all(bool(p) for p in self.inputs), "inputs", self.inputs, "no empty paths")
        require(bool(self.text_field), "text_field", self.text_field, "a non-empty field name")
        require(bool(self.output) and self.output.endswith(".vec"), "output", self.output, "a .vec file path (x.vec)")
        if self.mode == "tokens":
            require(bool(self.tokenizer), "tokenizer", self.tokenizer, "a tokenizer directory or file (tokens mode)")
            require(
                not self.lowercase,
                "lowercase",
                self.lowercase,
                "false in tokens mode (token strings are kept verbatim)",
            )
        else:
            require(not self.tokenizer, "tokenizer", self.tokenizer, "empty: only tokens mode reads a tokenizer")
        if self.mode == "aligned":
            langs = [lang for lang, _ in aligned_inputs(self.inputs)]
            require(len(langs) >= 2, "inputs", self.inputs, "two or more lang=path inputs in aligned mode")
            require(len(set(langs)) == len(langs), "inputs", self.inputs, "each language once")
            require(self.algorithm == "word2vec", "algorithm", self.algorithm, "word2vec in aligned mode (sentence-ID)")
        require(self.dim >= 1, "dim", self.dim, "an integer >= 1")
        require(self.window >= 1, "window", self.window, "an integer >= 1")
        require(self.min_count >= 1, "min_count", self.min_count, "an integer >= 1")
        require(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0 (0: automatic)")
        require(self.buckets >= 1, "buckets", self.buckets, "an integer >= 1")
        require(self.negative >= 1, "negative", self.negative, "an integer >= 1")
        require(0 <= self.sample < 1, "sample", self.sample, "a number in [0, 1)")
        require(self.max_documents >= 0, "max_documents", self.max_documents, "an integer >= 0 (0: all)")
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")


def aligned_inputs(inputs: list[str]) -> list[tuple[str, str]]:
    """(language, file or glob) of each `lang=path` input; ConfigError naming the bad one."""
    out = []
    for item in inputs:
        lang, eq, path = item.partition("=")
        require(
            bool(eq) and bool(path) and _LANG.fullmatch(lang) is not None,
            "inputs",
            item,
            "lang=path with a lowercase language code such as eng or deu (ISO 639-3) in aligned mode",
        )
        out.append((lang, path))
    return out


# ------------------------------------------------------------------ text


def _documents(cfg: VocabVectorsConfig, pattern: str, what: str) -> list[str]:
    """Every document of the files `pattern` names, in order, empty ones as "" (aligned mode counts them)."""
    try:
        files = expand_inputs([pattern])
    except CptronError as e:
        raise CptronError(f"inputs: {e}") from e
    docs: list[str] = []
    bar = tqdm(desc=f"reading {what}", unit="doc", disable=not cfg.progress)
    for path in files:
        for _, text, _ in read_documents(path, cfg.input_format, cfg.text_field, cfg.text_unit):
            docs.append(text or "")
            bar.update(1)
            if cfg.max_documents and len(docs) >= cfg.max_documents:
                break
        if cfg.max_documents and len(docs) >= cfg.max_documents:
            break
    bar.close()
    return docs


def words_of(text: str, lowercase: bool) -> list[str]:
    """The words of `text` as `cptron vocab vectors` splits them (runs of \\w, any script)."""
    return _WORD.findall(text.lower() if lowercase else text)


def _token_strings(cfg: VocabVectorsConfig, docs: list[str]) -> list[list[str]]:
    from cptron.data.tokenize import resolve_tokenizer_file  # deferred: pulls in the tokenizer libraries

    file, kind = resolve_tokenizer_file(cfg.tokenizer)
    log.info("encoding %d documents with the %s tokenizer %s", len(docs), kind, file)
    try:
        if kind == "hf":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
            return [e.tokens for e in tok.encode_batch(docs, add_special_tokens=False)]
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(file))
        return sp.encode(docs, out_type=str)
    except Exception as e:  # the libraries raise their own types for unreadable files
        raise CptronError(f"cannot load or run the {kind} tokenizer {file}: {e}") from e


def _pieces(words: list[str]) -> list[list[str]]:
    return [words[i : i + _GENSIM_MAX_WORDS] for i in range(0, len(words), _GENSIM_MAX_WORDS)] if words else []


def _sentences(cfg: VocabVectorsConfig) -> tuple[list[Any], dict[str, Any]]:
    """gensim's training sentences (TaggedDocuments in aligned mode) and what the report says about them."""
    if cfg.mode == "aligned":
        return _aligned_sentences(cfg)
    docs = [d for p in cfg.inputs for d in _documents(cfg, p, p)]
    if cfg.mode == "tokens":
        units = _token_strings(cfg, docs)
    else:
        units = [words_of(d, cfg.lowercase) for d in docs]
    sentences = [piece for u in units for piece in _pieces(u)]
    n_words = sum(map(len, sentences))
    if not n_words:
        raise CptronError(f"inputs={cfg.inputs} hold no words ({len(docs)} documents): expected text to train on")
    return sentences, {"documents": len(docs), "words": n_words}


def _aligned_sentences(cfg: VocabVectorsConfig) -> tuple[list[Any], dict[str, Any]]:
    from gensim.models.doc2vec import TaggedDocument

    langs = aligned_inputs(cfg.inputs)
    per_lang = {lang: _documents(cfg, pattern, f"{lang} ({pattern})") for lang, pattern in langs}
    counts = {lang: len(d) for lang, d in per_lang.items()}
    if len(set(counts.values())) != 1:
        raise CptronError(
            f"aligned inputs differ in length ({', '.join(f'{k}: {v}' for k, v in counts.items())} "
            f"{'lines' if cfg.text_unit == 'line' else 'documents'}): line i of every input must be the same sentence"
        )
    n = next(iter(counts.values()))
    tokenized = {lang: [words_of(d, cfg.lowercase) for d in docs] for lang, docs in per_lang.items()}
    words = {lang: sum(map(len, t)) for lang, t in tokenized.items()}
    sentences, empty = [], 0
    for i in range(n):
        sent = [f"{lang}:{w}" for lang, t in tokenized.items() for w in t[i]]
        empty += not sent
        sentences += [TaggedDocument(piece, [i]) for piece in _pieces(sent)]
    if not sum(words.values()):
        raise CptronError(f"inputs={cfg.inputs} hold no words ({n} sentences): expected text to train on")
    log.info("%d aligned sentences in %d languages (%d empty in every language)", n, len(langs), empty)
    return sentences, {"documents": n, "words": sum(words.values()), "words_per_language": words}


# ------------------------------------------------------------------ training


def auto_epochs(mode: str, words: int) -> int:
    """Passes that train on about `_AUTO_WORDS[mode]` words, within 5..100 (small corpora need many passes)."""
    lo, hi = _AUTO_EPOCHS
    return min(hi, max(lo, math.ceil(_AUTO_WORDS[mode] / max(words, 1))))


def _epoch_logger(epochs: int, enabled: bool):
    from gensim.models.callbacks import CallbackAny2Vec

    every = max(1, epochs // 20)

    class EpochLogger(CallbackAny2Vec):
        """Logs finished epochs with the time spent and an estimate of the time left."""

        def __init__(self) -> None:
            self.epoch, self.start = 0, time.perf_counter()
            self.last_log = self.start

        def on_epoch_end(self, model) -> None:
            self.epoch += 1
            now = time.perf_counter()
            # about 20 lines per run, and one at least every 30 s when epochs are slow
            due = self.epoch % every == 0 or self.epoch == epochs or now - self.last_log > 30
            if enabled and due:
                spent, self.last_log = now - self.start, now
                left = spent / self.epoch * (epochs - self.epoch)
                log.info("epoch %d/%d done: %.1f s, about %.0f s left", self.epoch, epochs, spent, left)

    return EpochLogger()


def _fit(cfg: VocabVectorsConfig, model, sentences: list[Any], callback):
    """`model` with its vocabulary built from `sentences` and trained on them."""
    model.build_vocab(sentences)
    if not model.wv.index_to_key:
        raise CptronError(
            f"no word occurs min_count={cfg.min_count} times in inputs={cfg.inputs}: lower min_count or give more text"
        )
    log.info("vocabulary: %d words occur min_count=%d times or more", len(model.wv.index_to_key), cfg.min_count)
    model.train(sentences, total_examples=model.corpus_count, epochs=model.epochs, callbacks=[callback])
    return model


@contextlib.contextmanager
def _quiet_gensim():
    """gensim logs a dozen lines per model and a progress line every second at INFO; ours say enough."""
    gensim_log = logging.getLogger("gensim")
    level = gensim_log.level
    gensim_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        gensim_log.setLevel(level)


def train_vectors(cfg: VocabVectorsConfig, sentences: list[Any], epochs: int) -> WordVectors:
    """Train the mode's model on `sentences` and return its word vectors (most frequent word first)."""
    gensim = import_gensim()
    from gensim.models import Doc2Vec, FastText, Word2Vec

    common = dict(
        vector_size=cfg.dim,
        min_count=cfg.min_count,
        negative=cfg.negative,
        hs=0,
        sample=cfg.sample,
        epochs=epochs,
        seed=cfg.seed,
        workers=cfg.workers,
    )
    callback = _epoch_logger(epochs, cfg.progress)
    determinism = "deterministic" if cfg.workers == 1 else f"{cfg.workers} threads, not reproducible"
    if cfg.mode == "aligned":
        log.info(
            "training sentence-ID skip-gram (Levy et al. 2017) as gensim %s Doc2Vec PV-DBOW: dim %d, %d epochs, %s",
            gensim.__version__,
            cfg.dim,
            epochs,
            determinism,
        )
        with _quiet_gensim():
            model = _fit(cfg, Doc2Vec(dm=0, dbow_words=0, **common), sentences, callback)
        # The words' output (context) vectors are the sentence-ID word vectors; the input vectors stay untrained.
        vectors = model.syn1neg
    else:
        cls = Word2Vec if cfg.algorithm == "word2vec" else FastText
        log.info(
            "training skip-gram %s (gensim %s): dim %d, window %d, %d epochs, %s",
            cls.__name__,
            gensim.__version__,
            cfg.dim,
            cfg.window,
            epochs,
            determinism,
        )
        subwords = {"bucket": cfg.buckets} if cls is FastText else {}
        with _quiet_gensim():
            model = _fit(cfg, cls(sg=1, window=cfg.window, **subwords, **common), sentences, callback)
        vectors = model.wv.vectors
    words = [str(w) for w in model.wv.index_to_key]
    values = np.array(vectors[: len(words)], dtype=np.float32)
    if not np.isfinite(values).all():
        raise CptronError(f"training on inputs={cfg.inputs} gave NaN or inf vectors: nothing written")
    return WordVectors(words, torch.from_numpy(values))


def report_path(output: str | Path) -> Path:
    """Where the JSON report of the .vec file `output` goes."""
    return Path(output).with_suffix(".json")


def run_vocab_vectors(cfg: VocabVectorsConfig) -> dict[str, Any]:
    cfg.validate()
    import_gensim()  # fail before reading the text when gensim is missing
    out, report_file = Path(cfg.output), report_path(cfg.output)
    for p in (out, report_file):
        if p.exists() and not cfg.overwrite:
            raise CptronError(f"{p} exists: pass --overwrite true to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sentences, stats = _sentences(cfg)
    epochs = cfg.epochs or auto_epochs(cfg.mode, stats["words"])
    if not cfg.epochs:
        log.info("epochs=0: %d epochs (about %.1fM words trained on)", epochs, epochs * stats["words"] / 1e6)
    trained = time.perf_counter()
    wv = train_vectors(cfg, sentences, epochs)
    train_seconds = time.perf_counter() - trained
    save_vectors(wv, out)
    report = {
        "mode": cfg.mode,
        "method": (
            "sentence-ID skip-gram (Levy, Søgaard and Goldberg 2017), gensim Doc2Vec PV-DBOW output vectors"
            if cfg.mode == "aligned"
            else f"skip-gram {cfg.algorithm}"
        ),
        "output": str(out),
        "vocabulary_size": len(wv),
        "dim": wv.dim,
        "epochs": epochs,
        "seed": cfg.seed,
        "deterministic": cfg.workers == 1,
        **stats,
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(time.perf_counter() - start, 3),
        "config": asdict(cfg),
    }
    if cfg.mode == "aligned":
        prefixes = Counter(w.split(":", 1)[0] for w in wv.words)
        report["vocabulary_per_language"] = {lang: prefixes[lang] for lang, _ in aligned_inputs(cfg.inputs)}
    report_file.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info(
        "wrote %d vectors of dim %d to %s (%d epochs in %.1f s) and the report %s",
        len(wv),
        wv.dim,
        out,
        epochs,
        train_seconds,
        report_file,
    )
    return report


__all__ = ["VocabVectorsConfig", "aligned_inputs", "auto_epochs", "run_vocab_vectors", "train_vectors", "words_of"]
