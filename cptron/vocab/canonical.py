"""Token strings in one canonical form, so tokens of different vocabulary alphabets can be matched.

A vocabulary writes the same text in different alphabets: SentencePiece marks a word start with `▁`
("▁Haus"), byte-level BPE (GPT-2, Llama 3) maps every byte to a printable character (" Haus" is "ĠHaus",
"ä" is "Ã¤"), SentencePiece's byte fallback spells a byte as `<0xNN>`, and a byte-level token may hold
part of a UTF-8 character. The canonical form is the text the token stands for, with a word start as a
plain leading space and every byte that is not a whole UTF-8 character written `<0xNN>` (SentencePiece's
spelling), so "ĠHaus", "▁Haus" and " Haus" are all " Haus", and "Ã" (the lone byte 0xC3) and "<0xC3>"
are both "<0xC3>".

The module also goes the other way (`vocabulary_form`: a plain word in a vocabulary's alphabet, as the
tokenizer's model reads it) and names the trap of bare prefix pieces: a word the vocabulary has no
word-start token for splits into "▁" + pieces, and a bare "▁"/"Ġ" would then collect every such word.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Literal, Optional

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

Scheme = Literal["byte_level", "sentencepiece", "plain"]
"""A vocabulary's alphabet: byte-level BPE, SentencePiece (`▁` word starts, `<0xNN>` byte fallback), or
plain text (anything else: tokens are read as written)."""

SP_SPACE = "▁"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others (space, control
    characters, ...) for the characters from U+0100 on, in byte order (so the space byte 0x20 is "Ġ")."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _has(node: object, kind: str) -> bool:
    """Whether a tokenizer.json component (or any of a Sequence's members) has `type == kind`."""
    if isinstance(node, dict):
        if node.get("type") == kind:
            return True
        return any(_has(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has(v, kind) for v in node)
    return False


def detect_scheme(tokenizer: Tokenizer) -> Scheme:
    """The alphabet of a tokenizers.Tokenizer's vocabulary, read from its pre-tokenizer and decoder:
    ByteLevel means byte-level; Metaspace, or a decoder that turns "▁" into spaces, means SentencePiece."""
    data = json.loads(tokenizer.to_str())
    parts = [data.get("pre_tokenizer"), data.get("decoder"), data.get("normalizer")]
    if any(_has(p, "ByteLevel") for p in parts):
        return "byte_level"
    if any(_has(p, "Metaspace") for p in parts) or SP_SPACE in json.dumps(data.get("decoder")):
        return "sentencepiece"
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    if sum(t.startswith(SP_SPACE) for t in vocab) > len(vocab) // 10:  # a converted model without its decoder
        return "sentencepiece"
    return "plain"


def _bytes_to_text(data: bytes) -> str:
    """UTF-8 text of `data`, each byte that is not part of a whole character written `<0xNN>`."""
    text = data.decode("utf-8", errors="surrogateescape")
    # surrogateescape keeps an undecodable byte b as the lone surrogate U+DC00 + b.
    return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


def canonical_token(token: str, scheme: Scheme) -> str:
    """The canonical form of a vocabulary token (see the module docstring). Added tokens ("<s>", plain
    text) are not in the model's alphabet: pass scheme "plain" for them."""
    if scheme == "byte_level":
        table = unicode_to_byte()
        if all(c in table for c in token):
            return _bytes_to_text(bytes(table[c] for c in token))
        return token  # not a byte-level string (e.g. an added token stored in the model's vocab)
    if scheme == "sentencepiece":
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            return _bytes_to_text(bytes([int(match.group(1), 16)]))
        return token.replace(SP_SPACE, " ")
    return token


def vocabulary_form(text: str, scheme: Scheme) -> str:
    """Plain text in a vocabulary's alphabet, as the tokenizer's model (not its normalizer) reads it:
    " Haus" is "ĠHaus" in a byte-level vocabulary and "▁Haus" in a SentencePiece one."""
    if scheme == "byte_level":
        table = byte_to_unicode()
        return "".join(table[b] for b in text.encode("utf-8"))
    if scheme == "sentencepiece":
        return text.replace(" ", SP_SPACE)
    return text


def is_bare_prefix(canonical: str) -> bool:
    """True for a token that holds only a word-start marker or other whitespace (a bare "▁" or "Ġ"):
    it says nothing about the word it starts, and must never collect words or be matched as one."""
    return not canonical.strip()


def canonical_vocabulary(tokenizer: Tokenizer, scheme: Optional[Scheme] = None) -> dict[int, str]:
    """id -> canonical form of every token of a tokenizer (added tokens are read as plain text)."""
    scheme = scheme or detect_scheme(tokenizer)
    model = tokenizer.get_vocab(with_added_tokens=False)
    out = {}
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        out[i] = canonical_token(token, scheme if token in model else "plain")
    return out


def word_pieces(tokenizer: Tokenizer, word: str, scheme: Scheme) -> list[int]:
    """Ids of the pieces the tokenizer's model splits " " + word into (the word as it appears after a space
    in running text), leaving out bare prefix pieces: the lone-prefix trap."""
    pieces = tokenizer.model.tokenize(vocabulary_form(" " + word, scheme))
    return [p.id for p in pieces if not is_bare_prefix(canonical_token(p.value, scheme))]
