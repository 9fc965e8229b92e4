"""SentencePiece BPE bases (Llama-2, Mistral): new pieces appended below every old one, tokenizer.json regenerated.

Owns training the target-language SentencePiece model with the base's trainer and normalizer settings,
choosing its new pieces, appending them to a copy of the base proto with scores below every old score,
the reachability test of pieces, and the tokenizer.json and HF configs written from the edited proto.

SentencePiece's BPE encoder repeatedly merges the adjacent pair whose concatenation is the highest-scoring
piece (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with Subword Units"; Kudo and
Richardson, 2018, "SentencePiece"). New pieces scored below every old piece therefore only merge once no
old merge applies: a text's segmentation changes only where a new piece covers part of it.

A character the base has no piece for (it spells it in byte-fallback pieces, <0xE0><0xA4><0x8B>) is added as a
piece of its own before any new piece holding it, and counted in `new_tokens`: tokenizer.model would make such
a piece without it, tokenizer.json (what transformers and the trainer use) never (`_choose`). SentencePiece's
byte pieces are never merged, so no part of a character is a piece and every new piece has a text to check.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from typing import Any, Optional

import numpy as np

from cptron.errors import CptronError
from cptron.vocab.base_tokenizer import BaseTokenizer, ExtendedTokenizer

log = logging.getLogger("cptron.vocab")

# sentencepiece_model.proto's ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
_MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
# Trainer settings that shape which pieces a model learns; copied from the base's trainer_spec.
_CARRIED_TRAINER_FIELDS = (
    "byte_fallback",
    "split_digits",
    "split_by_unicode_script",
    "split_by_number",
    "split_by_whitespace",
    "treat_whitespace_as_suffix",
    "allow_whitespace_only_pieces",
    "max_sentencepiece_length",
    "character_coverage",
    "unk_id",
    "bos_id",
    "eos_id",
    "pad_id",
    "unk_piece",
    "bos_piece",
    "eos_piece",
    "pad_piece",
)
_GROWTH_ROUNDS = 4
_MAX_ROUNDS = 20


def _model_proto():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto()


def _processor(proto: Any):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _scores_below(floor: float, n: int) -> list[float]:
    """`n` strictly decreasing float32 scores below `floor`: SentencePiece stores scores as float32, and
    Mistral's whitespace pieces sit at -1e9, where float32 steps are 64 apart."""
    scores, s = [], np.float32(floor)
    for _ in range(n):
        t = np.float32(s - np.float32(1.0))
        if t >= s:
            t = np.nextafter(s, np.float32(-np.inf))
        scores.append(float(t))
        s = t
    return scores


# ------------------------------------------------------------------ the target model


def _training_lines(base: BaseTokenizer, texts: list[str]) -> list[str]:
    """The texts as the trainer sees them: one sentence per line, normalized by the base's own rule.

    The base's rule is applied here, through its precompiled charsmap, because the trainer accepts only
    built-in rule names; the target is then trained with the identity rule on text that is already normalized.
    """
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if base.proto.normalizer_spec.precompiled_charsmap:
        import sentencepiece as spm

        normalizer = spm.SentencePieceNormalizer(
            model_proto=base.proto.SerializeToString(),
            add_dummy_prefix=False,
            escape_whitespaces=False,
            remove_extra_whitespaces=False,
        )
        lines = [normalizer.normalize(line) for line in lines]
    return lines


