"""Output projection and cross-entropy in chunks of tokens: the loss without the full logits.

A microbatch's fp32 logits are tokens x vocabulary: 2.1 GB for one 4096-token sequence over a 128k
vocabulary, and the plain loss keeps several tensors of that size (the logits, their log-softmax,
the gradients of both). The chunked loss projects `chunk` tokens at a time, reduces each chunk to
its per-token losses, and computes that chunk's gradients at once, so only one chunk's logits ever
exist. This is the fused linear cross-entropy of Liger Kernel (Hsu et al. 2024, "Liger Kernel:
Efficient Triton Kernels for LLM Training"); Cut Cross-Entropy (Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models") recomputes the logits in backward instead.

Why gradients in forward rather than recomputation in backward: it costs the plain path's FLOPs
(one logits GEMM and two gradient GEMMs), where recomputation adds a third of the head's FLOPs.
The price is that the hidden states' gradient ([tokens, dim]) and the head's weight gradient (kept
in fp32) exist from forward to backward. The loss is the last thing a forward computes, so on the
plain path and on 1F1B pipelines backward follows at once; under GPipe each microbatch in flight
holds them, still less than the plain path's saved log-softmax whenever a microbatch has at least
`dim` tokens. Because the gradients are computed before the upstream gradient is known, the loss
sum is the only differentiable output (any scalar function of it, the trainer's scale and loss
hook, stays exact); the per-token losses come out detached, for per-source losses.

Tensor parallelism: the head's weight is vocabulary-sharded (a Shard(0) DTensor on the TP mesh).
Each rank projects the chunk onto its own vocabulary rows and the softmax statistics are reduced
over the TP group (max, then the sum of exponentials with the target logit), as Megatron-LM's
vocab-parallel cross-entropy does; the hidden states' gradient is a partial sum that autograd
reduces (all-reduce, or reduce-scatter under sequence parallelism) through DTensor, so the chunked
path is loss parallel whatever parallel.loss_parallel says. Padded vocabulary rows are never
projected: each rank uses only the rows below model.vocab_size.

Where it runs: inside the model's forward (`Transformer.head_loss`, given the labels), because FSDP2
frees the gathered head weights after a forward that resharded them; a pipeline's last stage gets the
labels as a keyword argument of its forward (`pipeline_train_step(stage_labels=...)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from cptron.data.interface import IGNORE_INDEX
from cptron.distributed import local_shard_region

DEFAULT_CHUNK_TOKENS = 512
"""Tokens per chunk when training.loss_chunk_tokens is 0. Each chunk reads the head's weight and updates
its gradient once, so a chunk's work per byte moved grows with its tokens, whatever the vocabulary:
benchmarks/loss_memory.py (CPU, fp32, vocabulary 128256, hidden 2048, seq 2048) measured 1.10x the plain
loss's time at 512 tokens and 1.27x at 128, for a peak of 0.43x and 0.38x the plain loss's."""
AUTO_MIN_LOGITS = 1 << 25
"""training.loss_impl=auto chunks a microbatch from this many logits per rank (128 MiB in fp32, of which the
plain loss keeps about three at once), and only when it has more tokens than one chunk."""


@dataclass(frozen=True)
class LossPath:
    """Which loss a run computes: `chunk_tokens` None for the plain loss over the full logits."""

    chunk_tokens: Optional[int]
    """Tokens per chunk of the chunked loss; None: the plain loss."""
    reason: str
    """Why, for the start-up log."""

    def describe(self) -> str:
        if self.chunk_tokens is None:
            return f"plain cross-entropy over the full logits ({self.reason})"
        return f"chunked linear+cross-entropy, {self.chunk_tokens} tokens per chunk ({self.reason})"


def resolve_loss_path(impl: str, chunk_tokens: int, tokens: int, local_vocab: int) -> LossPath:
    """The loss path of training.loss_impl (`impl`) for microbatches of `tokens` tokens and a head with
    `local_vocab` (padded) rows on each rank; `chunk_tokens` 0 is DEFAULT_CHUNK_TOKENS."""
    chunk = chunk_tokens or DEFAULT_CHUNK_TOKENS
    logits = tokens * local_vocab
    if impl == "plain":
        return LossPath(None, "training.loss_impl=plain")
    if impl == "chunked":
        return LossPath(chunk, "training.loss_impl=chunked")
    if tokens > chunk and logits >= AUTO_MIN_LOGITS:
        return LossPath(chunk, f"auto: {logits:,} logits per microbatch and rank, at least {AUTO_MIN_LOGITS:,}")
    return LossPath(
        None, f"auto: {logits:,} logits per microbatch and rank, chunked from {AUTO_MIN_LOGITS:,} and {chunk} tokens"
    )


@dataclass(frozen=True)
class ChunkedHeadLoss:
    """The loss a model computes from its final hidden states and its head (`Transformer.head_loss`):
    called as (h [B, T, dim], head module, labels [B, T]) and returning (the summed token loss, a
    differentiable fp32 scalar; the per-token losses [B, T], detached fp32)."""

    vocab_size: int
    """The real vocabulary (model.vocab_size); rows above it are padding."""
    chunk_tokens: int
    """Tokens per chunk."""
    sequence_parallel: bool
    """Whether a plain hidden-state tensor under TP holds only this rank's sequence slice."""
    repeat_backward: bool = False
    """Keep the gradients for a second backward through the loss, which zero-bubble pipeline schedules
    run (an input-gradient pass, then a weight-gradient pass). Off, backward hands them over: autograd
    then takes the weight gradient as the parameter's .grad instead of copying a tensor still held."""

    def __call__(self, h: Tensor, head: nn.Module, labels: Tensor) -> tuple[Tensor, Tensor]:
        coordinates = getattr(head, "coordinates", None)
        if coordinates is not None:  # factorized head: logits = (h B^T) P^T; the r-wide h B^T is cheap
            h, weight = head.basis(h), coordinates.weight
        else:
            weight = head.weight
        mesh = weight.device_mesh if isinstance(weight, DTensor) else None
        x = _all_tokens(h, mesh, self.sequence_parallel)
        local, region = local_shard_region(weight)
        start = region[0].start
        real = max(0, min(region[0].stop, self.vocab_size) - start)
        x = x.reshape(-1, x.shape[-1])
        flat = labels.reshape(-1)
        if flat.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} hidden states for {flat.shape[0]} labels")
        grads = torch.is_grad_enabled()
        total, per_token = _LinearCrossEntropy.apply(
            x,
            local,
            flat,
            start,
            real,
            self.chunk_tokens,
            mesh.get_group() if mesh is not None else None,
            grads and x.requires_grad,
            grads and local.requires_grad,
            self.repeat_backward,
        )
        return total, per_token.view(labels.shape)


