"""Bad or unlucky files give one-line errors, never a traceback or lost data: a failed `data tokenize
--overwrite` keeps the old shards, `convert verify` judges a bf16 export in its own precision, and
non-object configs, understated shard sidecars and pickle weights are refused naming the file."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cptron.cli import main
from cptron.config import dump_yaml
from cptron.data.config import DataConfig, SourceConfig
from cptron.data.indexed import shard_prefixes
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.data.tokenize import TokenizeConfig, run_tokenize
from cptron.errors import CptronError
from cptron.testing.fixtures import bible_text, train_bpe_tokenizer
from cptron.testing.training import VOCAB, make_train_config

EN = bible_text("en", 200)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# ------------------------------------------------------------------ 5: tokenize --overwrite


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(out, vocab_size=512)
    return out / "tokenizer.json"


def _tokenize(tmp_path, inputs, tokenizer, **kw):
    cfg = TokenizeConfig(inputs=[str(p) for p in inputs], tokenizer=str(tokenizer),
                         output_prefix=str(tmp_path / "out" / "corpus"), progress=False, **kw)
    return run_tokenize(cfg)


def _files(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("bad", ["empty_input", "missing_text_field", "missing_field_after_some_shards"])
def test_a_failed_overwrite_keeps_the_old_shards_byte_identical(tmp_path, bpe, bad):
    good = tmp_path / "en.txt"
    good.write_text("\n".join(EN) + "\n", encoding="utf-8")
    _tokenize(tmp_path, [good], bpe, shard_size_tokens=3000)
    before = _files(tmp_path / "out")
    assert len(before) > 6  # several shards of three files each
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"content": "no text field here"}) + "\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    inputs, match = {
        "empty_input": ([empty], "no non-empty document"),
        "missing_text_field": ([broken], "missing text field 'text'"),
        # the first input fills (and finalizes) shards before the second one fails
        "missing_field_after_some_shards": ([good, broken], "missing text field 'text'"),
    }[bad]
    with pytest.raises(CptronError, match=match):
        _tokenize(tmp_path, inputs, bpe, shard_size_tokens=2000, overwrite=True)
    assert _files(tmp_path / "out") == before  # same names (so no temporary files left) and same bytes


def test_a_successful_overwrite_replaces_every_old_shard(tmp_path, bpe):
    src = tmp_path / "en.txt"
    src.write_text("\n".join(EN) + "\n", encoding="utf-8")
    first = _tokenize(tmp_path, [src], bpe, shard_size_tokens=2000)
    assert len(first["shards"]) > 2
    before = _files(tmp_path / "out")
    second = _tokenize(tmp_path, [src], bpe, overwrite=True, eos=False)
    assert len(second["shards"]) == 1
    after = _files(tmp_path / "out")
    assert sorted(after) == ["corpus_00000.bin", "corpus_00000.idx", "corpus_00000.json"]
    assert after["corpus_00000.bin"] != before["corpus_00000.bin"]
    assert shard_prefixes(tmp_path / "out" / "corpus") == second["shards"]


# ------------------------------------------------------------------ 6: verify a bf16 export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny checkpoint (float32) and its bf16 and fp32 exports."""
    root = tmp_path_factory.mktemp("tiny")
    assert main(["init", "--model.preset", "tiny", "--output", str(root / "cp"), "--seed", "3"]) == 0
    for dtype in ("bfloat16", "float32"):
        assert main(["convert", "cptron-to-hf", "--input", str(root / "cp"), "--output", str(root / dtype),
                     "--dtype", dtype, "--progress", "false"]) == 0
    return root


def _verify(tiny, hf, *extra):
    return main(["convert", "verify", "--checkpoint", str(tiny / "cp"), "--hf", str(hf), *extra])


