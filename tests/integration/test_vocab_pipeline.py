"""The vocabulary-extension flow end to end, through the CLI a user runs:

    cptron vocab extend -> cptron vocab init -> cptron data tokenize -> cptron train (init_from, new rows only)
    -> cptron convert cptron-to-hf -> transformers

and the start-up refusal of shards made with the base tokenizer for the extended model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cptron.cli import main
from cptron.testing.fixtures import BIBLE_DIR, bible_text, train_bpe_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """An English base (tiny random LlamaForCausalLM with an English BPE tokenizer), its tokenizer
    extended on German, and the extended model initialized with subword-mean."""
    root = tmp_path_factory.mktemp("vocab")
    tok = train_bpe_tokenizer(root / "tok-en", vocab_size=600, texts=bible_text("en", 1500))
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    for f in (root / "tok-en").iterdir():
        shutil.copy2(f, root / "base" / f.name)
    de = root / "de.txt"
    de.write_text("\n".join(bible_text("de", 1500)) + "\n", encoding="utf-8")
    assert (
        main(
            ["vocab", "extend", "--base", str(root / "base"), "--inputs", str(de), "--new_tokens", "200"]
            + ["--output", str(root / "tok-ext"), "--progress", "false"]
        )
        == 0
    )
    assert (
        main(
            ["vocab", "init", "--base", str(root / "base"), "--tokenizer", str(root / "tok-ext")]
            + ["--method", "subword-mean", "--output", str(root / "ext"), "--progress", "false"]
        )
        == 0
    )
    for name, tokdir in (("base", root / "tok-en"), ("ext", root / "tok-ext")):
        rc = main(
            ["data", "tokenize", "--inputs", str(de), "--input_format", "text", "--text_unit", "line"]
            + ["--tokenizer", str(tokdir / "tokenizer.json"), "--output_prefix", str(root / "data" / name / "de")]
            + ["--progress", "false", "--workers", "1"]
        )
        assert rc == 0
    return root


def _train_yaml(root: Path, data: str, run: str, steps: int) -> str:
    cfg = {
        "training": {
            "run_dir": str(root / run),
            "steps": steps,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "seq_len": 32,
            "device": "cpu",
            "eval_at_start": False,
        },
        "optim": {"lr": 1e-2, "train_new_rows_only": True},
        "data": {"sources": {"de": {"paths": [str(root / "data" / data)]}}},
        "checkpoint": {"init_from": str(root / "ext"), "interval": steps},
        "metrics": {"progress_bar": "off"},
    }
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_shards_of_the_base_tokenizer_are_refused_for_the_extended_model(extended, capsys):
    rc = main(["train", _train_yaml(extended, "base", "refused", 2)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert "tokenizer" in lines[0] and "data.sources.de" in lines[0], lines[0]


def test_an_extended_model_trains_its_new_rows_and_exports_to_transformers(extended):
    root = extended
    report = json.loads((root / "ext" / "vocab_extension.json").read_text())
    n_old, n_new = report["old_vocab_size"], report["new_vocab_size"]
    assert n_new > n_old
    assert main(["train", _train_yaml(root, "ext", "run", 3)]) == 0
    ckpt = root / "run" / "checkpoints" / "step-00000003"
    assert main(["convert", "cptron-to-hf", "--input", str(ckpt), "--output", str(root / "out")]) == 0

    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    start = transformers.AutoModelForCausalLM.from_pretrained(root / "ext")
    out = transformers.AutoModelForCausalLM.from_pretrained(root / "out")
    tok = transformers.AutoTokenizer.from_pretrained(root / "out")
    assert len(tok) == n_new
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        trained, before, original = get(out), get(start), get(base)
        assert trained.shape[0] >= n_new
        assert torch.equal(trained[:n_old], original[:n_old])  # old rows bit-exact through the whole flow
        assert not torch.equal(trained[n_old:n_new], before[n_old:n_new])  # the new rows trained
    for (name, p), (_, q) in zip(out.named_parameters(), start.named_parameters()):
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(p, q), name  # everything else frozen
    # The German text needs fewer tokens with the extension, and the export round-trips it.
    verse = (BIBLE_DIR / "elberfelder.txt").read_text(encoding="utf-8").splitlines()[2000]
    base_tok = transformers.AutoTokenizer.from_pretrained(root / "base")
    ids = tok(verse, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(base_tok(verse, add_special_tokens=False)["input_ids"])
    assert tok.decode(ids) == verse
