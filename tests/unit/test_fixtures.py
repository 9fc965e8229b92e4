"""Checks for the offline test fixtures in cptron.testing.fixtures."""
from __future__ import annotations

import json
import re

import pytest

from cptron.testing import fixtures
from cptron.testing.fixtures import (
    bible_refs,
    bible_text,
    mistral_sentencepiece_path,
    train_bpe_tokenizer,
)

# --------------------------------------------------------------------------- text


def test_bible_files_are_aligned_and_non_empty():
    en, de, refs = bible_text("en"), bible_text("de"), bible_refs()
    assert len(en) == len(de) == len(refs)
    assert 2500 <= len(en) <= 3500
    for lines in (en, de, refs):
        assert all(line.strip() == line and line for line in lines)
    assert len(set(refs)) == len(refs)


def test_bible_files_stay_small():
    for name in (*fixtures.BIBLE_FILES.values(), "refs.txt"):
        assert (fixtures.BIBLE_DIR / name).stat().st_size < 500_000


def test_first_line_is_genesis_1_1_in_each_language():
    assert bible_refs(1) == ["Genesis 1:1"]
    assert bible_text("en", 1) == ["In the beginning God created the heavens and the earth."]
    assert bible_text("de", 1) == ["Im Anfang schuf Gott die Himmel und die Erde."]


def test_alignment_holds_beyond_the_first_verse():
    # Genesis 2:1 is line 31 (Genesis 1 has 31 verses) in both translations.
    refs = bible_refs()
    i = refs.index("Genesis 2:1")
    assert i == 31
    assert bible_text("en")[i].startswith("The heavens and the earth were finished")
    assert bible_text("de")[i].startswith("So wurden vollendet der Himmel und die Erde")


def test_bible_text_n_and_errors():
    assert bible_text("de", n=5) == bible_text("de")[:5]
    assert bible_text("en", n=0) == []
    with pytest.raises(ValueError, match="unknown language"):
        bible_text("fr")
    with pytest.raises(ValueError):
        bible_text("en", n=-1)


def test_missing_corpus_names_the_path(monkeypatch, tmp_path):
    missing = tmp_path / "nope" / "bible"
    monkeypatch.setattr(fixtures, "BIBLE_DIR", missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        bible_text("en")


def test_text_has_no_leftover_markup():
    for lang in ("en", "de"):
        text = "\n".join(bible_text(lang))
        for ch in "[]`<>{}*\t\r":
            assert ch not in text, (lang, ch)
    assert any(c in "äöüß" for c in "".join(bible_text("de", 50)))


# ---------------------------------------------------------------------- tokenizer

SAMPLES = [
    *bible_text("en", 3),
    *bible_text("de", 3),
    "  leading spaces, tabs\tand\nnewlines  ",
    "Unseen: naïve café, 日本語, emoji \U0001f600, ÄÖÜ ß",
    "",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    tok = train_bpe_tokenizer(out)
    return out, tok


def test_bpe_special_tokens_and_size(bpe_dir):
    _, tok = bpe_dir
    assert len(tok) == 512
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<unk>", "<s>", "</s>", "<pad>",
    )
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        0, 1, 2, 3,
    )


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trips(bpe_dir, text):
    _, tok = bpe_dir
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.eos_token_id not in ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_bpe_actually_merges(bpe_dir):
    _, tok = bpe_dir
    verse = bible_text("en", 1)[0]
    n_ids = len(tok.encode(verse, add_special_tokens=False))
    assert n_ids < len(verse.encode("utf-8")) / 2


def test_bpe_loads_back_with_auto_tokenizer(bpe_dir):
    from transformers import AutoTokenizer

    out, tok = bpe_dir
    assert (out / "tokenizer.json").is_file()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == len(tok)
    assert loaded.pad_token_id == tok.pad_token_id
    assert loaded.bos_token_id == tok.bos_token_id
    for text in SAMPLES:
        ids = loaded.encode(text)
        assert ids == tok.encode(text)
        assert loaded.decode(ids, skip_special_tokens=True) == text
    batch = loaded(["Gott", "Im Anfang schuf Gott"], padding=True)
    short, long_ = batch["input_ids"]
    assert len(short) == len(long_)
    assert short[-1] == loaded.pad_token_id
    assert batch["attention_mask"][0][-1] == 0


def test_bpe_is_deterministic(tmp_path, bpe_dir):
    out, _ = bpe_dir
    train_bpe_tokenizer(tmp_path)
    first = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    again = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert first["model"]["vocab"] == again["model"]["vocab"]
    assert first["model"]["merges"] == again["model"]["merges"]


def test_bpe_on_custom_texts_and_bad_sizes(tmp_path):
    tok = train_bpe_tokenizer(tmp_path / "a", vocab_size=300, texts=["abc abc abd"] * 20)
    assert len(tok) <= 300
    assert tok.decode(tok.encode("abc xyz"), skip_special_tokens=True) == "abc xyz"
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(tmp_path / "b", vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_bpe_tokenizer(tmp_path / "c", texts=[])


# ------------------------------------------------------------------ sentencepiece


def test_mistral_sentencepiece_model_loads():
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("mistral_common")
    path = mistral_sentencepiece_path()
    assert path.is_file() and path.name == "tokenizer.model.v1"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == 32000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    verse = bible_text("de", 1)[0]
    assert sp.decode(sp.encode(verse)) == verse


def test_mistral_sentencepiece_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "mistral_common" else real(name, *a, **k),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install mistral-common"):
        mistral_sentencepiece_path()
