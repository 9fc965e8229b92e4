"""Cross-entropy over the real vocabulary, on full or vocab-sharded logits.

The model's output has `padded_vocab_size` columns. Padded columns are not
tokens: the loss must not put probability mass on them, or it would differ from
the unpadded model's (and from transformers'). Full logits are sliced; sharded
logits (loss parallelism) get the padded columns of this rank's shard filled
with the dtype's lowest value, which is what slicing means for a softmax.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from cptron.data.interface import IGNORE_INDEX
from cptron.distributed import local_shard_region


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sum of token cross-entropies (fp32) over labels != IGNORE_INDEX.

    `logits` [B, T, V_padded] is a plain tensor or a DTensor sharded on the vocab
    dimension (then the call, and its backward, must run under
    `torch.distributed.tensor.parallel.loss_parallel()`)."""
    # Summed from the per-token losses, as cross_entropy_sum_and_rows does: one path, so a loader with
    # or without sources gives the same loss bits.
    return _cross_entropy(logits, labels, vocab_size, "none").sum()


def cross_entropy_sum_and_rows(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy_sum` and, detached, each row's part of it ([B] fp32 plain tensor), from one
    cross-entropy (for per-source losses)."""
    per_token = _cross_entropy(logits, labels, vocab_size, "none")
    rows = per_token.detach()
    if isinstance(rows, DTensor):  # replicated per-token losses under loss parallelism
        rows = rows.to_local()
    return per_token.sum(), rows.view(labels.shape).sum(1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, reduction: str) -> torch.Tensor:
    if isinstance(logits, DTensor):
        logits = _mask_padded_columns(logits.float(), vocab_size)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction=reduction, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(
        logits[..., :vocab_size].flatten(0, 1).float(), labels.flatten(), reduction=reduction, ignore_index=IGNORE_INDEX
    )


def _mask_padded_columns(logits: DTensor, vocab_size: int) -> DTensor:
    if logits.shape[-1] == vocab_size:
        return logits
    local, region = local_shard_region(logits)
    cols = torch.arange(region[-1].start, region[-1].stop, device=local.device)
    local = local.masked_fill(cols >= vocab_size, torch.finfo(local.dtype).min)
    return DTensor.from_local(
        local, logits.device_mesh, logits.placements, run_check=False, shape=logits.shape, stride=logits.stride()
    )


def loss_parallel_context(enabled: bool):
    """`loss_parallel()` when logits are vocab-sharded, else a no-op context."""
    return loss_parallel() if enabled else contextlib.nullcontext()