def _trainer_options(proto: Any, vocab_size: int, longest: int) -> dict[str, Any]:
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    options = {name: getattr(spec, name) for name in _CARRIED_TRAINER_FIELDS}
    options.update(
        model_type=_MODEL_TYPE_NAMES[spec.model_type],
        vocab_size=vocab_size,
        # The text may be too small for vocab_size: then the trainer stops where the text runs out.
        hard_vocab_limit=False,
        # The base's limit (Mistral: 4192 bytes) would drop long lines of the inputs without a word.
        max_sentence_length=max(spec.max_sentence_length, min(longest + 1, 1 << 20)),
        normalization_rule_name="identity",
        add_dummy_prefix=norm.add_dummy_prefix,
        remove_extra_whitespaces=norm.remove_extra_whitespaces,
        user_defined_symbols=[p.piece for p in proto.pieces if p.type == USER_DEFINED],
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return options


def train_target_model(base: BaseTokenizer, lines: list[str], vocab_size: int, seed: int) -> Any:
    """A SentencePiece model of the base's kind and settings, trained on `lines`; at most `vocab_size` pieces."""
    import sentencepiece as spm

    longest = max(len(line.encode("utf-8")) for line in lines)
    for _ in range(2):
        buf = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=buf, **_trainer_options(base.proto, vocab_size, longest)
            )
            break
        except RuntimeError as e:
            # Too small for the characters the text needs: grow by what it asks for, once.
            needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if needed is None or int(needed.group(1)) < vocab_size:
                raise CptronError(f"training the target SentencePiece model on the inputs failed: {e}") from e
            vocab_size += int(needed.group(1))
    else:
        raise CptronError("training the target SentencePiece model failed: the inputs need more characters")
    proto = _model_proto()
    proto.ParseFromString(buf.getvalue())
    return proto


# ------------------------------------------------------------------ the extended proto


def _extra_added_tokens(base: BaseTokenizer) -> list[str]:
    """Added tokens of the base's tokenizer.json past the proto's pieces (e.g. a <pad> at 32000): they become
    control pieces at the same ids, so the new pieces start after every id in use."""
    n = len(base.proto.pieces)
    added = (base.tokenizer_json or {}).get("added_tokens") or []
    path = base.tokenizer_json_path
    extra = {}
    for entry in added:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "content" not in entry:
            raise CptronError(f"{path}: added_tokens must be objects with an integer id and a content")
        tid, content = entry["id"], entry["content"]
        if tid < n and base.proto.pieces[tid].piece != content:
            raise CptronError(
                f"{path}: added token {content!r} has id {tid}, which is {base.proto.pieces[tid].piece!r} in "
                f"{base.path}: the two files describe different tokenizers"
            )
        if tid >= n:
            extra[tid] = content
    if sorted(extra) != list(range(n, n + len(extra))):
        raise CptronError(
            f"{path}: added tokens {sorted(extra.items())} leave a gap after the {n} pieces of {base.path}: "
            f"expected consecutive ids from {n}"
        )
    return [extra[i] for i in sorted(extra)]


