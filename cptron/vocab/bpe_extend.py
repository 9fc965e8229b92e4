"""Byte-level BPE bases (Llama 3, Qwen2, GPT-2 style tokenizer.json): new tokens and their merges go into the BPE model.

Owns training the target BPE with the base's normalizer and pre-tokenizer, walking its merges into the base's
vocabulary and merge list, the reachability test of tokens, and the tokenizer.json (plus vocab.json and
merges.txt where the base had them) written from the result.

BPE applies a word's merges in the order they were learned (Sennrich et al., 2016, "Neural Machine Translation
of Rare Words with Subword Units"; byte-level alphabet: Radford et al., 2019, GPT-2). Merges appended after
every old one only fire once no old merge applies, so a text's segmentation changes only where a new token
covers part of it. New tokens are model entries, not added tokens: added tokens are cut out of the text before
pre-tokenization and would bypass the pre-tokenizer's boundaries and the merges.

A character of three or four UTF-8 bytes (Devanagari, CJK, kana, emoji) that the base has no token for starts
as its bytes, and one merge joins only two pieces: its token needs a token for part of the character first
(e.g. the bytes E0 A4 that open most Devanagari characters). Such partial-character tokens, and those the
target learned across characters (the last byte of one and the first of the next), are added with their merges
and counted in `new_tokens`, but only as intermediates of a whole-character or longer token that needs them.
They have no text of their own to be encoded on: one counts as reached when the tokenizer forms it on the way
to a reachable token of whole characters, a single byte when UTF-8 text can hold it (`partial_token_check`),
and the base's partial-character tokens are counted by the same rule for comparison.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any, Optional

from cptron.errors import CptronError
from cptron.vocab.base_tokenizer import BaseTokenizer, ExtendedTokenizer

log = logging.getLogger("cptron.vocab")

_GROWTH_ROUNDS = 4
_MAX_ROUNDS = 20


def _byte_alphabet() -> dict[str, int]:
    """Character -> byte of the byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68
    are shifted past 255 in byte order, so that no token holds a space or a control character."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


_BYTES = _byte_alphabet()


