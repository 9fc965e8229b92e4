"""`cptron vocab init`: a Hugging Face model resized to an extended tokenizer, the new rows initialized.

Owns reading the base model and the two tokenizers (checking that the new one extends the base's),
rewriting the input embedding and the LM head with their new rows, and writing the output directory:
shards holding neither tensor are copied file by file, the shard(s) holding them are rewritten tensor
by tensor at the byte level (old rows copied bit-exact, new rows appended), so an 8B model is never
loaded whole. The methods and their statistics live in `cptron.vocab.init_methods`; the word-vector methods
(wechsel, focus, ofa, convex) make a `RowPlan` once (`cptron.vocab.wordvec_init`), applied here to each matrix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from cptron import checkpoint as ckpt
from cptron.errors import ConversionError, CptronError, require
from cptron.hf import TOKENIZER_FILES, _read_json, hf_weight_map
from cptron.vocab.init_methods import METHODS, new_rows, subword_pieces
from cptron.vocab.row_plan import RowPlan, apply_plan
from cptron.vocab.wordvec_init import WORDVEC_METHODS, PlanInputs, plan_rows, validate_method_fields

log = logging.getLogger("cptron.vocab")

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
VOCAB_EXTENSION_FILE = "vocab_extension.json"  # read by the trainer (optim.train_new_rows_only)
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer files that hold the vocabulary: the base's would contradict the extended tokenizer.
_VOCAB_FILES = {"tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"}
# Weights in other formats: stale copies of the old vocabulary, never carried over.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_COPY_BLOCK = 64 << 20


@dataclass
class VocabInitConfig:
    """Resize a Hugging Face model to an extended tokenizer: old embedding/LM-head rows bit-exact, new rows initialized."""

    base: str = ""
    """HF model directory: config.json, model.safetensors or a sharded index, and its tokenizer."""
    tokenizer: str = ""
    """Extended tokenizer directory (tokenizer.json, as `cptron vocab extend` writes it): every base token keeps its id."""
    method: Literal["random", "mean", "multivariate", "subword-mean", "wechsel", "focus", "ofa", "convex"] = "mean"
    """New rows: random N(0, init std), mean, multivariate N(mu, 1e-5 Sigma), subword-mean, wechsel, focus, ofa, convex."""
    output: str = ""
    """HF model directory to write."""
    pad_vocab_to_multiple_of: int = 1
    """Round the new row count up to a multiple of this (e.g. 128 for tensor parallelism); padding rows get the method's rows."""
    seed: int = 0
    """Seed of every random draw (random, multivariate and fallback rows: from (seed, tensor name); convex sampling)."""
    chunk_rows: int = 4096
    """Rows read at a time for the statistics (fp32 memory per chunk: chunk_rows x hidden x 4 bytes)."""
    overwrite: bool = False
    """Replace `output` if it exists."""
    progress: bool = True
    """Show a progress bar."""
    source_vectors: str = ""
    """wechsel: source-language (the base's) word vectors: fastText .vec/.bin, word2vec binary."""
    target_vectors: str = ""
    """wechsel: target-language word vectors (may be the same multilingual file, with the languages set)."""
    dictionary: str = ""
    """wechsel: bilingual dictionary, 'source<TAB or space>target' a line; empty: words spelled alike."""
    multilingual_vectors: str = ""
    """ofa: multilingual word vectors with language-prefixed words (eng:god, deu:gott)."""
    source_language: str = ""
    """Language prefix of the base's words in the vectors (e.g. eng); ofa needs it, wechsel uses it when set."""
    target_language: str = ""
    """Language prefix of the new tokens' words in the vectors (e.g. deu); ofa needs it, wechsel uses it when set."""
    token_vectors: str = ""
    """focus: token-level auxiliary vectors keyed by the extended tokenizer's token strings."""
    max_words: int = 200000
    """wechsel/ofa: most word vectors used per language, the file's first (most frequent); 0: all."""
    neighbours: int = 10
    """wechsel/ofa: nearest old tokens each new token combines."""
    temperature: float = 0.1
    """wechsel/ofa: weights are softmax(cosine / temperature) over the neighbours."""
    ofa_rank: int = 0
    """ofa: rank r of the embedding factorization (0: the hidden size, i.e. full rank)."""
    ofa_output: Literal["materialized", "factorized"] = "materialized"
    """ofa: ordinary weights only, or also embedding_factors.safetensors for model.embedding_rank."""
    texts: list[str] = dataclass_field(default_factory=list)
    """convex: target-language text files or globs (jsonl 'text', parquet, or one document a line)."""
    convex_steps: int = 300
    """convex: Adam steps of the skip-gram training of the weights."""
    convex_batch: int = 512
    """convex: (center, context) pairs per step."""
    convex_lr: float = 0.1
    """convex: Adam learning rate of the weight logits."""
    convex_window: int = 3
    """convex: context tokens on each side of a new token."""
    convex_negatives: int = 5
    """convex: negative samples per pair, from the unigram^0.75 distribution."""
    convex_candidates: int = 16
    """convex: old rows a new token may combine, besides its own pieces: the most similar to their mean."""

    def validate(self) -> None:
        require(bool(self.base), "base", self.base, "an HF model directory")
        require(Path(self.base).is_dir(), "base", self.base, "an existing directory")
        require(bool(self.tokenizer), "tokenizer", self.tokenizer, "an extended tokenizer directory")
        require(Path(self.tokenizer).is_dir(), "tokenizer", self.tokenizer, "an existing directory")
        methods = METHODS + WORDVEC_METHODS
        require(self.method in methods, "method", self.method, f"one of {', '.join(methods)}")
        require(bool(self.output), "output", self.output, "a directory path")
        for field, other in (("base", self.base), ("tokenizer", self.tokenizer)):
            # --overwrite replaces the whole output directory: one holding an input would delete it.
            require(
                not Path(other).resolve().is_relative_to(Path(self.output).resolve()),
                "output",
                self.output,
                f"a directory other than {field} and not one holding it",
            )
        require(
            self.pad_vocab_to_multiple_of >= 1,
            "pad_vocab_to_multiple_of",
            self.pad_vocab_to_multiple_of,
            "an integer >= 1",
        )
        require(self.chunk_rows >= 1, "chunk_rows", self.chunk_rows, "an integer >= 1")
        validate_method_fields(self)