def _rewrite_weights(src, dst, edit):
    (dst).mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_a_bf16_export_passes_verify_with_the_default_tolerance(tiny, capsys):
    assert json.loads((tiny / "bfloat16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert _verify(tiny, tiny / "bfloat16") == 0
    out = capsys.readouterr().out
    assert "OK" in out and "bfloat16" in out and "tolerance 1e-05" in out


def test_an_fp32_export_is_still_checked_at_1e_5(tiny, tmp_path, capsys):
    assert _verify(tiny, tiny / "float32") == 0
    assert "tolerance 1e-05): OK" in capsys.readouterr().out
    # float32 tensors holding bf16-rounded values are not what the checkpoint holds: refused at 1e-5
    def round_to_bf16(tensors):
        for name, t in tensors.items():
            tensors[name] = t.to(torch.bfloat16).float()

    _rewrite_weights(tiny / "float32", tmp_path / "rounded", round_to_bf16)
    with pytest.raises(SystemExit) as exit_info:
        _verify(tiny, tmp_path / "rounded")
    assert exit_info.value.code == 1 and "MISMATCH" in capsys.readouterr().out


def test_a_corrupted_bf16_export_fails_and_an_explicit_tolerance_wins(tiny, tmp_path, capsys):
    def swap_gate_and_up(tensors):
        gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        tensors[gate], tensors[up] = tensors[up], tensors[gate]

    _rewrite_weights(tiny / "bfloat16", tmp_path / "swapped", swap_gate_and_up)
    with pytest.raises(SystemExit) as exit_info:
        _verify(tiny, tmp_path / "swapped")
    assert exit_info.value.code == 1 and "MISMATCH" in capsys.readouterr().out
    assert _verify(tiny, tmp_path / "swapped", "--tolerance", "1000") == 0
    assert "OK" in capsys.readouterr().out


# ------------------------------------------------------------------ 8: one-line refusals


@pytest.mark.parametrize("content", ["[1, 2, 3]", "null"])
def test_a_config_json_that_is_not_an_object_is_refused(tiny, tmp_path, content, capsys):
    hf = tmp_path / "hf"
    _rewrite_weights(tiny / "float32", hf, lambda tensors: None)
    (hf / "config.json").write_text(content)
    assert main(["convert", "hf-to-cptron", "--input", str(hf), "--output", str(tmp_path / "cp"),
                 "--progress", "false"]) == 2
    line = _one_error_line(capsys)
    assert "config.json" in line and "expected a JSON object" in line
    # the same directory as a run's initial weights
    config = tmp_path / "train.yaml"
    cfg = make_train_config(tmp_path / "run")
    cfg.checkpoint.init_from = str(hf)
    cfg.data = DataConfig(sources={"x": SourceConfig(paths=[str(tmp_path / "nowhere")])})
    dump_yaml(cfg, str(config))
    for command in (["data", "plan"], ["train"]):
        assert main([*command, str(config)]) == 2
        line = _one_error_line(capsys)
        assert str(hf / "config.json") in line and "expected a JSON object" in line


def test_a_generation_config_that_is_not_an_object_is_refused_at_start(tiny, tmp_path, capsys):
    from cptron.train.initial_weights import init_source_meta

    hf = tmp_path / "hf"
    _rewrite_weights(tiny / "float32", hf, lambda tensors: None)
    (hf / "generation_config.json").write_text("[]")
    with pytest.raises(CptronError, match=r"generation_config.json holds a JSON array: expected a JSON object"):
        init_source_meta(hf)
    assert main(["convert", "hf-to-cptron", "--input", str(hf), "--output", str(tmp_path / "cp"),
                 "--progress", "false"]) == 2
    assert "generation_config.json holds a JSON array" in _one_error_line(capsys)
    assert not (tmp_path / "cp").exists()


def test_a_sidecar_understating_max_token_id_is_refused_before_step_1(tmp_path, capsys):
    prefix = tmp_path / "data" / "part"
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, vocab_size=1000) as w:  # ids up to 899: beyond the model's VOCAB
        for _ in range(40):
            w.add_document(rng.integers(3, 900, 30))
    side = json.loads((tmp_path / "data" / "part.json").read_text())
    side.update(vocab_size=VOCAB, max_token_id=VOCAB - 1)  # what a buggy writer might claim
    (tmp_path / "data" / "part.json").write_text(json.dumps(side))
    cfg = make_train_config(tmp_path / "run", steps=1)
    cfg.data = DataConfig(sources={"web": SourceConfig(paths=[str(tmp_path / "data")])}, cache_dir=str(tmp_path / "c"))
    config = tmp_path / "train.yaml"
    dump_yaml(cfg, str(config))
    for command in (["train"], ["data", "plan"]):
        assert main([*command, str(config)]) == 2
        line = _one_error_line(capsys)
        assert str(tmp_path / "data" / "part.bin") in line, line
        assert "token id 899 >= vocab_size=500" in line and "max_token_id=499" in line, line


def test_verify_refuses_pickle_weights_naming_the_file_without_loading_them(tiny, tmp_path, capsys):
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    hf = tmp_path / "hf"
    _rewrite_weights(tiny / "float32", hf, lambda tensors: None)
    (hf / "model.safetensors").unlink()
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    assert _verify(tiny, hf) == 2
    line = _one_error_line(capsys)
    assert str(hf / "pytorch_model.bin") in line and "safetensors" in line
    assert not marker.exists()
    # beside safetensors weights, a .bin is never unpickled either
    _rewrite_weights(tiny / "float32", tmp_path / "both", lambda tensors: None)
    (tmp_path / "both" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    assert _verify(tiny, tmp_path / "both") == 0
    assert not marker.exists()
