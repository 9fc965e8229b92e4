"""What each new row of `cptron vocab init`'s word-vector methods is made of, and making it from a matrix.

The methods (WECHSEL, FOCUS, OFA, constrained word2vec) decide once, from word vectors or text, which old
tokens each new token resembles and with which weights: a `RowPlan`. The plan is then applied to each
matrix with that matrix's own old rows, so an untied LM head gets the same weights over the same old
tokens as the input embedding, but made of the head's rows. Rows are read through a `RowReader`, only
the chunks that hold a needed row, so nothing here loads a whole 8B model's embedding.

Also here, shared by the methods: token vectors from word vectors (a token's vector is the mean of the
unit vectors of the words whose tokenization holds it) and matching new tokens to old ones by canonical
form.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from tqdm.auto import tqdm

from cptron.vocab.canonical import Scheme, canonical_token, is_bare_prefix, word_pieces
from cptron.vocab.init_methods import RowReader, gather_rows
from cptron.vocab.neighbours import unit_rows

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

log = logging.getLogger("cptron.vocab")

KINDS = ("copied", "combined", "fallback", "padding")
"""copied: an old row with the same canonical token string; combined: a convex combination of old rows;
fallback: no information about the token, a seeded draw from a normal fit to the old rows (mean and std
per dimension); padding: a row without a token (pad_vocab_to_multiple_of), the mean of the old rows."""


@dataclass
class RowPlan:
    """Per new row: its kind, the old token ids it is made of and their weights (non-negative, sum 1)."""

    method: str
    """The method that made the plan."""
    kinds: list[str]
    """One of KINDS per new row."""
    sources: list[torch.Tensor]
    """Old token ids (long) of each row; empty for fallback and padding rows, one id for a copied row."""
    weights: list[torch.Tensor]
    """fp32 weights over `sources`, non-negative and summing to 1; [1.0] for a copied row."""
    details: dict = field(default_factory=dict)
    """Method-specific facts for the report (dictionary pairs, reconstruction error, final loss, ...)."""

    def counts(self) -> dict[str, int]:
        return {kind: sum(k == kind for k in self.kinds) for kind in KINDS}

    def report(self, tokens: Sequence[Optional[str]], old_names: dict[int, str], examples: int = 20) -> dict:
        """Counts, details and the heaviest sources of the first `examples` combined rows."""
        shown = []
        for i, kind in enumerate(self.kinds):
            if kind != "combined" or len(shown) >= examples:
                continue
            top = torch.argsort(self.weights[i], descending=True, stable=True)[:5]
            shown.append(
                {
                    "token": tokens[i],
                    "sources": [
                        [
                            old_names.get(int(self.sources[i][j]), str(int(self.sources[i][j]))),
                            round(float(self.weights[i][j]), 4),
                        ]
                        for j in top
                    ],
                }
            )
        return {"counts": self.counts(), **self.details, "examples": shown}


def empty_plan(method: str, tokens: Sequence[Optional[str]]) -> RowPlan:
    """A plan for rows of these tokens: fallback (until a method fills the row in), padding for None."""
    kinds = ["fallback" if t is not None else "padding" for t in tokens]
    k = len(kinds)
    empty = torch.empty(0, dtype=torch.long)
    return RowPlan(method, kinds, [empty] * k, [torch.empty(0)] * k)


def set_copy(plan: RowPlan, row: int, old_id: int) -> None:
    plan.kinds[row] = "copied"
    plan.sources[row] = torch.tensor([old_id], dtype=torch.long)
    plan.weights[row] = torch.ones(1)


def set_combination(plan: RowPlan, row: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
    plan.kinds[row] = "combined"
    plan.sources[row] = ids.to(torch.long).clone()
    plan.weights[row] = weights.to(torch.float32).clone()


# ------------------------------------------------------------------ matching tokens


def shared_tokens(
    old_canonical: dict[int, str], tokens: Sequence[Optional[str]], in_model: Sequence[bool], scheme: Scheme
) -> dict[int, int]:
    """{new row: old id} for each new token whose canonical form is an old token's (the lowest old id
    when several share it). Bare prefixes ("▁", "Ġ") are never matched."""
    by_form: dict[str, int] = {}
    for i in sorted(old_canonical):
        form = old_canonical[i]
        if not is_bare_prefix(form):
            by_form.setdefault(form, i)
    out = {}
    for row, (token, model_token) in enumerate(zip(tokens, in_model)):
        if token is None:
            continue
        form = canonical_token(token, scheme if model_token else "plain")
        if form in by_form:
            out[row] = by_form[form]
    return out


def token_vectors_from_words(
    tokenizer: Tokenizer,
    scheme: Scheme,
    words: Sequence[str],
    vectors: torch.Tensor,
    lo: int,
    hi: int,
    *,
    progress: bool = False,
    desc: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, vectors): for each token id in [lo, hi) that a word's tokenization holds, the mean of the unit
    vectors of those words. Each word is tokenized as it reads after a space (" " + word) by the
    tokenizer's model; bare prefix pieces collect nothing (the lone-prefix trap), and a piece counts once
    per word however often it occurs in it."""
    token_index, word_index = [], []
    for w, word in enumerate(tqdm(words, desc=desc or "tokenizing words", unit="word", disable=not progress)):
        for p in set(word_pieces(tokenizer, word, scheme)):
            if lo <= p < hi:
                token_index.append(p - lo)
                word_index.append(w)
    d = vectors.shape[1]
    if not token_index:
        return torch.empty(0, dtype=torch.long), torch.empty(0, d)
    t = torch.tensor(token_index, dtype=torch.long)
    sums = torch.zeros(hi - lo, d, dtype=torch.float64)
    sums.index_add_(0, t, unit_rows(vectors)[torch.tensor(word_index)].to(torch.float64))
    counts = torch.bincount(t, minlength=hi - lo)
    ids = torch.nonzero(counts, as_tuple=True)[0]
    return ids + lo, (sums[ids] / counts[ids, None]).to(torch.float32)


