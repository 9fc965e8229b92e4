"""Random initialization that draws only this rank's shard of each parameter, the same in any layout.

A parameter is viewed as a 2-D matrix (rows = dim 0, columns = the other dims flattened) and cut into
fixed tiles of `TILE_ELEMENTS` values, `TILE_COLS` columns wide (narrower matrices: their full width).
Each tile draws from its own CPU generator seeded by (seed, stream name, tile row, tile column), so a
rank that holds a block of the matrix (FSDP2 Shard(0), even or uneven; tensor-parallel Shard(0) or
Shard(1); both at once on a 2-D mesh; a pipeline stage) draws only the tiles its block overlaps, and
every layout sees the same values. The tile grid depends on the global shape alone.

Why tiles and not one generator per parameter: torch's generators cannot jump ahead, so a per-parameter
stream forces every rank to draw every full tensor (a 128k x 4096 fp32 embedding is 2 GB on each rank).
Why this tile size: with 16k values (64 x 256 for wide matrices) the fixed cost of a tile (seeding a
generator, slicing: about 20 us of Python) is paid back by drawing into cache-sized blocks (a 4096 x 4096
matrix fills in 0.7-1.1x the time of one normal_ over it, one thread), and the shards of common layouts
(4096 columns split up to 16 ways, 14336 up to 8; row blocks of multiples of 64 rows) fall on tile
boundaries, so a rank rarely draws a value it does not keep. The values come from CPU generators on every
device, so CPU and GPU runs initialize alike.

The per-parameter conventions (`param_init`): norms start at one, biases at zero, matrices at
N(0, init_std); the residual output projections (wo, w2) at init_std / sqrt(2 n_layers) (the GPT-2
depth scaling, Radford et al. 2019); a factorized basis at 1/sqrt(r), so that coordinates @ basis has
entries of std init_std as a full embedding would (cptron.models.factorized); padded vocabulary rows at
zero. A tied head draws the stream of the embedding it is, so a last pipeline stage holding only the
head matches the first stage's embedding.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch

from cptron.models import factorized
from cptron.models.config import ModelConfig

log = logging.getLogger(__name__)

TILE_ELEMENTS = 16384
TILE_COLS = 256


@dataclass(frozen=True)
class ParamInit:
    """How one parameter starts."""

    fill: str
    """'normal', 'ones' or 'zeros'."""
    std: float = 0.0
    """Standard deviation of a 'normal' fill."""
    stream: str = ""
    """The name whose random values it takes (a tied head takes its embedding's)."""
    real_rows: Optional[int] = None
    """Rows from this one on are vocabulary padding and stay zero (None: no padding)."""


@dataclass
class InitStats:
    """What one initialization drew on this rank: the overhead of the tiles, measurable in tests."""

    local_elements: int = 0
    """Values this rank holds in its random (normal) parameters."""
    drawn_elements: int = 0
    """Random values it drew for them (>= local_elements: tiles that overhang the shard)."""
    largest_draw: int = 0
    """The most values drawn at once (one tile, or a full tensor on the full-tensor path)."""

    def add(self, local: int, drawn: int, largest: int) -> None:
        self.local_elements += local
        self.drawn_elements += drawn
        self.largest_draw = max(self.largest_draw, largest)


def param_init(cfg: ModelConfig, name: str) -> ParamInit:
    """The initialization of the parameter with checkpoint key `name`."""
    if name.endswith("norm.weight"):
        return ParamInit("ones")
    if name.endswith(".bias"):
        return ParamInit("zeros")
    stream = factorized.tied_parameters(cfg).get(name, name)
    depth_scaled = name.rsplit(".", 2)[-2] in ("wo", "w2")
    std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if depth_scaled else cfg.init_std
    if stream in factorized.basis_parameters(cfg):
        std = 1.0 / math.sqrt(cfg.embedding_rank)
    real_rows = cfg.vocab_size if stream in factorized.vocab_row_parameters(cfg) else None
    return ParamInit("normal", std, stream, real_rows)


@torch.no_grad()
def initialize_parameters(
    params: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, seed: int, full_tensors: bool = False
) -> InitStats:
    """Initialize (checkpoint key, parameter) pairs, plain tensors or DTensors, from `seed`.

    Each rank writes only its local shard. `full_tensors=True` is the former scheme, kept as the
    baseline of benchmarks/init_time.py: one generator per parameter, every rank drawing the whole
    tensor and keeping its slice (other values than the tiles, and full-size memory per rank)."""
    from cptron.distributed import local_shard_region  # lazily: it imports torch.distributed.tensor

    params = list(params)
    method = "full tensors on every rank" if full_tensors else f"local tiles of {TILE_ELEMENTS} values"
    log.info("initializing %d parameter tensors from seed %d: %s", len(params), seed, method)
    start, stats = time.perf_counter(), InitStats()
    for name, p in params:
        spec = param_init(cfg, name)
        local, region = local_shard_region(p)
        if spec.fill != "normal" or local.numel() == 0:
            local.fill_(1.0 if spec.fill == "ones" else 0.0)
            continue
        if full_tensors:
            drawn = _draw_full(tuple(p.shape), region, spec, _stream_seed(seed, spec.stream))
            local.copy_(drawn)
            stats.add(local.numel(), p.numel(), p.numel())
            continue
        real = region[0].stop if spec.real_rows is None else min(region[0].stop, spec.real_rows)
        keep = max(0, real - region[0].start)  # rows of this shard that are real tokens
        local[keep:].zero_()
        if keep:
            rows = slice(region[0].start, region[0].start + keep)
            drawn = draw_normal_region(tuple(p.shape), (rows, *region[1:]), spec.std, seed, spec.stream, local[:keep])
            stats.add(local[:keep].numel(), drawn, min(TILE_ELEMENTS, p.numel()))
    log.info(
        "initialized in %.1f s: drew %d random values for %d local ones (%.3fx)",
        time.perf_counter() - start,
        stats.drawn_elements,
        stats.local_elements,
        stats.drawn_elements / max(1, stats.local_elements),
    )
    return stats


def tile_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of the tiles of a parameter of global `shape` (in its 2-D view)."""
    cols = min(_view_cols(shape), TILE_COLS)
    return max(1, TILE_ELEMENTS // cols), cols


def draw_normal_region(
    shape: tuple[int, ...], region: tuple[slice, ...], std: float, seed: int, stream: str, out: torch.Tensor
) -> int:
    """Write the block `region` of the tiled N(0, std) tensor of global `shape` into `out` (the block's
    shape, any dtype or device); returns how many values were drawn. Only overlapping tiles are drawn."""
    if len(shape) > 2 and any((s.start, s.stop) != (0, n) for s, n in zip(region[1:], shape[1:], strict=True)):
        # A block of a >2-D tensor sharded past dim 0 is not a block of the 2-D view: draw whole rows.
        rows = torch.empty((region[0].stop - region[0].start, *shape[1:]), dtype=torch.float32)
        drawn = draw_normal_region(shape, (region[0], *(slice(0, n) for n in shape[1:])), std, seed, stream, rows)
        out.copy_(rows[(slice(None), *region[1:])])
        return drawn
    n_rows, n_cols = (shape[0] if shape else 1), _view_cols(shape)
    r0, r1 = (region[0].start, region[0].stop) if shape else (0, 1)
    c0, c1 = (region[1].start, region[1].stop) if len(shape) == 2 else (0, n_cols)
    tr, tc = tile_shape(shape)
    # Tiles go straight into a contiguous CPU block; other blocks fill through a CPU copy of each band
    # of tile rows (a device tensor), or of the whole block (a strided one, which no view can reach).
    staging = None if out.is_contiguous() else torch.empty(out.shape, dtype=torch.float32)
    target = (out if staging is None else staging).view(r1 - r0, c1 - c0)
    direct = _fills_in_place(target)
    drawn = 0
    for i in range(r0 // tr, -(-r1 // tr)):
        lo, hi = max(r0, i * tr), min(r1, (i + 1) * tr)
        band = target[lo - r0 : hi - r0] if direct else torch.empty((hi - lo, c1 - c0), dtype=torch.float32)
        for j in range(c0 // tc, -(-c1 // tc)):
            tile = torch.empty((min(tr, n_rows - i * tr), min(tc, n_cols - j * tc)), dtype=torch.float32)
            tile.normal_(0.0, std, generator=torch.Generator().manual_seed(_stream_seed(seed, stream, i, j)))
            drawn += tile.numel()
            left, right = max(c0, j * tc), min(c1, (j + 1) * tc)
            band[:, left - c0 : right - c0].copy_(tile[lo - i * tr : hi - i * tr, left - j * tc : right - j * tc])
        if not direct:
            target[lo - r0 : hi - r0].copy_(band)
    if staging is not None:
        out.copy_(staging)
    return drawn


def _draw_full(shape: tuple[int, ...], region: tuple[slice, ...], spec: ParamInit, stream_seed: int) -> torch.Tensor:
    full = torch.empty(shape, dtype=torch.float32).normal_(
        0.0, spec.std, generator=torch.Generator().manual_seed(stream_seed)
    )
    if spec.real_rows is not None:
        full[spec.real_rows :] = 0.0
    return full[region]


def _fills_in_place(t: torch.Tensor) -> bool:
    """Whether CPU tiles can be copied into `t` directly (a separate function: tests take the other path)."""
    return t.device.type == "cpu"


def _view_cols(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _stream_seed(seed: int, stream: str, *tile: int) -> int:
    key = ":".join(str(x) for x in (seed, stream, *tile))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)
