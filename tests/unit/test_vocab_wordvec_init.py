"""The word-vector methods of `cptron vocab init` (wechsel, focus, ofa, convex): canonical token strings and
the lone-prefix trap, batched neighbour search and sparsemax, Procrustes, OFA's factorization, and per
method through the CLI: old and copied rows bit-exact, convex weights, each matrix from its own old rows,
determinism under a seed, no all-zero rows, the report."""

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

from cptron.cli import main
from cptron.testing.fixtures import bible_text, mistral_sentencepiece_path, train_bpe_tokenizer
from cptron.vocab import wordvec_init
from cptron.vocab.canonical import (
    canonical_token,
    canonical_vocabulary,
    detect_scheme,
    is_bare_prefix,
    vocabulary_form,
    word_pieces,
)
from cptron.vocab.init import EMBED, HEAD, VocabInitConfig, read_vocabularies, word_vector_plan
from cptron.vocab.neighbours import nearest, sparsemax
from cptron.vocab.ofa import FACTORS_FILE, reconstruction_error, right_singular_vectors
from cptron.vocab.row_plan import shared_tokens, token_vectors_from_words
from cptron.vocab.vectors import WordVectors, save_vectors
from cptron.vocab.wordvec_init import procrustes, sparsemax_neighbours

N_OLD, N_NEW, PAD = 300, 340, 8
ADDED = N_NEW  # an added plain-text token " the": its canonical form is the old "Ġthe"'s
ROWS = 344  # N_NEW + 1 rounded up to a multiple of PAD
D, WV_DIM = 32, 16
TOL = 1e-6  # fp32 sums of at most a few dozen weighted rows of order 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: intra-op threads only add synchronization (milliseconds per op on a
    loaded machine), which would make convex's few hundred small steps take seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ canonical forms


def test_canonical_forms_of_the_three_alphabets():
    assert canonical_token("ĠHaus", "byte_level") == " Haus"
    assert canonical_token("Ã¤", "byte_level") == "ä"
    assert canonical_token("Ã", "byte_level") == "<0xC3>"  # the first byte of a two-byte character
    assert canonical_token("æĿ", "byte_level") == "<0xE6><0x9D>"  # two of 東's three bytes
    assert canonical_token("aÃ", "byte_level") == "a<0xC3>"
    assert canonical_token("<s>", "byte_level") == "<s>"  # not in the byte alphabet: read as written
    assert canonical_token("▁Haus", "sentencepiece") == " Haus"
    assert canonical_token("<0x41>", "sentencepiece") == "A"
    assert canonical_token("<0xC3>", "sentencepiece") == "<0xC3>"
    assert canonical_token("<0x20>", "sentencepiece") == " "
    for text in (" Haus", "über", " 東京", "🙂x", "a b"):
        for scheme in ("byte_level", "sentencepiece"):
            assert canonical_token(vocabulary_form(text, scheme), scheme) == text
    assert vocabulary_form(" Haus", "byte_level") == "ĠHaus" and vocabulary_form(" Haus", "sentencepiece") == "▁Haus"
    assert is_bare_prefix(canonical_token("▁", "sentencepiece")) and is_bare_prefix(canonical_token("Ġ", "byte_level"))
    assert not is_bare_prefix(" a")


def test_shared_tokens_match_by_canonical_form_but_never_a_bare_prefix():
    old = {0: " ", 1: " the", 2: "the", 3: "<0xC3>", 4: " the"}  # canonical forms; 4 repeats 1
    tokens = ["ĠĠ", "Ġ", " the", "Ã", "the", None, "Ġdog"]
    in_model = [True, True, False, True, False, False, True]
    assert shared_tokens(old, tokens, in_model, "byte_level") == {2: 1, 3: 3, 4: 2}


def _sentencepiece_style():
    """A SentencePiece-style BPE (Metaspace) with "▁" and letters but no word-start token for "xyz"."""
    vocab = {"<unk>": 0, "▁": 1, "x": 2, "y": 3, "z": 4, "▁the": 5, "t": 6, "h": 7, "e": 8, "▁t": 9, "▁th": 10}
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return tok


