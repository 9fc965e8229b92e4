"""`cptron vocab init`: old rows bit-exact, each method's new rows, tied/untied heads, the KL bound of
mean initialization, chunked statistics, shard streaming and the command line."""
import filecmp
import json
import math
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from cptron.cli import main
from cptron.errors import ConfigError, CptronError
from cptron.testing.fixtures import bible_text, mistral_sentencepiece_path, train_bpe_tokenizer
from cptron.vocab.init import EMBED, HEAD, VocabInitConfig, run_vocab_init
from cptron.vocab.init_methods import (
    METHODS, RowStatistics, multivariate_rows, row_statistics, subword_mean_rows, subword_pieces,
)

N_OLD, N_NEW, PAD = 300, 340, 16
ROWS = 352  # N_NEW rounded up to a multiple of PAD
TRAIN_VERSES = 2000  # the tokenizers' text; verses after it are held out
# The bound holds exactly for exact arithmetic; fp32 logits and the fp32-rounded mean row move the KL by
# about 1e-7 for logits of order 1.
FP32_SLACK = 1e-6


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """An old byte-level BPE tokenizer and an extension of it: the same training, more merges."""
    root = tmp_path_factory.mktemp("toks")
    text = bible_text("en", TRAIN_VERSES)
    train_bpe_tokenizer(root / "old", vocab_size=N_OLD, texts=text)
    train_bpe_tokenizer(root / "new", vocab_size=N_NEW, texts=text)
    old = Tokenizer.from_file(str(root / "old" / "tokenizer.json")).get_vocab(True)
    new = Tokenizer.from_file(str(root / "new" / "tokenizer.json")).get_vocab(True)
    assert all(new[t] == i for t, i in old.items()) and len(new) == N_NEW  # a true extension
    return root


def make_base(path, tok_dir, *, tied, dtype=torch.float32, vocab=N_OLD, head=None, **save_kwargs):
    """A tiny Llama whose input embedding and LM head differ clearly (different means and spreads)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
        eos_token_id=2, pad_token_id=3))
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.2, 1.0)
        if not tied:
            model.lm_head.weight.normal_(-0.1, 0.3)
            if head is not None:
                model.lm_head.weight.copy_(head)
    model.to(dtype).save_pretrained(path, **save_kwargs)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def bases(toks, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        "tied": make_base(root / "tied", toks / "old", tied=True),
        "untied": make_base(root / "untied", toks / "old", tied=False),
    }


def run(base, tokenizer, output, **kwargs):
    cfg = VocabInitConfig(base=str(base), tokenizer=str(tokenizer), output=str(output), progress=False, **kwargs)
    cfg.validate()
    return run_vocab_init(cfg)


def tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def held_out_ids(tok_dir, n=12):
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    seqs = [tok.encode(v).ids[:24] for v in bible_text("en")[TRAIN_VERSES:TRAIN_VERSES + n]]
    width = min(len(s) for s in seqs)
    return torch.tensor([s[:width] for s in seqs])


@torch.no_grad()
def logits(directory, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    return model(ids).logits.double(), model


def mean_kl(base, ext, ids):
    """Largest KL(p_old || p_ext) over positions, and the bound log(1 + k/n) for the extension's rows."""
    old, _ = logits(base, ids)
    new, _ = logits(ext, ids)
    log_p = old.log_softmax(-1)
    log_q = new.log_softmax(-1)[..., :N_OLD]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rows = new.shape[-1]
    return kl.max().item(), math.log(1 + (rows - N_OLD) / N_OLD)


