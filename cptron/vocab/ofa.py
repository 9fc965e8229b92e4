"""OFA (Liu et al., 2024, "OFA: A framework of initializing unseen subword embeddings for
efficient large-scale multilingual continued pretraining", NAACL Findings; arXiv 2023).

The old embedding matrix E (n_old x H) is factorized as E ~ P B: coordinates P = E V_r (n_old x r) and a
primitive basis B = V_r^T (r x H), V_r the top r right singular vectors of E. New tokens whose canonical
form is an old token's copy its coordinates; every other new token gets the softmax(cos / 0.1)-weighted
combination of the coordinates of its 10 nearest old tokens in a multilingual word-vector space; tokens
without a vector get a seeded normal fit to the old coordinates. Defaults: k = `neighbours` = 10,
`temperature` = 0.1, as in the paper; `ofa_rank` 0 is the full hidden size (the paper used r = 100 to 400
for factorized models).

The paper's multilingual space was ColexNet+, built from a parallel Bible; `cptron vocab vectors` builds
the same kind of space from verse-aligned text, with language-prefixed words ("eng:god", "deu:gott").
Old tokens get their vectors from the source language's words tokenized by the old tokenizer, new tokens
from the target language's words tokenized by the extended one (a token's vector: the mean of the unit
vectors of the words that hold it).

The reference initialized XLM-R and RoBERTa (encoders, tied embeddings). cptron factorizes the input
embedding and, for an untied head, the LM head separately, each from its own old rows, with the same
neighbours and weights. The right singular vectors come from an eigendecomposition of E^T E accumulated a
chunk of rows at a time in fp64, deterministic and without holding E (an 8B model's 128k x 4096 matrix)
in memory. Output: `ofa_output=materialized` writes P B as ordinary weights; `factorized` also writes
`embedding_factors.safetensors` (coordinates and basis per matrix) for `model.embedding_rank`. In the HF
weights, old rows (and copied rows) stay the old rows bit for bit, so only new rows carry the rank-r
approximation; the factor file holds the rank-r coordinates of every row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from cptron.hf_config import cptron_to_hf_name
from cptron.hf_factors import FACTORS, FACTORS_FILE
from cptron.vocab.canonical import canonical_vocabulary, detect_scheme
from cptron.vocab.init_methods import RowReader
from cptron.vocab.row_plan import (
    RowPlan,
    empty_plan,
    fill_fallback_and_padding,
    gather_rows,
    set_copy,
    shared_tokens,
)
from cptron.vocab.wordvec_init import (
    PlanInputs,
    old_and_new_token_vectors,
    plan_from_neighbours,
    read_vectors,
    select_words,
)

log = logging.getLogger("cptron.vocab")

FACTOR_PREFIX = {cptron_to_hf_name(dense): prefix for dense, (_, _, prefix) in FACTORS.items()}
"""HF tensor name -> its prefix in FACTORS_FILE (the file `model.embedding_rank` reads, cptron.hf_factors)."""


def ofa_plan(cfg, inputs: PlanInputs) -> RowPlan:
    """Which old tokens' coordinates make each new token's (see the module docstring)."""
    space = read_vectors(cfg.multilingual_vectors, "multilingual_vectors", cfg.progress)
    source = select_words(space, cfg.source_language, cfg.max_words, "multilingual_vectors")
    target = select_words(space, cfg.target_language, cfg.max_words, "multilingual_vectors")
    plan = empty_plan("ofa", inputs.tokens)
    old_canonical = canonical_vocabulary(inputs.old_tokenizer)
    old_canonical = {i: s for i, s in old_canonical.items() if i < inputs.n_old}
    for row, old_id in shared_tokens(
        old_canonical, inputs.tokens, inputs.in_model, detect_scheme(inputs.new_tokenizer)
    ).items():
        set_copy(plan, row, old_id)
    old, new = old_and_new_token_vectors(
        inputs, source.words, source.vectors, target.words, target.vectors, cfg.progress, "ofa"
    )
    plan_from_neighbours(plan, inputs, old, new, cfg.neighbours, cfg.temperature, cfg.progress)
    plan.details.update(old_tokens_with_vectors=len(old[0]), neighbours=cfg.neighbours, temperature=cfg.temperature)
    return plan


def right_singular_vectors(
    read_rows: RowReader, n_rows: int, d: int, rank: int, chunk_rows: int, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V_r [d, rank] fp64, singular values [rank]) of rows [0, n_rows), from the eigendecomposition of the
    Gram matrix accumulated in fp64. Each vector's sign is fixed (its largest entry positive) so the
    factors do not depend on the eigensolver's choice."""
    gram = torch.zeros(d, d, dtype=torch.float64)
    for start in tqdm(range(0, n_rows, chunk_rows), desc="ofa: Gram matrix", unit="chunk", disable=not progress):
        x = read_rows(start, min(start + chunk_rows, n_rows)).to(torch.float64)
        gram.addmm_(x.T, x)
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)[:rank]
    values, vectors = values[order].clamp_min(0), vectors[:, order]
    pivot = vectors.abs().argmax(0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    return vectors * torch.where(signs == 0, 1.0, signs), values.sqrt()


def reconstruction_error(read_rows: RowReader, n_rows: int, basis: torch.Tensor, chunk_rows: int) -> float:
    """||E - (E B^T) B||_F / ||E||_F of rows [0, n_rows) for an fp32 basis B with orthonormal rows."""
    err = total = 0.0
    for start in range(0, n_rows, chunk_rows):
        x = read_rows(start, min(start + chunk_rows, n_rows)).to(torch.float32)
        approx = (x @ basis.T) @ basis
        err += float((x.double() - approx.double()).square().sum())
        total += float(x.double().square().sum())
    return (err / total) ** 0.5 if total > 0 else 0.0


def ofa_rows(
    plan: RowPlan,
    read_rows: RowReader,
    n_old: int,
    d: int,
    chunk_rows: int,
    generator: torch.Generator,
    rank: int,
    factorized: bool,
    progress: bool = False,
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]], dict]:
    """(new fp32 rows, (coordinates of all rows [n_old + k, r], basis [r, d]) when factorized, facts).

    rank 0 (or >= d) is full rank."""
    r = d if rank == 0 or rank >= d else rank
    if rank > d:
        log.warning("ofa: ofa_rank %d exceeds the hidden size %d: using %d", rank, d, d)
    v, singular = right_singular_vectors(read_rows, n_old, d, r, chunk_rows, progress)
    basis = v.T.to(torch.float32).contiguous()
    v32 = v.to(torch.float32)

    def read_coordinates(start: int, stop: int) -> torch.Tensor:
        return read_rows(start, stop).to(torch.float32) @ v32

    k = len(plan.kinds)
    coords = torch.empty(k, r)
    needed = [int(i) for s in plan.sources for i in s]
    old_rows = gather_rows(read_rows, needed, chunk_rows)
    old_part = None
    if factorized:  # every old row's coordinates; copied rows take theirs from here, bit for bit
        old_part = torch.cat([read_coordinates(s, min(s + chunk_rows, n_old)) for s in range(0, n_old, chunk_rows)])
        old_coords = {i: old_part[i] for i in old_rows}
    else:
        old_coords = {i: row @ v32 for i, row in old_rows.items()}
    for row, kind in enumerate(plan.kinds):
        if kind in ("copied", "combined"):
            stacked = torch.stack([old_coords[int(i)] for i in plan.sources[row]])
            coords[row] = (plan.weights[row][:, None] * stacked).sum(0)
    fill_fallback_and_padding(coords, plan, read_coordinates, n_old, chunk_rows, generator)
    out = coords @ basis
    for row, kind in enumerate(plan.kinds):
        if kind == "copied":  # the old row itself; its coordinates are the old token's
            out[row] = old_rows[int(plan.sources[row][0])]
            coords[row] = old_coords[int(plan.sources[row][0])]
    error = reconstruction_error(read_rows, n_old, basis, chunk_rows)
    facts = {"rank": r, "relative_reconstruction_error": error, "top_singular_value": float(singular[0])}
    log.info("ofa: rank %d of %d, relative reconstruction error of the old rows %.3g", r, d, error)
    factors = None
    if old_part is not None:
        factors = (torch.cat([old_part, coords]), basis)
    return out, factors, facts


def write_factors(directory: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """`embedding_factors.safetensors`: `<prefix>.coordinates` [rows, r] and `<prefix>.basis` [r, H] in fp32
    per matrix (model.embed_tokens, and lm_head for an untied head), metadata {"rank": r}."""
    from safetensors.torch import save_file

    tensors, ranks = {}, set()
    for name, (coords, basis) in factors.items():
        prefix = FACTOR_PREFIX[name]
        tensors[f"{prefix}.coordinates"] = coords.to(torch.float32).contiguous()
        tensors[f"{prefix}.basis"] = basis.to(torch.float32).contiguous()
        ranks.add(basis.shape[0])
    (rank,) = ranks
    path = directory / FACTORS_FILE
    save_file(tensors, str(path), metadata={"rank": str(rank)})
    return path
