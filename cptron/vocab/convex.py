"""Constrained word2vec (Mundra et al., 2024, "An
empirical comparison of vocabulary expansion and initialization approaches for language models").

Each new row is a convex combination of old rows, softmax(logits) @ E_old, and the logits are trained
skip-gram style with negative sampling (Mikolov et al., 2013) on target text tokenized by the extended
tokenizer, with every old row frozen: a new token's row moves toward the rows of the tokens around it
and away from randomly drawn ones, and stays inside the convex hull of the old rows by construction.

Scale: a full softmax over all old rows per new token (8k x 128k logits for Llama 3) is too costly, so
each new token's combination is restricted to candidates: its pieces under the old tokenizer plus the
`convex_candidates` old rows most similar (cosine) to the mean of those pieces. The unit old rows of the
input embedding are held in memory in fp32 for the search and the training (2 GB for Llama 3 8B). The logits start equal
(uniform weights over the candidates). The score of a pair is 10 x the cosine of the two rows rather
than the raw dot product: an LLM's embedding rows are short (std ~0.01 per dimension), and their raw
dot products would leave every sigmoid at 0.5. New tokens without old pieces, which a combination cannot
start from, get a seeded normal fit to the old rows; new tokens that never occur in the text keep their
uniform starting weights.

Defaults are CPU-sized: 300 Adam steps of 512 (center, context) pairs, window 3, 5 negatives from the
unigram^0.75 distribution, lr 0.1 (cptron's choices; the paper's own sizes were larger). The paper
learns one set of combinations for one embedding matrix; cptron trains the weights on the input
embedding and applies the same weights over the same old tokens to an untied LM head's own rows.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cptron.errors import CptronError
from cptron.vocab.init_methods import subword_pieces
from cptron.vocab.neighbours import nearest, unit_rows
from cptron.vocab.row_plan import RowPlan, empty_plan, gather_rows, set_combination
from cptron.vocab.wordvec_init import PlanInputs

log = logging.getLogger("cptron.vocab")

SCORE_SCALE = 10.0
"""A pair's score is SCORE_SCALE x cosine (see the module docstring)."""


def read_training_text(cfg) -> list[str]:
    """The documents of `cfg.texts` (files or globs; jsonl by `text` field, parquet, or text one line each)."""
    from cptron.data.readers import expand_inputs, read_documents

    try:
        files = expand_inputs(cfg.texts)
    except CptronError as e:
        raise CptronError(f"texts: {e}") from e
    texts = []
    for path in files:
        for _, text, _ in read_documents(path, "auto", "text", "line"):
            if text and text.strip():
                texts.append(text)
    if not texts:
        raise CptronError(f"texts={cfg.texts} hold no non-empty document: expected target-language text")
    log.info("convex: %d documents from %d file(s)", len(texts), len(files))
    return texts


def _candidates(
    pieces: list[list[int]], rows: dict[int, torch.Tensor], keys: torch.Tensor, n: int, progress: bool
) -> list[list[int]]:
    """Per new token: its unique pieces, then the n old rows most similar to the pieces' mean (keys: the
    unit old rows, [n_old, d]); empty for a token without pieces."""
    out: list[list[int]] = [[] for _ in pieces]
    rows_with = [r for r, p in enumerate(pieces) if p]
    if not rows_with:
        return out
    means = torch.stack([torch.stack([rows[i] for i in pieces[r]]).mean(0) for r in rows_with])
    width = n + max(len(set(pieces[r])) for r in rows_with)
    _, near = nearest(means, keys, width, progress=progress, desc="convex: candidate rows")
    for j, r in enumerate(rows_with):
        own = list(dict.fromkeys(pieces[r]))
        taken = set(own)
        out[r] = own + [i for i in near[j].tolist() if i not in taken][:n]
    return out


def _pairs(docs: list[list[int]], n_old: int, n_rows: int, window: int) -> torch.Tensor:
    """(center, context) id pairs whose center is a new token, every context within `window` positions
    in the same document."""
    ids = torch.tensor([t for doc in docs for t in doc], dtype=torch.long)
    doc = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor([len(d) for d in docs]))
    out = []
    for offset in range(1, window + 1):
        same = doc[:-offset] == doc[offset:]
        left, right = ids[:-offset][same], ids[offset:][same]
        out += [torch.stack([left, right], 1), torch.stack([right, left], 1)]
    pairs = torch.cat(out) if out else torch.empty(0, 2, dtype=torch.long)
    return pairs[(pairs[:, 0] >= n_old) & (pairs[:, 0] < n_old + n_rows)]