# ------------------------------------------------------------------ every method


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", METHODS)
def test_old_rows_exact_new_rows_from_own_matrix_and_logits_unchanged(method, tied, toks, bases, tmp_path):
    base = bases["tied" if tied else "untied"]
    out = run(base, toks / "new", tmp_path / "out", method=method, pad_vocab_to_multiple_of=PAD, seed=5)
    before, after = tensors(base), tensors(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == ROWS and bool(config.get("tie_word_embeddings")) == tied
    report = json.loads((out / "vocab_extension.json").read_text())
    assert report == {"old_vocab_size": N_OLD, "new_vocab_size": N_NEW, "rows": ROWS, "method": method,
                      "base": str(base), "tokenizer": str(toks / "new"), "seed": 5, "tie_word_embeddings": tied}
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(True) == N_NEW
    names = [EMBED] if tied else [EMBED, HEAD]
    assert (HEAD in after) == (not tied)
    for name in names:
        assert after[name].shape == (ROWS, 32) and after[name].dtype == torch.float32
        assert torch.equal(after[name][:N_OLD], before[name])  # bit-exact
        assert torch.isfinite(after[name]).all()
    for name in set(before) - {EMBED, HEAD}:
        assert torch.equal(after[name], before[name])
    if not tied:  # each tensor's new rows come from its own old rows: embed mean 0.2, head mean -0.1
        for name, mu in ((EMBED, 0.2), (HEAD, -0.1)):
            new = after[name][N_OLD:]
            old_mean = before[name].double().mean(0)
            if method == "mean":
                assert torch.allclose(new.double(), old_mean.expand_as(new), atol=1e-6)
            elif method in ("multivariate", "subword-mean"):
                assert abs(new.mean().item() - mu) < 0.1
        assert not torch.equal(after[EMBED][N_OLD:], after[HEAD][N_OLD:])

    ids = held_out_ids(toks / "old")
    assert ids.max() < N_OLD
    theirs, _ = logits(base, ids)
    ours, model = logits(out, ids)
    assert ours.shape[-1] == ROWS
    assert (ours[..., :N_OLD] - theirs).abs().max().item() <= 1e-6
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_random_rows_use_the_models_init_std_and_the_seed(toks, bases, tmp_path):
    a = tensors(run(bases["untied"], toks / "new", tmp_path / "a", method="random", seed=1))
    b = tensors(run(bases["untied"], toks / "new", tmp_path / "b", method="random", seed=1))
    c = tensors(run(bases["untied"], toks / "new", tmp_path / "c", method="random", seed=2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a[EMBED][N_OLD:], c[EMBED][N_OLD:])
    new = torch.cat([a[EMBED][N_OLD:], a[HEAD][N_OLD:]])
    assert abs(new.mean().item()) < 0.005 and abs(new.std().item() - 0.02) < 0.002  # initializer_range


def test_bfloat16_base_keeps_its_dtype_and_old_rows(toks, tmp_path):
    base = make_base(tmp_path / "base", toks / "old", tied=False, dtype=torch.bfloat16)
    out = run(base, toks / "new", tmp_path / "out", method="multivariate", pad_vocab_to_multiple_of=PAD)
    before, after = tensors(base), tensors(out)
    for name in (EMBED, HEAD):
        assert after[name].dtype == torch.bfloat16 and after[name].shape == (ROWS, 32)
        assert torch.equal(after[name][:N_OLD].view(torch.int16), before[name].view(torch.int16))
    ids = held_out_ids(toks / "old")
    theirs, _ = logits(base, ids)
    ours, _ = logits(out, ids)
    assert (ours[..., :N_OLD] - theirs).abs().max().item() <= 1e-6


def test_padding_rows_of_the_base_are_not_statistics(toks, tmp_path):
    """A Qwen-style matrix with more rows than the tokenizer: the extra rows are padding."""
    base = make_base(tmp_path / "base", toks / "old", tied=True, vocab=320)
    weights = tensors(base)
    weights[EMBED][N_OLD:] = 1e3  # would dominate the mean if it were read
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = run(base, toks / "new", tmp_path / "out", method="mean")
    after = tensors(out)[EMBED]
    assert after.shape == (N_NEW, 32)
    assert torch.equal(after[:N_OLD], weights[EMBED][:N_OLD])
    expected = weights[EMBED][:N_OLD].double().mean(0)
    assert torch.allclose(after[N_OLD:].double(), expected.expand(N_NEW - N_OLD, -1), atol=1e-6)


def test_a_tied_model_that_also_stores_lm_head_stays_tied(toks, tmp_path):
    base = make_base(tmp_path / "base", toks / "old", tied=True)
    weights = tensors(base)
    weights[HEAD] = weights[EMBED].clone()
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    out = run(base, toks / "new", tmp_path / "out", method="mean")
    after = tensors(out)
    assert HEAD not in after and after[EMBED].shape == (N_NEW, 32)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_tokenizer_without_new_tokens_copies_the_matrices(toks, bases, tmp_path):
    out = run(bases["untied"], toks / "old", tmp_path / "out", method="multivariate")
    before, after = tensors(bases["untied"]), tensors(out)
    assert all(torch.equal(before[n], after[n]) for n in before) and set(before) == set(after)
    assert json.loads((out / "vocab_extension.json").read_text())["rows"] == N_OLD


# ------------------------------------------------------------------ mean: the KL bound


def test_mean_init_keeps_kl_within_log_1_plus_k_over_n_and_random_can_exceed_it(toks, bases, tmp_path):
    ids = held_out_ids(toks / "old")
    for name in ("tied", "untied"):
        out = run(bases[name], toks / "new", tmp_path / name, method="mean", pad_vocab_to_multiple_of=PAD)
        kl, bound = mean_kl(bases[name], out, ids)
        assert 0 < kl <= bound + FP32_SLACK, (name, kl, bound)
    # The bound is not vacuous: rows drawn with a large std break it.
    wide = tmp_path / "wide"
    shutil.copytree(bases["untied"], wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "initializer_range": 1.0}))
    out = run(wide, toks / "new", tmp_path / "random", method="random", pad_vocab_to_multiple_of=PAD)
    kl, bound = mean_kl(wide, out, ids)
    assert kl > 3 * bound


