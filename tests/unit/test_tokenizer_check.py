"""Shards made with another tokenizer of the same vocabulary size are refused at start-up: across the
sources of a mixture, and against the model's tokenizer (training.tokenizer, the one beside
checkpoint.init_from, or the resumed checkpoint's); data.allow_tokenizer_mismatch turns the refusal into a
warning, and shards without a recorded fingerprint are reported, not refused."""

import logging
import os

import numpy as np
import pytest
import torch.distributed as dist

from cptron.cli import InitConfig, main, run_init
from cptron.config import dump_yaml
from cptron.data.build import build_data_loaders
from cptron.data.config import DataConfig, SourceConfig
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.data.tokenize import TokenizeConfig, run_tokenize, tokenizer_fingerprint
from cptron.data.tokenizer_check import model_tokenizer_fingerprints
from cptron.errors import CptronError
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.fixtures import bible_text, train_bpe_tokenizer
from cptron.testing.training import make_train_config
from cptron.train.trainer import Trainer

VOCAB = 300  # both tokenizers: equal sizes, so token ids alone cannot tell them apart


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tokenizers `a` (trained on English) and `b` (German) of one vocabulary size, and English verses
    tokenized with each into shards."""
    root = tmp_path_factory.mktemp("tokcheck")
    en = root / "en.txt"
    en.write_text("\n".join(bible_text("en", 300)) + "\n", encoding="utf-8")
    out = {}
    for name, lang in (("a", "en"), ("b", "de")):
        train_bpe_tokenizer(root / f"tok_{name}", vocab_size=VOCAB, texts=bible_text(lang, 300))
        out[f"tok_{name}"] = root / f"tok_{name}"
        prefix = root / "data" / name / "en"
        run_tokenize(
            TokenizeConfig(
                inputs=[str(en)], tokenizer=str(root / f"tok_{name}"), output_prefix=str(prefix), progress=False
            )
        )
        out[name] = str(root / "data" / name)
    fp_a, fp_b = (tokenizer_fingerprint(out[f"tok_{n}"] / "tokenizer.json") for n in "ab")
    assert fp_a != fp_b
    out["fp_a"], out["fp_b"] = fp_a, fp_b
    return out


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """An in-process Trainer starts a one-process group; later tests in this process (run_distributed
    among them) must not inherit it."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _cfg(tmp_path, sources, tokenizer=None, **data):
    cfg = make_train_config(tmp_path / "run", steps=2, tokenizer=None if tokenizer is None else str(tokenizer))
    cfg.data = DataConfig(sources={n: SourceConfig(paths=[p]) for n, p in sources.items()}, **data)
    return cfg


def _build(cfg, tokenizer=None):
    return build_data_loaders(
        cfg.data, seq_len=16, global_batch_size=8, dp_rank=0, dp_size=1, vocab_size=500, seed=0, tokenizer=tokenizer
    )


def _messages(caplog, level):
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("cptron")]


