"""Factorized embeddings at the Hugging Face boundary: transformers knows only full matrices.

An HF model directory always holds the materialized embedding (and head), P @ B, so transformers
loads it. Beside them, `embedding_factors.safetensors` may hold the factors themselves (written by
`cptron vocab init --method ofa --ofa_output factorized` and by `convert cptron-to-hf`):
`model.embed_tokens.coordinates` [V, r], `model.embed_tokens.basis` [r, H], and for an untied head
`lm_head.coordinates`, `lm_head.basis`, in fp32, with metadata {"rank": "r"}. A cptron model with
`model.embedding_rank` = r reads them when the rank matches and factorizes the HF matrices by
truncated SVD otherwise (`cptron.models.factorized.svd_factorize`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from cptron.errors import ConversionError
from cptron.hf_config import cptron_to_hf_name
from cptron.models.config import ModelConfig
from cptron.models.factorized import reconstruction_error, svd_factorize

log = logging.getLogger(__name__)

FACTORS_FILE = "embedding_factors.safetensors"
"""Beside an HF model's ordinary (materialized) weights: the factors of its embedding and head."""
FACTORS = {
    "tok_embeddings.weight": ("tok_embeddings.coordinates.weight", "tok_embeddings.basis.weight", "model.embed_tokens"),
    "output.weight": ("output.coordinates.weight", "output.basis.weight", "lm_head"),
}
"""Dense cptron name -> (coordinates name, basis name, prefix of both in FACTORS_FILE)."""


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """The same model with full (materialized) embedding and head: the HF side of a factorized one."""
    return dataclasses.replace(cfg, embedding_rank=None, factorize_head=False)


def factorized_matrices(cfg: ModelConfig) -> list[str]:
    """The dense parameter names that `cfg` stores as coordinates and basis (a tied head is the embedding)."""
    names = [] if cfg.embedding_rank is None else ["tok_embeddings.weight"]
    return names + (["output.weight"] if cfg.factorize_head and not cfg.tie_embeddings else [])


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e


def hf_embedding_factors(hf_dir: Path, cfg: ModelConfig, files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """cptron factor name -> full fp32 tensor (coordinates padded with zero rows) for a factorized `cfg`;
    {} when nothing is factorized. `files`: HF tensor name -> safetensors file (`hf.hf_weight_map`).
    From FACTORS_FILE when it holds factors of rank model.embedding_rank, else by truncated SVD of
    the HF matrices (exact when their rank is at most r)."""
    names = factorized_matrices(cfg)
    if not names:
        return {}
    r, out = cfg.embedding_rank, {}
    stored = _read_factor_file(Path(hf_dir) / FACTORS_FILE, r, [FACTORS[n][2] for n in names])
    for dense in names:
        coord_name, basis_name, prefix = FACTORS[dense]
        if stored is not None:
            coords, basis = stored[prefix + ".coordinates"], stored[prefix + ".basis"]
            log.info("%s: %s factors of rank %d read from %s", hf_dir, prefix, r, FACTORS_FILE)
        else:
            hf_name = cptron_to_hf_name(dense)
            if hf_name not in files:
                raise ConversionError(f"{hf_dir}: tensor {hf_name!r} is missing")
            with _open(files[hf_name]) as f:
                matrix = f.get_tensor(hf_name).float()
            coords, basis = svd_factorize(matrix, r)
            error = reconstruction_error(matrix, coords, basis)
            log.info("%s: %s factorized by SVD to rank %d, relative error %.3e", hf_dir, hf_name, r, error)
        want = (cfg.vocab_size, r), (r, cfg.dim)
        if (tuple(coords.shape), tuple(basis.shape)) != want:
            raise ConversionError(
                f"{Path(hf_dir) / FACTORS_FILE}: {prefix} factors have shapes {list(coords.shape)} and "
                f"{list(basis.shape)}, expected {list(want[0])} and {list(want[1])}"
            )
        padded = torch.zeros(cfg.padded_vocab_size, r, dtype=torch.float32)
        padded[: cfg.vocab_size] = coords.float()
        out[coord_name], out[basis_name] = padded, basis.float().contiguous()
    return out


def _read_factor_file(path: Path, rank: int, prefixes: list[str]) -> Optional[dict[str, torch.Tensor]]:
    """The factors in `path` when it exists, has rank `rank` and holds every prefix; else None."""
    if not path.is_file():
        return None
    with _open(path) as f:
        file_rank = (f.metadata() or {}).get("rank")
        keys = {f"{p}.{half}" for p in prefixes for half in ("coordinates", "basis")}
        if file_rank != str(rank) or not keys <= set(f.keys()):
            log.info(
                "%s has rank %s and tensors %s, not the factors of rank %d: factorizing by SVD instead",
                path,
                file_rank,
                sorted(f.keys()),
                rank,
            )
            return None
        return {k: f.get_tensor(k) for k in keys}


def materialize(state: dict[str, torch.Tensor], dense: str, vocab_size: int, factors: dict) -> torch.Tensor:
    """P @ B (in fp32, cast back to the stored dtype) from the loaded factors in `state`, which move to
    `factors` under their FACTORS_FILE names (fp32, real rows only)."""
    coord_name, basis_name, prefix = FACTORS[dense]
    coords, basis = state.pop(coord_name), state.pop(basis_name)
    factors[prefix + ".coordinates"] = coords[:vocab_size].float().contiguous()
    factors[prefix + ".basis"] = basis.float().contiguous()
    return (coords.float() @ basis.float()).to(coords.dtype)