def convex_plan(cfg, inputs: PlanInputs) -> RowPlan:
    """The learned convex weights of each new token (see the module docstring)."""
    n_old, n_rows = inputs.n_old, inputs.n_tokens
    plan = empty_plan("convex", inputs.tokens)
    pieces = subword_pieces(inputs.old_tokenizer, inputs.tokens[:n_rows], inputs.in_model[:n_rows], n_old)
    texts = read_training_text(cfg)
    docs = [e.ids for e in inputs.new_tokenizer.encode_batch(texts, add_special_tokens=False)]
    with inputs.open_embedding() as (read_rows, _, _):
        keys = torch.cat(
            [unit_rows(read_rows(s, min(s + cfg.chunk_rows, n_old))) for s in range(0, n_old, cfg.chunk_rows)]
        )
        piece_rows = gather_rows(read_rows, [i for p in pieces for i in p], cfg.chunk_rows)
        candidates = _candidates(pieces, piece_rows, keys, cfg.convex_candidates, cfg.progress)
    trainable = [r for r, c in enumerate(candidates) if c]
    if not trainable:
        log.warning("convex: no new token has pieces under the old tokenizer: every new row falls back")
        return plan
    width = max(len(candidates[r]) for r in trainable)
    cand = torch.zeros(n_rows, width, dtype=torch.long)
    mask = torch.zeros(n_rows, width, dtype=torch.bool)
    for r in trainable:
        cand[r, : len(candidates[r])] = torch.tensor(candidates[r])
        mask[r, : len(candidates[r])] = True
    logits = torch.zeros(n_rows, width, requires_grad=True)

    def weights() -> torch.Tensor:
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)

    def vectors(ids: torch.Tensor) -> torch.Tensor:
        """Unit rows of token ids: the frozen old rows, or the new rows' current convex combinations
        (computed once per distinct new token in `ids`)."""
        new = ids >= n_old
        rows, position = torch.unique(ids[new] - n_old, return_inverse=True)
        w = torch.softmax(logits[rows].masked_fill(~mask[rows], float("-inf")), dim=-1)
        combined = unit_rows(torch.einsum("nc,ncd->nd", w, keys[cand[rows]]))
        out = keys[ids.clamp(max=n_old - 1)]
        return out.index_put((new.nonzero(as_tuple=True)[0],), combined[position])

    pairs = _pairs(docs, n_old, n_rows, cfg.convex_window)
    has_row = mask.any(1)  # new tokens without candidates have no row to score: their pairs are left out
    context_ok = (pairs[:, 1] < n_old) | has_row[(pairs[:, 1] - n_old).clamp(0, n_rows - 1)]
    pairs = pairs[context_ok & has_row[pairs[:, 0] - n_old]]
    details = {"pairs": len(pairs), "steps": 0, "loss_first": None, "loss_last": None}
    seen = set(pairs[:, 0].tolist()) if len(pairs) else set()
    if len(pairs):
        counts = torch.bincount(torch.tensor([t for doc in docs for t in doc]), minlength=n_old + n_rows).double()
        counts[n_old + n_rows :] = 0
        usable = counts.clone()
        usable[n_old:][~has_row] = 0
        noise = usable[: n_old + n_rows].pow(0.75)
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.Adam([logits], lr=cfg.convex_lr)
        losses = []
        for _ in tqdm(range(cfg.convex_steps), desc="convex: training weights", unit="step", disable=not cfg.progress):
            batch = pairs[torch.randint(len(pairs), (cfg.convex_batch,), generator=generator)]
            negatives = torch.multinomial(noise, cfg.convex_batch * cfg.convex_negatives, True, generator=generator)
            b = cfg.convex_batch
            rows = vectors(torch.cat([batch[:, 0], batch[:, 1], negatives]))
            center, context, other = rows[:b], rows[b : 2 * b], rows[2 * b :].view(b, cfg.convex_negatives, -1)
            positive = SCORE_SCALE * (center * context).sum(-1)
            negative = SCORE_SCALE * (center[:, None] * other).sum(-1)
            loss = -(F.logsigmoid(positive) + F.logsigmoid(-negative).sum(-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        tail = max(1, len(losses) // 10)
        details.update(
            steps=cfg.convex_steps,
            loss_first=round(sum(losses[:tail]) / tail, 4),
            loss_last=round(sum(losses[-tail:]) / tail, 4),
        )
        log.info("convex: %d pairs, loss %.4f -> %.4f", len(pairs), details["loss_first"], details["loss_last"])
    else:
        log.warning("convex: no new token occurs in the text: the weights stay uniform over the candidates")
    final = weights().detach()
    for r in trainable:
        n = len(candidates[r])
        set_combination(plan, r, cand[r, :n], final[r, :n] / final[r, :n].sum())
    plan.details.update(details, trained_tokens=len(seen), candidates=cfg.convex_candidates)
    return plan
