"""The tokenizer that `cptron vocab extend` starts from: where it is, which kind it is, and the files beside it.

Owns `BaseTokenizer` and `read_base_tokenizer`, and `ExtendedTokenizer`, the shape in which each kind's
extension hands its result back to `run_vocab_extend`. A tokenizer directory, an HF model directory holding one,
or a bare tokenizer.model / tokenizer.json file becomes one of two kinds: a SentencePiece BPE model proto
(Llama-2, Mistral) or a byte-level BPE tokenizer.json (Llama 3, Qwen2). Every file read here is untrusted:
an unreadable or malformed one is a one-line CptronError naming it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cptron.errors import CptronError

log = logging.getLogger("cptron.vocab")

SENTENCEPIECE = "sentencepiece"
BYTE_LEVEL_BPE = "byte-level-bpe"

# HF config files beside a tokenizer that stay valid when tokens are appended: no old id moves.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Carried verbatim; never parsed.
VERBATIM_FILES = ("chat_template.jinja", "chat_template.json")
# Written from the extended vocabulary; a stale copy of the base's would contradict tokenizer.json.
SLOW_BPE_FILES = ("vocab.json", "merges.txt")

_SP_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
_EXPECTED = "a tokenizer directory, an HF model directory holding one, or a tokenizer.model / tokenizer.json file"


@dataclass
class BaseTokenizer:
    """A base tokenizer as read from disk, before any change."""

    kind: str
    """SENTENCEPIECE or BYTE_LEVEL_BPE."""
    path: Path
    """The file holding the vocabulary: tokenizer.model (SentencePiece) or tokenizer.json (BPE)."""
    proto: Any = None
    """SentencePiece only: the parsed ModelProto."""
    tokenizer_json: Optional[dict] = None
    """The parsed tokenizer.json: the vocabulary of a BPE base; beside a SentencePiece model, its
    post-processor and added tokens."""
    tokenizer_json_path: Optional[Path] = None
    """Where tokenizer_json came from."""
    configs: dict[str, Any] = field(default_factory=dict)
    """CONFIG_FILES present beside the tokenizer, parsed."""
    verbatim: dict[str, bytes] = field(default_factory=dict)
    """VERBATIM_FILES present beside the tokenizer."""
    slow_files: tuple[str, ...] = ()
    """SLOW_BPE_FILES the base directory has, to be regenerated for the extended vocabulary."""

    def config_value(self, key: str) -> Any:
        """`key` from tokenizer_config.json, else special_tokens_map.json; AddedToken dicts give their content."""
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            value = self.configs.get(name, {}).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                return value
        return None


@dataclass
class ExtendedTokenizer:
    """An extended tokenizer, not yet written, with what `run_vocab_extend` needs to measure and check it."""

    files: dict[str, bytes]
    """Output file name -> contents (tokenizer.json, tokenizer.model, vocab.json, merges.txt, configs)."""
    old_vocab: dict[str, int]
    """Every token of the base (model and added tokens) -> id."""
    new_vocab: dict[str, int]
    """Every token of the extended tokenizer -> id."""
    old_size: int
    """Largest id the base uses, plus one."""
    first_new_id: int
    """Id of the first added token; the added ones run from here to new_size - 1."""
    new_size: int
    """Largest id the extended tokenizer uses, plus one."""
    added: list[str]
    """The added tokens' decoded text, in id order; a part of a UTF-8 character as its bytes, <0xE0><0xA4>."""
    encode_base: Callable[[list[str]], list[list[int]]]
    """Texts -> ids under the base, without special tokens."""
    encode_new: Callable[[list[str]], list[list[int]]]
    """Texts -> ids under the extended tokenizer, without special tokens."""
    decode_base: Callable[[list[int]], str]
    """Ids -> text under the base."""
    decode_new: Callable[[list[int]], str]
    """Ids -> text under the extended tokenizer."""
    unreachable_new: list[str]
    """Added tokens the extended tokenizer does not produce on their own text (empty unless something broke);
    partial-character tokens, which have no text, are counted in `partial` instead."""
    unreachable_base: int
    """Base tokens the base does not produce on their own text, by the same test."""
    base_checked: int
    """How many base tokens that test covered (normal tokens whose text is a string)."""
    new_checked: Optional[int] = None
    """How many added tokens that test covered (those with a text of their own); None: all."""
    partial: Optional[dict[str, Any]] = None
    """Byte-level BPE only: how many new and base tokens are parts of UTF-8 characters, how many of each no
    reachable token is made through, and the rule by which that is counted."""
    details: dict[str, Any] = field(default_factory=dict)
    """Kind-specific report entries (the target tokenizer, rejected candidates, ...)."""
    check_text: Optional[Callable[[list[str]], dict[str, Any]]] = None
    """Kind-specific checks on the eval text, run after the common ones; returns report entries."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CptronError(f"{path} is not readable JSON: {e}") from e


def _parse_sentencepiece(path: Path) -> Any:
    """The ModelProto in `path`, or None where the bytes are not one (e.g. Llama 3's tiktoken tokenizer.model)."""
    from sentencepiece import sentencepiece_model_pb2

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CptronError(f"{path} is not readable: {e}") from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError and friends: whatever the bytes are, not a model proto
        return None
    if not proto.pieces or not proto.HasField("trainer_spec"):
        return None
    return proto


def _check_sentencepiece(proto: Any, path: Path) -> None:
    model_type = proto.trainer_spec.model_type
    if model_type != 2:
        name = _SP_MODEL_TYPES.get(model_type, str(model_type))
        raise CptronError(
            f"{path}: SentencePiece model_type {name} is not supported: expected BPE (as Llama-2 and Mistral), "
            "whose new pieces can be appended below every old merge"
        )
    seen: set[str] = set()
    for i, piece in enumerate(proto.pieces):
        if piece.piece in seen:
            raise CptronError(f"{path}: piece {i} {piece.piece!r} appears twice; the model is malformed")
        seen.add(piece.piece)


def _is_byte_level(tokenizer_json: dict) -> bool:
    def has_byte_level(component: Any) -> bool:
        if not isinstance(component, dict):
            return False
        if component.get("type") == "ByteLevel":
            return True
        parts = component.get("pretokenizers") or component.get("decoders") or []
        return any(has_byte_level(p) for p in parts)

    return has_byte_level(tokenizer_json.get("pre_tokenizer")) or has_byte_level(tokenizer_json.get("decoder"))


def _check_bpe_json(tokenizer_json: Any, path: Path) -> None:
    if not isinstance(tokenizer_json, dict) or not isinstance(tokenizer_json.get("model"), dict):
        raise CptronError(f"{path} is not a tokenizers file: expected a JSON object with a 'model' object")
    model = tokenizer_json["model"]
    model_type = model.get("type")
    if model_type != "BPE":
        raise CptronError(
            f"{path}: tokenizer model type {model_type!r} is not supported: expected a byte-level BPE "
            "tokenizer.json (as Llama 3 and Qwen2) or a SentencePiece BPE tokenizer.model"
        )
    if not _is_byte_level(tokenizer_json):
        raise CptronError(
            f"{path}: a BPE model without byte-level pre-tokenization is not supported: expected a byte-level "
            "BPE tokenizer.json (as Llama 3 and Qwen2), or the SentencePiece tokenizer.model beside it"
        )
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not vocab:
        raise CptronError(f"{path}: model.vocab is missing or empty: expected a token -> id object")
    if not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in vocab.items()):
        raise CptronError(f"{path}: model.vocab must map token strings to ids >= 0")
    if len(set(vocab.values())) != len(vocab):
        raise CptronError(f"{path}: model.vocab gives two tokens the same id")
    if not isinstance(merges, list):
        raise CptronError(f"{path}: model.merges is missing: expected a list")
    added = tokenizer_json.get("added_tokens") or []
    if not isinstance(added, list) or not all(
        isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str) for a in added
    ):
        raise CptronError(f"{path}: added_tokens must be a list of objects with an integer id and a content")