def test_the_kl_bound_is_tight_when_old_logits_are_equal(toks, tmp_path):
    # Jensen's inequality is an equality when every old logit is the same: head rows equal up to noise.
    noise = torch.randn(N_OLD, 32, generator=torch.Generator().manual_seed(0)) * 1e-5
    head = 0.1 * torch.randn(32, generator=torch.Generator().manual_seed(1)) + noise
    base = make_base(tmp_path / "base", toks / "old", tied=False, head=head)
    out = run(base, toks / "new", tmp_path / "out", method="mean", pad_vocab_to_multiple_of=PAD)
    kl, bound = mean_kl(base, out, held_out_ids(toks / "old"))
    assert kl <= bound + FP32_SLACK and bound - kl < 1e-4 * bound


# ------------------------------------------------------------------ multivariate


def test_multivariate_samples_have_the_scaled_mean_and_covariance():
    d, k = 8, 40_000
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=gen)
    matrix = torch.randn(500, d, generator=gen) @ mix + 3.0
    stats = row_statistics(lambda a, b: matrix[a:b], 500, 64, covariance=True)
    samples = multivariate_rows(stats, k, torch.Generator().manual_seed(1)).double()
    target = 1e-5 * stats.covariance.double()
    sd = target.diag().sqrt()
    assert ((samples.mean(0) - stats.mean.double()).abs() <= 5 * sd / math.sqrt(k)).all()
    cov = torch.cov(samples.T)
    assert (cov - target).norm() / target.norm() < 0.05  # expected about 0.01 for this k
    again = multivariate_rows(stats, 4, torch.Generator().manual_seed(1))
    assert torch.equal(again, samples[:4].float())


def test_multivariate_with_a_singular_covariance():
    # Fewer rows than dimensions: no Cholesky factor; samples stay in the rows' affine span.
    matrix = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    stats = row_statistics(lambda a, b: matrix[a:b], 4, 2, covariance=True)
    samples = multivariate_rows(stats, 100, torch.Generator().manual_seed(0), scale=1.0).double()
    basis = (matrix[1:] - matrix[0]).double().T
    offsets = samples - matrix[0].double()
    residual = offsets - (basis @ torch.linalg.lstsq(basis, offsets.T).solution).T
    # fp32 statistics leave the null space at rounding level (about 1e-7 of the variance; sd about 3e-4)
    assert torch.isfinite(samples).all() and residual.abs().max() < 1e-2 < offsets.abs().max()


