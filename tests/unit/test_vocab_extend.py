"""`cptron vocab extend`, the fast parts: config checks, base reading and its errors, the BPE merge walk's
building blocks against the tokenizers library, byte-level BPE bases with ignore_merges, "a b" merges and
added tokens past the model's vocabulary, the protected text filter, the output directory and the CLI."""

import io
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cptron.cli import main
from cptron.errors import ConfigError, CptronError
from cptron.testing.fixtures import bible_text, mistral_sentencepiece_path, train_bpe_tokenizer
from cptron.vocab.base_tokenizer import BYTE_LEVEL_BPE, SENTENCEPIECE, read_base_tokenizer
from cptron.vocab.bpe_extend import parse_merges, partial_token_check, segment, token_label, token_text
from cptron.vocab.extend import REPORT_FILE, VocabExtendConfig, run_vocab_extend
from cptron.vocab.sentencepiece_extend import _choose, _scores_below, tokenizer_json_from_proto

EN = bible_text("en", 600)
DE = bible_text("de", 600)


@pytest.fixture(scope="module")
def bpe_base(tmp_path_factory):
    """A 1,000-id byte-level BPE trained on English only: unk=0, bos=1, eos=2, pad=3."""
    out = tmp_path_factory.mktemp("bpe_base")
    train_bpe_tokenizer(out, vocab_size=1000, texts=EN)
    return out


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "de.txt").write_text("\n".join(DE[:500]) + "\n", encoding="utf-8")
    (d / "de_eval.txt").write_text("\n".join(DE[500:]) + "\n", encoding="utf-8")
    (d / "en.txt").write_text("\n".join(EN[:500]) + "\n", encoding="utf-8")
    (d / "en_eval.txt").write_text("\n".join(EN[500:]) + "\n", encoding="utf-8")
    (d / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    return d


def edited_base(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (dst / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return dst


def extend(base, texts, out, **kw):
    kw.setdefault("new_tokens", 300)
    cfg = VocabExtendConfig(base=str(base), inputs=[str(texts / "de.txt")], output=str(out), progress=False, **kw)
    return run_vocab_extend(cfg)


# ------------------------------------------------------------------ config and base


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"new_tokens": 0}, "new_tokens=0"),
        ({"base": "/nonexistent/tok"}, "base='/nonexistent/tok'"),
        ({"inputs": []}, "inputs=[]"),
        ({"output": ""}, "output=''"),
        ({"target_vocab_size": 100}, "target_vocab_size=100"),
    ],
)
def test_invalid_config_names_the_field(bpe_base, texts, tmp_path, change, needle):
    cfg = dict(base=str(bpe_base), inputs=[str(texts / "de.txt")], output=str(tmp_path / "out"))
    cfg.update(change)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        VocabExtendConfig(**cfg).validate()


def test_output_may_not_be_the_base(bpe_base, texts):
    with pytest.raises(ConfigError, match="output="):
        VocabExtendConfig(base=str(bpe_base), inputs=[str(texts / "de.txt")], output=str(bpe_base)).validate()
    # --overwrite would replace a directory holding the base, and the base with it
    with pytest.raises(ConfigError, match="not one holding it"):
        VocabExtendConfig(base=str(bpe_base), inputs=[str(texts / "de.txt")], output=str(bpe_base.parent)).validate()


