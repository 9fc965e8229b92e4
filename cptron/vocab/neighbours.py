"""Nearest neighbours by cosine similarity, and the weightings the initialization methods put on them.

The search is an exact batched matmul of unit rows followed by `topk`: a batch of `batch_rows` queries
against all keys at a time, so memory stays at batch_rows x keys floats. It is exact, deterministic and
needs no dependency. faiss would only pay off for approximate search over millions of keys; vocabularies
(at most a few hundred thousand tokens) take seconds this way, even on a CPU.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def unit_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to length 1 in fp32 (an all-zero row stays zero: cosine 0 with everything)."""
    x = x.to(torch.float32)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def nearest(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    batch_rows: int = 4096,
    progress: bool = False,
    desc: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine [n, k], key index [n, k] long) of the k keys most similar to each query, most similar
    first; k is capped at the number of keys. The same inputs on the same device give the same answer."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)}: expected [n, d] and [m, d]")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    k = min(k, keys.shape[0])
    n = queries.shape[0]
    sims = torch.empty(n, k, dtype=torch.float32, device=queries.device)
    index = torch.empty(n, k, dtype=torch.long, device=queries.device)
    if n == 0 or k == 0:
        return sims, index
    keys_t = unit_rows(keys).T.contiguous()
    batches = range(0, n, batch_rows)
    for start in tqdm(batches, desc=desc or "nearest neighbours", unit="batch", disable=not progress):
        stop = min(start + batch_rows, n)
        top, order = torch.topk(unit_rows(queries[start:stop]) @ keys_t, k, dim=1, sorted=True)
        sims[start:stop] = top
        index[start:stop] = order
    return sims, index


def softmax_weights(cosine: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(cos / temperature) along the last dimension (WECHSEL and OFA use temperature 0.1)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(cosine.to(torch.float32) / temperature, dim=-1)


def sparsemax(z: torch.Tensor) -> torch.Tensor:
    """Sparsemax along the last dimension (Martins and Astudillo, 2016): the Euclidean projection of z onto
    the probability simplex. The result is non-negative, sums to 1, and is exactly 0 for entries below a
    threshold tau, so only the most similar entries get weight (FOCUS's weighting)."""
    z = z.to(torch.float32)
    if z.shape[-1] == 0:
        return z
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    cumulative = sorted_z.cumsum(-1)
    ks = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    support = (1 + ks * sorted_z) > cumulative
    size = support.sum(-1, keepdim=True)  # >= 1: the largest entry is always in the support
    tau = (cumulative.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return (z - tau).clamp_min(0)
