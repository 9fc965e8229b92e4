"""The word-vector methods of `cptron vocab init`: WECHSEL and FOCUS here, OFA in `cptron.vocab.ofa`,
constrained word2vec in `cptron.vocab.convex`, and the one entry point (`plan_rows`) that picks among them.

Each method makes a `RowPlan` (which old tokens each new token is made of, with which weights) from word
vectors or text, once; `cptron.vocab.init` then applies it to the input embedding and, for a model with
an untied head, separately to the LM head, each from its own old rows. The reference implementations
all target encoders or GPT-2-style models with tied embeddings, where one matrix is all there is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from cptron.errors import CptronError, require
from cptron.vocab.canonical import Scheme, canonical_token, canonical_vocabulary, detect_scheme
from cptron.vocab.neighbours import nearest, softmax_weights, sparsemax, unit_rows
from cptron.vocab.row_plan import (
    RowPlan,
    empty_plan,
    set_combination,
    set_copy,
    shared_tokens,
    token_vectors_from_words,
)

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

    from cptron.vocab.vectors import WordVectors

log = logging.getLogger("cptron.vocab")

WORDVEC_METHODS = ("wechsel", "focus", "ofa", "convex")

SPARSEMAX_CANDIDATES = 1024
"""FOCUS: sparsemax is taken over each token's most similar shared tokens, this many at first; a row whose
support fills them all is redone over every shared token, so the result is exact sparsemax."""


@dataclass
class PlanInputs:
    """What the methods know about the two vocabularies."""

    n_old: int
    """Old vocabulary size: rows below it are old rows."""
    tokens: list[Optional[str]]
    """Token string of each new row (None: padding or an unused id)."""
    in_model: list[bool]
    """Whether each new token belongs to the tokenizer's model (False: an added token, plain text)."""
    old_tokenizer: Tokenizer
    new_tokenizer: Tokenizer
    open_embedding: Callable
    """Context manager yielding (read_rows, hidden size) of the old input embedding (convex only)."""

    @property
    def n_tokens(self) -> int:
        """New rows that have a token (the rest are padding)."""
        return max((i + 1 for i, t in enumerate(self.tokens) if t is not None), default=0)


def validate_method_fields(cfg) -> None:
    """Start-up checks of the fields the word-vector methods read (cfg is a VocabInitConfig)."""
    require(cfg.neighbours >= 1, "neighbours", cfg.neighbours, "an integer >= 1")
    require(cfg.temperature > 0, "temperature", cfg.temperature, "a float > 0")
    require(cfg.max_words >= 0, "max_words", cfg.max_words, "an integer >= 0 (0: all)")
    require(cfg.ofa_rank >= 0, "ofa_rank", cfg.ofa_rank, "an integer >= 0 (0: the hidden size)")
    require(
        cfg.ofa_output in ("materialized", "factorized"), "ofa_output", cfg.ofa_output, "materialized or factorized"
    )
    for name in ("convex_steps", "convex_batch", "convex_window", "convex_negatives", "convex_candidates"):
        require(getattr(cfg, name) >= 1, name, getattr(cfg, name), "an integer >= 1")
    require(cfg.convex_lr > 0, "convex_lr", cfg.convex_lr, "a float > 0")
    needs = {
        "wechsel": ("source_vectors", "target_vectors"),
        "focus": ("token_vectors",),
        "ofa": ("multilingual_vectors", "source_language", "target_language"),
        "convex": ("texts",),
    }.get(cfg.method, ())
    for name in needs:
        require(bool(getattr(cfg, name)), name, getattr(cfg, name), f"a value: method {cfg.method} needs it")
    for name in ("source_vectors", "target_vectors", "multilingual_vectors", "token_vectors", "dictionary"):
        path = getattr(cfg, name)
        require(not path or Path(path).exists(), name, path, "an existing file")
    if cfg.ofa_output == "factorized":
        require(cfg.method == "ofa", "ofa_output", cfg.ofa_output, "materialized unless method is ofa")


def read_vectors(path: str, field: str, progress: bool = False) -> WordVectors:
    """Word vectors of the file a config field names; errors name the field."""
    from cptron.vocab.vectors import load_vectors  # deferred: only these methods read vectors

    try:
        return load_vectors(path, progress=progress)
    except CptronError as e:
        raise CptronError(f"{field}: {e}") from e