def test_base_kinds_are_recognized(bpe_base, tmp_path):
    assert read_base_tokenizer(str(bpe_base)).kind == BYTE_LEVEL_BPE
    assert read_base_tokenizer(str(bpe_base / "tokenizer.json")).kind == BYTE_LEVEL_BPE
    # mistral-common's file name is not tokenizer.model: recognized by its bytes
    assert read_base_tokenizer(str(mistral_sentencepiece_path())).kind == SENTENCEPIECE
    both = tmp_path / "both"
    shutil.copytree(bpe_base, both)
    shutil.copy(mistral_sentencepiece_path(), both / "tokenizer.model")
    assert read_base_tokenizer(str(both)).kind == SENTENCEPIECE
    # Llama 3 ships a tiktoken tokenizer.model beside tokenizer.json: the JSON is the tokenizer then
    (both / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    assert read_base_tokenizer(str(both)).kind == BYTE_LEVEL_BPE


def _unigram_sentencepiece(path: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(EN[:200]), model_writer=buf, model_type="unigram", vocab_size=200, minloglevel=2
    )
    path.write_bytes(buf.getvalue())


def test_bad_bases_are_one_line_errors_naming_the_file(bpe_base, tmp_path):
    cases = {}
    (tmp_path / "empty").mkdir()
    cases["empty"] = "holds neither tokenizer.model nor tokenizer.json"
    (tmp_path / "text.model").write_text("hello, not a model\n")
    cases["text.model"] = "is not a SentencePiece model"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    cases["bad"] = "is not readable JSON"
    wordlevel = {"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}
    (tmp_path / "wl.json").write_text(json.dumps(wordlevel))
    cases["wl.json"] = "model type 'WordLevel' is not supported"
    meta = json.loads((bpe_base / "tokenizer.json").read_text())
    meta["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    meta["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cases["meta.json"] = "without byte-level pre-tokenization"
    broken = json.loads((bpe_base / "tokenizer.json").read_text())
    broken["model"]["merges"].append(["no-such-token", "x"])
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    cases["broken.json"] = "is not a tokenizer the tokenizers library can load"
    _unigram_sentencepiece(tmp_path / "uni.model")
    cases["uni.model"] = "model_type UNIGRAM is not supported"
    # A SentencePiece model's tokenizer.json lends the extension its added tokens, post-processor and padding
    sp_base = read_base_tokenizer(str(mistral_sentencepiece_path()))
    valid = tokenizer_json_from_proto(sp_base, sp_base.proto)
    for name, edit in {
        "sp_added": lambda d: d.update(added_tokens=5),
        "sp_fields": lambda d: d["added_tokens"][0].pop("single_word"),
        "sp_padding": lambda d: d.update(padding=5),
    }.items():
        companion = json.loads(json.dumps(valid))
        edit(companion)
        (tmp_path / name).mkdir()
        shutil.copy(mistral_sentencepiece_path(), tmp_path / name / "tokenizer.model")
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(companion))
        cases[name] = "tokenizer.json is not a tokenizer the tokenizers library can load"
    for name, needle in cases.items():
        with pytest.raises(CptronError, match=needle) as info:
            read_base_tokenizer(str(tmp_path / name))
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value), name


# ------------------------------------------------------------------ building blocks


def test_scores_below_are_strictly_decreasing_float32():
    for floor in (-1e9, -31740.0, 0.0):
        scores = np.array(_scores_below(floor, 1000), dtype=np.float32)
        assert scores[0] < np.float32(floor)
        assert np.all(np.diff(scores) < 0)


def test_token_text_inverts_the_byte_level_alphabet():
    from tokenizers import decoders, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    decoder = decoders.ByteLevel()
    texts = {token_text(c) for c in alphabet if token_text(c) is not None}
    assert len(alphabet) == 256 and len(texts) == 128  # the ASCII bytes; the others are parts of characters
    assert all(decoder.decode([c]) == token_text(c) for c in alphabet if token_text(c) is not None)
    sample = "Grüße,\tGott!\n Ägypten 1905 — 「神」"
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(sample)
    assert "".join(token_text(p) for p, _ in pieces) == sample
    assert token_text("ĠGott") == " Gott" and token_text("Ã¼") == "ü" and token_text("Ã") is None


def test_segment_agrees_with_the_tokenizers_library(bpe_base):
    from tokenizers import Tokenizer

    data = json.loads((bpe_base / "tokenizer.json").read_text())
    tok = Tokenizer.from_file(str(bpe_base / "tokenizer.json"))
    merges, _ = parse_merges(data["model"]["merges"], "base")
    ranks = {pair: i for i, pair in enumerate(merges)}
    vocab = data["model"]["vocab"]
    words = {w for text in DE[:200] + EN[:50] for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)}
    assert len(words) > 500
    for word in words:
        want = [tok.id_to_token(i) for i in tok.encode(token_text(word), add_special_tokens=False).ids]
        assert segment(word, ranks, vocab, ignore_merges=False) == want, word