class Vocabularies(NamedTuple):
    """What the two tokenizers say about the rows."""

    n_old: int
    """Largest id the base tokenizer uses, plus one: rows below it are copied."""
    n_new: int
    """Largest id the extended tokenizer uses, plus one."""
    new_tokens: list[Optional[str]]
    """The token string of each id in [n_old, n_new), None for an id no token uses."""
    in_model: list[bool]
    """Whether each of those tokens belongs to the tokenizer's model (False: an added token)."""
    old_tokenizer: object
    """The base's tokenizers.Tokenizer (for subword-mean)."""


# ------------------------------------------------------------------ tokenizers


def _load_tokenizer_json(path: Path):
    from tokenizers import Tokenizer  # deferred: only this command needs it

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise CptronError(f"{path} is not a readable tokenizer.json: {e}") from e


def _sentencepiece_vocab(path: Path) -> dict[str, int]:
    import sentencepiece as spm  # deferred: only SentencePiece bases without tokenizer.json need it

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise CptronError(f"{path} is not a readable SentencePiece model: {e}") from e
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}


def _restricted_tokenizer(new_file: Path, n_old: int):
    """The extended tokenizer.json cut back to ids below n_old: the base's BPE model, for a base that ships
    only tokenizer.model (the extension appends tokens and merges after the base's and changes none)."""
    from tokenizers import Tokenizer

    data = json.loads(new_file.read_text(encoding="utf-8"))  # loaded by tokenizers before: valid JSON
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise CptronError(f"{new_file}: subword-mean without the base's tokenizer.json needs a BPE model")
    try:
        vocab = {t: i for t, i in model["vocab"].items() if i < n_old}
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
        kept = [m for m in pairs if len(m) == 2 and m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
        model["vocab"], model["merges"] = vocab, kept
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < n_old]
        return Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # an odd but loadable file: tokenizers raises its own types
        raise CptronError(f"{new_file}: cannot cut it back to the base's {n_old} ids: {e}") from e


