"""Factorized (low-rank) input embedding and LM head: W = P @ B, as OFA stores embeddings.

OFA (Liu et al., 2023, "OFA: A Framework of Initializing Unseen Subword Embeddings for Efficient
Large-scale Multilingual Continued Pretraining") keeps an embedding matrix W (V x H) as token
coordinates P (V x r) in a shared primitive basis B (r x H). The reference factorizes encoders with
tied embeddings (XLM-R); cptron also factorizes an untied decoder head on its own
(`model.factorize_head`), where logits = (h B^T) P^T, and a tied model shares P and B.

Parameter names (checkpoint keys): `tok_embeddings.coordinates.weight` [V, r],
`tok_embeddings.basis.weight` [r, H], and for a factorized head `output.basis.weight` [r, H],
`output.coordinates.weight` [V, r]. Each half is its own submodule so that a tensor-parallel plan,
applied from outside (cptron.parallel), can shard the coordinates by vocabulary and reduce the
r-wide rows between the halves instead of H-wide embeddings.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from cptron.kernels.factorized_embedding import factorized_embedding
from cptron.models.config import ModelConfig

log = logging.getLogger(__name__)


class Basis(nn.Module):
    """The shared basis B [r, H]: maps r-dim coordinates to H-dim embeddings (x @ B)."""

    def __init__(self, rank: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class FactorizedEmbedding(nn.Module):
    """Input embedding P[ids] @ B through `cptron.kernels.factorized_embedding`.

    `vocab_parallel` is set by a tensor-parallel plan: the lookup then runs as its two halves,
    `coordinates` (a vocabulary-sharded gather whose r-wide rows the plan reduces) and `basis`."""

    def __init__(self, num_embeddings: int, rank: int, dim: int):
        super().__init__()
        self.coordinates = nn.Embedding(num_embeddings, rank)
        self.basis = Basis(rank, dim)
        self.vocab_parallel = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.vocab_parallel:
            return self.basis(self.coordinates(ids))
        return factorized_embedding(ids, self.coordinates.weight, self.basis.weight)


class FactorizedHead(nn.Module):
    """LM head (h B^T) P^T: a projection onto the basis, then scores against every token's coordinates."""

    def __init__(self, dim: int, rank: int, num_embeddings: int):
        super().__init__()
        self.basis = nn.Linear(dim, rank, bias=False)  # weight [r, H] = B
        self.coordinates = nn.Linear(rank, num_embeddings, bias=False)  # weight [V, r] = P

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.coordinates(self.basis(h))


def build_embedding(cfg: ModelConfig) -> nn.Module:
    if cfg.embedding_rank is None:
        return nn.Embedding(cfg.padded_vocab_size, cfg.dim)
    return FactorizedEmbedding(cfg.padded_vocab_size, cfg.embedding_rank, cfg.dim)


def build_head(cfg: ModelConfig) -> nn.Module:
    if cfg.factorize_head:
        return FactorizedHead(cfg.dim, cfg.embedding_rank, cfg.padded_vocab_size)
    return nn.Linear(cfg.dim, cfg.padded_vocab_size, bias=False)


def tied_parameters(cfg: ModelConfig) -> dict[str, str]:
    """Head parameter name -> the embedding parameter it is (empty when untied)."""
    if not cfg.tie_embeddings:
        return {}
    if cfg.embedding_rank is None:
        return {"output.weight": "tok_embeddings.weight"}
    return {f"output.{half}.weight": f"tok_embeddings.{half}.weight" for half in ("coordinates", "basis")}


def vocab_row_parameters(cfg: ModelConfig) -> tuple[str, ...]:
    """Parameters whose rows are token ids (padded rows stay zero)."""
    emb = "tok_embeddings.weight" if cfg.embedding_rank is None else "tok_embeddings.coordinates.weight"
    head = "output.coordinates.weight" if cfg.factorize_head else "output.weight"
    return (emb, head)


def basis_parameters(cfg: ModelConfig) -> tuple[str, ...]:
    out = () if cfg.embedding_rank is None else ("tok_embeddings.basis.weight",)
    return out + (("output.basis.weight",) if cfg.factorize_head else ())


def tie(model: nn.Module, cfg: ModelConfig) -> None:
    """Make each tied head parameter the embedding's parameter object (after construction or a conversion)."""
    if model.output is None or model.tok_embeddings is None:
        return
    for head, emb in tied_parameters(cfg).items():
        owner, _, leaf = head.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(emb))


@torch.no_grad()
def svd_factorize(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [V, rank], B [rank, H]) with P @ B the best rank-`rank` approximation of `matrix` (Eckart-Young).

    Truncated SVD in float64 (exact up to rounding when rank(matrix) <= rank): P = U_r diag(S_r) and
    B = V_r^T, so the basis rows are orthonormal, as OFA's primitive embeddings are. Returned in fp32."""
    v, h = matrix.shape
    if not 1 <= rank <= min(v, h):
        raise ValueError(f"rank={rank} is invalid for a {v} x {h} matrix: expected 1 <= rank <= {min(v, h)}")
    log.info("factorizing a %d x %d embedding matrix by SVD to rank %d (float64)", v, h, rank)
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float().contiguous()


def reconstruction_error(matrix: torch.Tensor, coordinates: torch.Tensor, basis: torch.Tensor) -> float:
    """Relative Frobenius error |W - P B| / |W|."""
    w = matrix.double()
    return ((w - coordinates.double() @ basis.double()).norm() / w.norm().clamp_min(1e-30)).item()


def describe_parameters(cfg: ModelConfig) -> str:
    """Parameter counts for the logs: the total, and the embedding and head, factorized vs full."""
    emb, head = cfg.embedding_params()
    full_emb, full_head = dataclasses.replace(cfg, embedding_rank=None, factorize_head=False).embedding_params()
    text = f"{cfg.num_params():,} parameters"
    if cfg.embedding_rank is None:
        return f"{text} (embedding {emb:,}, head {head:,})"
    return (
        f"{text} (embedding factorized at rank {cfg.embedding_rank}: {emb:,} instead of {full_emb:,}; head "
        + (f"factorized: {head:,} instead of {full_head:,}" if cfg.factorize_head and head else f"{head:,}")
        + (", tied" if cfg.tie_embeddings else "")
        + f"; {full_emb + full_head - emb - head:,} fewer in all)"
    )
