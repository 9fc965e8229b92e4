"""Megatron .bin/.idx token shards: round trips, the byte layout, atomic writes, and every bad input."""
import json
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cptron.data.indexed import INDEX_MAGIC, IndexedDataset, best_dtype, read_sidecar, shard_prefixes
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.errors import CptronError

DOCS = [[5, 1, 2], [7], [0, 9, 9, 9, 3], [4, 4]]


def write_shard(prefix, docs=DOCS, vocab_size=10, **kw):
    with IndexedDatasetWriter(prefix, vocab_size=vocab_size, **kw) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def write_raw_shard(prefix, sequences, document_indices, dtype=np.uint16, code=8, version=1, magic=INDEX_MAGIC):
    """A shard built byte by byte from the documented layout, with no cptron writer involved."""
    lengths = np.array([len(s) for s in sequences], dtype="<i4")
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * np.dtype(dtype).itemsize]).astype("<i8")
    with open(f"{prefix}.bin", "wb") as fh:
        for s in sequences:
            fh.write(np.asarray(s, dtype=dtype).tobytes())
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(magic + struct.pack("<QBQQ", version, code, len(sequences), len(document_indices)))
        fh.write(lengths.tobytes() + pointers[: len(sequences)].tobytes())
        fh.write(np.asarray(document_indices, dtype="<i8").tobytes())
    return str(prefix)


def test_best_dtype_follows_megatron_cutoff():
    assert best_dtype(32000) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(128256) == np.int32
    with pytest.raises(CptronError, match="vocab_size=0"):
        best_dtype(0)


@pytest.mark.parametrize("vocab_size, dtype", [(10, np.uint16), (200_000, np.int32)])
def test_round_trip_documents_views_and_sidecar(tmp_path, vocab_size, dtype):
    docs = DOCS + ([[199_999, 70_000]] if vocab_size > 65_500 else [])
    prefix = write_shard(tmp_path / "s", docs, vocab_size=vocab_size, tokenizer_fingerprint="abc")
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype and len(ds) == len(docs) and ds.num_documents == len(docs)
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.dtype == np.int64
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.get(2, offset=1, length=3).tolist() == [9, 9, 9]
    assert ds.get(2, offset=3).tolist() == [9, 3]
    view = ds.get(0)
    assert not view.flags.owndata and not view.flags.writeable  # a view into the read-only map, no copy
    assert ds.sidecar == read_sidecar(prefix)
    assert ds.sidecar["tokenizer_fingerprint"] == "abc" and ds.sidecar["vocab_size"] == vocab_size
    assert ds.sidecar["dtype"] == np.dtype(dtype).name
    assert ds.sidecar["max_token_id"] == max(max(d) for d in docs) == ds.max_token_id()
    assert (ds.sidecar["token_count"], ds.sidecar["document_count"], ds.sidecar["sequence_count"]) == (
        ds.num_tokens, len(docs), len(docs))
    with pytest.raises(IndexError):
        ds.get(len(docs))
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=5)


