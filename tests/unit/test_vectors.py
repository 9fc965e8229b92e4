"""Word-vector files: every format read back exactly, language prefixes, and one-line errors for bad files."""

from __future__ import annotations

import gzip
import struct
import sys

import numpy as np
import pytest
import torch

from cptron.errors import CptronError
from cptron.vocab.vectors import WordVectors, import_gensim, load_vectors, save_vectors

WORDS = ["eng:God", "deu:Gott", "▁Haus", "ĠHaus", "<0x41>", "deu:Himmel", "eng:heaven", "über"]


def _table(n_dim: int = 5, seed: int = 0) -> WordVectors:
    g = torch.Generator().manual_seed(seed)
    return WordVectors(list(WORDS), torch.randn(len(WORDS), n_dim, generator=g) * 3)


def _error(path, **kw) -> str:
    with pytest.raises(CptronError) as info:
        load_vectors(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ the table


def test_word_vectors_table():
    wv = _table()
    assert len(wv) == len(WORDS) and wv.dim == 5 and wv.vectors.dtype == torch.float32
    assert wv.index()["deu:Gott"] == 1
    assert torch.equal(wv.get("▁Haus"), wv.vectors[2])
    assert wv.get("missing") is None
    assert wv.languages() == ["deu", "eng"]
    with pytest.raises(CptronError, match="expected \\[words, dim\\]"):
        WordVectors(["a", "b"], torch.zeros(3, 4))


def test_restrict_language_keeps_one_language_prefix_stripped():
    wv = _table()
    de = wv.restrict_language("deu")
    assert de.words == ["Gott", "Himmel"]
    assert torch.equal(de.vectors, wv.vectors[[1, 5]])
    assert wv.restrict_language("eng:").words == ["God", "heaven"]
    with pytest.raises(CptronError, match="'fra:'.*prefixes seen: \\['deu', 'eng'\\]"):
        wv.restrict_language("fra")


# ------------------------------------------------------------------ round trips


def test_vec_round_trip_is_exact(tmp_path):
    wv = _table()
    path = save_vectors(wv, tmp_path / "v.vec")
    back = load_vectors(path)
    assert back.words == WORDS
    assert torch.equal(back.vectors, wv.vectors)  # 9 significant digits hold any float32 exactly
    assert not (tmp_path / "v.vec.tmp").exists()
    assert load_vectors(path, max_words=3).words == WORDS[:3]


def test_vec_gzip_and_unknown_suffix_and_word_with_space(tmp_path):
    wv = _table()
    text = save_vectors(wv, tmp_path / "v.vec").read_bytes()
    (tmp_path / "v.vec.gz").write_bytes(gzip.compress(text))
    assert torch.equal(load_vectors(tmp_path / "v.vec.gz").vectors, wv.vectors)
    (tmp_path / "vectors.data").write_bytes(text)  # no telling suffix: sniffed as text
    assert load_vectors(tmp_path / "vectors.data").words == WORDS
    # fastText's Common Crawl files hold a few words with a space; values are split off the right.
    (tmp_path / "space.vec").write_text("2 2\nNew York 1 2 \nx 3 4\n", encoding="utf-8")
    back = load_vectors(tmp_path / "space.vec")
    assert back.words == ["New York", "x"] and back.vectors.tolist() == [[1, 2], [3, 4]]


def test_save_refuses_words_the_format_cannot_hold(tmp_path):
    with pytest.raises(CptronError, match="word 2 \\('a b'\\)"):
        save_vectors(WordVectors(["x", "a b"], torch.zeros(2, 3)), tmp_path / "v.vec")
    with pytest.raises(CptronError, match="NaN or inf"):
        save_vectors(WordVectors(["x"], torch.tensor([[float("nan"), 1.0]])), tmp_path / "v.vec")
    assert not (tmp_path / "v.vec").exists()


def _gensim_kv(wv: WordVectors):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(wv.dim)
    kv.add_vectors(wv.words, wv.vectors.numpy())
    return kv


def test_word2vec_binary_gensim_and_c_tool_layouts(tmp_path):
    pytest.importorskip("gensim")
    wv = _table()
    _gensim_kv(wv).save_word2vec_format(str(tmp_path / "g.bin"), binary=True)
    back = load_vectors(tmp_path / "g.bin")
    assert back.words == WORDS and torch.equal(back.vectors, wv.vectors)
    # The word2vec C tool ends each record with a newline; gensim does not.
    rows = b"".join(w.encode() + b" " + v.numpy().astype("<f4").tobytes() + b"\n" for w, v in zip(wv.words, wv.vectors))
    (tmp_path / "c.bin").write_bytes(f"{len(wv)} {wv.dim}\n".encode() + rows)
    back = load_vectors(tmp_path / "c.bin")
    assert back.words == WORDS and torch.equal(back.vectors, wv.vectors)
    (tmp_path / "c.data").write_bytes((tmp_path / "c.bin").read_bytes())  # sniffed as binary
    assert torch.equal(load_vectors(tmp_path / "c.data").vectors, wv.vectors)


def test_fasttext_bin_written_by_gensim(tmp_path):
    pytest.importorskip("gensim")
    from gensim.models import FastText
    from gensim.models.fasttext import save_facebook_model

    sentences = [["im", "anfang", "schuf", "gott", "die", "himmel"], ["und", "gott", "sprach", "es", "werde", "licht"]]
    model = FastText(sentences, vector_size=8, min_count=1, epochs=2, seed=1, workers=1, bucket=1000)
    save_facebook_model(model, str(tmp_path / "ft.bin"))
    back = load_vectors(tmp_path / "ft.bin")  # auto: the fastText magic number
    assert back.words == list(model.wv.index_to_key)
    want = torch.from_numpy(np.stack([model.wv[w] for w in back.words]))
    torch.testing.assert_close(back.vectors, want, atol=1e-6, rtol=1e-5)


def test_gensim_files_need_an_explicit_format(tmp_path):
    pytest.importorskip("gensim")
    wv = _table()
    kv = _gensim_kv(wv)
    kv.save(str(tmp_path / "v.kv"))
    msg = _error(tmp_path / "v.kv")
    assert "pickle" in msg and "format='gensim'" in msg
    back = load_vectors(tmp_path / "v.kv", format="gensim")
    assert back.words == WORDS and torch.equal(back.vectors, wv.vectors)
    from gensim.models import Word2Vec

    model = Word2Vec([["a", "b", "c", "a"]], vector_size=4, min_count=1, epochs=1, seed=1, workers=1)
    model.save(str(tmp_path / "w2v.model"))
    back = load_vectors(tmp_path / "w2v.model", format="gensim")
    assert back.words == list(model.wv.index_to_key)
    assert torch.equal(back.vectors, torch.from_numpy(model.wv.vectors))


def test_missing_gensim_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)  # import gensim now raises ImportError
    with pytest.raises(CptronError, match=r"pip install 'cptron\[vectors\]'"):
        import_gensim()


