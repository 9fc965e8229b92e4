"""The factorized embedding lookup: rows of coordinates P (V x r) times the shared basis B (r x H).

OFA (Liu et al., 2023, "OFA: A Framework of Initializing Unseen Subword Embeddings for Efficient
Large-scale Multilingual Continued Pretraining") stores an embedding matrix as W = P @ B. The lookup
of ids then is P[ids] @ B, which never builds the V x H matrix.

`factorized_embedding` is the one entry point the model calls. It dispatches to an implementation:
the fused CUDA kernel of csrc/ (`cptron.kernels.factorized_embedding_op`: a gather fused with the
matmul, and a backward that reduces repeated ids without materializing [tokens, r]) when the tensors
are on CUDA and the extension is built or JIT-builds, else the pure-PyTorch reference
(`factorized_embedding_reference`), which every implementation must match. The environment
variable CPTRON_FACTORIZED_KERNEL picks: `auto` (the default: the kernel where it runs, with its
deterministic backward), `atomic` (the kernel with its atomic backward) or `reference`. The log
says once which path runs.

Under tensor parallelism the model does not call this function: its plan splits the lookup into a
vocabulary-parallel gather of r-wide rows, their reduction across ranks, and the replicated
projection by B (see `cptron.models.factorized.FactorizedEmbedding`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cptron.errors import require
from cptron.kernels.factorized_embedding_op import factorized_embedding_fused, kernel_unsupported, load_extension

log = logging.getLogger(__name__)

KERNEL_ENV = "CPTRON_FACTORIZED_KERNEL"
KERNEL_CHOICES = ("auto", "atomic", "reference")
_announced: set[str] = set()  # the paths already logged: each is logged once per process

Implementation = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def factorized_embedding_reference(ids: torch.Tensor, coordinates: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P[ids] @ B in plain PyTorch: ids [...] (int), coordinates [V, r], basis [r, H] -> [..., H]."""
    return F.embedding(ids, coordinates) @ basis


def _announce(path: str) -> None:
    if path not in _announced and not torch.compiler.is_compiling():
        _announced.add(path)
        log.info("factorized embedding lookup: %s", path)


def _select_implementation(ids: torch.Tensor, coordinates: torch.Tensor, basis: torch.Tensor) -> Implementation:
    choice = os.environ.get(KERNEL_ENV, "auto")
    require(choice in KERNEL_CHOICES, KERNEL_ENV, choice, f"one of {', '.join(KERNEL_CHOICES)}")
    if not coordinates.is_cuda:
        _announce(f"PyTorch reference (F.embedding + matmul) on {coordinates.device.type}")
        return factorized_embedding_reference
    if choice == "reference":
        _announce(f"PyTorch reference (F.embedding + matmul), as {KERNEL_ENV}=reference asks")
        return factorized_embedding_reference
    ext, how = load_extension()
    why_not = f"the CUDA kernel is unavailable: {how}" if ext is None else kernel_unsupported(coordinates, basis)
    if why_not is not None:
        _announce(f"PyTorch reference (F.embedding + matmul); {why_not}")
        return factorized_embedding_reference
    deterministic = choice == "auto"
    mode = "deterministic (sort by id, segmented reduction)" if deterministic else "atomic"
    _announce(
        f"fused CUDA kernel from the {how}, {mode} backward, dtype {str(coordinates.dtype).removeprefix('torch.')}"
    )
    return functools.partial(factorized_embedding_fused, deterministic=deterministic)


def factorized_embedding(ids: torch.Tensor, coordinates: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Embeddings of `ids` under W = coordinates @ basis, without building W. Differentiable in
    coordinates and basis."""
    if coordinates.shape[-1] != basis.shape[0]:
        raise ValueError(
            f"coordinates {list(coordinates.shape)} and basis {list(basis.shape)} do not chain: "
            "expected coordinates [V, r] and basis [r, H]"
        )
    return _select_implementation(ids, coordinates, basis)(ids, coordinates, basis)
