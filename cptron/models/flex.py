"""FlexAttention for packed documents and sliding windows (`training.attention`: auto or flex).

FlexAttention (Dong et al. 2024, "Flex Attention: A Programming Model for
Generating Optimized Attention Kernels") runs attention over a block-sparse
`BlockMask`: tiles of queries x keys that are fully masked are skipped, fully
visible tiles run without evaluating the mask, and only the remaining tiles
call the element-wise `mask_mod`. For block-diagonal causal attention over
packed documents this skips the cross-document tiles that a boolean SDPA mask
still computes, and no T x T mask is ever built.

`build_block_mask` derives the tile lists directly from the per-token segment
indices (O(B * (T / block)^2) work), instead of evaluating `mask_mod` on every
(query, key) pair as `torch.nn.attention.flex_attention.create_block_mask`
does (that materializes B x T x T tensors unless it is itself compiled).

Which kernel runs (`resolve_attention`): `training.attention=auto`, the default, takes flex
on CUDA when attention is masked and SDPA everywhere else; sdpa and flex force one.

Where the kernel comes from, per device:
- CUDA and other accelerators: `torch.compile(flex_attention)`, compiled once
  per process (lazily) and cached; uncompiled flex attention would fall back to
  a dense implementation. Inside an already compiled block the public function
  is called directly and the surrounding compile handles it.
- CPU: torch 2.13's public `flex_attention` refuses to build a backward on CPU,
  eager or compiled. The model calls torch's flex-attention operator itself
  (`cptron._torch_compat.flex_attention_dense`), whose CPU implementation is
  torch's dense reference (it evaluates `mask_mod` on the full score matrix and
  differentiates through it). That gives the same
  numbers as the GPU kernel, for tests and CPU runs, but it is slower than the
  SDPA mask path (about 9x for a training step at T=1024 on a 2-core machine);
  compiled blocks (`parallel.compile`) cannot use it and are refused at start-up.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from cptron._torch_compat import flex_attention_dense
from cptron.errors import ConfigError

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flex")
# The tile size torch's GPU kernels are tuned for; T need not be a multiple of
# it (the kernels bound the indices they pass to mask_mod by the real length).
DEFAULT_BLOCK_SIZE = 128

_compiled_flex_attention: Optional[Callable] = None
log = logging.getLogger(__name__)


def document_mask_mod(segments: Optional[torch.Tensor], sliding_window: Optional[int]):
    """The element-wise rule: causal, within one segment (when given), and within
    the last `sliding_window` keys (when set). Same rule as
    `cptron.models.llama.build_attention_mask`."""

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx <= q_idx
        if segments is not None:
            allowed = allowed & (segments[b, q_idx] == segments[b, kv_idx])
        if sliding_window is not None:
            allowed = allowed & (q_idx - kv_idx < sliding_window)
        return allowed

    return mask_mod


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile flags [B, 1, nq, nk] -> (count per query tile, key-tile indices with the
    listed ones first in increasing order), the layout BlockMask stores."""
    counts = dense.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


def block_tile_flags(
    T: int,
    device,
    segments: Optional[torch.Tensor] = None,
    sliding_window: Optional[int] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
):
    """(partial, full) flags [B or 1, 1, nq, nk] of the query x key tiles.

    `full` tiles are exactly those whose every pair is allowed and which lie
    wholly inside the sequence (the kernels skip mask_mod there, so this must be
    exact). `partial` tiles hold the other tiles that may contain an allowed
    pair: exact for causal and document masks; with a sliding window as well it
    may list a few tiles with no allowed pair, which only costs their compute.
    `segments` [B, T] must be non-decreasing along the sequence, as
    `positions_and_segments` returns them (a document is a contiguous run).
    """
    n_blocks = (T + block_size - 1) // block_size
    starts = torch.arange(n_blocks, device=device) * block_size
    lasts = torch.clamp(starts + block_size, max=T) - 1  # last index inside each tile
    q_first, q_last = starts[:, None], lasts[:, None]
    k_first, k_last = starts[None, :], lasts[None, :]
    # Over a tile, q - k takes every value in [q_first - k_last, q_last - k_first].
    candidate = q_last >= k_first
    full = (k_last <= q_first) & (starts[:, None] + block_size <= T) & (starts[None, :] + block_size <= T)
    if sliding_window is not None:
        candidate = candidate & (q_first - k_last < sliding_window)
        full = full & (q_last - k_first < sliding_window)
    candidate, full = candidate[None], full[None]
    if segments is not None:
        seg_first, seg_last = segments[:, starts], segments[:, lasts]  # [B, n]
        # Monotone segments: the tiles share a segment iff their ranges overlap,
        # and every pair is in one segment iff both tiles are inside one segment.
        overlap = torch.maximum(seg_first[:, :, None], seg_first[:, None, :]) <= torch.minimum(
            seg_last[:, :, None], seg_last[:, None, :]
        )
        one_segment = seg_first[:, None, :] == seg_last[:, :, None]
        candidate = candidate & overlap
        full = full & one_segment
    return (candidate & ~full)[:, None], full[:, None]