def test_sources_tokenized_with_different_tokenizers_are_refused(tmp_path, corpus):
    cfg = _cfg(tmp_path, {"en_a": corpus["a"], "en_b": corpus["b"]})
    with pytest.raises(CptronError) as e:
        _build(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "different tokenizers" in msg
    assert "data.sources.en_a shard " + os.path.join(corpus["a"], "en_00000") in msg
    assert "data.sources.en_b shard " + os.path.join(corpus["b"], "en_00000") in msg
    assert corpus["fp_a"][:16] in msg and corpus["fp_b"][:16] in msg
    assert "data.allow_tokenizer_mismatch=true" in msg
    _build(_cfg(tmp_path, {"en_a": corpus["a"], "more_a": corpus["a"]}))  # one tokenizer: accepted


def test_the_trainer_refuses_shards_of_another_tokenizer_than_training_tokenizer(tmp_path, corpus):
    with pytest.raises(CptronError) as e:
        Trainer(_cfg(tmp_path, {"en": corpus["a"]}, tokenizer=corpus["tok_b"]))
    msg = str(e.value)
    assert "\n" not in msg
    assert "data.sources.en shard " + os.path.join(corpus["a"], "en_00000") in msg
    assert f"model's tokenizer {corpus['tok_b'] / 'tokenizer.json'}" in msg
    assert corpus["fp_a"][:16] in msg and corpus["fp_b"][:16] in msg
    Trainer(_cfg(tmp_path, {"en": corpus["a"]}, tokenizer=corpus["tok_a"]))  # the right one builds


def test_the_tokenizer_beside_init_from_and_of_the_resumed_checkpoint_is_checked(tmp_path, corpus):
    base = tmp_path / "base"  # a base model that carries tokenizer b, as a Mistral base carries Mistral's
    run_init(InitConfig(model=make_train_config(tmp_path).model, output=str(base), tokenizer=str(corpus["tok_b"])))
    cfg = _cfg(tmp_path, {"en": corpus["a"]})
    cfg.checkpoint.init_from = str(base)
    with pytest.raises(CptronError, match=f"model's tokenizer {base / 'tokenizer' / 'tokenizer.json'}"):
        Trainer(cfg)
    # A run that overrode the check once ships tokenizer b in its checkpoints; resuming checks that one.
    cfg = _cfg(tmp_path, {"en": corpus["a"]}, tokenizer=corpus["tok_b"], allow_tokenizer_mismatch=True)
    cfg.checkpoint.save_final = True
    Trainer(cfg).run()
    cfg = _cfg(tmp_path, {"en": corpus["a"]})
    cfg.checkpoint.resume = True
    with pytest.raises(CptronError, match=r"step-0*2/tokenizer/tokenizer.json"):
        Trainer(cfg)


def _refusal_on(rank, world_size, run_dir, shards, tokenizer):
    cfg = make_train_config(run_dir, ParallelConfig(dp_shard=world_size), steps=2, tokenizer=str(tokenizer))
    cfg.data = DataConfig(sources={"en": SourceConfig(paths=[shards])})
    try:
        Trainer(cfg)
        return "built"
    except CptronError as e:
        return str(e)


def test_every_rank_refuses(tmp_path, corpus):
    results = run_distributed(_refusal_on, 2, str(tmp_path / "run"), corpus["a"], corpus["tok_b"], timeout=120)
    assert all("was not tokenized with the model's tokenizer" in r for r in results), results


def test_cptron_train_and_data_plan_exit_2_naming_both_sides(tmp_path, corpus, capsys):
    config = tmp_path / "train.yaml"
    dump_yaml(_cfg(tmp_path, {"en": corpus["a"]}, tokenizer=corpus["tok_b"]), str(config))
    for command in (["train"], ["data", "plan"]):
        assert main([*command, str(config)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert os.path.join(corpus["a"], "en_00000") in err and str(corpus["tok_b"] / "tokenizer.json") in err


def test_the_override_warns_naming_both_and_trains(tmp_path, corpus, caplog):
    caplog.set_level(logging.INFO, logger="cptron")
    cfg = _cfg(tmp_path, {"en": corpus["a"]}, tokenizer=corpus["tok_b"], allow_tokenizer_mismatch=True)
    assert Trainer(cfg).run().last_step == 2
    warnings = [m for m in _messages(caplog, logging.WARNING) if "allow_tokenizer_mismatch" in m]
    assert len(warnings) == 1
    assert os.path.join(corpus["a"], "en_00000") in warnings[0]
    assert str(corpus["tok_b"] / "tokenizer.json") in warnings[0]


def test_shards_without_a_fingerprint_are_reported_once_and_used(tmp_path, corpus, caplog):
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(tmp_path / "old" / "part"), vocab_size=VOCAB) as w:  # sidecar, no fingerprint
        for _ in range(60):
            w.add_document(rng.integers(3, VOCAB, int(rng.integers(5, 40))))
    os.remove(tmp_path / "old" / "part.json")  # ... and a shard without a sidecar (megatron-core's)
    with IndexedDatasetWriter(str(tmp_path / "old" / "part2"), vocab_size=VOCAB) as w:
        for _ in range(60):
            w.add_document(rng.integers(3, VOCAB, int(rng.integers(5, 40))))
    caplog.set_level(logging.INFO, logger="cptron")
    Trainer(_cfg(tmp_path, {"old": str(tmp_path / "old")}, tokenizer=corpus["tok_b"]))
    notes = [m for m in _messages(caplog, logging.INFO) if "no tokenizer fingerprint" in m]
    assert len(notes) == 1 and "2 of 2 shard(s)" in notes[0] and "data.sources.old" in notes[0]
    assert not _messages(caplog, logging.WARNING)


def test_a_model_directory_accepts_shards_made_from_its_json_or_its_sentencepiece_file(tmp_path, corpus):
    # An HF directory holds one tokenizer twice; `cptron data tokenize` may have read either file.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes((corpus["tok_a"] / "tokenizer.json").read_bytes())
    (model_dir / "tokenizer.json").write_bytes((corpus["tok_b"] / "tokenizer.json").read_bytes())
    file, accepted = model_tokenizer_fingerprints(model_dir)
    assert file == model_dir / "tokenizer.json" and accepted == {corpus["fp_a"], corpus["fp_b"]}
    _build(_cfg(tmp_path, {"en": corpus["a"]}), tokenizer=str(model_dir))