def test_merges_in_both_encodings():
    assert parse_merges([["a", "b"], ["ab", "c"]], "f") == ([("a", "b"), ("ab", "c")], False)
    assert parse_merges(["a b", "ab c"], "f") == ([("a", "b"), ("ab", "c")], True)
    with pytest.raises(CptronError, match=r"f: model.merges\[1\]"):
        parse_merges(["a b", "a b c"], "f")


# ------------------------------------------------------------------ byte-level BPE variants


def _tokenizer_json(out: Path) -> dict:
    return json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))


def test_ignore_merges_base(bpe_base, texts, tmp_path):
    from tokenizers import Tokenizer

    base = edited_base(bpe_base, tmp_path / "base", lambda d: d["model"].__setitem__("ignore_merges", True))
    report = extend(base, texts, tmp_path / "out")
    out = _tokenizer_json(tmp_path / "out")
    assert out["model"]["ignore_merges"] is True
    assert report["tokens_added"] == 300 and report["checks"]["unreachable_new_tokens"] == 0
    assert report["target"]["after"]["fertility"] < report["target"]["before"]["fertility"]
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for token, tid in out["model"]["vocab"].items():
        if tid >= report["first_new_id"]:
            assert tok.encode(token_text(token), add_special_tokens=False).ids == [tid]


def test_string_merges_stay_strings(bpe_base, texts, tmp_path):
    def as_strings(d):
        d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]

    base = edited_base(bpe_base, tmp_path / "base", as_strings)
    report = extend(base, texts, tmp_path / "out")
    merges = _tokenizer_json(tmp_path / "out")["model"]["merges"]
    assert all(isinstance(m, str) for m in merges)
    assert merges[: report["merges"]["old"]] == _tokenizer_json(base)["model"]["merges"]


@pytest.mark.parametrize("ids", [[1000, 1001, 1002], [1500]], ids=["after-the-model", "past-a-gap"])
def test_added_tokens_past_the_model_keep_their_ids(bpe_base, texts, tmp_path, ids):
    from transformers import AutoTokenizer

    def add(d):
        for k, tid in enumerate(ids):
            d["added_tokens"].append(
                {
                    "id": tid,
                    "content": f"<|extra{k}|>",
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": True,
                }
            )

    base = edited_base(bpe_base, tmp_path / "base", add)
    report = extend(base, texts, tmp_path / "out")
    assert report["old_vocab_size"] == max(ids) + 1 == report["first_new_id"]
    out = _tokenizer_json(tmp_path / "out")
    new = {t: i for t, i in out["model"]["vocab"].items() if i >= report["first_new_id"]}
    assert len(new) == report["tokens_added"] == 300
    assert not set(new) & {a["content"] for a in out["added_tokens"]}
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for k, tid in enumerate(ids):
        assert tok.convert_tokens_to_ids(f"<|extra{k}|>") == tid
        assert tok(f"Gott <|extra{k}|>", add_special_tokens=False)["input_ids"][-1] == tid
    assert [tok.convert_tokens_to_ids(s) for s in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]


def test_protected_text_keeps_its_segmentation(bpe_base, texts, tmp_path):
    report = extend(
        bpe_base,
        texts,
        tmp_path / "out",
        new_tokens=400,
        protected_inputs=[str(texts / "en.txt")],
        source_inputs=[str(texts / "en.txt")],
    )
    assert report["source"]["unchanged_share"] == 1.0
    assert report["target_tokenizer"]["dropped_changing_source"] > 0
    assert report["tokens_added"] == 400