def build_block_mask(
    T: int,
    device,
    segments: Optional[torch.Tensor] = None,
    sliding_window: Optional[int] = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
):
    """The BlockMask of causal attention restricted to segments and/or a sliding
    window, for a batch of B = segments.shape[0] rows (1, broadcast, without
    segments) and any number of heads. One mask serves every layer of a forward."""
    # On use: check_attention_support is where a torch without flex attention is reported.
    from torch.nn.attention.flex_attention import BlockMask

    partial, full = block_tile_flags(T, device, segments, sliding_window, block_size)
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=document_mask_mod(segments, sliding_window),
        seq_lengths=(T, T),
    )


def flex_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the pairs `block_mask` allows; q [B, Hq, T, D],
    k/v [B, Hkv, T, D] with Hq a multiple of Hkv (each k/v head serves its query
    group without being copied)."""
    from torch.nn.attention.flex_attention import flex_attention  # on use: see build_block_mask

    gqa = q.shape[1] != k.shape[1]
    if torch.compiler.is_compiling():  # inside a compiled block: its compile takes the call
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if q.device.type == "cpu":
        # The operator's dense CPU implementation differentiates; the public
        # function refuses CPU backward (see the module docstring). It takes
        # k/v with Hkv heads and shares them across each query group itself.
        return flex_attention_dense(q, k, v, block_mask, 1.0 / math.sqrt(q.shape[-1]))
    return _compiled()(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _compiled() -> Callable:
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention  # on use: see build_block_mask

        # Shapes are fixed within a run (seq_len, micro batch): static shapes
        # give the specialized kernels.
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def attention_is_masked(document_masking: bool, sliding_window: Optional[int], seq_len: int) -> bool:
    """Whether attention needs a mask beyond causal: packed documents, or a window shorter than
    the sequence (`cptron.models.llama.attention_mask_for` returns None otherwise)."""
    return document_masking or (sliding_window is not None and sliding_window < seq_len)


def resolve_attention(attention: str, device_type: str, masked: bool) -> str:
    """The kernel `training.attention` stands for: "auto" is flex on CUDA when attention is
    masked (block-diagonal documents keep a flash-like, tile-skipping kernel instead of SDPA's
    dense boolean-mask path) and sdpa otherwise: plain causal attention runs SDPA's flash
    kernel, and on CPU flex has only a dense reference that is slower than the SDPA mask."""
    if attention != "auto":
        return attention
    return "flex" if device_type == "cuda" and masked else "sdpa"


def choose_attention(attention: str, device: torch.device, masked: bool, compiled: bool = False) -> str:
    """Resolve `training.attention` on `device` and check that the kernel runs there (see
    `check_attention_support`). An explicit choice that cannot run fails at start-up; "auto" falls
    back to sdpa with a warning when flex cannot run, so the default never stops a run."""
    impl = resolve_attention(attention, device.type, masked)
    try:
        check_attention_support(impl, device, compiled=compiled)
    except ConfigError as e:
        if attention != "auto" or impl == "sdpa":
            raise
        log.warning("training.attention=auto: FlexAttention cannot run here, using SDPA with a boolean mask: %s", e)
        return "sdpa"
    return impl


def check_attention_support(attention: str, device: torch.device, compiled: bool = False) -> None:
    """Refuse at start-up a `training.attention` this torch/device cannot run.

    For flex, runs a tiny forward and backward with packed documents and grouped
    heads on `device` and compares it with SDPA, so a platform where FlexAttention
    is missing or broken fails here, naming the option, rather than in step 1."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"training.attention={attention!r} is invalid: expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if attention != "flex":
        return
    prefix = f"training.attention='flex' is invalid on {device.type}"
    if device.type == "cpu" and compiled:
        raise ConfigError(
            f"{prefix} with parallel.compile=true: torch {torch.__version__} cannot compile "
            "flex_attention's backward on CPU; set parallel.compile=false or training.attention=sdpa"
        )
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as e:
        raise ConfigError(
            f"{prefix}: torch {torch.__version__} has no torch.nn.attention.flex_attention "
            f"({e}); use training.attention=sdpa"
        ) from e
    try:
        error = _probe(device)
    except Exception as e:  # any failure of the kernel or its compilation
        raise ConfigError(
            f"{prefix}: a test call of flex_attention failed with {type(e).__name__}: {e}; use training.attention=sdpa"
        ) from e
    # Loose enough for TF32/reduced-precision matmuls on GPUs, tight enough to
    # catch a wrong mask (those differ by O(1)).
    if error > 1e-2:
        raise ConfigError(
            f"{prefix}: a test call of flex_attention differs from SDPA by {error:.3g} "
            "(relative); use training.attention=sdpa"
        )


def _probe(device: torch.device) -> float:
    """Largest difference of outputs and gradients between flex and SDPA on a tiny packed
    batch, relative to the largest reference value (at least 1)."""
    gen = torch.Generator().manual_seed(0)
    T, D = 24, 16
    q = torch.randn(2, 4, T, D, generator=gen).to(device).requires_grad_()
    k = torch.randn(2, 2, T, D, generator=gen).to(device).requires_grad_()
    v = torch.randn(2, 2, T, D, generator=gen).to(device).requires_grad_()
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 21], device=device)
    out = flex_attention_forward(q, k, v, build_block_mask(T, device, segments, sliding_window=8))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    pos = torch.arange(T, device=device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 8)
    mask = mask[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    return max(
        float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1.0))
        for a, b in zip((out, *grads), (ref, *ref_grads))
    )