def token_text(token: str) -> Optional[str]:
    """The text a byte-level token stands for; None for a part of a UTF-8 character (it has no text of its own)."""
    try:
        return bytes(_BYTES[c] for c in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def token_label(token: str) -> str:
    """The token's text, or for a part of a UTF-8 character its bytes written as SentencePiece writes byte
    pieces (<0xE0><0xA4>)."""
    text = token_text(token)
    return text if text is not None else "".join(f"<0x{_BYTES[c]:02X}>" if c in _BYTES else c for c in token)


PARTIAL_RULE = (
    "a token that is part of a UTF-8 character has no text to encode; a single byte counts as reached when UTF-8 "
    "text can hold it, a longer one when BPE forms it while encoding the text of a reachable whole-character "
    "token of the same tokenizer"
)
_UTF8_BYTES = frozenset(range(0x80)) | frozenset(range(0x80, 0xC0)) | frozenset(range(0xC2, 0xF5))


# ------------------------------------------------------------------ reading the base


def parse_merges(merges: list, path: Any) -> tuple[list[tuple[str, str]], bool]:
    """(pairs, written as "a b" strings): tokenizers >= 0.20 writes [a, b] lists, older versions strings."""
    pairs, as_strings = [], bool(merges) and isinstance(merges[0], str)
    for i, merge in enumerate(merges):
        if as_strings and isinstance(merge, str) and len(merge.split(" ")) == 2:
            pairs.append(tuple(merge.split(" ")))
        elif not as_strings and isinstance(merge, list) and len(merge) == 2 and all(isinstance(m, str) for m in merge):
            pairs.append((merge[0], merge[1]))
        else:
            raise CptronError(
                f"{path}: model.merges[{i}]={merge!r} is invalid: expected {'an a b string' if as_strings else 'an [a, b] pair'} like the merges before it"
            )
    return pairs, as_strings


def _check_options(model: dict, path: Any) -> None:
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise CptronError(
                f"{path}: model.{option}={model[option]!r} is not supported: byte-level BPE bases (Llama 3, Qwen2) "
                "mark no word boundaries inside tokens"
            )


def _tokenizer(data: dict):
    """A tokenizers.Tokenizer for `data`, without BPE dropout: the checks need one segmentation per text."""
    from tokenizers import Tokenizer

    if data["model"].get("dropout"):
        data = {**data, "model": {**data["model"], "dropout": None}}
    return Tokenizer.from_str(json.dumps(data))


def _encoder(tok):
    batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return lambda texts: [e.ids for e in batch(texts, add_special_tokens=False)]


# ------------------------------------------------------------------ the target BPE


def train_target_merges(base: BaseTokenizer, texts: list[str], vocab_size: int) -> tuple[list[tuple[str, str]], int]:
    """(merges in learned order, vocabulary size reached) of a BPE trained on `texts` with the base's normalizer
    and pre-tokenizer, over the whole byte alphabet."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    data = {k: v for k, v in base.tokenizer_json.items() if k not in ("model", "added_tokens", "post_processor")}
    data["model"] = {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False, "vocab": {}, "merges": []}
    data["added_tokens"], data["post_processor"] = [], None
    try:
        tok = Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises a bare Exception
        raise CptronError(f"{base.path}: cannot build its pre-tokenization for training: {e}") from e
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    trained = json.loads(tok.to_str())["model"]
    merges, _ = parse_merges(trained["merges"], "the target tokenizer")
    return merges, len(trained["vocab"])


# ------------------------------------------------------------------ walking the target's merges


def segment(
    word: str,
    ranks: dict[tuple[str, str], int],
    vocab: dict[str, int],
    ignore_merges: bool,
    formed: Optional[set[str]] = None,
) -> Optional[list]:
    """The tokens BPE makes of one pre-tokenized word: the lowest-ranked adjacent pair merges first, the leftmost
    among equals; None where a character is not in the vocabulary. `formed` collects every symbol the merging
    passes through, the initial bytes included."""
    if ignore_merges and word in vocab:
        return [word]
    symbols = list(word)
    if any(s not in vocab for s in symbols):
        return None
    if formed is not None:
        formed.update(symbols)
    while len(symbols) > 1:
        best, at = None, -1
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        if formed is not None:
            formed.add(symbols[at])
    return symbols


class _Growing:
    """A vocabulary and merge list that grow by one token and its merge at a time, and can be rolled back."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], first_id: int):
        self.vocab, self.merges = dict(vocab), list(merges)
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}  # a repeated pair ranks last, as in tokenizers
        self.next_id = first_id

    def add(self, left: str, right: str) -> None:
        self.vocab[left + right] = self.next_id
        self.ranks[(left, right)] = len(self.merges)
        self.merges.append((left, right))
        self.next_id += 1

    def undo(self, n: int) -> None:
        for left, right in self.merges[len(self.merges) - n :]:
            del self.vocab[left + right], self.ranks[(left, right)]
        del self.merges[len(self.merges) - n :]
        self.next_id -= n


def _build(
    token: str, grow: _Growing, allowed, target_rank: dict[str, int], room: int, ignore_merges: bool
) -> Optional[int]:
    """Add `token` with the merge that makes it from the two pieces the growing tokenizer splits it into, after
    the intermediate tokens it needs to get there; the number of tokens added, or None (nothing added).

    The growing tokenizer may split `token` into more than two pieces: always for a character of three or four
    bytes the base has no token for, and where old merges split a word elsewhere than the target did. Then two
    adjacent pieces are joined into an intermediate token with its own merge, the one the target learned first
    where several qualify (else the leftmost), until two pieces remain. Each new merge ranks after every merge
    already there, so it fires only on pieces the tokenizer could no longer merge: the intermediate is made on
    the way to `token`, and `token` on its own text.
    """
    added = 0
    while added < room:
        pieces = segment(token, grow.ranks, grow.vocab, ignore_merges)
        if pieces is None or len(pieces) < 2:
            break
        if len(pieces) == 2:
            grow.add(pieces[0], pieces[1])
            return added + 1
        joins = [i for i in range(len(pieces) - 1) if allowed(pieces[i] + pieces[i + 1])]
        if not joins:
            break
        at = min(joins, key=lambda i: (target_rank.get(pieces[i] + pieces[i + 1], len(target_rank)), i))
        grow.add(pieces[at], pieces[at + 1])
        added += 1
    grow.undo(added)
    return None