def test_index_bytes_follow_the_documented_layout(tmp_path):
    prefix = write_shard(tmp_path / "s")
    raw = Path(prefix + ".idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    assert (version, code, n_seq, n_doc) == (1, 8, 4, 5)
    body = raw[34:]
    assert np.frombuffer(body, "<i4", 4).tolist() == [3, 1, 5, 2]
    assert np.frombuffer(body, "<i8", 4, offset=16).tolist() == [0, 6, 8, 18]
    assert np.frombuffer(body, "<i8", 5, offset=48).tolist() == [0, 1, 2, 3, 4]
    assert len(body) == 48 + 40
    assert np.fromfile(prefix + ".bin", dtype="<u2").tolist() == sum(DOCS, [])


def test_reads_documents_made_of_several_sequences(tmp_path):
    seqs = [[1, 2], [3], [4, 5, 6], [7]]
    prefix = write_raw_shard(tmp_path / "m", seqs, [0, 2, 3, 4])
    ds = IndexedDataset(prefix)
    assert ds.sidecar is None and len(ds) == 4 and ds.num_documents == 3
    assert ds.document_indices.tolist() == [0, 2, 3, 4]
    assert ds.document(0).tolist() == [1, 2, 3] and ds.document(1).tolist() == [4, 5, 6]
    assert ds.max_token_id() == 7  # no sidecar: one scan of the .bin


def test_writer_stores_a_document_as_several_sequences(tmp_path):
    with IndexedDatasetWriter(tmp_path / "w", vocab_size=10) as w:
        w.add_document([1, 2])
        w.add_document([3, 4, 5, 6], sequence_lengths=[1, 0, 3])
        w.add_documents(np.array([7, 8, 9]), [2, 1])
    ds = IndexedDataset(tmp_path / "w")
    assert ds.sequence_lengths.tolist() == [2, 1, 0, 3, 2, 1]
    assert ds.document_indices.tolist() == [0, 1, 4, 5, 6]
    assert [ds.document(d).tolist() for d in range(4)] == [[1, 2], [3, 4, 5, 6], [7, 8], [9]]
    assert ds.sidecar["document_count"] == 4 and ds.sidecar["sequence_count"] == 6
    with IndexedDatasetWriter(tmp_path / "bad", vocab_size=10) as w:
        with pytest.raises(CptronError, match=r"document 0 for shard .*bad: sequence_lengths \[1, 1\] must"):
            w.add_document([1, 2, 3], sequence_lengths=[1, 1])
        w.add_document([1])


def test_max_token_id_scans_only_without_sidecar(tmp_path):
    prefix = write_shard(tmp_path / "s")
    os.remove(prefix + ".json")
    ds = IndexedDataset(prefix)
    assert ds.sidecar is None and ds._max_token_id is None  # opening did not scan
    assert ds.max_token_id() == 9


def test_opening_reads_the_index_only(tmp_path):
    # A 4 GiB sparse .bin: opening must not touch its pages (O(index size)); scanning would take seconds.
    prefix = str(tmp_path / "big")
    n = 2**31 - 1
    write_raw_shard(prefix, [[]], [0, 1])
    with open(prefix + ".idx", "r+b") as fh:
        fh.seek(34)
        fh.write(struct.pack("<i", n))
    with open(prefix + ".bin", "wb") as fh:
        fh.truncate(2 * n)
    start = time.perf_counter()
    ds = IndexedDataset(prefix)
    assert time.perf_counter() - start < 1.0
    assert ds.num_tokens == n and ds.get(0, offset=n - 2).tolist() == [0, 0]


def test_writer_refuses_out_of_range_ids_and_empty_shards(tmp_path):
    with pytest.raises(CptronError, match=r"document 1 for shard .*s has token id 10: expected ids in \[0, "
                                          r"vocab_size=10\)"):
        write_shard(tmp_path / "s", [[1], [2, 10]])
    with pytest.raises(CptronError, match="document 0 .* token id -1"):
        write_shard(tmp_path / "s", [[-1]])
    with pytest.raises(CptronError, match="has no documents"):
        write_shard(tmp_path / "e", [])
    assert sorted(os.listdir(tmp_path)) == []  # nothing left behind, not even temporary files


def test_add_documents_names_the_document_with_a_bad_id(tmp_path):
    with IndexedDatasetWriter(tmp_path / "s", vocab_size=10) as w:
        w.add_documents(np.array([1, 2, 3], dtype=np.uint16), [2, 1])
        with pytest.raises(CptronError, match="document 4 for shard .* token id 12"):
            w.add_documents(np.array([4, 5, 12, 1]), [1, 1, 2])
        with pytest.raises(CptronError, match="add up to the 3 tokens"):
            w.add_documents(np.array([4, 5, 6]), [1, 1])
    assert IndexedDataset(tmp_path / "s").document_indices.tolist() == [0, 1, 2]


def test_an_exception_leaves_no_half_written_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetWriter(tmp_path / "s", vocab_size=10) as w:
            w.add_document([1, 2])
            assert any(f.startswith("s.bin.tmp-") for f in os.listdir(tmp_path))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_existing_shard_is_refused_unless_overwrite(tmp_path):
    prefix = write_shard(tmp_path / "s")
    with pytest.raises(CptronError, match=r"shard .*s exists"):
        IndexedDatasetWriter(prefix, vocab_size=10)
    write_shard(prefix, [[3, 3]], overwrite=True)
    assert IndexedDataset(prefix)[0].tolist() == [3, 3]


@pytest.mark.parametrize("damage, message", [
    ("no_bin", r"missing shard .*s: .*s\.bin not found"),
    ("no_idx", r"missing shard .*s: .*s\.idx not found"),
    ("magic", r"s\.idx is not a Megatron index: wrong magic"),
    ("version", r"s\.idx has unsupported index version 2: expected 1"),
    ("dtype_code", r"s\.idx has unknown dtype code 9"),
    ("float_dtype", r"s\.idx stores float32 values: expected an integer token dtype"),
    ("idx_truncated", r"s\.idx is truncated or has wrong counts: its header says 4 sequences"),
    ("idx_tiny", r"s\.idx is truncated: 5 bytes"),
    ("idx_count", r"s\.idx is truncated or has wrong counts: its header says 5 sequences"),
    ("doc_end", r"s\.idx has wrong counts: document indices run from 0 to 3, expected 0 to the sequence count 4"),
    ("bin_truncated", r"s\.bin is truncated: the index says sequence 3 ends at byte 22, but the \.bin has 21 bytes"),
    ("sidecar_dtype", r"s\.json says dtype 'int32' but .*s\.idx stores uint16"),
    ("sidecar_count", r"s\.json says token_count=99 but the index .*s\.idx has 11"),
    ("sidecar_json", r"shard sidecar .*s\.json is not valid JSON"),
])
def test_bad_shards_are_refused_naming_the_file(tmp_path, damage, message):
    prefix = write_shard(tmp_path / "s")
    idx, bin_, side = prefix + ".idx", prefix + ".bin", prefix + ".json"
    raw = bytearray(Path(idx).read_bytes())
    meta = json.loads(Path(side).read_text())
    if damage == "no_bin":
        os.remove(bin_)
    elif damage == "no_idx":
        os.remove(idx)
    elif damage == "magic":
        raw[:9] = b"NOTMEGATR"
    elif damage == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif damage == "dtype_code":
        raw[17] = 9
    elif damage == "float_dtype":
        raw[17] = 7
    elif damage == "idx_truncated":
        raw = raw[:-3]
    elif damage == "idx_tiny":
        raw = raw[:5]
    elif damage == "idx_count":
        raw[18:26] = struct.pack("<Q", 5)
    elif damage == "doc_end":
        raw[-8:] = struct.pack("<q", 3)
    elif damage == "bin_truncated":
        with open(bin_, "r+b") as fh:
            fh.truncate(os.path.getsize(bin_) - 1)
    elif damage == "sidecar_dtype":
        meta["dtype"] = "int32"
    elif damage == "sidecar_count":
        meta["token_count"] = 99
    if damage.startswith("idx") or damage in ("magic", "version", "dtype_code", "float_dtype", "doc_end"):
        Path(idx).write_bytes(bytes(raw))
    if damage.startswith("sidecar"):
        Path(side).write_text("{not json" if damage == "sidecar_json" else json.dumps(meta))
    with pytest.raises(CptronError, match=message):
        IndexedDataset(prefix)


def test_truncated_bin_is_caught_without_full_verification(tmp_path):
    prefix = write_shard(tmp_path / "s")
    with open(prefix + ".bin", "r+b") as fh:
        fh.truncate(4)
    with pytest.raises(CptronError, match=r"s\.bin is truncated"):
        IndexedDataset(prefix, verify=False)


def test_check_vocab_names_the_file_and_the_id(tmp_path):
    prefix = write_shard(tmp_path / "s")
    ds = IndexedDataset(prefix)
    ds.check_vocab(10)
    with pytest.raises(CptronError, match=r"s\.bin: token id 9 at sequence 2, position 1 is >= vocab_size=8"):
        ds.check_vocab(8)
    os.remove(prefix + ".json")
    with pytest.raises(CptronError, match=r"s\.bin: token id 7 at sequence 1, position 0 is >= vocab_size=6"):
        IndexedDataset(prefix).check_vocab(6)


def test_shard_prefixes_expands_directories_globs_and_prefixes(tmp_path):
    a = write_shard(tmp_path / "c_00000")
    b = write_shard(tmp_path / "c_00001")
    other = write_shard(tmp_path / "other")
    (tmp_path / "notes.txt").write_text("x")
    assert shard_prefixes(tmp_path) == [a, b, other]
    assert shard_prefixes(str(tmp_path / "c_*")) == [a, b]
    assert shard_prefixes(str(tmp_path / "*.idx")) == [a, b, other]
    assert shard_prefixes(tmp_path / "c") == [a, b]  # a tokenize output prefix
    assert shard_prefixes(other + ".idx") == [other]
    assert shard_prefixes(other) == [other]
    with pytest.raises(CptronError, match=r"no shard at .*nothing"):
        shard_prefixes(tmp_path / "nothing")
    with pytest.raises(CptronError, match="matches no shard"):
        shard_prefixes(str(tmp_path / "z*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CptronError, match=r"directory .*empty has no \*\.idx shard"):
        shard_prefixes(tmp_path / "empty")


def test_dataset_pickles_by_path(tmp_path):
    ds = IndexedDataset(write_shard(tmp_path / "s"))
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.path_prefix == ds.path_prefix and copy[2].tolist() == DOCS[2]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 65_498), max_size=20), min_size=1, max_size=20),
       st.sampled_from([65_499, 70_000]))