def extended_proto(base_proto: Any, extra_controls: list[str], pieces: list[str]) -> Any:
    """A copy of the base proto with `extra_controls` and then `pieces` appended, each piece scored below every
    old piece and below the one before it (the target's merge order)."""
    proto = _model_proto()
    proto.CopyFrom(base_proto)
    for content in extra_controls:
        proto.pieces.add(piece=content, score=0.0, type=CONTROL)
    floor = min(p.score for p in base_proto.pieces)
    for piece, score in zip(pieces, _scores_below(floor, len(pieces))):
        proto.pieces.add(piece=piece, score=score, type=NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto


def _piece_text(piece: str, proto: Any) -> str:
    return piece.replace("▁", " ") if proto.normalizer_spec.escape_whitespaces else piece


def unreachable_pieces(proto: Any, ids: list[int]) -> list[int]:
    """The ids among `ids` that the model does not produce on their own text.

    A piece's own text is encoded without the dummy prefix and without whitespace clean-up, so a word-inside
    piece such as "ung" is tested as "ung" and "▁Gott" as " Gott".
    """
    variant = _model_proto()
    variant.CopyFrom(proto)
    variant.normalizer_spec.add_dummy_prefix = False
    variant.normalizer_spec.remove_extra_whitespaces = False
    sp = _processor(variant)
    encoded = sp.encode([_piece_text(proto.pieces[i].piece, proto) for i in ids], out_type=int)
    return [i for i, got in zip(ids, encoded) if got != [i]]


def _text_pieces(proto: Any) -> list[int]:
    return [i for i, p in enumerate(proto.pieces) if p.type in (NORMAL, USER_DEFINED)]


# ------------------------------------------------------------------ tokenizer.json and configs


def _build_fast(proto: Any, legacy: bool):
    try:
        from transformers.convert_slow_tokenizer import SpmConverter
    except ImportError as e:
        raise CptronError(f"regenerating tokenizer.json needs transformers: {e}") from e
    build = getattr(SpmConverter, "build_tokenizer_from_spm_proto", None)
    if build is None:
        import transformers

        raise CptronError(
            "regenerating tokenizer.json from a SentencePiece model needs transformers >= 5 "
            f"(SpmConverter.build_tokenizer_from_spm_proto); installed: {transformers.__version__}"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tok = build(proto=proto, vocab=vocab, legacy=legacy)
    if tok is None:
        raise CptronError("transformers could not convert the extended SentencePiece model to tokenizer.json")
    return tok


def _added_tokens(base: BaseTokenizer, proto: Any) -> list[dict]:
    if base.tokenizer_json is not None and base.tokenizer_json.get("added_tokens"):
        return base.tokenizer_json["added_tokens"]
    return [
        {
            "id": i,
            "content": p.piece,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, p in enumerate(proto.pieces)
        if p.type in (UNKNOWN, CONTROL)
    ]


def _post_processor(base: BaseTokenizer) -> Optional[dict]:
    if base.tokenizer_json is not None and "post_processor" in base.tokenizer_json:
        return base.tokenizer_json["post_processor"]
    from tokenizers import processors

    spec = base.proto.trainer_spec
    add_bos = base.config_value("add_bos_token")
    add_eos = base.config_value("add_eos_token")
    bos = [spec.bos_piece] if spec.bos_id >= 0 and (add_bos is None or add_bos) else []
    eos = [spec.eos_piece] if spec.eos_id >= 0 and add_eos else []
    if not bos and not eos:
        return None
    ids = {spec.bos_piece: spec.bos_id, spec.eos_piece: spec.eos_id}
    template = processors.TemplateProcessing(
        single=[*(f"{t}:0" for t in bos), "$A:0", *(f"{t}:0" for t in eos)],
        pair=[*(f"{t}:0" for t in bos), "$A:0", *(f"{t}:0" for t in eos), *(f"{t}:1" for t in bos), "$B:1"]
        + [f"{t}:1" for t in eos],
        special_tokens=[(t, ids[t]) for t in bos + eos],
    )
    return json.loads(template.__getstate__())


def tokenizer_json_from_proto(base: BaseTokenizer, proto: Any) -> dict:
    """tokenizer.json for `proto`, built the way transformers builds one from a tokenizer.model, with the
    base's added tokens, post-processor, padding and truncation."""
    legacy = base.config_value("legacy")
    data = json.loads(_build_fast(proto, True if legacy is None else bool(legacy)).to_str())
    data["added_tokens"] = _added_tokens(base, proto)
    data["post_processor"] = _post_processor(base)
    for key in ("padding", "truncation"):
        if base.tokenizer_json is not None and key in base.tokenizer_json:
            data[key] = base.tokenizer_json[key]
    return data


def default_configs(base: BaseTokenizer) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for a base that came without them.

    PreTrainedTokenizerFast loads tokenizer.json as written, so transformers encodes exactly as the proto.
    """
    spec = base.proto.trainer_spec
    special = {
        key: piece
        for key, piece, tid in (
            ("bos_token", spec.bos_piece, spec.bos_id),
            ("eos_token", spec.eos_piece, spec.eos_id),
            ("unk_token", spec.unk_piece, spec.unk_id),
            ("pad_token", spec.pad_piece, spec.pad_id),
        )
        if tid >= 0
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": spec.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


# ------------------------------------------------------------------ the extension


def _candidates(base_proto: Any, target: Any, taken: set[str]) -> list[str]:
    return [p.piece for p in target.pieces if p.type == NORMAL and p.piece not in taken]


def _choose(pool: list[str], known: set[str], excluded: set[str], n: int) -> list[str]:
    """The first pieces of `pool` outside `excluded`, at most `n` in all, each after those of its characters
    that are no piece yet.

    SentencePiece merges two adjacent symbols whenever their concatenation is a piece, even symbols that are not
    pieces themselves (characters it would otherwise spell in byte-fallback pieces), but the BPE of
    tokenizer.json merges only tokens of its vocabulary, and starts such a character from its bytes: a piece
    whose characters are not all pieces would be made by tokenizer.model and never by tokenizer.json. Every
    symbol SentencePiece passes through on the way to a piece is a piece or a character, so with its characters
    a piece is made the same way by both. A piece that does not fit with the characters it needs is skipped.
    """
    chosen: list[str] = []
    have: set[str] = set()
    for piece in pool:
        if len(chosen) >= n:
            break
        if piece in excluded or piece in have:
            continue
        missing = [c for c in dict.fromkeys(piece) if c != piece and c not in known and c not in have]
        if any(c in excluded for c in missing) or len(chosen) + len(missing) + 1 > n:
            continue
        chosen += [*missing, piece]
        have.update(chosen[-len(missing) - 1 :])
    return chosen


def _unreachable_in_json(fast: Any, proto: Any, first_id: int) -> list[int]:
    """The ids from `first_id` on whose piece the model of tokenizer.json does not make, alone, of the piece."""
    ids = range(first_id, len(proto.pieces))
    return [i for i in ids if [t.id for t in fast.model.tokenize(proto.pieces[i].piece)] != [i]]


def _pieces_used(proto: Any, texts: list[str], first_id: int) -> set[int]:
    if not texts:
        return set()
    return {i for ids in _processor(proto).encode(texts, out_type=int) for i in ids if i >= first_id}


def extend_sentencepiece(
    base: BaseTokenizer,
    texts: list[str],
    new_tokens: int,
    target_vocab_size: int,
    seed: int,
    protect: list[str] = (),
) -> ExtendedTokenizer:
    """Append at most `new_tokens` pieces of a target model trained on `texts` to the base proto; none that
    the texts in `protect` would use, so that their segmentation stays the base's.

    Merging a target-language SentencePiece model into the base's by appending its pieces is the vocabulary
    extension of Chinese LLaMA (Cui et al., 2023, "Efficient and Effective Text Encoding for Chinese LLaMA and
    Alpaca"); here the appended pieces score below every old one, and unreachable ones are replaced.
    """
    from tokenizers import Tokenizer

    base_proto = base.proto
    extra = _extra_added_tokens(base)
    old_size = len(base_proto.pieces) + len(extra)
    taken = {p.piece for p in base_proto.pieces} | set(extra)
    lines = _training_lines(base, texts)
    if not lines:
        raise CptronError("the inputs hold no text to train a target SentencePiece model on")

    # Many target pieces are old ones: grow the target until it yields new_tokens new pieces or the text runs out.
    size = target_vocab_size or 2 * new_tokens + 512
    for _ in range(_GROWTH_ROUNDS):
        log.info("training a target SentencePiece model of at most %d pieces on %d lines", size, len(lines))
        target = train_target_model(base, lines, size, seed)
        candidates = _candidates(base_proto, target, taken)
        if target_vocab_size or len(candidates) >= new_tokens or len(target.pieces) < size:
            break
        size *= 2

    # A new piece can be unreachable when old merges split its text so that no two adjacent pieces make it up;
    # such pieces, and those the protected texts would use, are dropped and the next candidates take their place.
    # tokenizer.json is built (a second or so for 32k pieces) and checked only once tokenizer.model passes.
    unreachable: set[str] = set()
    protected: set[str] = set()
    known = {p.piece for p in base_proto.pieces}
    pool = candidates
    for round_ in range(_MAX_ROUNDS):
        chosen = _choose(pool, known, unreachable | protected, new_tokens)
        proto = extended_proto(base_proto, extra, chosen)
        bad = unreachable_pieces(proto, list(range(old_size, len(proto.pieces))))
        used = _pieces_used(proto, list(protect), old_size)
        if not bad and not used:
            tokenizer_json = tokenizer_json_from_proto(base, proto)
            fast = Tokenizer.from_str(json.dumps(tokenizer_json))
            bad = _unreachable_in_json(fast, proto, old_size)
            if not bad:
                break
        unreachable.update(proto.pieces[i].piece for i in bad)
        protected.update(proto.pieces[i].piece for i in used)
        if round_ >= _MAX_ROUNDS // 2:
            pool = chosen  # stop refilling, so that the rounds end
    else:
        raise CptronError(
            f"{len(bad)} new pieces stay unreachable or change protected text after {_MAX_ROUNDS} rounds; "
            "nothing was written"
        )
    log.info(
        "appending %d new pieces (dropped: %d unreachable, %d used by the protected text)",
        len(chosen),
        len(unreachable),
        len(protected),
    )

    base_unreachable = unreachable_pieces(base_proto, _text_pieces(base_proto))
    base_sp, new_sp = _processor(base_proto), _processor(proto)

    def check_text(eval_texts: list[str]) -> dict[str, Any]:
        # The regenerated tokenizer.json must segment as tokenizer.model does; the base, converted the same
        # way, shows how far transformers' conversion itself agrees on this text.
        base_fast = Tokenizer.from_str(
            json.dumps(tokenizer_json_from_proto(base, extended_proto(base_proto, extra, [])))
        )
        mismatches = {}
        for name, sp, hf in (("base", base_sp, base_fast), ("extended", new_sp, fast)):
            want = sp.encode(eval_texts, out_type=int)
            got = [e.ids for e in hf.encode_batch(eval_texts, add_special_tokens=False)]
            mismatches[name] = sum(a != b for a, b in zip(want, got))
        if mismatches["extended"] > mismatches["base"]:
            log.warning(
                "tokenizer.json and tokenizer.model segment %d eval documents differently (the base: %d)",
                mismatches["extended"],
                mismatches["base"],
            )
        return {"tokenizer_json_vs_model_mismatches": mismatches}

    files = {
        "tokenizer.model": proto.SerializeToString(),
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=2).encode("utf-8"),
    }
    if not base.configs:
        files.update(
            {name: json.dumps(value, indent=2).encode("utf-8") + b"\n" for name, value in default_configs(base).items()}
        )
    fast_vocab = fast.get_vocab(with_added_tokens=True)
    stray = [(i, p.piece) for i, p in enumerate(proto.pieces) if fast_vocab.get(p.piece) != i]
    if stray:
        raise CptronError(f"internal error: tokenizer.json gives piece {stray[0][1]!r} another id than {stray[0][0]}")
    return ExtendedTokenizer(
        files=files,
        old_vocab={p.piece: i for i, p in enumerate(base_proto.pieces)}
        | dict(zip(extra, range(len(base_proto.pieces), old_size))),
        # As tokenizer.json loads, so that the checks see the ids transformers and the trainer will see.
        new_vocab=fast_vocab,
        old_size=old_size,
        first_new_id=old_size,
        new_size=len(proto.pieces),
        added=[_piece_text(p, proto) for p in chosen],
        encode_base=lambda t: base_sp.encode(t, out_type=int),
        encode_new=lambda t: new_sp.encode(t, out_type=int),
        decode_base=base_sp.decode,
        decode_new=new_sp.decode,
        unreachable_new=[proto.pieces[i].piece for i in bad],
        unreachable_base=len(base_unreachable),
        base_checked=len(_text_pieces(base_proto)),
        details={
            "target_tokenizer": {
                "vocab_size": len(target.pieces),
                "requested_vocab_size": size,
                "new_candidates": len(candidates),
                "single_character_pieces": sum(len(c) == 1 for c in chosen),
                "dropped_unreachable": len(unreachable),
                "dropped_changing_source": len(protected),
            },
            "score_of_first_new_piece": proto.pieces[old_size].score if chosen else None,
        },
        check_text=check_text,
    )


__all__ = ["extend_sentencepiece", "extended_proto", "train_target_model", "unreachable_pieces"]