# ------------------------------------------------------------------ subword-mean


def test_subword_mean_row_is_the_mean_of_its_old_pieces(toks, bases, tmp_path):
    base = bases["untied"]
    out = run(base, toks / "new", tmp_path / "out", method="subword-mean", pad_vocab_to_multiple_of=PAD)
    before, after = tensors(base), tensors(out)
    old = Tokenizer.from_file(str(toks / "old" / "tokenizer.json"))
    by_id = {i: t for t, i in Tokenizer.from_file(str(toks / "new" / "tokenizer.json")).get_vocab(True).items()}
    for i in range(N_OLD, N_NEW):
        pieces = old.model.tokenize(by_id[i])
        assert "".join(p.value for p in pieces) == by_id[i] and len(pieces) >= 2
        for name in (EMBED, HEAD):
            acc = torch.zeros(32)
            for p in pieces:
                acc += before[name][p.id]
            assert torch.equal(after[name][i], acc / len(pieces))
            mean = torch.stack([before[name][p.id] for p in pieces]).double().mean(0)
            assert torch.allclose(after[name][i].double(), mean, atol=1e-6)
    for name in (EMBED, HEAD):  # padding rows have no string: the mean of the old rows
        expected = before[name].double().mean(0).expand(ROWS - N_NEW, -1)
        assert torch.allclose(after[name][N_NEW:].double(), expected, atol=1e-6)