def test_any_documents_round_trip(tmp_path_factory, docs, vocab_size):
    prefix = write_shard(tmp_path_factory.mktemp("h") / "s", docs, vocab_size=vocab_size)
    ds = IndexedDataset(prefix)
    assert [d.tolist() for d in ds] == docs
    assert ds.num_tokens == sum(map(len, docs))


def test_check_vocab_skips_empty_sequences_and_gaps_between_sequences(tmp_path):
    prefix = write_shard(tmp_path / "e", [[1], [], [12, 3]], vocab_size=20)
    os.remove(prefix + ".json")
    with pytest.raises(CptronError, match=r"token id 12 at sequence 2, position 0 is >= vocab_size=10"):
        IndexedDataset(prefix).check_vocab(10)
    # Sequences need not be back to back: bytes between them (here the id 99) belong to no sequence.
    gap = str(tmp_path / "gap")
    np.array([1, 2, 99, 3], dtype="<u2").tofile(gap + ".bin")
    with open(gap + ".idx", "wb") as fh:
        fh.write(INDEX_MAGIC + struct.pack("<QBQQ", 1, 8, 2, 3))
        fh.write(np.array([2, 1], "<i4").tobytes() + np.array([0, 6], "<i8").tobytes()
                 + np.array([0, 1, 2], "<i8").tobytes())
    ds = IndexedDataset(gap)
    assert ds[1].tolist() == [3] and ds.max_token_id() == 3
    ds.check_vocab(4)
    with pytest.raises(CptronError, match=r"token id 3 at sequence 1, position 0 is >= vocab_size=3"):
        ds.check_vocab(3)