def _walk(
    target_merges: list[tuple[str, str]],
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    taken: set[str],
    rejected: set[str],
    first_id: int,
    budget: int,
    ignore_merges: bool,
    only: Optional[set[str]] = None,
) -> tuple[dict[str, int], list[tuple[str, str]], int]:
    """Extend copies of `vocab` and `merges` by the target's tokens of whole characters, in the target's order,
    each with the intermediate tokens `_build` needs for it; (vocabulary, merges, tokens skipped).

    Parts of a UTF-8 character are never candidates of their own: they come in only as intermediates. A token
    is skipped when it, with its intermediates, does not fit in what is left of `budget`, or when every pair
    of its pieces would make a token that is already there (old merges may split a word so that no new merge
    can reach it without a second merge for an existing token), rejected, or outside `only`.
    """
    grow = _Growing(vocab, merges, first_id)
    target_rank: dict[str, int] = {}
    for i, (a, b) in enumerate(target_merges):
        target_rank.setdefault(a + b, i)

    def allowed(token: str) -> bool:
        return (
            token not in grow.vocab and token not in taken and token not in rejected and (only is None or token in only)
        )

    skipped = 0
    for a, b in target_merges:
        room = budget - (grow.next_id - first_id)
        if room <= 0:
            break
        token = a + b
        if not allowed(token) or token_text(token) is None:
            continue
        if _build(token, grow, allowed, target_rank, room, ignore_merges) is None:
            skipped += 1
    return grow.vocab, grow.merges, skipped


def _has_high_byte(token: str) -> bool:
    return any(_BYTES.get(c, 0) >= 0x80 for c in token)


def partial_token_check(
    partial: list[str], reachable: list[str], merges: list[tuple[str, str]], vocab: dict[str, int]
) -> list[str]:
    """The tokens among `partial` (parts of UTF-8 characters) that no text is known to produce (PARTIAL_RULE).

    A partial-character token has no text of its own, so the test of whole tokens (encode the text, expect the
    token alone) cannot apply to it; it is reachable when some text produces it as a step of its merges. A
    single byte is every text's starting point where it occurs, so it counts when UTF-8 text can hold it (all
    but C0, C1 and F5..FF). A longer one counts when BPE forms it on the way to one of the `reachable` tokens,
    encoded on its own text: a sufficient condition, which every partial token the extension adds meets by
    construction. The merges run without `ignore_merges`' shortcut, which skips them only for a word that is a
    token as a whole.
    """
    longer = [t for t in partial if len(t) > 1]
    formed: set[str] = set()
    if longer:
        ranks = {pair: i for i, pair in enumerate(merges)}
        for token in reachable:
            if _has_high_byte(token):  # a token of ASCII bytes cannot pass through part of a longer character
                segment(token, ranks, vocab, False, formed)
    return [t for t in partial if (t not in formed if len(t) > 1 else _BYTES.get(t, 0xFF) not in _UTF8_BYTES)]


def unreachable_tokens(tok, items: list[tuple[str, int]]) -> list[str]:
    """The tokens among (token, id) `items` that `tok` does not produce, alone, on their own text."""
    encoded = _encoder(tok)([token_text(t) for t, _ in items])
    return [t for (t, i), ids in zip(items, encoded) if ids != [i]]


