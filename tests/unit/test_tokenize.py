"""`cptron data tokenize`: every input format, both tokenizer kinds, BOS/EOS, sharding, determinism, errors."""
import gzip
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from cptron.cli import main
from cptron.config import parse_config
from cptron.data.indexed import IndexedDataset, shard_prefixes
from cptron.data.tokenize import TokenizeConfig, run_tokenize, tokenizer_fingerprint
from cptron.errors import ConfigError, CptronError
from cptron.testing.fixtures import BIBLE_DIR, bible_text, mistral_sentencepiece_path, train_bpe_tokenizer

REPO = Path(__file__).resolve().parents[2]
EN = bible_text("en", 200)
DE = bible_text("de", 200)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 512-id byte-level BPE: unk=0, bos=1, eos=2, pad=3."""
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(out, vocab_size=512)
    from tokenizers import Tokenizer

    return out / "tokenizer.json", Tokenizer.from_file(str(out / "tokenizer.json"))


def tokenize(tmp_path, inputs, tokenizer, **kw):
    kw.setdefault("progress", False)
    cfg = TokenizeConfig(inputs=[str(p) for p in inputs], tokenizer=str(tokenizer),
                         output_prefix=str(tmp_path / "out" / "corpus"), **kw)
    return run_tokenize(cfg)


def documents(summary):
    docs = []
    for prefix in summary["shards"]:
        ds = IndexedDataset(prefix)
        docs += [ds[i].tolist() for i in range(len(ds))]
    return docs


def write_text(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_plain_text_lines_round_trip_with_eos(tmp_path, bpe):
    path, tok = bpe
    summary = tokenize(tmp_path, [write_text(tmp_path / "en.txt", EN)], path)
    docs = documents(summary)
    assert len(docs) == len(EN) == summary["documents"]
    assert all(d[-1] == 2 and 2 not in d[:-1] and d[0] != 1 for d in docs)  # EOS once at the end, no BOS
    assert [tok.decode(d[:-1]) for d in docs] == EN
    ds = IndexedDataset(summary["shards"][0])
    assert ds.dtype == np.uint16 and ds.sidecar["vocab_size"] == 512
    assert ds.sidecar["tokenizer_fingerprint"] == tokenizer_fingerprint(path) == summary["tokenizer_fingerprint"]
    assert summary["tokens"] == ds.num_tokens == sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in EN)


def test_bos_and_no_eos(tmp_path, bpe):
    path, tok = bpe
    docs = documents(tokenize(tmp_path, [write_text(tmp_path / "en.txt", EN[:20])], path, bos=True, eos=False))
    assert [d[0] for d in docs] == [1] * 20 and all(2 not in d for d in docs)
    assert [tok.decode(d[1:]) for d in docs] == EN[:20]


def test_jsonl_gz_and_parquet_with_a_chosen_text_field(tmp_path, bpe):
    path, tok = bpe
    records = [{"id": i, "body": t} for i, t in enumerate(EN[:30])]
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records[:10])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records[10:20])
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [r["id"] for r in records[20:]], "body": [r["body"] for r in records[20:]]}),
                   tmp_path / "c.parquet", row_group_size=4)
    summary = tokenize(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.parquet"], path,
                       text_field="body")
    assert [tok.decode(d[:-1]) for d in documents(summary)] == EN[:30]
    assert summary["input_files"] == [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]


def test_one_document_per_file_and_globs_in_sorted_order(tmp_path, bpe):
    path, tok = bpe
    for i in range(3):
        write_text(tmp_path / f"doc{i}.txt", EN[i * 5:(i + 1) * 5])
    summary = tokenize(tmp_path, [tmp_path / "doc*.txt"], path, text_unit="file")
    assert [tok.decode(d[:-1]) for d in documents(summary)] == [
        "\n".join(EN[i * 5:(i + 1) * 5]) + "\n" for i in range(3)]


def test_sentencepiece_model_round_trips_german(tmp_path):
    sp_path = mistral_sentencepiece_path()
    summary = tokenize(tmp_path, [write_text(tmp_path / "de.txt", DE)], sp_path, bos=True)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    docs = documents(summary)
    assert all(d[0] == sp.bos_id() == 1 and d[-1] == sp.eos_id() == 2 for d in docs)
    assert [sp.decode(d[1:-1]) for d in docs] == DE
    assert summary["vocab_size"] == 32000 and summary["dtype"] == "uint16"
    assert IndexedDataset(summary["shards"][0]).sidecar["tokenizer_fingerprint"] == tokenizer_fingerprint(sp_path)


def test_worker_count_does_not_change_the_bytes(tmp_path, bpe):
    path, _ = bpe
    src = write_text(tmp_path / "en.txt", bible_text("en", 1500))
    outs = []
    for workers in (1, 2):
        s = run_tokenize(TokenizeConfig(inputs=[str(src)], tokenizer=str(path), workers=workers, chunk_docs=97,
                                        shard_size_tokens=30_000, output_prefix=str(tmp_path / f"w{workers}" / "c"),
                                        progress=False))
        assert s["workers"] == workers
        outs.append([Path(p + ext).read_bytes() for p in s["shards"] for ext in (".bin", ".idx", ".json")])
    assert len(outs[0]) > 3 and outs[0] == outs[1]


def test_shards_split_between_documents(tmp_path, bpe):
    path, _ = bpe
    src = write_text(tmp_path / "en.txt", EN)
    whole = documents(tokenize(tmp_path / "one", [src], path))
    summary = tokenize(tmp_path / "many", [src], path, shard_size_tokens=1000, chunk_docs=7)
    assert summary["shards"] == [str(tmp_path / "many" / "out" / f"corpus_{i:05d}") for i in
                                 range(len(summary["shards"]))]
    sizes = [IndexedDataset(p).num_tokens for p in summary["shards"]]
    assert len(sizes) > 5 and max(sizes) <= 1000
    # every shard but the last is closed only because the next document would overflow it
    firsts = [len(IndexedDataset(p)[0]) for p in summary["shards"][1:]]
    assert all(s + f > 1000 for s, f in zip(sizes, firsts))
    assert documents(summary) == whole
    assert shard_prefixes(tmp_path / "many" / "out" / "corpus") == summary["shards"]


def test_a_document_longer_than_a_shard_gets_its_own_shard(tmp_path, bpe):
    path, _ = bpe
    summary = tokenize(tmp_path, [write_text(tmp_path / "en.txt", ["a b", " ".join(EN[:10]), "c"])], path,
                       shard_size_tokens=50)
    assert [IndexedDataset(p).num_documents for p in summary["shards"]] == [1, 1, 1]
    assert IndexedDataset(summary["shards"][1]).num_tokens > 50


def test_empty_documents_are_skipped_counted_and_reported(tmp_path, bpe, caplog):
    path, tok = bpe
    src = tmp_path / "e.jsonl"
    src.write_text('{"text": "In the beginning"}\n{"text": ""}\n\n{"text": null}\n{"text": "  "}\n'
                   '{"text": "God said"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="cptron.data.tokenize"):
        summary = tokenize(tmp_path, [src], path)
    assert summary["documents"] == 2 and summary["empty_documents"] == 4
    assert summary["empty_examples"] == [f"{src}:{n}" for n in (2, 3, 4, 5)]
    assert "skipped 4 empty document(s)" in caplog.text and f"{src}:2" in caplog.text
    assert [tok.decode(d[:-1]) for d in documents(summary)] == ["In the beginning", "God said"]


@pytest.mark.parametrize("content, field, message", [
    ('{"text": "ok"}\n{"text": "broken\n', "text", r"b\.jsonl:2: bad JSON line"),
    ('{"text": "ok"}\n{"body": "x"}\n', "text", r"b\.jsonl:2: missing text field 'text' \(the record has \['body'\]\)"),
    ('{"text": 5}\n', "text", r"b\.jsonl:1: field 'text' holds int: expected a string"),
    ('["text"]\n', "text", r"b\.jsonl:1: expected a JSON object, got list"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, bpe, content, field, message):
    src = tmp_path / "b.jsonl"
    src.write_text(content, encoding="utf-8")
    with pytest.raises(CptronError, match=message):
        tokenize(tmp_path, [src], bpe[0], text_field=field)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_bad_inputs_and_tokenizers_are_refused(tmp_path, bpe):
    path, _ = bpe
    good = write_text(tmp_path / "en.txt", EN[:3])
    with pytest.raises(CptronError, match=r"input .*missing\.txt not found"):
        tokenize(tmp_path, [tmp_path / "missing.txt"], path)
    with pytest.raises(CptronError, match=r"input glob .*nope\*\.jsonl' matches no file"):
        tokenize(tmp_path, [tmp_path / "nope*.jsonl"], path)
    with pytest.raises(CptronError, match=r"tokenizer .*none\.json not found"):
        tokenize(tmp_path, [good], tmp_path / "none.json")
    with pytest.raises(CptronError, match=r"eos_token='<nope>' is not a token of .*tokenizer\.json"):
        tokenize(tmp_path, [good], path, eos_token="<nope>")
    (tmp_path / "bad.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(CptronError, match=r"bad\.txt:2: not valid UTF-8"):
        tokenize(tmp_path, [tmp_path / "bad.txt"], path)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(CptronError, match=r"no non-empty document in 1 input file\(s\) \(2 empty\)"):
        tokenize(tmp_path, [tmp_path / "blank.txt"], path)


def test_missing_pyarrow_is_a_clear_error(tmp_path, bpe, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(CptronError, match=r"parquet input needs pyarrow: pip install pyarrow"):
        tokenize(tmp_path, [tmp_path / "x.parquet"], bpe[0])


def test_existing_output_is_refused_and_overwrite_removes_stale_shards(tmp_path, bpe):
    path, _ = bpe
    src = write_text(tmp_path / "en.txt", EN)
    first = tokenize(tmp_path, [src], path, shard_size_tokens=2000)
    assert len(first["shards"]) > 2
    with pytest.raises(CptronError, match=r"output .*corpus has shards already .*corpus_00000\.bin"):
        tokenize(tmp_path, [src], path)
    second = tokenize(tmp_path, [src], path, overwrite=True)
    assert len(second["shards"]) == 1
    assert shard_prefixes(tmp_path / "out" / "corpus") == second["shards"]


@pytest.mark.parametrize("override, needle", [
    (["--workers", "-1"], "workers=-1 is invalid"),
    (["--shard_size_tokens", "0"], "shard_size_tokens=0 is invalid"),
    (["--inputs", ""], "inputs=[] is invalid"),
    (["--output_prefix", "out/"], "output_prefix='out/' is invalid"),
    (["--input_format", "csv"], "input_format='csv' is invalid"),
])
def test_config_values_are_checked_at_startup(override, needle):
    argv = ["--inputs", "a.txt", "--tokenizer", "t.json", "--output_prefix", "o", *override]
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_config(TokenizeConfig, argv)


def test_cli_runs_the_shipped_preset_end_to_end(tmp_path, bpe, capsys):
    path, tok = bpe
    out = tmp_path / "bible-en"
    argv = ["data", "tokenize", str(REPO / "configs/data/bible-en.yaml"), "--tokenizer", str(path),
            "--inputs", str(BIBLE_DIR / "web.txt"), "--output_prefix", str(out), "--progress", "false"]
    assert main(argv) == 0
    ds = IndexedDataset(shard_prefixes(out)[0])
    assert ds.num_documents == 3000 and tok.decode(ds[2].tolist()[:-1]) == bible_text("en", 3)[2]
    assert main(argv) == 2
    assert "has shards already" in capsys.readouterr().err
    assert main(["data", "tokenize", "--inputs", "x.txt", "--tokenizer", str(path), "--output_prefix", "o"]) == 2
    assert "input x.txt not found" in capsys.readouterr().err


@pytest.mark.parametrize("bos, eos, expected", [
    (True, True, [1, 5, 6, 2, 1, 7, 2]),
    (False, True, [5, 6, 2, 7, 2]),
    (True, False, [1, 5, 6, 1, 7]),
    (False, False, [5, 6, 7]),
])
def test_specials_frame_each_nonempty_document_only(bpe, monkeypatch, bos, eos, expected):
    from cptron.data.tokenize import DocumentEncoder, TokenizerSpec

    spec = TokenizerSpec(str(bpe[0]), "hf", 512, 2 if eos else None, 1 if bos else None, "f")
    encoder = DocumentEncoder(spec)
    monkeypatch.setattr(encoder, "encode", lambda texts: [[5, 6], [], [7], []])  # e.g. text the normalizer drops
    flat, lengths = encoder.encode_chunk(["a", "b", "c", "d"])
    assert flat.tolist() == expected and flat.dtype == np.uint16
    extra = int(bos) + int(eos)
    assert lengths.tolist() == [2 + extra, 0, 1 + extra, 0]


def test_a_worker_that_dies_fails_the_run_and_writes_nothing(tmp_path, bpe, monkeypatch):
    import os
    import signal

    from cptron.data.tokenize import DocumentEncoder

    parent = os.getpid()

    def die_in_a_worker(self, texts):
        if os.getpid() != parent:  # as if the kernel's OOM killer took the worker
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, texts)

    real = DocumentEncoder.encode_chunk
    monkeypatch.setattr(DocumentEncoder, "encode_chunk", die_in_a_worker)  # forked workers inherit the patch
    with pytest.raises(CptronError, match="a tokenizer worker process died"):
        tokenize(tmp_path, [write_text(tmp_path / "en.txt", EN)], bpe[0], workers=2, chunk_docs=50)
    assert not list((tmp_path / "out").glob("corpus_*"))