def select_words(wv: WordVectors, language: str, max_words: int, field: str) -> WordVectors:
    """One language's words of a space (prefix stripped) when `language` is set, then the first `max_words`
    (vector files list the most frequent words first; 0 keeps all)."""
    from cptron.vocab.vectors import WordVectors

    if language:
        try:
            wv = wv.restrict_language(language)
        except CptronError as e:
            raise CptronError(f"{field}: {e}") from e
    if max_words and len(wv) > max_words:
        wv = WordVectors(words=list(wv.words[:max_words]), vectors=wv.vectors[:max_words])
    log.info("%s: %d %sword vectors of dimension %d", field, len(wv), f"{language} " if language else "", wv.dim)
    return wv


def plan_from_neighbours(
    plan: RowPlan,
    inputs: PlanInputs,
    old: tuple[torch.Tensor, torch.Tensor],
    new: tuple[torch.Tensor, torch.Tensor],
    k: int,
    temperature: float,
    progress: bool,
) -> None:
    """Each new token with a vector (and not copied) becomes the softmax(cos / temperature)-weighted
    combination of its k nearest old tokens (WECHSEL's and OFA's rule)."""
    (old_ids, old_vecs), (new_ids, new_vecs) = old, new
    if len(old_ids) == 0 or len(new_ids) == 0:
        log.warning("%s: no old or no new token has a word vector: every new row falls back", plan.method)
        return
    cos, index = nearest(new_vecs, old_vecs, k, progress=progress, desc=f"{plan.method}: nearest old tokens")
    weights = softmax_weights(cos, temperature)
    for j, token_id in enumerate(new_ids.tolist()):
        row = token_id - inputs.n_old
        if plan.kinds[row] != "copied":
            set_combination(plan, row, old_ids[index[j]], weights[j])


# ------------------------------------------------------------------ WECHSEL