# ------------------------------------------------------------------ characters of several UTF-8 bytes

HINDI = ["नमस्ते", "भारत", "हिन्दी", "पानी", "किताब"]  # Devanagari: 3 bytes a character
CJK = "東京日本語大学"  # 3 bytes a character, in words of one to three
OTHER = ["ありがとう", "こんにちは", "🙏", "😀"]  # kana (3 bytes), emoji (4 bytes)


def multibyte_lines(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def word():
        r = rng.random()
        if r < 0.45:
            return rng.choice(HINDI)
        if r < 0.8:
            return "".join(rng.choice(CJK) for _ in range(rng.randint(1, 3)))
        return rng.choice(OTHER)

    return [" ".join(word() for _ in range(8)) for _ in range(n)]


@pytest.fixture(scope="module")
def multibyte(bpe_base, texts, tmp_path_factory):
    """The English-only BPE extended by 100 tokens on Hindi, CJK, kana and emoji, none of which it has a token
    for beyond single bytes (before partial-character tokens were allowed, this added none)."""
    from tokenizers import Tokenizer

    d = tmp_path_factory.mktemp("multibyte")
    lines = multibyte_lines()
    (d / "t.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = run_vocab_extend(
        VocabExtendConfig(
            base=str(bpe_base),
            inputs=[str(d / "t.txt")],
            source_inputs=[str(texts / "en_eval.txt")],
            new_tokens=100,
            output=str(d / "out"),
            progress=False,
        )
    )
    base = Tokenizer.from_file(str(bpe_base / "tokenizer.json"))
    ext = Tokenizer.from_file(str(d / "out" / "tokenizer.json"))
    return d / "out", report, lines, base, ext


def test_multibyte_characters_are_added_and_fertility_drops(multibyte):
    out, report, lines, _, _ = multibyte
    assert report["tokens_added"] == 100
    assert report["target"]["fertility_change"] <= -0.6, report["target"]
    assert report["source"]["unchanged_share"] == 1.0
    vocab = _tokenizer_json(out)["model"]["vocab"]
    new_text = {token_text(t) for t, i in vocab.items() if i >= report["first_new_id"]} - {None}
    # Whole-character tokens for characters of 3 (Devanagari, CJK) and 4 (emoji) bytes, and whole words.
    chars = {t for t in new_text if len(t) == 1}
    assert {"त", "न", "ा", "ि", "्"} <= chars and set(CJK) <= chars and {"🙏", "😀"} <= chars, sorted(chars)
    assert {" नमस", " こんにちは", " ありがとう", " 🙏"} <= new_text
    labels = report["examples"]
    assert labels[0] == token_label("à¤") == "<0xE0><0xA4>"  # the bytes that open most Devanagari characters


def test_multibyte_merges_are_valid_and_old_ids_unchanged(multibyte, bpe_base):
    out, report, _, _, _ = multibyte
    old, new = _tokenizer_json(bpe_base)["model"], _tokenizer_json(out)["model"]
    vocab, n_old = new["vocab"], len(old["merges"])
    assert {t: vocab[t] for t in old["vocab"]} == old["vocab"]
    assert new["merges"][:n_old] == old["merges"] and len(new["merges"]) == n_old + 100
    made = [a + b for a, b in new["merges"][n_old:]]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in new["merges"])
    assert sorted(vocab[t] for t in made) == list(range(report["first_new_id"], report["new_vocab_size"]))