# ------------------------------------------------------------------ bad files


@pytest.mark.parametrize(
    "content, where, what",
    [
        ("three 3\nx 1 2 3\n", ":1:", "bad header"),
        ("1\nx 1 2 3\n", ":1:", "bad header"),
        ("1 0\nx\n", ":1:", "dim >= 1"),
        ("2 3\nx 1 2 3\ny 1 2\n", ":3:", "2 values: expected a word and 3 values"),
        ("2 3\nx 1 2 3\ny 1 2 3 4\n", ":3:", "4 values: expected a word and 3 values"),
        ("2 3\nx 1 2 3\ny 1 zwei 3\n", ":3:", "non-numeric value 'zwei'"),
        ("2 3\nx 1 2 3\n\n", ":3:", "0 values"),
        ("2 3\nx 1 2 3\nx 4 5 6\n", ":3:", "duplicate word 'x' (first at row 1)"),
        ("2 3\nx 1 2 3\ny 1 nan 3\n", ":3:", "non-finite"),
        ("2 3\nx 1 2 3\ny 1 -inf 3\n", ":3:", "non-finite"),
        ("3 3\nx 1 2 3\ny 1 2 3\n", ":", "2 rows but the header says 3"),
        ("100000 3\nx 1 2 3\n", ":1:", "header says 100000 rows of 3 values, more than a file of 17 bytes holds"),
        ("1 3\nx 1 2 3\ny 1 2 3\n", ":3:", "more rows than the header's count 1"),
        ("0 3\n", ":", "no word vectors"),
    ],
)
def test_bad_vec_files_give_one_line_naming_file_and_line(tmp_path, content, where, what):
    path = tmp_path / "bad.vec"
    path.write_text(content, encoding="utf-8")
    msg = _error(path)
    assert f"{path}{where}" in msg and what in msg, msg


def test_bad_utf8_and_empty_file(tmp_path):
    (tmp_path / "u.vec").write_bytes(b"1 2\n\xff\xfe 1 2\n")
    assert f"{tmp_path / 'u.vec'}:2: not valid UTF-8" in _error(tmp_path / "u.vec")
    (tmp_path / "e.vec").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "e.vec")
    assert "not found" in _error(tmp_path / "missing.vec")
    assert "unknown" in _error(tmp_path / "e.vec", format="glove")


def test_bad_word2vec_binary_files(tmp_path):
    row = b"x " + struct.pack("<3f", 1, 2, 3)
    (tmp_path / "short.bin").write_bytes(b"2 3\n" + row + b"y " + struct.pack("<2f", 1, 2))
    assert f"{tmp_path / 'short.bin'}: record 2" in _error(tmp_path / "short.bin")
    (tmp_path / "cut.bin").write_bytes(b"2 1\n" + b"x " + struct.pack("<f", 1) + b"\n" * 5)
    assert "file ends after 1 of the header's 2 words" in _error(tmp_path / "cut.bin")
    (tmp_path / "big.bin").write_bytes(b"999999999 300\n" + row)
    assert f"{tmp_path / 'big.bin'}:1: header says 999999999 rows" in _error(tmp_path / "big.bin")
    (tmp_path / "nan.bin").write_bytes(b"1 3\n" + b"x " + struct.pack("<3f", 1, float("nan"), 3))
    assert "record 1" in (msg := _error(tmp_path / "nan.bin")) and "non-finite" in msg
    (tmp_path / "dup.bin").write_bytes(b"2 3\n" + row + row)
    assert "record 2" in (msg := _error(tmp_path / "dup.bin")) and "duplicate word 'x'" in msg
    (tmp_path / "hdr.bin").write_bytes(b"\x00\x01garbage\n")
    assert f"{tmp_path / 'hdr.bin'}:1: bad header" in _error(tmp_path / "hdr.bin")


def test_bad_fasttext_bin_is_one_line(tmp_path):
    pytest.importorskip("gensim")
    (tmp_path / "ft.bin").write_bytes((793712314).to_bytes(4, "little") + b"\x0c\x00\x00\x00" + b"\x01" * 10)
    assert f"{tmp_path / 'ft.bin'}: not a readable fastText .bin model" in _error(tmp_path / "ft.bin")
