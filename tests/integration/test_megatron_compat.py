"""cptron's token shards and megatron-core's IndexedDataset read each other's files."""
import warnings

import numpy as np
import pytest

from cptron.data.indexed import IndexedDataset
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.data.tokenize import TokenizeConfig, run_tokenize
from cptron.testing.fixtures import bible_text, train_bpe_tokenizer

with warnings.catch_warnings():  # megatron-core warns at import that apex and Transformer Engine are missing
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core")
    from megatron.core.datasets import indexed_dataset as mcore

torch = pytest.importorskip("torch")


def random_documents(seed, vocab_size, n=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=int(rng.integers(0, 50))) for _ in range(n)]


@pytest.mark.parametrize("vocab_size, dtype", [(32_000, np.uint16), (128_256, np.int32)])
def test_megatron_reads_cptron_shards(tmp_path, vocab_size, dtype):
    docs = random_documents(0, vocab_size)
    docs[3] = np.array([vocab_size - 1, 0])  # the extreme ids survive the dtype
    with IndexedDatasetWriter(tmp_path / "c", vocab_size=vocab_size) as w:
        for d in docs:
            w.add_document(d)
    theirs = mcore.IndexedDataset(str(tmp_path / "c"))
    assert theirs.index.dtype == dtype and len(theirs) == len(docs)
    assert theirs.document_indices.tolist() == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert theirs[i].tolist() == d.tolist()
    assert theirs.get(3, offset=1, length=1).tolist() == [0]


def test_megatron_reads_cptron_documents_of_several_sequences(tmp_path):
    rng = np.random.default_rng(4)
    with IndexedDatasetWriter(tmp_path / "c", vocab_size=1000) as w:
        for _ in range(10):
            cuts = rng.integers(0, 20, size=int(rng.integers(1, 4)))
            w.add_document(rng.integers(0, 1000, size=int(cuts.sum())), sequence_lengths=cuts)
    ours, theirs = IndexedDataset(tmp_path / "c"), mcore.IndexedDataset(str(tmp_path / "c"))
    assert theirs.document_indices.tolist() == ours.document_indices.tolist() and ours.num_documents == 10
    assert len(theirs) == len(ours) > 10
    for i in range(len(ours)):
        assert theirs[i].tolist() == ours[i].tolist()


def test_megatron_reads_a_tokenize_run(tmp_path):
    train_bpe_tokenizer(tmp_path / "tok", vocab_size=400)
    text = bible_text("en", 300)
    (tmp_path / "en.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    summary = run_tokenize(TokenizeConfig(inputs=[str(tmp_path / "en.txt")], tokenizer=str(tmp_path / "tok"),
                                          output_prefix=str(tmp_path / "out" / "en"), shard_size_tokens=5000,
                                          progress=False))
    assert len(summary["shards"]) > 1
    seen = 0
    for prefix in summary["shards"]:
        ours, theirs = IndexedDataset(prefix), mcore.IndexedDataset(prefix)
        assert len(theirs) == len(ours) and theirs.document_indices.tolist() == ours.document_indices.tolist()
        assert all(np.array_equal(theirs[i], ours[i]) for i in range(len(ours)))
        seen += len(ours)
    assert seen == len(text)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_cptron_reads_megatron_shards_with_multi_sequence_documents(tmp_path, dtype):
    rng = np.random.default_rng(1)
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype)
    sequences, boundaries = [], [0]
    for doc in range(12):
        for _ in range(int(rng.integers(1, 4))):  # 1-3 sequences per document
            seq = rng.integers(0, 60_000, size=int(rng.integers(1, 30)))
            builder.add_item(torch.from_numpy(seq))
            sequences.append(seq)
        builder.end_document()
        boundaries.append(len(sequences))
    builder.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    theirs = mcore.IndexedDataset(str(tmp_path / "m"))
    assert ours.sidecar is None and ours.dtype == dtype
    assert ours.document_indices.tolist() == boundaries == theirs.document_indices.tolist()
    assert ours.sequence_lengths.tolist() == theirs.sequence_lengths.tolist()
    assert ours.sequence_pointers.tolist() == theirs.index.sequence_pointers.tolist()
    assert len(ours) == len(sequences) and ours.num_documents == 12
    for i, seq in enumerate(sequences):
        assert ours[i].tolist() == seq.tolist() == theirs[i].tolist()
    first, last = boundaries[5], boundaries[6]
    assert ours.document(5).tolist() == np.concatenate(sequences[first:last]).tolist()
    assert ours.max_token_id() == max(int(s.max()) for s in sequences)


def test_cptron_reads_megatron_multimodal_shards(tmp_path):
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.uint16, multimodal=True)
    builder.add_item(torch.tensor([1, 2, 3]), mode=0)
    builder.add_item(torch.tensor([4]), mode=1)
    builder.end_document()
    builder.finalize(str(tmp_path / "mm.idx"))
    ours = IndexedDataset(tmp_path / "mm")
    assert [ours[i].tolist() for i in range(2)] == [[1, 2, 3], [4]]
    assert ours.sequence_modes.tolist() == [0, 1] and ours.document_indices.tolist() == [0, 2]
