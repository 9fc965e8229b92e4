"""`cptron vocab vectors` through the CLI: each mode on small text, determinism, bad inputs, and the
multilingual acceptance: aligned English/German vectors from the shipped Bible text put at least half of a
list of obvious translation pairs within each other's 10 nearest neighbours."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from cptron.cli import main
from cptron.testing.fixtures import BIBLE_DIR, BIBLE_FILES, bible_text, mistral_sentencepiece_path, train_bpe_tokenizer
from cptron.vocab.vectors import load_vectors
from cptron.vocab.vectors_train import auto_epochs, words_of

pytest.importorskip("gensim")

EN, DE = BIBLE_DIR / BIBLE_FILES["en"], BIBLE_DIR / BIBLE_FILES["de"]

# Obvious English/German translation pairs of the shipped verses (WEB / Elberfelder), as the texts spell them;
# mostly common nouns, a few names that the two translations spell differently or alike.
PAIRS = [
    ("God", "Gott"), ("heaven", "Himmel"), ("son", "Sohn"), ("sons", "Söhne"), ("earth", "Erde"),
    ("water", "Wasser"), ("day", "Tag"), ("night", "Nacht"), ("light", "Licht"), ("man", "Mann"),
    ("wife", "Weib"), ("king", "König"), ("father", "Vater"), ("mother", "Mutter"), ("brother", "Bruder"),
    ("daughter", "Tochter"), ("house", "Haus"), ("land", "Land"), ("people", "Volk"), ("name", "Namen"),
    ("hand", "Hand"), ("years", "Jahre"), ("flock", "Herde"), ("bread", "Brot"), ("gold", "Gold"),
    ("silver", "Silber"), ("fire", "Feuer"), ("blood", "Blut"), ("tree", "Baum"), ("eyes", "Augen"),
    ("sea", "Meer"), ("mountain", "Berg"), ("altar", "Altar"), ("servant", "Knecht"), ("money", "Geld"),
    ("wilderness", "Wüste"), ("seven", "sieben"), ("twelve", "zwölf"), ("camels", "Kamele"),
    ("covenant", "Bund"), ("tent", "Zelt"), ("city", "Stadt"), ("famine", "Hungersnot"), ("dream", "Traum"),
    ("cattle", "Vieh"), ("priest", "Priester"), ("stone", "Stein"), ("Egypt", "Ägypten"),
    ("Pharaoh", "Pharao"), ("Moses", "Mose"), ("Jacob", "Jakob"), ("Isaac", "Isaak"),
]  # fmt: skip


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["vocab", "vectors", *args, "--progress", "false"])
    return code, capsys.readouterr().err


def _neighbours(vectors: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest rows (cosine) of each of `rows`, itself excluded."""
    unit = torch.nn.functional.normalize(vectors, dim=1)
    sims = unit[rows] @ unit.T
    sims[torch.arange(len(rows)), rows] = -2.0
    return sims.topk(k, dim=1).indices


@pytest.fixture(scope="module")
def english_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "en.txt"
    path.write_text("\n".join(bible_text("en", 600)) + "\n", encoding="utf-8")
    return path


def test_automatic_epochs():
    assert auto_epochs("aligned", 147_021) == 52  # the shipped EN+DE verses
    assert auto_epochs("mono", 100_000) == 50
    assert auto_epochs("mono", 10**9) == 5 and auto_epochs("tokens", 10) == 100


def test_mono_word2vec_is_deterministic_and_reports(tmp_path, english_text, capsys):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.vec"
        code, err = _run(capsys, "--inputs", str(english_text), "--output", str(out), "--epochs", "3", "--dim", "16")
        assert code == 0, err
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()  # workers=1 and a seed: the same bytes
    wv = load_vectors(outs[0])
    report = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert report["mode"] == "mono" and report["epochs"] == 3 and report["dim"] == 16 == wv.dim
    assert report["vocabulary_size"] == len(wv) and report["documents"] == 600 and report["deterministic"]
    counts = Counter(w for line in bible_text("en", 600) for w in words_of(line, False))
    assert set(wv.words) == {w for w, c in counts.items() if c >= 3}  # min_count 3, case kept
    assert wv.words[0] == counts.most_common(1)[0][0]  # most frequent first
    code, err = _run(capsys, "--inputs", str(english_text), "--output", str(outs[0]))
    assert code == 2 and "exists: pass --overwrite true" in err


