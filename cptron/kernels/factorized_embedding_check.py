"""Correctness cases for the fused factorized-embedding kernel against a float64 reference.

Shared by the gpu-marked tests (tests/unit/test_factorized_kernel_gpu.py) and the GPU script
(benchmarks/gpu_kernel.py), so both check the same things: sizes that are not multiples of any tile,
every dtype, vocabulary shards (ids outside the shard), many repeated ids, an empty batch, both
backward modes. Errors are relative Frobenius norms, ||x - ref|| / ||ref||, against the CPU op in
float64 on the same (rounded) inputs; outputs land in memory first poisoned with NaN, so an element
the kernel fails to write shows up as NaN (which never passes).
"""

from __future__ import annotations

import dataclasses

import torch

from cptron.kernels.factorized_embedding_op import factorized_embedding_bwd, factorized_embedding_fwd

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
"""Largest accepted relative error per dtype: fp32 arithmetic with fp32 accumulation; one rounding of
each output (and of the summed gradient rows) to 8 or 11 mantissa bits."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One check: a shard [vocab_start, vocab_start + v_local) of a vocabulary of vocab tokens."""

    name: str
    tokens: int
    vocab: int
    rank: int
    hidden: int
    vocab_start: int = 0
    v_local: int | None = None
    distinct: int | None = None
    """Draw ids from this many distinct values (many repeats) instead of the whole vocabulary."""

    @property
    def rows(self) -> int:
        return self.vocab if self.v_local is None else self.v_local


CASES = (
    Case("odd sizes", tokens=1000, vocab=777, rank=100, hidden=333),
    Case("rank 400, tiny batch", tokens=3, vocab=5000, rank=400, hidden=4100),
    Case("vocab shard 2 of 3", tokens=1500, vocab=3000, rank=72, hidden=520, vocab_start=1000, v_local=1000),
    Case("last, uneven shard", tokens=999, vocab=3001, rank=200, hidden=130, vocab_start=2000, v_local=1001),
    Case("many repeated ids", tokens=4097, vocab=50000, rank=128, hidden=1000, distinct=7),
    Case("one id only", tokens=300, vocab=100, rank=24, hidden=96, distinct=1),
    Case("empty batch", tokens=0, vocab=100, rank=24, hidden=96),
)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (inf when x holds a NaN or inf; 0 for two empty tensors)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _poison(device: torch.device, nbytes: int) -> None:
    """Fill a block of the next output's size with 0xFF bytes (NaN in fp32, bf16 and fp16) and free it:
    the caching allocator hands that block to the output, so unwritten elements read NaN."""
    if device.type == "cuda" and nbytes > 0:
        torch.full((nbytes,), 255, dtype=torch.uint8, device=device)


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int):
    """Fresh random (ids, P, B, dOut) on `device`; ids span the whole vocabulary, so a shard misses some."""
    g = torch.Generator().manual_seed(seed)
    if case.distinct is None:
        ids = torch.randint(0, case.vocab, (case.tokens,), generator=g)
    else:
        values = torch.randperm(case.vocab, generator=g)[: case.distinct]
        if case.v_local is None:
            values = values % case.rows
        ids = values[torch.randint(0, case.distinct, (case.tokens,), generator=g)]
    coords = torch.randn(case.rows, case.rank, generator=g).to(dtype)
    basis = (torch.randn(case.rank, case.hidden, generator=g) / case.rank**0.5).to(dtype)
    dout = torch.randn(case.tokens, case.hidden, generator=g).to(dtype)
    return tuple(t.to(device) for t in (ids, coords, basis, dout))


def check_case(case: Case, dtype: torch.dtype, deterministic: bool, device: torch.device, seed: int = 0) -> dict:
    """Run the op on `device` and the CPU float64 op; return the relative errors and whether they pass."""
    ids, coords, basis, dout = make_inputs(case, dtype, device, seed)
    _poison(device, ids.numel() * case.hidden * coords.element_size())
    out = factorized_embedding_fwd(ids, coords, basis, case.vocab_start, deterministic)
    _poison(device, case.rank * case.hidden * coords.element_size())  # dB; dP starts from zeros by design
    grad_coords, grad_basis = factorized_embedding_bwd(dout, ids, coords, basis, case.vocab_start, deterministic)
    cpu = [t.cpu().double() if t.is_floating_point() else t.cpu() for t in (ids, coords, basis, dout)]
    ref_out = factorized_embedding_fwd(cpu[0], cpu[1], cpu[2], case.vocab_start, deterministic)
    ref_dp, ref_db = factorized_embedding_bwd(cpu[3], cpu[0], cpu[1], cpu[2], case.vocab_start, deterministic)
    errors = {
        "out": relative_error(out, ref_out),
        "dP": relative_error(grad_coords, ref_dp),
        "dB": relative_error(grad_basis, ref_db),
    }
    shapes_ok = out.shape == ref_out.shape and grad_coords.shape == ref_dp.shape and grad_basis.shape == ref_db.shape
    ok = shapes_ok and all(err <= TOLERANCE[dtype] for err in errors.values())
    return {
        "case": case.name,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "deterministic": deterministic,
        **errors,
        "ok": ok,
    }


def check_all(device: torch.device, seed: int = 0, dtypes=tuple(TOLERANCE)) -> list[dict]:
    """Every case x dtype x backward mode, with fresh inputs for each (the seed moves on)."""
    results = []
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # dB goes through cuBLAS: keep fp32 in fp32
    try:
        for dtype in dtypes:
            for deterministic in (True, False):
                for case in CASES:
                    seed += 1
                    results.append(check_case(case, dtype, deterministic, device, seed))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return results


def repeatable(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the deterministic backward gives bit-identical gradients on two runs (many repeated ids)."""
    case = Case("repeat", tokens=8192, vocab=50000, rank=200, hidden=777, distinct=50)
    ids, coords, basis, dout = make_inputs(case, dtype, device, seed=123)
    first = factorized_embedding_bwd(dout, ids, coords, basis, 0, True)
    second = factorized_embedding_bwd(dout, ids, coords, basis, 0, True)
    return all(torch.equal(a, b) for a, b in zip(first, second))