def test_multibyte_reachability_is_reported_for_both_kinds_of_token(multibyte):
    out, report, _, _, ext = multibyte
    checks, first = report["checks"], report["first_new_id"]
    new = [(t, i) for t, i in ext.get_vocab().items() if i >= first]
    whole = [(t, i) for t, i in new if token_text(t) is not None]
    partial = [t for t, _ in new if token_text(t) is None]
    assert checks["unreachable_new_tokens"] == 0 and checks["new_tokens_checked"] == len(whole)
    for token, tid in whole:
        assert ext.encode(token_text(token), add_special_tokens=False).ids == [tid], token
    p = checks["partial_character_tokens"]
    assert p["new"] == len(partial) > 0 and p["new_unreached"] == 0
    # The base's single bytes by the same rule: all but C0, C1 and F5..FF, which UTF-8 text never holds.
    assert p["base"] == 128 and p["base_unreached"] == 13 and "UTF-8" in p["rule"]
    model = _tokenizer_json(out)["model"]
    merges = [tuple(m) for m in model["merges"]]
    assert partial_token_check(partial, [t for t, _ in whole], merges, model["vocab"]) == []
    # Each one is a step of BPE on the way to some new whole token, in the tokenizers library's own merges too.
    assert partial_token_check(partial, [], merges, model["vocab"]) == partial
    # Independently of segment(): without a partial token's merge, the tokenizers library no longer makes some
    # new whole token of its own text, so it passes through the partial token on the way.
    from tokenizers import Tokenizer

    data = _tokenizer_json(out)
    texts = [token_text(t) for t, _ in whole]
    for token in partial:
        cut = {**data, "model": {**model, "merges": [m for m in model["merges"] if m[0] + m[1] != token]}}
        encoded = Tokenizer.from_str(json.dumps(cut)).encode_batch(texts, add_special_tokens=False)
        assert any(e.ids != [i] for e, (_, i) in zip(encoded, whole)), token_label(token)


