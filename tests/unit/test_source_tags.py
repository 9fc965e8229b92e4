"""Per-source loss plumbing: the label tags that carry a row's source and index through a pipeline, and
the per-row cross-entropy."""
import torch
import torch.nn.functional as F

from cptron.data.interface import IGNORE_INDEX, Batch
from cptron.train.loss import cross_entropy_sum, cross_entropy_sum_and_rows
from cptron.train.source_losses import SOURCE_BITS, tag_labels, untag_labels


def test_tags_round_trip_for_ignored_labels_large_vocabularies_and_every_source():
    labels = torch.tensor([[IGNORE_INDEX, 5], [2**31 - 1, IGNORE_INDEX], [0, 128_255], [7, 7]])
    sources = torch.tensor([0, (1 << SOURCE_BITS) - 1, 3, 1])
    tagged = tag_labels(labels, sources)
    for first in range(4):  # a microbatch is any run of rows; it reports its first row
        back, got_sources, first_row = untag_labels(tagged[first:])
        assert torch.equal(back, labels[first:]) and torch.equal(got_sources, sources[first:])
        assert first_row == first


def test_per_row_losses_add_up_to_the_summed_loss_and_match_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 16)  # 16 columns, 12 real ids: padded columns are not tokens
    labels = torch.randint(0, 12, (3, 4))
    labels[1, 2] = IGNORE_INDEX
    total, rows = cross_entropy_sum_and_rows(logits, labels, vocab_size=12)
    want = F.cross_entropy(logits[..., :12].flatten(0, 1), labels.flatten(), reduction="none").view(3, 4).sum(1)
    assert torch.allclose(rows, want) and torch.equal(total, cross_entropy_sum(logits, labels, 12))
    assert torch.allclose(total, want.sum())


def test_batch_sources_are_per_row_int64():
    b = Batch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
              sources=torch.tensor([1, 0], dtype=torch.int32))
    assert b.sources.dtype == torch.int64 and torch.equal(b.slice(1, 2).sources, torch.tensor([0]))
