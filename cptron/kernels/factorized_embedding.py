"""The factorized embedding lookup: rows of coordinates P (V x r) times the shared basis B (r x H).

OFA (Liu et al., 2023, "OFA: A Framework of Initializing Unseen Subword Embeddings for Efficient
Large-scale Multilingual Continued Pretraining") stores an embedding matrix as W = P @ B. The lookup
of ids then is P[ids] @ B, which never builds the V x H matrix.

`factorized_embedding` is the one entry point the model calls. It dispatches to an implementation;
today that is the pure-PyTorch reference (`factorized_embedding_reference`), which every other
implementation must match. The CUDA kernel of the kernel issue (a gather fused with the matmul,
and a backward that scatters into P's gradient without materializing [tokens, r] twice) plugs in
at `_select_implementation`.

Under tensor parallelism the model does not call this function: its plan splits the lookup into a
vocabulary-parallel gather of r-wide rows, their reduction across ranks, and the replicated
projection by B (see `cptron.models.factorized.FactorizedEmbedding`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Implementation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def factorized_embedding_reference(ids: torch.Tensor, coordinates: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P[ids] @ B in plain PyTorch: ids [...] (int), coordinates [V, r], basis [r, H] -> [..., H]."""
    return F.embedding(ids, coordinates) @ basis


def _select_implementation(ids: torch.Tensor, coordinates: torch.Tensor, basis: torch.Tensor) -> Implementation:
    # The dispatch point for custom kernels (CUDA, later): choose by device, dtype and shapes here.
    return factorized_embedding_reference


def factorized_embedding(ids: torch.Tensor, coordinates: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Embeddings of `ids` under W = coordinates @ basis, without building W. Differentiable in
    coordinates and basis."""
    if coordinates.shape[-1] != basis.shape[0]:
        raise ValueError(
            f"coordinates {list(coordinates.shape)} and basis {list(basis.shape)} do not chain: "
            "expected coordinates [V, r] and basis [r, H]"
        )
    return _select_implementation(ids, coordinates, basis)(ids, coordinates, basis)