def test_the_lone_prefix_piece_collects_no_word(toks):
    sp = _sentencepiece_style()
    assert detect_scheme(sp) == "sentencepiece"
    assert [p.value for p in sp.model.tokenize("▁xyz")] == ["▁", "x", "y", "z"]
    assert word_pieces(sp, "xyz", "sentencepiece") == [2, 3, 4]  # no bare "▁"
    assert word_pieces(sp, "the", "sentencepiece") == [5]
    words = ["xyz", "zyx", "yy", "the"]
    ids, _ = token_vectors_from_words(sp, "sentencepiece", words, torch.randn(4, 3), 0, 11)
    assert 1 not in ids.tolist() and {2, 3, 4, 5} <= set(ids.tolist())
    # Byte-level: a word without a "Ġ..." start token splits off a bare "Ġ", which gets no vector either.
    old = Tokenizer.from_file(str(toks / "old" / "tokenizer.json"))
    assert detect_scheme(old) == "byte_level"
    bare = old.token_to_id("Ġ")
    assert bare in [p.id for p in old.model.tokenize("ĠQqzx")]
    ids, _ = token_vectors_from_words(old, "byte_level", ["Qqzx", "the", "Zzq"], torch.randn(3, 4), 0, N_OLD)
    assert len(ids) and bare not in ids.tolist()


def test_a_real_sentencepiece_vocabulary(tmp_path):
    """Mistral's SentencePiece vocabulary (byte fallback): words without a word-start token split off "▁"."""
    shutil.copy(mistral_sentencepiece_path(), tmp_path / "tokenizer.model")
    transformers.AutoTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path / "hf")
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert detect_scheme(tok) == "sentencepiece"
    assert [p.value for p in tok.model.tokenize(vocabulary_form(" 東京", "sentencepiece"))] == ["▁", "東", "京"]
    for word, pieces in (("東京", ["東", "京"]), ("Herrlichkeit", ["▁Herr", "lich", "keit"]), ("Gott", ["▁Gott"])):
        assert [tok.id_to_token(i) for i in word_pieces(tok, word, "sentencepiece")] == pieces
    canonical = canonical_vocabulary(tok)
    assert canonical[tok.token_to_id("▁Gott")] == " Gott" and canonical[tok.token_to_id("<0xC3>")] == "<0xC3>"
    assert canonical[tok.token_to_id("<0x41>")] == "A" and canonical[tok.token_to_id("<s>")] == "<s>"


# ------------------------------------------------------------------ neighbours, sparsemax, Procrustes, SVD


def test_batched_nearest_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(37, 8, generator=g), torch.randn(101, 8, generator=g)
    cos, idx = nearest(q, k, 5, batch_rows=4)
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(k, dim=1).T
    ref_cos, ref_idx = full.topk(5, dim=1)
    assert torch.equal(idx, ref_idx) and torch.allclose(cos, ref_cos, atol=1e-6)
    assert nearest(q, k[:3], 10)[1].shape == (37, 3)  # k capped at the number of keys


def test_sparsemax_is_a_sparse_distribution():
    assert torch.allclose(sparsemax(torch.tensor([0.9, 0.5, 0.1])), torch.tensor([0.7, 0.3, 0.0]), atol=1e-6)
    z = torch.randn(50, 30, generator=torch.Generator().manual_seed(1))
    p = sparsemax(z)
    assert (p >= 0).all() and torch.allclose(p.sum(-1), torch.ones(50), atol=1e-6)
    assert (p == 0).any(1).all()  # sparse for spread-out scores
    assert torch.equal(p.argmax(-1), z.argmax(-1))


def test_focus_sparsemax_over_the_top_candidates_is_exact(monkeypatch):
    g = torch.Generator().manual_seed(4)
    queries, keys = torch.randn(20, 6, generator=g), torch.randn(40, 6, generator=g)
    full = sparsemax_neighbours(queries, keys, False)  # 40 keys < SPARSEMAX_CANDIDATES: every key
    monkeypatch.setattr(wordvec_init, "SPARSEMAX_CANDIDATES", 3)  # most supports fill 3: redone over all
    for (i_full, w_full), (i_top, w_top) in zip(full, sparsemax_neighbours(queries, keys, False)):
        assert sorted(i_full.tolist()) == sorted(i_top.tolist())
        assert torch.allclose(w_full[i_full.argsort()], w_top[i_top.argsort()], atol=1e-6)
    assert max(len(i) for i, _ in full) > 3 and all(abs(float(w.sum()) - 1) < 1e-6 for _, w in full)