# ------------------------------------------------------------------ applying a plan to a matrix


def mean_std(read_rows: RowReader, n_rows: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and (unbiased) std of rows [0, n_rows), a chunk at a time in fp64 around the
    first chunk's mean (a shift keeps the variance from cancelling when the mean is large)."""
    shift = s1 = s2 = None
    for start in range(0, n_rows, chunk_rows):
        x = read_rows(start, min(start + chunk_rows, n_rows)).to(torch.float64)
        if shift is None:
            shift = x.mean(0)
            s1, s2 = torch.zeros_like(shift), torch.zeros_like(shift)
        x = x - shift
        s1 += x.sum(0)
        s2 += (x * x).sum(0)
    m = s1 / n_rows
    var = (s2 - n_rows * m * m) / max(n_rows - 1, 1)
    return (shift + m).to(torch.float32), var.clamp_min(0).sqrt().to(torch.float32)


def normal_fit_rows(mean: torch.Tensor, std: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n rows drawn from N(mean, diag(std^2)): FOCUS's and OFA's initialization of tokens they know nothing
    about, fitted to the old rows so the new ones have their scale."""
    return mean + torch.randn(n, mean.numel(), generator=generator) * std


def combine(plan: RowPlan, rows: dict[int, torch.Tensor], row: int) -> torch.Tensor:
    """The plan's row from the old rows (fp32; a copied row is the old row itself, bit for bit)."""
    ids, w = plan.sources[row], plan.weights[row]
    if plan.kinds[row] == "copied":
        return rows[int(ids[0])]
    stacked = torch.stack([rows[int(i)] for i in ids])
    return (w[:, None] * stacked).sum(0)


def apply_plan(
    plan: RowPlan, read_rows: RowReader, n_old: int, d: int, chunk_rows: int, generator: torch.Generator
) -> torch.Tensor:
    """The plan's fp32 rows, made of one matrix's old rows [0, n_old)."""
    k = len(plan.kinds)
    out = torch.empty(k, d)
    rows = gather_rows(read_rows, [int(i) for s in plan.sources for i in s], chunk_rows)
    for row, kind in enumerate(plan.kinds):
        if kind in ("copied", "combined"):
            out[row] = combine(plan, rows, row)
    fill_fallback_and_padding(out, plan, read_rows, n_old, chunk_rows, generator)
    return out


def fill_fallback_and_padding(
    out: torch.Tensor, plan: RowPlan, read_rows: RowReader, n_old: int, chunk_rows: int, generator: torch.Generator
) -> None:
    """Fallback rows of `out` drawn from the normal fit of rows [0, n_old) of `read_rows`; padding rows
    their mean. The statistics are read only when such a row exists."""
    drawn = [r for r, kind in enumerate(plan.kinds) if kind == "fallback"]
    padding = [r for r, kind in enumerate(plan.kinds) if kind == "padding"]
    if drawn or padding:
        mean, std = mean_std(read_rows, n_old, chunk_rows)
        if drawn:
            out[drawn] = normal_fit_rows(mean, std, len(drawn), generator)
        if padding:
            out[padding] = mean