def read_vocabularies(base: Path, tokenizer: Path) -> Vocabularies:
    """Both vocabularies, refusing an extended tokenizer that moves or drops a base token."""
    new_file = tokenizer / "tokenizer.json"
    if not new_file.is_file():
        raise CptronError(f"{tokenizer} holds no tokenizer.json: expected an extended tokenizer directory")
    new_tok = _load_tokenizer_json(new_file)
    new = new_tok.get_vocab(with_added_tokens=True)
    model_vocab = new_tok.get_vocab(with_added_tokens=False)
    old_tok = None
    if (base / "tokenizer.json").is_file():
        old_file = base / "tokenizer.json"
        old_tok = _load_tokenizer_json(old_file)
        old = old_tok.get_vocab(with_added_tokens=True)
    elif (base / "tokenizer.model").is_file():
        old_file = base / "tokenizer.model"
        old = _sentencepiece_vocab(old_file)
    else:
        raise CptronError(f"{base} holds no tokenizer (tokenizer.json or tokenizer.model): the base's is needed")
    if not old:
        raise CptronError(f"{old_file} holds no tokens")
    if len(new) < len(old):
        raise CptronError(
            f"{new_file} has {len(new)} tokens, fewer than the {len(old)} of the base tokenizer {old_file}: "
            "expected an extension of it"
        )
    moved = [(t, i) for t, i in old.items() if new.get(t) != i]
    if moved:
        t, i = moved[0]
        raise CptronError(
            f"{new_file} is not an extension of the base tokenizer {old_file}: {len(moved)} of the base's "
            f"{len(old)} tokens are missing or have another id (e.g. {t!r}: id {i} in the base, "
            f"{new.get(t)} in the extension)"
        )
    n_old, n_new = max(old.values()) + 1, max(new.values()) + 1
    inside = sorted((i, t) for t, i in new.items() if t not in old and i < n_old)
    if inside:
        i, t = inside[0]
        raise CptronError(
            f"{new_file}: new token {t!r} has id {i}, inside the base tokenizer {old_file}'s ids [0, {n_old}): "
            "expected new ids after the base's largest"
        )
    by_id: dict[int, str] = {i: t for t, i in new.items() if i >= n_old}
    tokens = [by_id.get(i) for i in range(n_old, n_new)]
    in_model = [t is not None and t in model_vocab for t in tokens]
    if old_tok is None:
        old_tok = _restricted_tokenizer(new_file, n_old)
    return Vocabularies(n_old, n_new, tokens, in_model, old_tok)