def test_subword_mean_falls_back_to_the_mean_without_pieces():
    matrix = torch.arange(12.0).reshape(6, 2)
    rows, fallbacks = subword_mean_rows([[1, 1, 4], [], [5]], lambda a, b: matrix[a:b], 2,
                                        lambda: torch.tensor([-1.0, -1.0]))
    assert fallbacks == 1
    assert torch.equal(rows, torch.tensor([[4.0, 5.0], [-1.0, -1.0], [10.0, 11.0]]))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """Mistral's SentencePiece vocabulary as tokenizer.json, and an extension by three merged words."""
    root = tmp_path_factory.mktemp("sp")
    shutil.copy(mistral_sentencepiece_path(), root / "tokenizer.model")
    transformers.AutoTokenizer.from_pretrained(root).save_pretrained(root / "old")
    shutil.copy(root / "tokenizer.model", root / "old" / "tokenizer.model")
    data = json.loads((root / "old" / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for left, right in (("▁Herr", "lich"), ("▁Herrlich", "keit"), ("▁Gott", "es")):
        assert left in vocab and right in vocab and left + right not in vocab
        vocab[left + right] = len(vocab)
        data["model"]["merges"].append([left, right])
    (root / "new").mkdir()
    (root / "new" / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    shutil.copy(root / "old" / "tokenizer_config.json", root / "new")
    new = Tokenizer.from_file(str(root / "new" / "tokenizer.json"))
    assert new.encode("Herrlichkeit Gottes").tokens == ["▁Herrlichkeit", "▁Gottes"]
    return root


def test_subword_pieces_of_sentencepiece_tokens_use_the_old_model(sentencepiece):
    old = Tokenizer.from_file(str(sentencepiece / "old" / "tokenizer.json"))
    pieces = subword_pieces(old, ["▁Herrlichkeit", "▁東京", None, "Gottes"], [True, True, False, False], 32000)
    names = [[old.id_to_token(i) for i in p] for p in pieces]
    assert names[0] == ["▁Herr", "lich", "keit"]
    assert names[1] == ["▁", "東", "京"] and names[2] == []
    assert names[3] == old.encode("Gottes", add_special_tokens=False).tokens  # an added token: plain text


@pytest.mark.parametrize("base_tokenizer", ["tokenizer.json", "tokenizer.model only"])
def test_subword_mean_on_a_sentencepiece_base(sentencepiece, base_tokenizer, tmp_path):
    src = sentencepiece / "old"
    if base_tokenizer != "tokenizer.json":
        src = tmp_path / "sp_only"
        src.mkdir()
        shutil.copy(sentencepiece / "tokenizer.model", src / "tokenizer.model")
    base = make_base(tmp_path / "base", src, tied=True, vocab=32000)
    out = run(base, sentencepiece / "new", tmp_path / "out", method="subword-mean")
    before, after = tensors(base)[EMBED], tensors(out)[EMBED]
    assert after.shape == (32003, 32) and torch.equal(after[:32000], before)
    old = Tokenizer.from_file(str(sentencepiece / "old" / "tokenizer.json"))
    for row, word in ((32000, ["▁Herr", "lich"]), (32001, ["▁Herr", "lich", "keit"]), (32002, ["▁Gott", "es"])):
        acc = torch.zeros(32)
        for piece in word:
            acc += before[old.token_to_id(piece)]
        assert torch.equal(after[row], acc / len(word))


# ------------------------------------------------------------------ chunked statistics


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 257, 1000])
def test_chunked_statistics_equal_the_unchunked_ones(chunk_rows):
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(257, 16, generator=gen) @ torch.randn(16, 16, generator=gen) * 0.05 + 2.0
    reads = []

    def read(a, b):
        reads.append(b - a)
        return matrix[a:b]

    stats = row_statistics(read, 257, chunk_rows, covariance=True)
    assert max(reads) == min(chunk_rows, 257)
    whole = row_statistics(lambda a, b: matrix[a:b], 257, 257, covariance=True)
    assert (stats.mean - whole.mean).abs().max() <= 1e-6
    assert (stats.covariance - whole.covariance).abs().max() <= 1e-6
    reference = torch.cov(matrix.double().T)
    assert (stats.mean.double() - matrix.double().mean(0)).abs().max() <= 1e-6
    assert (stats.covariance.double() - reference).abs().max() <= 1e-6
    assert isinstance(stats, RowStatistics) and stats.count == 257


# ------------------------------------------------------------------ streaming shards


def test_sharded_base_streams_untouched_shards_byte_identical(toks, tmp_path):
    base = make_base(tmp_path / "base", toks / "old", tied=False, max_shard_size="40KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    touched = {index["weight_map"][EMBED], index["weight_map"][HEAD]}
    assert len(shards) >= 3 and set(shards) - touched
    out = run(base, toks / "new", tmp_path / "out", method="mean", pad_vocab_to_multiple_of=PAD, chunk_rows=32)
    for shard in shards:
        assert filecmp.cmp(base / shard, out / shard, shallow=False) == (shard not in touched)
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == index["weight_map"]
    total = 0
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert sorted(f.keys()) == sorted(n for n, s in index["weight_map"].items() if s == shard)
            total += sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    assert out_index["metadata"]["total_size"] == total
    assert total - index["metadata"]["total_size"] == 2 * (ROWS - N_OLD) * 32 * 4
    assert (out / "generation_config.json").read_text() == (base / "generation_config.json").read_text()
    before, after = tensors(base), tensors(out)
    assert torch.equal(after[EMBED][:N_OLD], before[EMBED]) and torch.equal(after[HEAD][:N_OLD], before[HEAD])
    ids = held_out_ids(toks / "old")
    theirs, _ = logits(base, ids)
    ours, _ = logits(out, ids)
    assert (ours[..., :N_OLD] - theirs).abs().max().item() <= 1e-6


# ------------------------------------------------------------------ command line and refusals


def test_cli_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as e:
        main(["vocab", "init", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for field in ("--base", "--tokenizer", "--method", "--output", "--pad_vocab_to_multiple_of", "--seed",
                  "--chunk_rows", "--overwrite", "subword-mean", "multivariate"):
        assert field in text
    assert main(["--help"]) == 0 and "vocab init" in capsys.readouterr().out


def test_cli_writes_a_model_and_refuses_to_replace_it(toks, bases, tmp_path, capsys):
    args = ["vocab", "init", "--base", str(bases["tied"]), "--tokenizer", str(toks / "new"),
            "--output", str(tmp_path / "out"), "--method", "subword-mean", "--progress", "false"]
    assert main(args) == 0
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == N_NEW
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in _one_error_line(capsys)
    assert main(args + ["--overwrite", "true", "--method", "mean"]) == 0
    assert json.loads((tmp_path / "out" / "vocab_extension.json").read_text())["method"] == "mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directory left


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _broken_base(bases, tmp_path, what):
    base = tmp_path / "base"
    shutil.copytree(bases["untied"], base)
    if what == "no config.json":
        (base / "config.json").unlink()
    elif what == "config.json not JSON":
        (base / "config.json").write_text("{")
    elif what == "weights garbled":
        (base / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    elif what == "no weights":
        (base / "model.safetensors").unlink()
    elif what == "no embedding":
        weights = tensors(base)
        del weights[EMBED]
        save_file(weights, base / "model.safetensors")
    elif what in ("no lm_head", "no lm_head, no tie key"):
        weights = tensors(base)
        del weights[HEAD]
        save_file(weights, base / "model.safetensors")
        if what == "no lm_head, no tie key":
            config = json.loads((base / "config.json").read_text())
            config.pop("tie_word_embeddings", None)
            (base / "config.json").write_text(json.dumps(config))
    elif what == "no tokenizer":
        (base / "tokenizer.json").unlink()
    elif what == "shard outside":
        (base / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {EMBED: "../x.safetensors"}}))
        shutil.copy(base / "model.safetensors", tmp_path / "x.safetensors")
    elif what == "rows beyond the embedding":
        config = json.loads((base / "config.json").read_text())
        weights = tensors(base)
        weights = {n: t[:N_OLD - 10] if n in (EMBED, HEAD) else t for n, t in weights.items()}
        save_file(weights, base / "model.safetensors")
        (base / "config.json").write_text(json.dumps({**config, "vocab_size": N_OLD - 10}))
    return base


@pytest.mark.parametrize("what, message", [
    ("no config.json", "config.json is missing"),
    ("config.json not JSON", "config.json is not valid JSON"),
    ("weights garbled", "model.safetensors is not a readable safetensors file"),
    ("no weights", "neither model.safetensors nor model.safetensors.index.json"),
    ("no embedding", "no tensor 'model.embed_tokens.weight'"),
    ("no lm_head", "config.json says tie_word_embeddings=false (untied, as transformers reads it), but no tensor"),
    ("no lm_head, no tie key", "config.json has no tie_word_embeddings (untied, as transformers reads it), but no"),
    ("no tokenizer", "holds no tokenizer"),
    ("shard outside", "expected a file name in"),
    ("rows beyond the embedding", "has 290 rows, but the base tokenizer uses ids up to 299"),
])
def test_bad_base_exits_2_with_one_line(what, message, bases, toks, tmp_path, capsys):
    base = _broken_base(bases, tmp_path, what)
    assert main(["vocab", "init", "--base", str(base), "--tokenizer", str(toks / "new"),
                 "--output", str(tmp_path / "out"), "--progress", "false"]) == 2
    line = _one_error_line(capsys)
    assert message in line and str(base) in line
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_is_not_an_extension_is_refused(toks, bases, tmp_path, capsys):
    german = tmp_path / "german"
    train_bpe_tokenizer(german, vocab_size=N_NEW, texts=bible_text("de", 500))
    smaller = tmp_path / "smaller"
    train_bpe_tokenizer(smaller, vocab_size=N_OLD - 20, texts=bible_text("en", TRAIN_VERSES))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "tokenizer.json").write_text("{]")
    cases = [(german, "is not an extension of the base tokenizer"), (smaller, "fewer than the"),
             (garbled, "is not a readable tokenizer.json"), (tmp_path, "holds no tokenizer.json")]
    for tok, message in cases:
        assert main(["vocab", "init", "--base", str(bases["tied"]), "--tokenizer", str(tok),
                     "--output", str(tmp_path / "out"), "--progress", "false"]) == 2
        line = _one_error_line(capsys)
        assert message in line and str(tok) in line, line
    # both tokenizers are named
    with pytest.raises(CptronError, match="tokenizer.json is not an extension of the base tokenizer .*tokenizer.json"):
        run(bases["tied"], german, tmp_path / "out")


def _tokenizer_with_ids(src, dst, keep, extra=()):
    """src's tokenizer.json keeping the model tokens whose id passes `keep` (and the merges among them),
    plus `extra` (token, id, (left, right)) model tokens with their merges appended."""
    dst.mkdir()
    shutil.copy(src / "tokenizer_config.json", dst)
    data = json.loads((src / "tokenizer.json").read_text())
    model = data["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if keep(i)}
    model["merges"] = [m for m in model["merges"] if m[0] + m[1] in model["vocab"]]
    for token, token_id, merge in extra:
        model["vocab"][token] = token_id
        model["merges"].append(list(merge))
    (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


def test_new_ids_inside_the_base_range_are_refused_and_gaps_are_copied(toks, tmp_path):
    # The base uses ids 0..299 and 339 (300..338 unused): the extension's ids 300..338 are inside its range.
    base_tok = _tokenizer_with_ids(toks / "new", tmp_path / "base_tok", lambda i: i < N_OLD or i == N_NEW - 1)
    base = make_base(tmp_path / "base", base_tok, tied=True, vocab=N_NEW)
    with pytest.raises(CptronError, match=r"new token .* has id 300, inside the base tokenizer .*'s ids \[0, 340\)"):
        run(base, toks / "new", tmp_path / "out")
    # An extension that leaves the gap alone: the gap's rows are base rows, copied like every other one.
    old = Tokenizer.from_file(str(base_tok / "tokenizer.json"))
    left, right = "Ġthe", "Ġ"
    assert old.token_to_id(left) is not None and old.token_to_id(right) is not None
    assert old.token_to_id(left + right) is None
    new = _tokenizer_with_ids(base_tok, tmp_path / "new", lambda i: True, [(left + right, N_NEW, (left, right))])
    out = run(base, new, tmp_path / "out", method="subword-mean")
    assert json.loads((out / "vocab_extension.json").read_text())["old_vocab_size"] == N_NEW
    after, before = tensors(out)[EMBED], tensors(base)[EMBED]
    assert after.shape == (N_NEW + 1, 32) and torch.equal(after[:N_NEW], before)
    pieces = [old.token_to_id(left), old.token_to_id(right)]
    assert torch.equal(after[N_NEW], (before[pieces[0]] + before[pieces[1]]) / 2)


@pytest.mark.parametrize("field, value", [
    ("method", "word2vec"), ("pad_vocab_to_multiple_of", "0"), ("chunk_rows", "0"), ("base", "/nonexistent"),
])
def test_invalid_fields_exit_2(field, value, toks, bases, tmp_path, capsys):
    args = {"base": str(bases["tied"]), "tokenizer": str(toks / "new"), "output": str(tmp_path / "out"), field: value}
    assert main(["vocab", "init"] + [x for k, v in args.items() for x in (f"--{k}", v)]) == 2
    assert f"{field}=" in _one_error_line(capsys)


def test_output_may_not_hold_the_base_or_the_tokenizer(toks, bases, tmp_path):
    """--overwrite replaces the whole output directory: one holding an input would delete it."""
    inside = tmp_path / "model-de" / "tokenizer"
    shutil.copytree(toks / "new", inside)
    for base, tokenizer, output, field in (
        (bases["tied"], inside, tmp_path / "model-de", "tokenizer"),
        (bases["tied"], toks / "new", bases["tied"].parent, "base"),
    ):
        cfg = VocabInitConfig(base=str(base), tokenizer=str(tokenizer), output=str(output), overwrite=True)
        with pytest.raises(ConfigError, match=f"output=.*a directory other than {field} and not one holding it"):
            cfg.validate()
    assert (inside / "tokenizer.json").is_file()