def test_procrustes_recovers_a_rotation():
    g = torch.Generator().manual_seed(2)
    source = torch.randn(200, WV_DIM, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(WV_DIM, WV_DIM, generator=g))
    w = procrustes(source, source @ rotation.T)
    assert torch.allclose(w @ w.T, torch.eye(WV_DIM), atol=1e-5)
    assert torch.allclose((source @ rotation.T) @ w, source, atol=1e-4)


def test_ofa_reconstruction_error_falls_with_the_rank_and_vanishes_at_full_rank():
    g = torch.Generator().manual_seed(3)
    matrix = torch.randn(120, D, generator=g) @ torch.diag(torch.linspace(2, 0.1, D)) + 0.3
    errors = []
    for r in (1, 2, 4, 8, 16, 24, D):
        v, singular = right_singular_vectors(lambda a, b: matrix[a:b], 120, D, r, 7)
        errors.append(reconstruction_error(lambda a, b: matrix[a:b], 120, v.T.float(), 13))
        ref = torch.linalg.svdvals(matrix.double())[:r]
        assert torch.allclose(singular, ref, rtol=1e-6)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-6 and errors[0] > 0.3


# ------------------------------------------------------------------ fixtures: tokenizers, models, vectors


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """A byte-level BPE, an extension of it (more merges of the same text, plus an added token " the")."""
    root = tmp_path_factory.mktemp("toks")
    text = bible_text("en", 1500)
    train_bpe_tokenizer(root / "old", vocab_size=N_OLD, texts=text)
    train_bpe_tokenizer(root / "new", vocab_size=N_NEW, texts=text)
    data = json.loads((root / "new" / "tokenizer.json").read_text())
    data["added_tokens"].append(
        {
            "id": ADDED,
            "content": " the",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        }
    )
    (root / "new" / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return root


def _base(path, tok_dir, tied):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=N_OLD,
            hidden_size=D,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    )
    with torch.no_grad():  # input embedding and head clearly different, so a row's origin shows
        model.model.embed_tokens.weight.normal_(0.2, 1.0)
        if not tied:
            model.lm_head.weight.normal_(-0.1, 0.3)
    model.save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def data(toks, tmp_path_factory):
    """Bases (tied, untied) and the inputs of every method: monolingual, multilingual and token vectors,
    a dictionary and target text. The target-language vectors are the source ones rotated, plus noise."""
    root = tmp_path_factory.mktemp("wv")
    out = {"tied": _base(root / "tied", toks / "old", True), "untied": _base(root / "untied", toks / "old", False)}
    text = bible_text("en", 1500)
    counts = {}
    for w in re.findall(r"[A-Za-z]+", " ".join(text)):
        counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[:400]
    g = torch.Generator().manual_seed(7)
    src = torch.randn(len(words), WV_DIM, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(WV_DIM, WV_DIM, generator=g))
    tgt = src @ rotation.T + 0.01 * torch.randn(len(words), WV_DIM, generator=g)
    save_vectors(WordVectors(words, src), root / "src.vec")
    save_vectors(WordVectors(words, tgt), root / "tgt.vec")
    (root / "dict.txt").write_text("".join(f"{w}\t{w}\n" for w in words[:300]))
    multi = WordVectors([f"eng:{w}" for w in words] + [f"deu:{w}" for w in words], torch.cat([src, src + 0.05 * tgt]))
    save_vectors(multi, root / "multi.vec")
    new = Tokenizer.from_file(str(toks / "new" / "tokenizer.json"))
    by_id = {i: t for t, i in new.get_vocab(with_added_tokens=False).items()}
    seen = [i for i in range(N_NEW - 8) if i % 7]  # a few old tokens and the last 8 new ones are unseen
    aux = torch.randn(N_NEW, WV_DIM, generator=g)
    save_vectors(WordVectors([by_id[i] for i in seen], aux[seen]), root / "tokens.vec")
    (root / "de.txt").write_text("\n".join(bible_text("en")[1500:1800]) + "\n")
    out["root"] = root
    return out


METHOD_ARGS = {
    "wechsel": lambda r: {
        "source_vectors": r / "src.vec",
        "target_vectors": r / "tgt.vec",
        "dictionary": r / "dict.txt",
    },
    "focus": lambda r: {"token_vectors": r / "tokens.vec"},
    "ofa": lambda r: {"multilingual_vectors": r / "multi.vec", "source_language": "eng", "target_language": "deu"},
    "convex": lambda r: {"texts": r / "de.txt", "convex_steps": 40, "convex_batch": 128},
}


