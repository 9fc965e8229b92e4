"""The chunked linear+cross-entropy (cptron.train.chunked_loss) against the plain loss over the full
logits, on one process at fp32: the loss, the per-token losses and every gradient within 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cptron.data.interface import IGNORE_INDEX
from cptron.errors import ConfigError
from cptron.models.config import model_config_from_preset
from cptron.models.factorized import FactorizedHead
from cptron.models.llama import build_model
from cptron.train.chunked_loss import ChunkedHeadLoss, resolve_loss_path
from cptron.train.config import TrainingConfig
from cptron.train.loss import cross_entropy_sum_and_rows

TOL = 1e-5
VOCAB, PADDED, DIM = 50, 64, 16  # padded rows hold weights that must not count


def _inputs(seed=0, rows=3, seq=11, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, seq, DIM, generator=g).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (rows, seq), generator=g)
    if ignore:
        labels[0, :4] = IGNORE_INDEX
        labels[2, -1] = IGNORE_INDEX
    return h, labels


def _plain(h, head, labels, scale=0.37):
    loss, rows = cross_entropy_sum_and_rows(head(h), labels, VOCAB)
    (loss * scale).backward()
    return loss.detach(), rows


def _chunked(h, head, labels, chunk, scale=0.37):
    loss, per_token = ChunkedHeadLoss(VOCAB, chunk, sequence_parallel=False)(h, head, labels)
    assert loss.requires_grad and not per_token.requires_grad
    (loss * scale).backward()
    return loss.detach(), per_token.sum(1)


def _grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


def _assert_close(a, b, what, per=1):
    """Within TOL; sums of `per` tokens are compared as means, as the trainer reports them (a sum of 33
    losses near 100 is only resolved to 8e-6 in fp32)."""
    err = ((a - b) / per).abs().max().item()
    assert err <= TOL, f"{what}: max |diff| = {err:.2e}"


@pytest.mark.parametrize("chunk", [1, 5, 8, 33, 1000], ids=lambda c: f"chunk{c}")
def test_linear_head_matches_plain_loss_and_gradients(chunk):
    """Uneven chunks (33 tokens in chunks of 5 or 8), one chunk per token, one chunk for everything;
    padded vocabulary rows with non-zero weights (the plain loss slices them off); ignored labels."""
    torch.manual_seed(0)
    head = torch.nn.Linear(DIM, PADDED, bias=False)
    h, labels = _inputs()
    ref, ref_rows = _plain(h, head, labels)
    ref_h, ref_w = _grads(h, head.weight)
    got, got_rows = _chunked(h, head, labels, chunk)
    got_h, got_w = _grads(h, head.weight)
    _assert_close(got, ref, "loss", (labels != IGNORE_INDEX).sum())
    _assert_close(got_rows, ref_rows, "per-row loss sums (per-source losses)", labels.shape[1])
    _assert_close(got_h, ref_h, "d/dh")
    _assert_close(got_w, ref_w, "d/dW")
    assert got_w[VOCAB:].abs().max() == 0, "padded rows get no gradient"
    assert ref.item() > 1.0 and ref_h.abs().max() > 1e-3, "a loss and gradients that can differ"


def test_factorized_head_matches_plain():
    torch.manual_seed(1)
    head = FactorizedHead(DIM, 4, PADDED)
    h, labels = _inputs(seed=1)
    ref, ref_rows = _plain(h, head, labels)
    ref_grads = _grads(h, head.basis.weight, head.coordinates.weight)
    got, got_rows = _chunked(h, head, labels, 7)
    got_grads = _grads(h, head.basis.weight, head.coordinates.weight)
    _assert_close(got, ref, "loss", (labels != IGNORE_INDEX).sum())
    _assert_close(got_rows, ref_rows, "per-row loss sums", labels.shape[1])
    for name, a, b in zip(("d/dh", "d/dB", "d/dP"), got_grads, ref_grads):
        _assert_close(a, b, name)


def test_any_scalar_function_of_the_loss_gets_exact_gradients():
    """The gradients are computed in forward for a unit upstream gradient and scaled in backward: a loss
    hook that is not linear (here loss**2 / 100) must still get the chain rule right."""
    torch.manual_seed(2)
    head = torch.nn.Linear(DIM, PADDED, bias=False)
    h, labels = _inputs(seed=2, ignore=False)
    (cross_entropy_sum_and_rows(head(h), labels, VOCAB)[0] ** 2 / 100).backward()
    ref = _grads(h, head.weight)
    (ChunkedHeadLoss(VOCAB, 4, False)(h, head, labels)[0] ** 2 / 100).backward()
    for a, b in zip(_grads(h, head.weight), ref):
        _assert_close(a, b, "gradient through loss**2")


def test_no_grad_computes_the_same_loss_without_gradients():
    torch.manual_seed(3)
    head = torch.nn.Linear(DIM, PADDED, bias=False)
    h, labels = _inputs(seed=3)
    loss = ChunkedHeadLoss(VOCAB, 6, False)(h, head, labels)[0]
    with torch.no_grad():
        again, per_token = ChunkedHeadLoss(VOCAB, 6, False)(h, head, labels)
    assert not again.requires_grad and again.item() == loss.item()
    assert (per_token[labels == IGNORE_INDEX] == 0).all()


def test_a_second_backward_needs_repeat_backward():
    """Zero-bubble pipeline schedules run backward through the loss twice (inputs, then weights): with
    repeat_backward the same gradients come again; without, the first backward handed them over."""
    head = torch.nn.Linear(DIM, PADDED, bias=False)
    h, labels = _inputs()
    loss = ChunkedHeadLoss(VOCAB, 6, False, repeat_backward=True)(h, head, labels)[0] * 0.5
    loss.backward(retain_graph=True)
    once = _grads(h, head.weight)
    loss.backward(retain_graph=True)
    for a, b in zip(_grads(h, head.weight), once):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="same upstream gradient"):
        (loss * 2).backward()
    loss = ChunkedHeadLoss(VOCAB, 6, False)(h, head, labels)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="repeat_backward=True"):
        loss.backward()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_whole_model_with_labels_matches_logits_path(tied):
    """Transformer.forward(..., labels=) with head_loss set: the loss and every parameter's gradient
    (the tied embedding's takes both uses) equal the plain loss over the model's logits."""
    cfg = model_config_from_preset(
        "tiny", n_layers=2, vocab_size=VOCAB, pad_vocab_to_multiple_of=64, max_seq_len=32, tie_embeddings=tied
    )
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # padded rows non-zero: the plain path must ignore them, and so must the chunked one
        model.output.weight[VOCAB:] = 0.5
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(tokens, -1, 1)
    labels[1, -3:] = IGNORE_INDEX
    ref = cross_entropy_sum_and_rows(model(tokens), labels, VOCAB)[0]
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.head_loss = ChunkedHeadLoss(VOCAB, 5, False)
    got, per_token = model(tokens, labels=labels)
    got.backward()
    _assert_close(got, ref.detach(), "loss", (labels != IGNORE_INDEX).sum())
    assert per_token.shape == labels.shape
    for name, p in model.named_parameters():
        _assert_close(p.grad, ref_grads[name], name)


def test_labels_without_head_loss_is_an_error():
    cfg = model_config_from_preset("tiny", n_layers=1, vocab_size=VOCAB, max_seq_len=32)
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="head_loss"):
        build_model(cfg, seed=0)(tokens, labels=tokens)


def test_auto_chunks_large_logits_of_more_tokens_than_one_chunk():
    small = resolve_loss_path("auto", 0, tokens=16, local_vocab=512)
    assert small.chunk_tokens is None and "auto" in small.describe()
    assert resolve_loss_path("auto", 0, tokens=4096, local_vocab=128256).chunk_tokens == 512
    assert resolve_loss_path("auto", 0, tokens=2048, local_vocab=32000).chunk_tokens == 512
    assert resolve_loss_path("auto", 0, tokens=512, local_vocab=1 << 20).chunk_tokens is None  # one chunk
    assert resolve_loss_path("auto", 0, tokens=1 << 20, local_vocab=16).chunk_tokens is None  # small logits
    assert resolve_loss_path("chunked", 64, tokens=16, local_vocab=512).chunk_tokens == 64
    assert resolve_loss_path("plain", 0, tokens=4096, local_vocab=128256).chunk_tokens is None


def test_negative_chunk_size_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="training.loss_chunk_tokens"):
        TrainingConfig(loss_chunk_tokens=-1).validate()


def test_bf16_matches_plain_within_bf16_rounding():
    """Low precision: logits from the bf16 GEMM, then fp32 softmax, as the plain path; the weight
    gradient accumulates over chunks in fp32."""
    torch.manual_seed(5)
    head = torch.nn.Linear(DIM, PADDED, bias=False).to(torch.bfloat16)
    h, labels = _inputs(seed=5)
    h = h.detach().to(torch.bfloat16).requires_grad_(True)
    ref, _ = _plain(h, head, labels, scale=1.0)
    ref_h, ref_w = _grads(h, head.weight)
    got, _ = _chunked(h, head, labels, 4, scale=1.0)
    got_h, got_w = _grads(h, head.weight)
    assert got_h.dtype == got_w.dtype == torch.bfloat16
    assert abs(got.item() - ref.item()) <= 1e-4 * abs(ref.item())
    assert (got_h.float() - ref_h.float()).abs().max() <= 0.02 * ref_h.float().abs().max()
    assert (got_w.float() - ref_w.float()).abs().max() <= 0.02 * ref_w.float().abs().max()
    assert F.cosine_similarity(got_w.float().flatten(), ref_w.float().flatten(), dim=0) > 0.999