def _load_tokenizers_json(tokenizer_json: dict, path: Path) -> None:
    """Refuse a file the tokenizers library itself cannot build, before any work is done on it."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(json.dumps(tokenizer_json))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise CptronError(f"{path} is not a tokenizer the tokenizers library can load: {e}") from e


def read_base_tokenizer(base: str) -> BaseTokenizer:
    """Locate, read and check the base tokenizer; a directory's tokenizer.model wins when it is SentencePiece."""
    root = Path(base)
    if root.is_dir():
        sp_file = root / "tokenizer.model" if (root / "tokenizer.model").is_file() else None
        json_file = root / "tokenizer.json" if (root / "tokenizer.json").is_file() else None
        if sp_file is None and json_file is None:
            raise CptronError(f"base {root} holds neither tokenizer.model nor tokenizer.json: expected {_EXPECTED}")
        side = root
    elif root.is_file():
        try:
            with open(root, "rb") as fh:
                head = fh.read(64).lstrip()
        except OSError as e:
            raise CptronError(f"base {root} is not readable: {e}") from e
        is_json = root.suffix == ".json" or head.startswith(b"{")
        sp_file, json_file = (None, root) if is_json else (root, None)
        side = None  # a bare file comes without the configs of whatever directory it sits in
    else:
        raise CptronError(f"base {root} not found: expected {_EXPECTED}")

    proto = _parse_sentencepiece(sp_file) if sp_file is not None else None
    if sp_file is not None and proto is None:
        if json_file is None:
            raise CptronError(f"{sp_file} is not a SentencePiece model (its bytes do not parse as a ModelProto)")
        log.info("%s is not a SentencePiece model (tiktoken?); extending %s", sp_file, json_file)
    tokenizer_json = _read_json(json_file) if json_file is not None else None

    if proto is not None:
        _check_sentencepiece(proto, sp_file)
        if tokenizer_json is not None:
            if not isinstance(tokenizer_json, dict):
                raise CptronError(f"{json_file} is not a tokenizers file: expected a JSON object")
            # Its added tokens, post-processor and padding go into the extended tokenizer.json: refused
            # here, before the target model is trained, rather than as a traceback once they are used.
            _load_tokenizers_json(tokenizer_json, json_file)
        tok = BaseTokenizer(SENTENCEPIECE, sp_file, proto=proto, tokenizer_json=tokenizer_json)
    else:
        _check_bpe_json(tokenizer_json, json_file)
        _load_tokenizers_json(tokenizer_json, json_file)
        tok = BaseTokenizer(BYTE_LEVEL_BPE, json_file, tokenizer_json=tokenizer_json)
    tok.tokenizer_json_path = json_file if tokenizer_json is not None else None

    if side is not None:
        for name in CONFIG_FILES:
            if (side / name).is_file():
                value = _read_json(side / name)
                if not isinstance(value, dict):
                    raise CptronError(f"{side / name} is not a JSON object")
                tok.configs[name] = value
        for name in VERBATIM_FILES:
            if (side / name).is_file():
                tok.verbatim[name] = (side / name).read_bytes()
        tok.slow_files = tuple(name for name in SLOW_BPE_FILES if (side / name).is_file())
    return tok


__all__ = ["SENTENCEPIECE", "BYTE_LEVEL_BPE", "BaseTokenizer", "ExtendedTokenizer", "read_base_tokenizer"]
