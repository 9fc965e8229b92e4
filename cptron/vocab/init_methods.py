"""The rows `cptron vocab init` gives new tokens: the initialization methods and the statistics they need.

Owns the row statistics of an embedding matrix (mean and covariance, in fp32, accumulated a chunk of rows
at a time, so a 128k x 8192 matrix is never centered or converted to fp32 whole), the four methods
(random, mean, multivariate, subword-mean), and splitting a new token's string into the old tokenizer's
pieces. Rows are read through a `RowReader`, so nothing here knows about files.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

log = logging.getLogger("cptron.vocab")

METHODS = ("random", "mean", "multivariate", "subword-mean")

MULTIVARIATE_SCALE = 1e-5
"""Hewitt (2021) samples new rows from N(mu, 1e-5 * Sigma): close to the mean, with some spread to break ties."""

RowReader = Callable[[int, int], torch.Tensor]
"""rows [start, stop) of the old matrix, as a (stop - start, d) tensor of any floating dtype."""


@dataclass
class RowStatistics:
    """Mean and (optionally) covariance of the old rows, in fp32."""

    count: int
    """Rows the statistics cover (the old vocabulary; padding rows are never read)."""
    mean: torch.Tensor
    """(d,) mean row."""
    covariance: Optional[torch.Tensor] = None
    """(d, d) unbiased sample covariance, or None when it was not asked for."""


def row_statistics(read_rows: RowReader, n_rows: int, chunk_rows: int, covariance: bool) -> RowStatistics:
    """Mean (and covariance) of rows [0, n_rows), reading `chunk_rows` rows at a time.

    The sums of x and x^T x are accumulated per chunk in fp32 around a shift (the first chunk's mean):
    the covariance is shift-invariant, and without the shift fp32 loses the covariance to cancellation
    whenever the mean row is large next to the spread of the rows."""
    if n_rows < 1:
        raise ValueError(f"row statistics need at least one row, got n_rows={n_rows}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    shift = s1 = s2 = None
    for start in range(0, n_rows, chunk_rows):
        x = read_rows(start, min(start + chunk_rows, n_rows)).to(torch.float32)
        if shift is None:
            shift = x.mean(0)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros(shift.numel(), shift.numel()) if covariance else None
        x = x - shift
        s1 += x.sum(0)
        if s2 is not None:
            s2.addmm_(x.T, x)
    centered_mean = s1 / n_rows
    mean = shift + centered_mean
    if s2 is None:
        return RowStatistics(n_rows, mean)
    cov = (s2 - n_rows * torch.outer(centered_mean, centered_mean)) / max(n_rows - 1, 1)
    return RowStatistics(n_rows, mean, (cov + cov.T) / 2)


def random_rows(k: int, d: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """The naive baseline: each new row drawn from N(0, std^2 I), with std the model's own initialization
    std (config.json's `initializer_range`, 0.02 when absent), as if the rows had never been trained."""
    return torch.randn(k, d, generator=generator) * std


def mean_rows(stats: RowStatistics, k: int) -> torch.Tensor:
    """Every new row is the mean of the old rows (Hewitt, 2021, "Initializing new word embeddings for
    pretrained language models"). With the LM head's mean as a new output row, Jensen's inequality bounds
    KL(p_old || p_new) of every next-token distribution by log(1 + k/n) for k new and n old rows."""
    return stats.mean.expand(k, -1).clone()


def multivariate_rows(
    stats: RowStatistics, k: int, generator: torch.Generator, scale: float = MULTIVARIATE_SCALE
) -> torch.Tensor:
    """New rows sampled from N(mu, scale * Sigma) of the old rows, scale 1e-5 by default (Hewitt, 2021;
    compared with other initializations by Mundra et al., 2024, "An empirical comparison of vocabulary
    expansion and initialization approaches for language models")."""
    if stats.covariance is None:
        raise ValueError("multivariate rows need the covariance of the old rows")
    factor = _covariance_factor(stats.covariance * scale)
    z = torch.randn(k, stats.mean.numel(), generator=generator)
    return stats.mean + z @ factor.T


def _covariance_factor(cov: torch.Tensor) -> torch.Tensor:
    """L with L L^T = cov, in fp32. The factorization runs in fp64: an embedding's covariance is often
    ill-conditioned and, with fewer rows than dimensions, singular; then a symmetric square root with
    negative eigenvalues (rounding noise) clamped to zero replaces the Cholesky factor."""
    cov64 = cov.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(cov64)
    if int(info) != 0:
        eigenvalues, vectors = torch.linalg.eigh(cov64)
        factor = vectors * eigenvalues.clamp(min=0).sqrt()
    return factor.to(torch.float32)


def subword_pieces(
    old: Tokenizer, tokens: Sequence[Optional[str]], in_model: Sequence[bool], n_old: int
) -> list[list[int]]:
    """The old tokenizer's piece ids of each new token's string (empty for None: a row without a token).

    A token of the BPE model (e.g. "Ġhaus" in a byte-level vocabulary, "▁Haus" in a SentencePiece-
    converted one) is split by the old tokenizer's model alone (`model.tokenize`), so the string is read
    in the vocabulary's own alphabet, without the normalizer or pre-tokenizer rewriting it. An added token
    (not in the BPE model) holds plain text, which the whole old tokenizer encodes. Unknown-token pieces
    are dropped: they carry no information about the string."""
    unk = getattr(old.model, "unk_token", None)
    unk_id = old.token_to_id(unk) if unk else None
    out = []
    for token, model_token in zip(tokens, in_model):
        if token is None:
            out.append([])
            continue
        if model_token:
            ids = [t.id for t in old.model.tokenize(token)]
        else:
            ids = old.encode(token, add_special_tokens=False).ids
        out.append([i for i in ids if i < n_old and i != unk_id])
    return out


def gather_rows(read_rows: RowReader, ids: Sequence[int], chunk_rows: int) -> dict[int, torch.Tensor]:
    """{id: fp32 row} of the given ids, reading only the chunks that hold one."""
    needed = sorted(set(ids))
    rows: dict[int, torch.Tensor] = {}
    if not needed:
        return rows
    end = needed[-1] + 1
    for start in range(0, end, chunk_rows):
        stop = min(start + chunk_rows, end)
        lo, hi = bisect.bisect_left(needed, start), bisect.bisect_left(needed, stop)
        if lo == hi:
            continue
        chunk = read_rows(start, stop).to(torch.float32)
        for i in needed[lo:hi]:
            rows[i] = chunk[i - start].clone()
    return rows


def subword_mean_rows(
    pieces: Sequence[Sequence[int]], read_rows: RowReader, chunk_rows: int, fallback: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """(rows, how many fell back): each new row is the mean of its old pieces' rows, the "fast vocabulary
    transfer" of Gee et al. (2022), "Fast Vocabulary Transfer for Language Model Compression". The
    pieces' fp32 rows are summed in piece order (a repeated piece counts each time) and divided by their
    count. A token without usable pieces (and a padding row) gets `fallback()`, the mean of the old rows.

    Only the chunks holding a needed piece are read, and only the needed rows are kept."""
    rows = gather_rows(read_rows, [i for p in pieces for i in p], chunk_rows)
    out, fallbacks, mean = [], 0, None
    for p in pieces:
        if not p:
            if mean is None:
                mean = fallback()
            out.append(mean)
            fallbacks += 1
            continue
        acc = torch.zeros_like(rows[p[0]])
        for i in p:
            acc += rows[i]
        out.append(acc / len(p))
    return torch.stack(out), fallbacks


def new_rows(
    method: str,
    k: int,
    read_rows: RowReader,
    n_old: int,
    d: int,
    chunk_rows: int,
    generator: torch.Generator,
    std: float,
    pieces: Optional[Sequence[Sequence[int]]] = None,
) -> tuple[torch.Tensor, int]:
    """(k fp32 rows for `method`, rows that fell back to the mean) from the old rows [0, n_old).

    `pieces` (subword-mean only) lists each new row's old piece ids, empty for rows without a token."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if k == 0:
        return torch.empty(0, d), 0
    if method == "random":
        return random_rows(k, d, std, generator), 0
    if method == "subword-mean":
        if pieces is None or len(pieces) != k:
            raise ValueError(f"subword-mean needs the pieces of each of the {k} new rows")
        return subword_mean_rows(
            pieces, read_rows, chunk_rows, lambda: row_statistics(read_rows, n_old, chunk_rows, False).mean
        )
    stats = row_statistics(read_rows, n_old, chunk_rows, covariance=method == "multivariate")
    if method == "mean":
        return mean_rows(stats, k), 0
    return multivariate_rows(stats, k, generator), 0