def _cli(base, toks, out, method, data, **extra):
    args = {
        "base": base,
        "tokenizer": toks / "new",
        "output": out,
        "method": method,
        "progress": "false",
        "pad_vocab_to_multiple_of": PAD,
        "seed": 3,
        **METHOD_ARGS[method](data["root"]),
        **extra,
    }
    assert main(["vocab", "init"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]) == 0
    return out


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def _plan(base, toks, method, data, **extra):
    """The method's plan, computed as `cptron vocab init` computes it."""
    fields = {k: (v if k != "texts" else [str(v)]) for k, v in METHOD_ARGS[method](data["root"]).items()}
    fields = {k: str(v) if not isinstance(v, (int, list)) else v for k, v in fields.items()}
    fields.update(extra)
    cfg = VocabInitConfig(
        base=str(base),
        tokenizer=str(toks / "new"),
        output="unused",
        method=method,
        progress=False,
        pad_vocab_to_multiple_of=PAD,
        seed=3,
        **fields,
    )
    cfg.validate()
    from cptron.hf import hf_weight_map

    vocab = read_vocabularies(base, toks / "new")
    plan, _ = word_vector_plan(cfg, vocab, ROWS - N_OLD, hf_weight_map(base))
    return plan


# ------------------------------------------------------------------ every method through the CLI