def old_and_new_token_vectors(
    inputs: PlanInputs, source_words, source_vectors, target_words, target_vectors, progress: bool, method: str
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Token vectors of the old vocabulary [0, n_old) from the source words (old tokenizer) and of the new
    tokens from the target words (extended tokenizer), as `token_vectors_from_words` makes them."""
    old = token_vectors_from_words(
        inputs.old_tokenizer,
        detect_scheme(inputs.old_tokenizer),
        source_words,
        source_vectors,
        0,
        inputs.n_old,
        progress=progress,
        desc=f"{method}: source words",
    )
    new = token_vectors_from_words(
        inputs.new_tokenizer,
        detect_scheme(inputs.new_tokenizer),
        target_words,
        target_vectors,
        inputs.n_old,
        inputs.n_old + inputs.n_tokens,
        progress=progress,
        desc=f"{method}: target words",
    )
    return old, new


def read_dictionary(path: str) -> list[tuple[str, str]]:
    """(source word, target word) pairs of a bilingual dictionary: one pair a line, tab- or space-separated;
    blank lines and lines starting with # are skipped."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise CptronError(f"dictionary={path} line {n}: {line!r} is not 'source<TAB or space>target'")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise CptronError(f"dictionary={path} holds no word pairs")
    return pairs


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal W minimizing ||target @ W - source||_F (Schönemann, 1966): W = U V^T for
    target^T source = U S V^T. Computed in fp64."""
    u, _, vh = torch.linalg.svd(target.to(torch.float64).T @ source.to(torch.float64))
    return (u @ vh).to(torch.float32)


def align(source: WordVectors, target: WordVectors, dictionary: str) -> tuple[torch.Tensor, dict]:
    """The target vectors (unit rows) rotated into the source space, and facts for the report."""
    if source.dim != target.dim:
        raise CptronError(
            f"source_vectors have dimension {source.dim} but target_vectors {target.dim}: expected the same"
        )
    if dictionary:
        pairs, origin = read_dictionary(dictionary), f"dictionary {dictionary}"
    else:  # names, numbers and loanwords are spelled alike: a seed dictionary without a file
        pairs, origin = [(w, w) for w in target.words if w in source.index()], "identical strings"
    s_index, t_index = source.index(), target.index()
    found = [(s_index[s], t_index[t]) for s, t in pairs if s in s_index and t in t_index]
    if not found:
        raise CptronError(f"wechsel: none of the {len(pairs)} word pairs from {origin} has vectors in both languages")
    if len(found) < source.dim:
        log.warning(
            "wechsel: only %d word pairs (from %s) for %d dimensions: the alignment is underdetermined; "
            "a bilingual dictionary file gives a better one",
            len(found),
            origin,
            source.dim,
        )
    s_rows = unit_rows(source.vectors[torch.tensor([p[0] for p in found])])
    t_rows = unit_rows(target.vectors[torch.tensor([p[1] for p in found])])
    w = procrustes(s_rows, t_rows)
    residual = float((t_rows @ w - s_rows).norm(dim=1).mean())
    log.info("wechsel: Procrustes over %d pairs from %s, mean residual %.4f", len(found), origin, residual)
    return unit_rows(target.vectors) @ w, {"alignment_pairs": len(found), "alignment": origin, "residual": residual}


def wechsel_plan(cfg, inputs: PlanInputs) -> RowPlan:
    """WECHSEL (Minixhofer, Paischer and Rekabsaz, 2022, "WECHSEL: Effective initialization of subword
    embeddings for cross-lingual transfer of monolingual language models").

    Source- and target-language word vectors are aligned by orthogonal Procrustes over a bilingual
    dictionary (`dictionary`; without one, over the words both vector files spell alike). A token's vector
    comes from the words whose tokenization holds it, as in the paper's variant for word vectors without
    fastText subword information: cptron takes the unweighted mean of their unit vectors, over the
    `max_words` most frequent words. Each new token becomes the softmax(cos / `temperature`)-weighted combination of its
    `neighbours` nearest old tokens: defaults k = 10, temperature 0.1, as in the paper. New tokens no word
    holds get a seeded normal fit to the old rows, as the paper does.

    The reference replaced the whole vocabulary of RoBERTa and GPT-2 (tied embeddings). cptron keeps
    every old row and makes only the new ones; for an untied head the same weights over the same old
    tokens are applied to the head's own old rows."""
    source_space = read_vectors(cfg.source_vectors, "source_vectors", cfg.progress)
    same = Path(cfg.target_vectors).resolve() == Path(cfg.source_vectors).resolve()  # one multilingual file
    target_space = source_space if same else read_vectors(cfg.target_vectors, "target_vectors", cfg.progress)
    source = select_words(source_space, cfg.source_language, cfg.max_words, "source_vectors")
    target = select_words(target_space, cfg.target_language, cfg.max_words, "target_vectors")
    aligned, details = align(source, target, cfg.dictionary)
    old, new = old_and_new_token_vectors(
        inputs, source.words, source.vectors, target.words, aligned, cfg.progress, "wechsel"
    )
    plan = empty_plan("wechsel", inputs.tokens)
    plan_from_neighbours(plan, inputs, old, new, cfg.neighbours, cfg.temperature, cfg.progress)
    plan.details.update(
        details, old_tokens_with_vectors=len(old[0]), neighbours=cfg.neighbours, temperature=cfg.temperature
    )
    return plan


# ------------------------------------------------------------------ FOCUS


def _aux_rows(aux: WordVectors, strings: dict[int, str], scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, vectors) of the tokens the auxiliary space has a vector for: by the token string itself, else
    by its canonical form (an auxiliary space trained with another alphabet's tokenizer)."""
    index = aux.index()
    by_form: dict[str, int] = {}
    for w, word in enumerate(aux.words):
        by_form.setdefault(canonical_token(word, scheme), w)
    ids, rows = [], []
    for i, s in strings.items():
        w = index.get(s)
        if w is None:
            w = by_form.get(canonical_token(s, scheme))
        if w is not None:
            ids.append(i)
            rows.append(w)
    return torch.tensor(ids, dtype=torch.long), aux.vectors[torch.tensor(rows, dtype=torch.long)]


def sparsemax_neighbours(queries: torch.Tensor, keys: torch.Tensor, progress: bool) -> list[tuple]:
    """(key indices, sparsemax weights) per query over the cosine similarities to every key, exact:
    computed over the top SPARSEMAX_CANDIDATES and redone over all keys when the support fills them."""
    k = min(SPARSEMAX_CANDIDATES, keys.shape[0])
    cos, index = nearest(queries, keys, k, progress=progress, desc="focus: similar shared tokens")
    out, unit_keys = [], None
    for j in range(queries.shape[0]):
        z, idx = cos[j], index[j]
        if k < keys.shape[0] and bool((sparsemax(z) > 0).all()):
            unit_keys = unit_rows(keys) if unit_keys is None else unit_keys
            z, idx = (unit_keys @ unit_rows(queries[j : j + 1]).T)[:, 0], torch.arange(keys.shape[0])
        p = sparsemax(z)
        keep = p > 0
        out.append((idx[keep], p[keep] / p[keep].sum()))
    return out


def focus_plan(cfg, inputs: PlanInputs) -> RowPlan:
    """FOCUS (Dobler and de Melo, 2023, "FOCUS: Effective embedding initialization for monolingual
    specialization of multilingual models").

    New tokens whose canonical form (`cptron.vocab.canonical`) is an old token's are copied from it. Every
    other new token becomes a sparsemax-weighted combination of the shared tokens, by cosine similarity in
    an auxiliary token-level space (`token_vectors`, as `cptron vocab vectors --mode tokens` trains it on
    target text with the extended tokenizer; the paper used fastText). Shared tokens are the old tokens
    that have an auxiliary vector: in an extension every old token is in the new vocabulary. Tokens
    without an auxiliary vector get a seeded normal fit to the old rows (mean and std per dimension), as
    in the paper. FOCUS has no k or temperature: sparsemax picks the support.

    The reference specialized XLM-R (an encoder with tied embeddings). cptron applies the same weights over
    the same shared tokens to the input embedding and, separately, to an untied LM head's own rows."""
    aux = read_vectors(cfg.token_vectors, "token_vectors", cfg.progress)
    log.info("focus: %d token vectors of dimension %d from %s", len(aux), aux.dim, cfg.token_vectors)
    old_scheme, new_scheme = detect_scheme(inputs.old_tokenizer), detect_scheme(inputs.new_tokenizer)
    plan = empty_plan("focus", inputs.tokens)
    old_canonical = canonical_vocabulary(inputs.old_tokenizer, old_scheme)
    old_canonical = {i: s for i, s in old_canonical.items() if i < inputs.n_old}
    for row, old_id in shared_tokens(old_canonical, inputs.tokens, inputs.in_model, new_scheme).items():
        set_copy(plan, row, old_id)
    old_strings = {i: t for t, i in inputs.old_tokenizer.get_vocab(with_added_tokens=True).items() if i < inputs.n_old}
    new_strings = {
        inputs.n_old + r: t for r, t in enumerate(inputs.tokens) if t is not None and plan.kinds[r] != "copied"
    }
    old_ids, old_vecs = _aux_rows(aux, old_strings, new_scheme)
    new_ids, new_vecs = _aux_rows(aux, new_strings, new_scheme)
    if len(old_ids) and len(new_ids):
        for token_id, (idx, w) in zip(new_ids.tolist(), sparsemax_neighbours(new_vecs, old_vecs, cfg.progress)):
            set_combination(plan, token_id - inputs.n_old, old_ids[idx], w)
    else:
        log.warning("focus: no old or no new token has an auxiliary vector: every new row falls back")
    sizes = [len(s) for s, k in zip(plan.sources, plan.kinds) if k == "combined"]
    plan.details.update(
        shared_tokens_with_vectors=len(old_ids),
        mean_support=round(sum(sizes) / len(sizes), 2) if sizes else 0,
    )
    return plan


# ------------------------------------------------------------------ the entry point


def plan_rows(cfg, inputs: PlanInputs) -> RowPlan:
    """The plan of `cfg.method` (one of WORDVEC_METHODS)."""
    if not inputs.tokens:  # the tokenizer adds nothing: no vectors or text to read
        return RowPlan(cfg.method, [], [], [])
    if cfg.method == "wechsel":
        plan = wechsel_plan(cfg, inputs)
    elif cfg.method == "focus":
        plan = focus_plan(cfg, inputs)
    elif cfg.method == "ofa":
        from cptron.vocab.ofa import ofa_plan

        plan = ofa_plan(cfg, inputs)
    elif cfg.method == "convex":
        from cptron.vocab.convex import convex_plan

        plan = convex_plan(cfg, inputs)
    else:
        raise ValueError(f"unknown word-vector method {cfg.method!r}: expected one of {', '.join(WORDVEC_METHODS)}")
    counts = plan.counts()
    log.info(
        "%s: %d new row(s): %d copied, %d combined, %d fallback, %d padding",
        cfg.method,
        len(plan.kinds),
        counts["copied"],
        counts["combined"],
        counts["fallback"],
        counts["padding"],
    )
    return plan