def test_mono_fasttext_lowercase(tmp_path, english_text, capsys):
    out = tmp_path / "ft.vec"
    args = ["--inputs", str(english_text), "--output", str(out), "--algorithm", "fasttext", "--lowercase", "true"]
    code, err = _run(capsys, *args, "--epochs", "2", "--dim", "12", "--min_count", "5", "--buckets", "5000")
    assert code == 0, err
    wv = load_vectors(out)
    assert "god" in wv.index() and "God" not in wv.index() and wv.dim == 12
    assert json.loads(out.with_suffix(".json").read_text())["method"] == "skip-gram fasttext"


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tokens_mode_keys_are_the_tokenizers_token_strings(tmp_path, english_text, capsys, kind):
    if kind == "bpe":
        tok_dir = tmp_path / "tok"
        vocab = set(train_bpe_tokenizer(tok_dir, vocab_size=400, texts=bible_text("en", 600)).get_vocab())
        tokenizer, marker = str(tok_dir), "Ġ"
    else:
        import sentencepiece as spm

        path = mistral_sentencepiece_path()
        sp = spm.SentencePieceProcessor(model_file=str(path))
        vocab = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
        tokenizer, marker = str(path), "▁"
    out = tmp_path / "tok.vec"
    code, err = _run(capsys, "--mode", "tokens", "--tokenizer", tokenizer, "--inputs", str(english_text),
                     "--output", str(out), "--epochs", "2", "--dim", "8")  # fmt: skip
    assert code == 0, err
    wv = load_vectors(out)
    assert len(wv) > 100 and set(wv.words) <= vocab  # token strings verbatim, nothing else
    assert any(w.startswith(marker) for w in wv.words)
    code, err = _run(capsys, "--mode", "tokens", "--inputs", str(english_text), "--output", str(out))
    assert code == 2 and "tokenizer=''" in err


def test_bad_inputs_fail_with_one_line(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(bible_text("de", 10)) + "\n", encoding="utf-8")
    out = str(tmp_path / "x.vec")
    cases = [
        (["--mode", "aligned", "--inputs", f"eng={EN},deu={short}"], "aligned inputs differ in length (eng: 3000, deu: 10"),
        (["--mode", "aligned", "--inputs", f"eng={EN},{DE}"], "lang=path"),
        (["--mode", "aligned", "--inputs", f"eng={EN},eng={DE}"], "each language once"),
        (["--mode", "aligned", "--inputs", f"eng={EN}"], "two or more"),
        (["--inputs", str(tmp_path / "missing.txt")], "missing.txt not found"),
        (["--inputs", str(short), "--min_count", "1000"], "no word occurs min_count=1000 times"),
        (["--inputs", str(short), "--dim", "0"], "dim=0 is invalid"),
    ]  # fmt: skip
    for args, needle in cases:
        code, err = _run(capsys, *args, "--output", out)
        assert code == 2 and needle in err, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x.vec").exists()


def test_aligned_bible_vectors_put_translations_within_each_others_10_nearest(tmp_path, capsys):
    """The acceptance line: at least half of >= 30 obvious translation pairs are mutual 10-nearest neighbours
    in the whole bilingual space (the German word among the English word's 10 nearest of all words of both
    languages, and the reverse). Defaults: sentence-ID skip-gram, dim 100, automatic epochs (52 here)."""
    en_counts = Counter(w for line in bible_text("en") for w in words_of(line, False))
    de_counts = Counter(w for line in bible_text("de") for w in words_of(line, False))
    absent = [(e, d) for e, d in PAIRS if en_counts[e] < 5 or de_counts[d] < 5]
    assert len(PAIRS) >= 30 and not absent, f"pairs that do not occur 5+ times in the shipped text: {absent}"
    out = tmp_path / "en-de.vec"
    code, err = _run(capsys, "--mode", "aligned", "--inputs", f"eng={EN},deu={DE}", "--output", str(out))
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    wv = load_vectors(out)
    assert report["documents"] == 3000 and report["vocabulary_per_language"]["deu"] == len(wv.restrict_language("deu"))
    index = wv.index()
    en_rows = torch.tensor([index[f"eng:{e}"] for e, _ in PAIRS])
    de_rows = torch.tensor([index[f"deu:{d}"] for _, d in PAIRS])
    k = 10
    en_nn, de_nn = _neighbours(wv.vectors, en_rows, k), _neighbours(wv.vectors, de_rows, k)
    hits = [bool((en_nn[i] == de_rows[i]).any() and (de_nn[i] == en_rows[i]).any()) for i in range(len(PAIRS))]
    missed = [pair for pair, hit in zip(PAIRS, hits) if not hit]
    rate = sum(hits) / len(PAIRS)
    print(
        f"\nmutual {k}-NN translation pairs: {sum(hits)}/{len(PAIRS)} = {rate:.2f} "
        f"(dim {wv.dim}, {report['epochs']} epochs, {report['train_seconds']:.1f} s); missed: {missed}"
    )
    assert rate >= 0.5, f"hit rate {rate:.2f} below the acceptance's 0.5; missed {missed}"
    # Regression guard under what this gave with gensim 4.4 (1.00 at 50 epochs, seeds 0-2; 0.96 at 30).
    assert rate >= 0.9, f"hit rate {rate:.2f}, measured 0.96+ before; missed {missed}"