@pytest.mark.parametrize("method", ["wechsel", "focus", "ofa", "convex"])
def test_method_properties_through_the_cli(method, toks, data, tmp_path):
    base = data["untied"]
    out = _cli(base, toks, tmp_path / "a", method, data)
    again = _cli(base, toks, tmp_path / "b", method, data)
    before, after = _tensors(base), _tensors(out)
    assert all(torch.equal(after[n], t) for n, t in _tensors(again).items())  # deterministic under the seed
    plan = _plan(base, toks, method, data)
    assert plan.kinds == _plan(base, toks, method, data).kinds
    report = json.loads((out / "vocab_extension.json").read_text())["init"]
    assert report["counts"] == plan.counts()
    assert plan.kinds[N_NEW - N_OLD + 1 :] == ["padding"] * (ROWS - N_NEW - 1)
    assert report["counts"]["combined"] >= 20, report["counts"]
    for name in (EMBED, HEAD):  # the head's new rows come from the head's own old rows
        old, new = before[name], after[name][N_OLD:]
        assert after[name].shape == (ROWS, D) and torch.equal(after[name][:N_OLD], old)  # bit-exact
        assert (new.abs().sum(1) > 0).all() and torch.isfinite(new).all()  # no all-zero rows
        for row, kind in enumerate(plan.kinds):
            src, w = plan.sources[row], plan.weights[row]
            if kind == "copied":
                assert torch.equal(new[row], old[src[0]])
            elif kind == "combined":
                assert (w >= 0).all() and abs(float(w.sum()) - 1) <= TOL and len(src) == len(set(src.tolist()))
                assert (src < N_OLD).all()
                expected = (w[:, None] * old[src]).sum(0)
                assert torch.allclose(new[row], expected, atol=1e-5), (method, name, row)
            elif kind == "padding":
                assert torch.allclose(new[row], old.mean(0), atol=1e-5)
        fallback = [r for r, k in enumerate(plan.kinds) if k == "fallback"]
        if fallback:  # a normal fit to this matrix's rows (embedding std 1.0, head 0.3), not the other's
            assert 0.6 < new[fallback].std().item() / old.std().item() < 1.6
    assert not torch.equal(after[EMBED][N_OLD:], after[HEAD][N_OLD:])
    if method in ("focus", "ofa"):  # " the" (an added token) is the old "Ġthe" by canonical form
        assert plan.kinds[ADDED - N_OLD] == "copied"
        assert plan.sources[ADDED - N_OLD].tolist() == [
            Tokenizer.from_file(str(toks / "old" / "tokenizer.json")).token_to_id("Ġthe")
        ]
    if method == "focus":
        assert all(plan.kinds[r] == "fallback" for r in range(N_NEW - 8 - N_OLD, N_NEW - N_OLD))
    if method == "convex":
        assert report["loss_last"] < report["loss_first"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == ROWS


def test_wechsel_aligns_the_rotated_target_space(toks, data):
    plan = _plan(data["tied"], toks, "wechsel", data)
    assert plan.details["alignment_pairs"] == 300 and plan.details["residual"] < 0.05
    induced = _plan(data["tied"], toks, "wechsel", data, dictionary="")  # identical strings: every word
    assert induced.details["alignment"] == "identical strings" and induced.details["residual"] < 0.05
    # The target vectors are the source ones rotated: each new token's heaviest source is among its pieces
    # in the (unrotated) source space far more often than chance.
    old = Tokenizer.from_file(str(toks / "old" / "tokenizer.json"))
    new = Tokenizer.from_file(str(toks / "new" / "tokenizer.json"))
    by_id = {i: t for t, i in new.get_vocab().items()}
    hits = total = 0
    for row, kind in enumerate(plan.kinds):
        if kind == "combined":
            pieces = {p.id for p in old.model.tokenize(by_id[N_OLD + row])}
            hits += int(plan.sources[row][plan.weights[row].argmax()]) in pieces
            total += 1
    assert total >= 20 and hits / total > 0.3, (hits, total)


@pytest.mark.parametrize("rank", [0, 8])
def test_ofa_factorized_output(rank, toks, data, tmp_path):
    base = data["untied"]
    out = _cli(base, toks, tmp_path / "out", "ofa", data, ofa_rank=rank, ofa_output="factorized")
    before, after = _tensors(base), _tensors(out)
    r = rank or D
    report = json.loads((out / "vocab_extension.json").read_text())["init"]
    plan = _plan(base, toks, "ofa", data)
    with safe_open(out / FACTORS_FILE, framework="pt") as f:
        assert f.metadata() == {"rank": str(r)}
        factors = {n: f.get_tensor(n) for n in f.keys()}
    for name, prefix in ((EMBED, "model.embed_tokens"), (HEAD, "lm_head")):
        coords, basis = factors[f"{prefix}.coordinates"], factors[f"{prefix}.basis"]
        assert coords.shape == (ROWS, r) and basis.shape == (r, D) and coords.dtype == torch.float32
        assert torch.allclose(basis @ basis.T, torch.eye(r), atol=1e-5)
        assert torch.equal(after[name][:N_OLD], before[name])
        error = report["matrices"][name]["relative_reconstruction_error"]
        approx = coords[:N_OLD] @ basis
        measured = float((approx.double() - before[name].double()).norm() / before[name].double().norm())
        assert abs(measured - error) < 1e-5 and (error < 1e-5) == (rank == 0)
        for row, kind in enumerate(plan.kinds):
            if kind == "combined":  # the HF row is P @ B of the combined coordinates
                assert torch.allclose(after[name][N_OLD + row], coords[N_OLD + row] @ basis, atol=1e-5)
                expected = (plan.weights[row][:, None] * coords[plan.sources[row]]).sum(0)
                assert torch.allclose(coords[N_OLD + row], expected, atol=1e-5)
            elif kind == "copied":
                assert torch.equal(coords[N_OLD + row], coords[plan.sources[row][0]])


def test_a_tokenizer_without_new_tokens_copies_the_matrix(toks, data, tmp_path):
    args = [
        "vocab",
        "init",
        "--base",
        str(data["untied"]),
        "--tokenizer",
        str(toks / "old"),
        "--method",
        "focus",
        "--token_vectors",
        str(data["root"] / "tokens.vec"),
        "--output",
        str(tmp_path / "out"),
        "--progress",
        "false",
    ]
    assert main(args) == 0
    before, after = _tensors(data["untied"]), _tensors(tmp_path / "out")
    assert set(before) == set(after) and all(torch.equal(before[n], after[n]) for n in before)


def test_tied_model_gets_one_matrix(toks, data, tmp_path):
    out = _cli(data["tied"], toks, tmp_path / "out", "wechsel", data)
    after = _tensors(out)
    assert HEAD not in after and after[EMBED].shape == (ROWS, D)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    "method, missing",
    [("wechsel", "source_vectors"), ("focus", "token_vectors"), ("ofa", "source_language"), ("convex", "texts")],
)
def test_missing_inputs_exit_2_naming_the_field(method, missing, toks, data, tmp_path, capsys):
    args = {
        "base": data["tied"],
        "tokenizer": toks / "new",
        "output": tmp_path / "out",
        "method": method,
        **METHOD_ARGS[method](data["root"]),
    }
    args.pop(missing)
    assert main(["vocab", "init"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{missing}=" in err, err