def invalid_merges(vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Merges whose parts or result are not in the vocabulary."""
    return [(a, b) for a, b in merges if a not in vocab or b not in vocab or a + b not in vocab]


# ------------------------------------------------------------------ files


def _with_model(base_json: dict, vocab: dict[str, int], merges: list[tuple[str, str]], as_strings: bool) -> dict:
    if as_strings and any(" " in a or " " in b for a, b in merges):
        as_strings = False  # "a b" cannot hold a token with a space; tokenizers reads both forms
    data = copy.copy(base_json)
    data["model"] = {
        **base_json["model"],
        "vocab": vocab,
        "merges": [f"{a} {b}" for a, b in merges] if as_strings else [[a, b] for a, b in merges],
    }
    return data


def _default_configs(base_json: dict) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for a bare tokenizer.json: the specials found among its
    added tokens, loaded by PreTrainedTokenizerFast exactly as tokenizer.json says."""
    from cptron.data.tokenize import _BOS_CANDIDATES, _EOS_CANDIDATES

    added = {a["content"] for a in base_json.get("added_tokens") or []}
    special = {}
    for key, candidates in (("bos_token", _BOS_CANDIDATES), ("eos_token", _EOS_CANDIDATES), ("pad_token", ("<pad>",))):
        found = next((c for c in candidates if c in added), None)
        if found is not None:
            special[key] = found
    unk = base_json["model"].get("unk_token")
    if unk:
        special["unk_token"] = unk
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _files(base: BaseTokenizer, data: dict, vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict[str, bytes]:
    files = {"tokenizer.json": json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8")}
    if "vocab.json" in base.slow_files:
        files["vocab.json"] = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    if "merges.txt" in base.slow_files:
        files["merges.txt"] = ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")
    if not base.configs:
        files.update(
            {name: json.dumps(v, indent=2).encode("utf-8") + b"\n" for name, v in _default_configs(data).items()}
        )
    return files


# ------------------------------------------------------------------ the extension


def _model_vocab_with_added(vocab: dict[str, int], added: dict[str, int], path: Any) -> dict[str, int]:
    """The model's vocabulary with the added tokens it lacks, at their own ids.

    tokenizers numbers an added token that is not in the model by counting past the model's vocabulary, so
    growing the model would move every such token (Llama 3's specials at 128000 and up). In the model's
    vocabulary they keep their ids; nothing else changes, as no merge makes them and the text is split on
    them before BPE runs.
    """
    by_id = {i: t for t, i in vocab.items()}
    outside = {}
    for content, tid in added.items():
        if content in vocab and vocab[content] != tid:
            raise CptronError(f"{path}: added token {content!r} has id {tid}, but the model gives it {vocab[content]}")
        if content not in vocab and tid in by_id:
            raise CptronError(f"{path}: added token {content!r} has id {tid}, which is {by_id[tid]!r} in the model")
        if content not in vocab:
            outside[content] = tid
    return dict(vocab) | outside


def extend_byte_level_bpe(
    base: BaseTokenizer, texts: list[str], new_tokens: int, target_vocab_size: int, protect: list[str] = ()
) -> ExtendedTokenizer:
    """Add at most `new_tokens` tokens, each with its merge, from a target BPE trained on `texts` (with the
    partial-character tokens they need, counted among the `new_tokens`); none that the texts in `protect` would
    use, so that their segmentation stays the base's."""
    base_json, path = base.tokenizer_json, base.path
    model = base_json["model"]
    _check_options(model, path)
    merges, as_strings = parse_merges(model["merges"], path)
    added = {a["content"]: a["id"] for a in base_json.get("added_tokens") or []}
    vocab = _model_vocab_with_added(model["vocab"], added, path)
    old_size = max(vocab.values()) + 1
    ignore_merges = bool(model.get("ignore_merges"))
    taken = set(added)

    size = target_vocab_size or 256 + 2 * new_tokens
    for _ in range(_GROWTH_ROUNDS):
        log.info("training a target BPE of at most %d tokens on %d documents", size, len(texts))
        target_merges, reached = train_target_merges(base, texts, size)
        # A candidate the extended tokenizer does not produce on its own text (the pre-tokenizer splits it
        # differently outside the text it was learned in), or one the protected texts would use, is dropped,
        # and the walk runs again without it. A partial-character token is dropped when no reachable token is
        # made through it, which the walk's construction rules out but the check does not assume; only once
        # the whole tokens are settled, as one dropped whole token can leave its intermediates unused.
        unreachable: set[str] = set()
        protected: set[str] = set()
        only = None
        for round_ in range(_MAX_ROUNDS):
            new_vocab, new_merges, skipped = _walk(
                target_merges, vocab, merges, taken, unreachable | protected, old_size, new_tokens, ignore_merges, only
            )
            data = _with_model(base_json, new_vocab, new_merges, as_strings)
            new_tok = _tokenizer(data)
            items = [(t, i) for t, i in new_vocab.items() if i >= old_size]
            whole = [(t, i) for t, i in items if token_text(t) is not None]
            bad = unreachable_tokens(new_tok, whole)
            partial = [t for t, _ in items if token_text(t) is None]
            unformed = [] if bad else partial_token_check(partial, [t for t, _ in whole], new_merges, new_vocab)
            new_ids = {i: t for t, i in items}
            used = {
                new_ids[i] for ids in (_encoder(new_tok)(list(protect)) if protect else []) for i in ids if i in new_ids
            }
            if not bad and not unformed and not used:
                break
            unreachable.update(bad, unformed)
            protected.update(used)
            if round_ >= _MAX_ROUNDS // 2:
                only = {t for t, _ in items}  # stop refilling, so that the rounds end
        else:
            raise CptronError(
                f"{len(bad) + len(unformed)} new tokens stay unreachable or change protected text after "
                f"{_MAX_ROUNDS} rounds; nothing was written"
            )
        if target_vocab_size or len(items) >= new_tokens or reached < size:
            break
        size *= 2
    log.info(
        "adding %d new tokens with their merges, %d of them parts of UTF-8 characters (skipped: %d that did not "
        "fit or could not be built, %d unreachable, %d used by the protected text)",
        len(items),
        len(partial),
        skipped,
        len(unreachable),
        len(protected),
    )
    broken = invalid_merges(new_vocab, new_merges[len(merges) :])
    if broken:
        raise CptronError(f"internal error: new merges {broken[:3]} name tokens outside the vocabulary")

    base_tok = _tokenizer(base_json)
    loaded = base_tok.get_vocab(with_added_tokens=True)
    moved = {t: (i, loaded.get(t)) for t, i in added.items() if loaded.get(t) != i}
    if moved:
        log.warning(
            "%s: tokenizers loads added tokens at other ids than the file gives, e.g. %s (file, loaded); "
            "the extended tokenizer keeps the file's",
            path,
            next(iter(moved.items())),
        )
    base_items = [(t, i) for t, i in vocab.items() if t not in added]
    base_text_items = [(t, i) for t, i in base_items if token_text(t) is not None]
    base_bad = unreachable_tokens(base_tok, base_text_items)
    base_partial = [t for t, _ in base_items if token_text(t) is None]
    base_reached = sorted({t for t, _ in base_text_items} - set(base_bad))
    base_unformed = partial_token_check(base_partial, base_reached, merges, vocab)
    return ExtendedTokenizer(
        files=_files(base, data, new_vocab, new_merges),
        old_vocab=dict(vocab),
        # As loaded, so that the checks see the ids transformers and the trainer will see.
        new_vocab=new_tok.get_vocab(with_added_tokens=True),
        old_size=old_size,
        first_new_id=old_size,
        new_size=max(new_vocab.values()) + 1,
        added=[token_label(t) for t, _ in items],
        encode_base=_encoder(base_tok),
        encode_new=_encoder(new_tok),
        decode_base=lambda ids: base_tok.decode(ids, skip_special_tokens=False),
        decode_new=lambda ids: new_tok.decode(ids, skip_special_tokens=False),
        unreachable_new=bad,
        unreachable_base=len(base_bad),
        base_checked=len(base_text_items),
        new_checked=len(whole),
        partial={
            "rule": PARTIAL_RULE,
            "new": len(partial),
            "new_unreached": len(unformed),
            "base": len(base_partial),
            "base_unreached": len(base_unformed),
        },
        details={
            "target_tokenizer": {
                "vocab_size": reached,
                "requested_vocab_size": size,
                "merges": len(target_merges),
                "skipped_unbuildable": skipped,
                "dropped_unreachable": len(unreachable),
                "dropped_changing_source": len(protected),
            },
            "merges": {"old": len(merges), "new": len(new_merges) - len(merges)},
            "invalid_base_merges": len(invalid_merges(vocab, merges)),
            "ignore_merges": ignore_merges,
        },
    )


__all__ = [
    "PARTIAL_RULE",
    "extend_byte_level_bpe",
    "parse_merges",
    "partial_token_check",
    "segment",
    "token_label",
    "token_text",
    "train_target_merges",
]