def test_multibyte_round_trip_and_transformers(multibyte):
    from transformers import AutoTokenizer

    out, report, lines, base, ext = multibyte
    assert report["checks"]["round_trip"]["failures"] == 0
    others = multibyte_lines(50, seed=1) + EN[:50] + ["ऋषि 鬱金 ສະບາຍ 🦜 नमस्ते"]  # unseen text and characters
    for text in lines + others:
        assert ext.decode(ext.encode(text, add_special_tokens=False).ids) == text
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == report["new_vocab_size"]
    got = tok(lines + others, add_special_tokens=False)["input_ids"]
    assert got == [e.ids for e in ext.encode_batch(lines + others, add_special_tokens=False)]
    assert tok.decode(tok(lines[0])["input_ids"], skip_special_tokens=True) == lines[0]
    assert [tok.convert_tokens_to_ids(s) for s in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    held_out = [e.ids for e in ext.encode_batch(others[:50], add_special_tokens=False)]
    before = [e.ids for e in base.encode_batch(others[:50], add_special_tokens=False)]
    assert sum(map(len, held_out)) < 0.4 * sum(map(len, before))


def test_choose_puts_missing_characters_before_their_pieces():
    # "ab" needs "b" (the base has "a"); "xyz" would need three more and does not fit in 5; "c" alone fits.
    assert _choose(["ab", "xyz", "c", "b", "abc"], {"a"}, set(), 5) == ["b", "ab", "c", "abc"]
    assert _choose(["ab", "xyz", "c", "b", "abc"], {"a"}, set(), 3) == ["b", "ab", "c"]
    assert _choose(["ab", "c"], {"a"}, {"b"}, 5) == ["c"]  # its character is excluded: so is the piece


def test_sentencepiece_adds_the_characters_its_pieces_need(tmp_path):
    """Characters Mistral spells in byte-fallback pieces (ऋ, 鬱, Lao, Ethiopic, Javanese): a new piece holding one
    is made by tokenizer.model without a piece for the character, but never by tokenizer.json, which starts such
    a character from its bytes; the character becomes a piece first."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    rng = random.Random(0)
    words = ["ऋषि", "鬱金", "ສະບາຍດີ", "ጤና", "ꦗꦮꦶ", "नमस्ते", "東京"]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "base").mkdir()
    shutil.copy(mistral_sentencepiece_path(), tmp_path / "base" / "tokenizer.model")
    report = run_vocab_extend(
        VocabExtendConfig(
            base=str(tmp_path / "base"),
            inputs=[str(tmp_path / "t.txt")],
            new_tokens=40,
            output=str(tmp_path / "out"),
            progress=False,
        )
    )
    base = spm.SentencePieceProcessor(model_file=str(tmp_path / "base" / "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert base.encode("ऋ", out_type=str) == ["▁", "<0xE0>", "<0xA4>", "<0x8B>"]
    assert report["tokens_added"] == 40 and report["target"]["fertility_change"] <= -0.5
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    new = [sp.id_to_piece(i) for i in range(32000, sp.get_piece_size())]
    assert {"ऋ", "鬱", "ສ", "ጤ"} <= set(new) and report["target_tokenizer"]["single_character_pieces"] > 0
    assert all(c in pieces for piece in new for c in piece), [p for p in new if any(c not in pieces for c in p)]
    checks = report["checks"]
    assert checks["unreachable_new_tokens"] == 0 and checks["tokenizer_json_vs_model_mismatches"]["extended"] == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok(lines, add_special_tokens=False)["input_ids"] == sp.encode(lines)
    assert tok("ऋषि", add_special_tokens=False)["input_ids"] == sp.encode("ऋषि") == [sp.piece_to_id("▁ऋषि")]
    assert all(sp.decode(ids) == t for ids, t in zip(sp.encode(lines), lines))


# ------------------------------------------------------------------ output and CLI


def test_existing_output_is_refused_unless_overwrite(bpe_base, texts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(CptronError, match="already exists"):
        extend(bpe_base, texts, out, new_tokens=50)
    assert (out / "keep").is_file()
    extend(bpe_base, texts, out, new_tokens=50, overwrite=True)
    assert not (out / "keep").exists() and (out / REPORT_FILE).is_file()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_file_at_the_output_or_a_failed_write_leaves_nothing_behind(bpe_base, texts, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CptronError, match="is a file, not an output directory"):
        extend(bpe_base, texts, blocker, new_tokens=50, overwrite=True)
    assert blocker.read_text() == "x"

    def disk_full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        extend(bpe_base, texts, tmp_path / "out", new_tokens=50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "a half-written output was left behind"


def test_cli_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as info:
        main(["vocab", "extend", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in (
        "--base",
        "--inputs",
        "--new_tokens",
        "--output",
        "--eval_inputs",
        "--source_inputs",
        "--protected_inputs",
        "--input_format",
        "--text_field",
        "--overwrite",
    ):
        assert name in out, name


def test_cli_run_writes_the_directory_and_report(bpe_base, texts, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "vocab",
        "extend",
        "--base",
        str(bpe_base),
        "--inputs",
        str(texts / "de.txt"),
        "--new_tokens",
        "200",
        "--eval_inputs",
        str(texts / "de_eval.txt"),
        "--source_inputs",
        str(texts / "en_eval.txt"),
        "--output",
        str(out),
        "--progress",
        "false",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fertility" in printed and "added 200 tokens" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["tokens_added"] == 200 and report["kind"] == BYTE_LEVEL_BPE
    assert report["source"]["documents"] == 100 and report["target"]["documents"] == 100
    assert {"tokenizer.json", "tokenizer_config.json", REPORT_FILE} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--base", "/nonexistent"], "base='/nonexistent'"),
        (["--inputs", "{texts}/blank.txt"], "hold no non-empty document"),
        (["--inputs", "{texts}/missing.txt"], "inputs: input"),
        (["--base", "{texts}/de.txt"], "is not a SentencePiece model"),
        (["--new_tokens", "0"], "new_tokens=0"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(bpe_base, texts, tmp_path, capsys, args, needle):
    argv = [
        "vocab",
        "extend",
        "--base",
        str(bpe_base),
        "--inputs",
        str(texts / "de.txt"),
        "--output",
        str(tmp_path / "out"),
        "--progress",
        "false",
    ]
    argv += [a.format(texts=texts) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()
