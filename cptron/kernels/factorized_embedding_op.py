"""The fused factorized-embedding lookup as `torch.library` custom ops, with the CUDA kernels of csrc/.

    cptron::factorized_embedding_fwd(ids, coordinates, basis, vocab_start, deterministic) -> out
    cptron::factorized_embedding_bwd(grad_out, ids, coordinates, basis, vocab_start, deterministic)
        -> (grad_coordinates, grad_basis)

out[n] = P[ids[n] - vocab_start] @ B for the ids this shard owns ([vocab_start, vocab_start + V)) and
zero rows for the rest, which therefore also give no gradient: summed over the shards of a
vocabulary-parallel layout, the outputs and basis gradients are those of the unsharded lookup
(OFA's factorization W = P @ B; Liu et al., 2023). `deterministic` selects the backward's reduction
of repeated ids: sort by id and reduce each run of equal ids in a fixed order (reproducible bit for
bit), or add every token's row with atomics (the order of additions varies on a GPU). The forward
ignores it; it is an argument so that the autograd formula can pass it on.

Each op has a fake implementation (torch.compile traces through it), an autograd formula, a CPU
implementation that is the pure-PyTorch math of both modes (what the CPU tests check, and what the
kernels must match) and a CUDA implementation from the compiled extension. The extension is found
in this order: the module setup.py built, else a JIT build of csrc/ (torch.utils.cpp_extension.load,
GPU machines with nvcc and a CUDA build of torch), else none, and callers use the reference.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import Tensor

from cptron.kernels import build

log = logging.getLogger(__name__)

MAX_RANK = 1024
"""The largest r the CUDA backward takes (its fp32 rows live in shared memory; kFeMaxRank in csrc)."""

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _owned_rows(ids: Tensor, vocab_start: int, num_rows: int) -> tuple[Tensor, Tensor]:
    """(local row of each token, clamped into range; whether this shard owns the token)."""
    local = ids.reshape(-1).long() - vocab_start
    owned = (local >= 0) & (local < num_rows)
    return local.clamp(0, max(num_rows - 1, 0)), owned


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # The kernels accumulate in fp32 whatever the input dtype; float64 stays float64 for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("cptron::factorized_embedding_fwd", mutates_args=(), device_types="cpu")
def factorized_embedding_fwd(
    ids: Tensor, coordinates: Tensor, basis: Tensor, vocab_start: int, deterministic: bool
) -> Tensor:
    """P[ids - vocab_start] @ B with zero rows for ids outside this shard; [..., H]."""
    acc = _accumulation_dtype(coordinates.dtype)
    rows, owned = _owned_rows(ids, vocab_start, coordinates.shape[0])
    gathered = coordinates.index_select(0, rows).to(acc) * owned.unsqueeze(1)
    out = (gathered @ basis.to(acc)).to(coordinates.dtype)
    return out.reshape(*ids.shape, basis.shape[1])


@torch.library.custom_op("cptron::factorized_embedding_bwd", mutates_args=(), device_types="cpu")
def factorized_embedding_bwd(
    grad_out: Tensor, ids: Tensor, coordinates: Tensor, basis: Tensor, vocab_start: int, deterministic: bool
) -> tuple[Tensor, Tensor]:
    """(dP, dB): dP[i] = sum over tokens owned with row i of dOut B^T, dB = P[ids]^T dOut over owned tokens."""
    acc = _accumulation_dtype(coordinates.dtype)
    v, r = coordinates.shape
    h = basis.shape[1]
    rows, owned = _owned_rows(ids, vocab_start, v)
    dout = grad_out.reshape(-1, h).to(acc)
    basis_acc = basis.to(acc)
    gathered = coordinates.index_select(0, rows).to(acc) * owned.unsqueeze(1)
    grad_basis = (gathered.T @ dout).to(basis.dtype)
    grad_coords = torch.zeros(v, r, dtype=acc)
    if deterministic:
        # As the kernel does it: sort by id, sum each run of equal ids in token order, project once.
        keys = torch.where(owned, rows, torch.full_like(rows, v))
        sorted_keys, order = torch.sort(keys, stable=True)
        ids_run, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
        run = torch.repeat_interleave(torch.arange(len(ids_run)), counts)
        sums = torch.zeros(len(ids_run), h, dtype=acc).index_add_(0, run, dout[order])
        kept = ids_run < v
        grad_coords[ids_run[kept]] = sums[kept] @ basis_acc.T
    else:
        grad_coords.index_add_(0, rows[owned], dout[owned] @ basis_acc.T)
    return grad_coords.to(coordinates.dtype), grad_basis


@factorized_embedding_fwd.register_fake
def _fwd_fake(ids, coordinates, basis, vocab_start, deterministic):
    return coordinates.new_empty((*ids.shape, basis.shape[1]))


@factorized_embedding_bwd.register_fake
def _bwd_fake(grad_out, ids, coordinates, basis, vocab_start, deterministic):
    return coordinates.new_empty(coordinates.shape), basis.new_empty(basis.shape)


def _setup_context(ctx, inputs, output):
    ids, coordinates, basis, vocab_start, deterministic = inputs
    ctx.save_for_backward(ids, coordinates, basis)
    ctx.vocab_start, ctx.deterministic = vocab_start, deterministic


def _backward(ctx, grad_out):
    ids, coordinates, basis = ctx.saved_tensors
    grad_coords, grad_basis = factorized_embedding_bwd(
        grad_out, ids, coordinates, basis, ctx.vocab_start, ctx.deterministic
    )
    needs = ctx.needs_input_grad
    return None, grad_coords if needs[1] else None, grad_basis if needs[2] else None, None, None


factorized_embedding_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- CUDA


@functools.cache
def load_extension() -> tuple[ModuleType | None, str]:
    """(the compiled extension or None, how it was found or why not). Runs once per process."""
    try:
        from cptron.kernels import _factorized_embedding_cuda as ext  # built by setup.py

        return ext, "built extension"
    except ImportError:
        pass
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return None, "extension not built and no CUDA toolkit for a JIT build"
    missing = [name for name in build.BINDING_SOURCES + build.KERNEL_SOURCES if not (build.CSRC / name).exists()]
    if missing:
        return None, f"extension not built and {build.CSRC / missing[0]} is missing for a JIT build"
    log.info("factorized embedding: JIT-building the CUDA extension from %s (once per machine; cached)", build.CSRC)
    try:
        ext = cpp_extension.load(
            name=build.JIT_NAME,
            sources=build.sources(),
            extra_cflags=build.CXX_FLAGS,
            extra_cuda_cflags=build.NVCC_FLAGS,
            verbose=False,
        )
    except Exception as err:  # a failed build falls back to the reference; the reason is logged once
        return None, f"JIT build failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    return ext, "JIT build"


def _extension() -> ModuleType:
    ext, how = load_extension()
    if ext is None:
        raise RuntimeError(f"cptron::factorized_embedding has no CUDA implementation here: {how}")
    return ext


@factorized_embedding_fwd.register_kernel("cuda")
def _fwd_cuda(ids, coordinates, basis, vocab_start, deterministic):
    return _extension().forward(ids, coordinates, basis, vocab_start)


@factorized_embedding_bwd.register_kernel("cuda")
def _bwd_cuda(grad_out, ids, coordinates, basis, vocab_start, deterministic):
    grad_coords, grad_basis = _extension().backward(grad_out, ids, coordinates, basis, vocab_start, deterministic)
    return grad_coords, grad_basis


def factorized_embedding_fused(
    ids: Tensor, coordinates: Tensor, basis: Tensor, vocab_start: int = 0, deterministic: bool = True
) -> Tensor:
    """The op with autograd: P[ids - vocab_start] @ B, zero rows for ids outside this shard."""
    return factorized_embedding_fwd(ids, coordinates, basis, vocab_start, deterministic)


def kernel_unsupported(coordinates: Tensor, basis: Tensor) -> str | None:
    """Why the CUDA kernel cannot take these tensors, or None when it can."""
    if coordinates.dtype not in KERNEL_DTYPES or basis.dtype != coordinates.dtype:
        return f"dtype {coordinates.dtype}/{basis.dtype} (the kernel takes one of float32, bfloat16, float16)"
    if coordinates.shape[1] > MAX_RANK:
        return f"rank {coordinates.shape[1]} > {MAX_RANK}"
    if torch.cuda.get_device_capability(coordinates.device)[0] < 8:
        return "a GPU older than compute capability 8.0"
    return None