# ------------------------------------------------------------------ safetensors at the byte level


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, byte offset of the data) of a safetensors file, validated by safetensors itself first."""
    try:
        with safe_open(path, framework="pt"):
            pass
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except Exception as e:  # safetensors raises its own types; a short or garbled header raises others
        raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
    return header, 8 + n


def _tensor_bytes(entry: dict) -> int:
    begin, end = entry["data_offsets"]
    return end - begin


def _copy_range(src, dst, start: int, length: int) -> None:
    src.seek(start)
    while length > 0:
        block = src.read(min(length, _COPY_BLOCK))
        if not block:
            raise ConversionError(f"{src.name} ends inside a tensor")
        dst.write(block)
        length -= len(block)


def _rewrite_shard(src: Path, dst: Path, tails: dict[str, torch.Tensor], n_old: int, drop: set[str]) -> int:
    """Write `src` to `dst` with each tensor in `tails` cut to its first n_old rows (copied as bytes) and
    its tail rows appended; tensors in `drop` are left out. Returns the tensor bytes written."""
    header, data_start = _safetensors_header(src)
    meta = header.pop("__metadata__", None)
    names = sorted((n for n in header if n not in drop), key=lambda n: header[n]["data_offsets"][0])
    out_header: dict = {"__metadata__": meta} if meta is not None else {}
    offset = 0
    for name in names:
        entry = dict(header[name])
        if name in tails:
            entry["shape"] = [n_old + tails[name].shape[0]] + list(entry["shape"][1:])
            row_bytes = _tensor_bytes(header[name]) // header[name]["shape"][0]
            size = n_old * row_bytes + tails[name].numel() * tails[name].element_size()
        else:
            size = _tensor_bytes(entry)
        entry["data_offsets"] = [offset, offset + size]
        out_header[name] = entry
        offset += size
    encoded = json.dumps(out_header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(src, "rb") as f, open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            begin, end = header[name]["data_offsets"]
            if name in tails:
                row_bytes = (end - begin) // header[name]["shape"][0]
                _copy_range(f, out, data_start + begin, n_old * row_bytes)
                out.write(tails[name].contiguous().view(torch.uint8).numpy().tobytes())
            else:
                _copy_range(f, out, data_start + begin, end - begin)
    return offset


# ------------------------------------------------------------------ the command


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_matrix(path: Path, name: str, n_old: int, config_vocab: Optional[int]) -> tuple[int, torch.dtype]:
    """(hidden size, dtype) of an embedding-shaped tensor, refusing one that does not fit the vocabularies."""
    header, _ = _safetensors_header(path)
    entry = header.get(name)
    if not isinstance(entry, dict):
        raise ConversionError(f"tensor {name!r} is not in {path} although the index names that file")
    shape, code = entry.get("shape"), entry.get("dtype")
    if code not in _ST_DTYPES:
        raise ConversionError(f"tensor {name!r} in {path} has dtype {code}: expected a floating-point tensor")
    if not isinstance(shape, list) or len(shape) != 2:
        raise ConversionError(f"tensor {name!r} in {path} has shape {shape}: expected [vocab, hidden]")
    if shape[0] < n_old:
        raise ConversionError(
            f"tensor {name!r} in {path} has {shape[0]} rows, but the base tokenizer uses ids up to {n_old - 1}"
        )
    if config_vocab is not None and shape[0] != config_vocab:
        raise ConversionError(
            f"tensor {name!r} in {path} has {shape[0]} rows, but config.json says vocab_size={config_vocab}"
        )
    return shape[1], _ST_DTYPES[code]


@contextmanager
def open_rows(path: Path, name: str):
    """(read_rows, hidden size, dtype) of tensor `name` in `path`.

    Rows are read with plain file reads, not through a memory map: the mapped pages of a whole embedding
    would count against the process's memory (and a container's limit) although a chunk is all it needs."""
    header, data_start = _safetensors_header(path)
    entry = header[name]
    d, dtype = entry["shape"][1], _ST_DTYPES[entry["dtype"]]
    row_bytes = _tensor_bytes(entry) // entry["shape"][0]
    offset = data_start + entry["data_offsets"][0]
    with open(path, "rb") as f:

        def read_rows(start: int, stop: int) -> torch.Tensor:
            f.seek(offset + start * row_bytes)
            buf = bytearray((stop - start) * row_bytes)
            if f.readinto(buf) != len(buf):
                raise ConversionError(f"{path} ends inside tensor {name!r}")
            return torch.frombuffer(buf, dtype=dtype).view(stop - start, d)

        yield read_rows, d, dtype


def _tail_rows(
    cfg: VocabInitConfig,
    path: Path,
    name: str,
    n_old: int,
    k: int,
    std: float,
    pieces: Optional[list[list[int]]],
    plan: Optional[RowPlan] = None,
    factors: Optional[dict] = None,
) -> torch.Tensor:
    """The k rows after n_old of tensor `name`, in its dtype; a word-vector method's `plan` is applied to
    this tensor's own old rows (ofa also puts the tensor's factors in `factors`)."""
    with open_rows(path, name) as (read_rows, d, dtype):
        generator = torch.Generator().manual_seed(_tensor_seed(cfg.seed, name))
        if plan is None:
            out, _ = new_rows(cfg.method, k, read_rows, n_old, d, cfg.chunk_rows, generator, std, pieces)
        elif cfg.method == "ofa":
            from cptron.vocab.ofa import ofa_rows

            factorized = cfg.ofa_output == "factorized"
            out, factor, facts = ofa_rows(
                plan, read_rows, n_old, d, cfg.chunk_rows, generator, cfg.ofa_rank, factorized, cfg.progress
            )
            plan.details.setdefault("matrices", {})[name] = facts
            if factor is not None and factors is not None:
                factors[name] = factor
        else:
            out = apply_plan(plan, read_rows, n_old, d, cfg.chunk_rows, generator)
    return out.to(dtype)


def word_vector_plan(
    cfg: VocabInitConfig, vocab: Vocabularies, k: int, files: dict[str, Path]
) -> tuple[RowPlan, PlanInputs]:
    """The plan of a word-vector method (cptron.vocab.wordvec_init) for the k rows after the old ones."""
    new_tok = _load_tokenizer_json(Path(cfg.tokenizer) / "tokenizer.json")
    tokens = vocab.new_tokens + [None] * (k - len(vocab.new_tokens))
    in_model = vocab.in_model + [False] * (k - len(vocab.in_model))
    inputs = PlanInputs(
        vocab.n_old, tokens, in_model, vocab.old_tokenizer, new_tok, lambda: open_rows(files[EMBED], EMBED)
    )
    return plan_rows(cfg, inputs), inputs


def run_vocab_init(cfg: VocabInitConfig) -> Path:
    """Write `cfg.output`: the base model with its vocabulary extended to `cfg.tokenizer`; returns the path."""
    base, tok_dir, out = Path(cfg.base), Path(cfg.tokenizer), Path(cfg.output)
    ckpt.check_replaceable(out, cfg.overwrite)
    config = _read_json(base / "config.json")
    files = hf_weight_map(base)
    outside = next((p for p in files.values() if p.parent != base), None)
    if outside is not None:  # the index is untrusted: its shards are written under the same names
        raise ConversionError(f"{base / INDEX_FILE} names shard {outside}: expected a file name in {base}")
    vocab = read_vocabularies(base, tok_dir)
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ConversionError(
            f"{base / 'config.json'}: tie_word_embeddings={tied!r} is invalid: expected true or false"
        )
    config_vocab = config.get("vocab_size")
    config_vocab = config_vocab if isinstance(config_vocab, int) else None
    std = config.get("initializer_range", 0.02)
    if not isinstance(std, (int, float)) or not std > 0:
        raise ConversionError(f"{base / 'config.json'}: initializer_range={std!r} is invalid: expected a float > 0")
    if EMBED not in files:
        raise ConversionError(f"{base}: no tensor {EMBED!r} in the model's safetensors files")
    matrices = [EMBED] if tied else [EMBED, HEAD]
    if not tied and HEAD not in files:
        raise ConversionError(
            f"{base}: config.json "
            + ("says tie_word_embeddings=false" if "tie_word_embeddings" in config else "has no tie_word_embeddings")
            + f" (untied, as transformers reads it), but no tensor {HEAD!r} is in the safetensors files"
        )
    shapes = {name: _check_matrix(files[name], name, vocab.n_old, config_vocab) for name in matrices}
    multiple = cfg.pad_vocab_to_multiple_of
    rows = -(-vocab.n_new // multiple) * multiple
    drop = {HEAD} if tied and HEAD in files else set()

    log.info(
        "vocab init: method %s, old vocabulary %d, new vocabulary %d, %d rows (%d new, %d padding), %s embeddings, "
        "hidden %d, %s",
        cfg.method,
        vocab.n_old,
        vocab.n_new,
        rows,
        vocab.n_new - vocab.n_old,
        rows - vocab.n_new,
        "tied" if tied else "untied",
        shapes[EMBED][0],
        str(shapes[EMBED][1]).removeprefix("torch."),
    )
    base_rows = config_vocab or vocab.n_old
    if base_rows > vocab.n_old:
        log.info("%s: rows %d..%d of the base are padding: not read, not kept", base, vocab.n_old, base_rows - 1)
    k = rows - vocab.n_old
    pieces = None
    if cfg.method == "subword-mean":
        tokens = vocab.new_tokens + [None] * (k - len(vocab.new_tokens))  # padding rows have no string
        in_model = vocab.in_model + [False] * (k - len(vocab.in_model))
        pieces = subword_pieces(vocab.old_tokenizer, tokens, in_model, vocab.n_old)
        lost = sum(t is not None and not p for t, p in zip(tokens, pieces))
        log.info(
            "subword-mean: %d of %d new token(s) had no usable old pieces and got the mean row",
            lost,
            sum(t is not None for t in tokens),
        )
    plan, inputs, factors = None, None, {}
    if cfg.method in WORDVEC_METHODS:
        plan, inputs = word_vector_plan(cfg, vocab, k, files)
    tails = {
        name: _tail_rows(cfg, files[name], name, vocab.n_old, k, float(std), pieces, plan, factors) for name in matrices
    }

    tmp, _ = ckpt.side_dirs(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        extra = None
        if plan is not None:  # which old tokens made the new rows: counts, method facts, examples
            old_names = {i: t for t, i in vocab.old_tokenizer.get_vocab(with_added_tokens=True).items()}
            extra = {"init": plan.report(inputs.tokens, old_names)}
        _write_output(cfg, base, tok_dir, tmp, files, tails, vocab, rows, drop, config, extra)
        if factors:
            from cptron.vocab.ofa import write_factors

            write_factors(tmp, factors)
        ckpt.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


def _write_output(
    cfg: VocabInitConfig,
    base: Path,
    tok_dir: Path,
    tmp: Path,
    files: dict[str, Path],
    tails: dict[str, torch.Tensor],
    vocab: Vocabularies,
    rows: int,
    drop: set[str],
    config: dict,
    extra: Optional[dict] = None,
) -> None:
    shards = sorted(set(files.values()))
    rewritten = {files[name] for name in list(tails) + list(drop)}
    sizes = {}
    for shard in tqdm(shards, desc="vocab init", unit="shard", disable=not cfg.progress):
        if shard in rewritten:
            sizes[shard.name] = _rewrite_shard(
                shard, tmp / shard.name, {n: t for n, t in tails.items() if files[n] == shard}, vocab.n_old, drop
            )
        else:
            shutil.copyfile(shard, tmp / shard.name)
            header, _ = _safetensors_header(shard)
            sizes[shard.name] = sum(_tensor_bytes(e) for n, e in header.items() if n != "__metadata__")
    index_path = base / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path)
        index["weight_map"] = {n: f for n, f in index["weight_map"].items() if n not in drop}
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": sum(sizes.values())}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = {**config, "vocab_size": rows}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    extended = {f.name for f in tok_dir.iterdir() if f.name in TOKENIZER_FILES and f.is_file()}
    skipped = []
    for f in sorted(base.iterdir()):
        name = f.name
        if name in ("config.json", INDEX_FILE) or (tmp / name).exists():
            continue
        if f.is_dir() or name.endswith(_OTHER_WEIGHTS) or name in _VOCAB_FILES or name in extended:
            if name not in _VOCAB_FILES and name not in extended:
                skipped.append(name)
            continue
        shutil.copy2(f, tmp / name)  # generation_config.json, chat templates, README, licence, ...
    if skipped:
        log.info(
            "%s: not copied (directories and weights not in the model's safetensors): %s", base, ", ".join(skipped)
        )
    for name in sorted(extended):
        shutil.copy2(tok_dir / name, tmp / name)
    report = {
        "old_vocab_size": vocab.n_old,
        "new_vocab_size": vocab.n_new,
        "rows": rows,
        "method": cfg.method,
        "base": str(base),
        "tokenizer": str(tok_dir),
        "seed": cfg.seed,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        **(extra or {}),
    }
    (tmp / VOCAB_EXTENSION_FILE).write_text(json.dumps(report, indent=2) + "\n")