def _all_tokens(h: Tensor, mesh, sequence_parallel: bool) -> Tensor:
    """Every token's hidden state as a plain tensor on every TP rank (all-gathered under sequence
    parallelism), whose gradient, a partial sum over the vocabulary shards, autograd reduces over TP."""
    if mesh is None:
        return h.to_local() if isinstance(h, DTensor) else h
    if mesh.ndim != 1:
        raise ValueError(f"the head's weight is a DTensor on a {mesh.ndim}-D mesh, expected the 1-D TP mesh")
    if not isinstance(h, DTensor):
        h = DTensor.from_local(h, mesh, (Shard(1) if sequence_parallel else Replicate(),), run_check=False)
    return h.redistribute(mesh, (Replicate(),)).to_local(grad_placements=(Partial(),))


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of x @ w[:vocab]^T, w being the vocabulary rows [start, start + len(w)) that
    this rank holds (all of them without TP) and the first `vocab` of them real tokens, chunk by chunk, with
    the gradients of the loss sum computed on the way. The padded rows are sliced off here and not by the
    caller: autograd's backward of a slice would allocate a second weight-sized gradient."""

    @staticmethod
    def forward(ctx, x, w_all, labels, start, vocab, chunk, group, need_x, need_w, repeat):
        n, w = x.shape[0], w_all[:vocab]
        losses = torch.empty(n, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w_all = torch.zeros(w_all.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_w = grad_w_all[:vocab] if need_w else None
        for s in range(0, n, chunk):
            xc, lab = x[s : s + chunk], labels[s : s + chunk]
            valid = lab != IGNORE_INDEX
            idx = lab - start
            mine = valid & (idx >= 0) & (idx < vocab)
            idx = idx.clamp(0, max(vocab - 1, 0))
            logits = torch.mm(xc, w.t()).float()
            if vocab:
                target = torch.where(mine, logits.gather(1, idx[:, None]).squeeze(1), 0.0)
                top = logits.max(1).values
            else:  # a TP rank whose shard is all padding
                target = torch.zeros(xc.shape[0], device=x.device)
                top = torch.full_like(target, float("-inf"))
            if group is not None:
                dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
            probs = logits.sub_(top[:, None]).exp_()  # in place: one chunk-sized fp32 buffer
            stats = torch.stack([probs.sum(1), target])
            if group is not None:
                dist.all_reduce(stats, group=group)
            sumexp, target = stats
            losses[s : s + chunk] = torch.where(valid, sumexp.log() + top - target, 0.0)
            if not (need_x or need_w):
                del logits, probs  # before the next chunk's logits: one chunk alive, not two
                continue
            # d(loss_i)/d(logits_i) = softmax_i - onehot(target_i), zero for ignored tokens; no
            # boolean indexing, which would wait for the device on every chunk
            probs.mul_((valid / sumexp)[:, None])
            if vocab:
                probs.scatter_add_(1, idx[:, None], -mine.to(probs.dtype)[:, None])
            g = probs.to(x.dtype)
            if need_x:
                torch.mm(g, w, out=grad_x[s : s + chunk])
            if need_w:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), xc)
                else:  # accumulate the chunks in fp32: the sum of many rounded partial GEMMs drifts
                    grad_w.add_(torch.mm(g.t(), xc))
            del logits, probs, g
        ctx.grads, ctx.scale, ctx.w_dtype, ctx.repeat = (grad_x, grad_w_all), None, w.dtype, repeat
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        # With `repeat` (zero-bubble pipeline schedules: backward runs twice through the loss, with the
        # same upstream gradient) the gradients are scaled in place once and handed out again.
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked loss computes its gradients in forward and hands them over in backward: "
                "a second backward through it needs ChunkedHeadLoss(repeat_backward=True)"
            )
        grad_x, grad_w = ctx.grads
        if not ctx.repeat:
            ctx.grads = None
        if ctx.scale is None:
            ctx.scale = grad_total.detach().clone()
            if grad_x is not None:
                grad_x.mul_(grad_total.to(grad_x.dtype))
            if grad_w is not None:
                grad_w.mul_(grad_total)
        elif not torch.equal(ctx.scale, grad_total):
            raise RuntimeError(
                "the chunked loss computes its gradients in forward: a second backward through it must "
                "bring the same upstream gradient as the first"
            )
        grad_w = grad_w.to(ctx.w_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None, None, None, None, None, None, None
