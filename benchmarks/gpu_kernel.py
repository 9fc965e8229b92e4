"""The fused factorized-embedding kernel on one GPU: check it, then time forward+backward.

1. Check: every case of cptron.kernels.factorized_embedding_check (sizes off every tile, fp32/bf16/
   fp16, vocabulary shards, many repeated ids, an empty batch, both backward modes) against the
   float64 CPU op by relative error, outputs poisoned with NaN first; the deterministic backward
   must repeat bit for bit.
2. Ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 matmul rate, measured.
3. Time forward+backward (median of CUDA-event timings after warm-up) at V=160000, H=4096,
   N=16384 tokens, r in {100, 200, 400}, bf16: the kernel (deterministic and atomic backward)
   against eager F.embedding + matmul and torch.compile of the same, with the achieved bandwidth
   over the bytes that must move (the roofline floor) for each.

Run through benchmarks/gpu_kernel.sh (builds the extension first). Exit 0 when every check passes,
1 when one fails, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_bandwidth(device) -> float:
    src = torch.randn(1 << 28, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (median_ms(lambda: dst.copy_(src), 20) / 1e3)


def _matmul_rate(device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / (median_ms(lambda: a @ b, 20) / 1e3)


def ceilings(device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), measured here."""
    bw = _copy_bandwidth(device)
    torch.cuda.empty_cache()
    return bw, _matmul_rate(device)


def floor_bytes(n: int, v: int, r: int, h: int, elem: int) -> int:
    """Bytes forward+backward must move at least: ids (twice), the rows of P used (twice), B (twice),
    out, dOut, dB, and the dense dP [V, r] (every row is written, zeros included)."""
    rows = min(n, v) * r * elem
    return 2 * n * 8 + 2 * rows + 3 * r * h * elem + 2 * n * h * elem + v * r * elem


def run_checks(device) -> bool:
    from cptron.kernels.factorized_embedding_check import check_all, repeatable

    results = check_all(device)
    worst: dict[tuple[str, bool], float] = {}
    for res in results:
        key = (res["dtype"], res["deterministic"])
        worst[key] = max(worst.get(key, 0.0), res["out"], res["dP"], res["dB"])
        if not res["ok"]:
            print(f"  FAIL {res}")
    for (dtype, det), err in sorted(worst.items()):
        print(f"  {dtype:9s} {'deterministic' if det else 'atomic':13s} worst relative error {err:.2e}")
    same = repeatable(device)
    print(f"  deterministic backward repeats bit for bit: {same}")
    ok = all(r["ok"] for r in results) and same
    print(f"checks: {sum(r['ok'] for r in results)}/{len(results)} passed{'' if ok else ' -- FAILED'}")
    return ok


def eager_lookup(ids, p, b):
    return F.embedding(ids, p) @ b


def time_rank(device, args, r: int, compiled) -> tuple[dict[str, float], int]:
    """Median ms of forward+backward per variant at rank r, and the element size."""
    from cptron.kernels.factorized_embedding_op import factorized_embedding_fused

    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(r)
    ids = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=g)
    p = torch.randn(args.vocab, r, device=device, dtype=dtype, generator=g).requires_grad_(True)
    b = (torch.randn(r, args.hidden, device=device, dtype=dtype, generator=g) / r**0.5).requires_grad_(True)
    dout = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=g)
    variants = {
        "kernel, deterministic": lambda: factorized_embedding_fused(ids, p, b, 0, True),
        "kernel, atomic": lambda: factorized_embedding_fused(ids, p, b, 0, False),
        "eager": lambda: eager_lookup(ids, p, b),
        "torch.compile": lambda: compiled(ids, p, b),
    }
    times = {}
    for name, fwd in variants.items():
        times[name] = median_ms(lambda fwd=fwd: torch.autograd.grad(fwd(), (p, b), dout), args.iters)
    return times, p.element_size()


def time_variants(device, args, bw: float, flops: float) -> list[str]:
    compiled = torch.compile(eager_lookup, dynamic=False)
    n, v, h = args.tokens, args.vocab, args.hidden
    rows = []
    for r in args.ranks:
        times, elem = time_rank(device, args, r, compiled)
        torch.cuda.empty_cache()
        floor_b = floor_bytes(n, v, r, h, elem)
        floor_ms = max(floor_b / bw, 6 * n * r * h / flops) * 1e3
        for name, ms in times.items():
            rows.append(
                f"{r:5d} {name:22s} {ms:8.3f} {floor_b / (ms / 1e3) / 1e9:8.0f} {floor_ms:8.3f} "
                f"{times['eager'] / ms:7.2f}x {times['torch.compile'] / ms:7.2f}x"
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=160000)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, default=50, help="timed runs per variant (median reported)")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "error: no CUDA GPU visible (torch.cuda.is_available() is False); this benchmark needs one", file=sys.stderr
        )
        return 2
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {torch.cuda.get_device_name(device)}")
    t0 = time.perf_counter()
    from cptron.kernels.factorized_embedding_op import load_extension

    ext, how = load_extension()
    print(f"extension: {how} ({time.perf_counter() - t0:.0f} s)")
    if ext is None:
        return 1
    ok = True
    if not args.skip_check:
        t = time.perf_counter()
        ok = run_checks(device)
        print(f"(checks took {time.perf_counter() - t:.0f} s)")
    bw, flops = ceilings(device)
    print(f"measured ceilings: copy {bw / 1e9:.0f} GB/s (read + write), bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    t = time.perf_counter()
    rows = time_variants(device, args, bw, flops)
    print(f"(timing took {time.perf_counter() - t:.0f} s; total {time.perf_counter() - t0:.0f} s)")
    print(f"\nforward+backward, V={args.vocab} H={args.hidden} N={args.tokens} {args.dtype}, median of {args.iters}")
    print("    r variant                     ms     GB/s floor ms vs eager vs compile")
    print("\n".join(rows))
    print("GB/s = floor bytes / time (floor: each input read once, each output written once, dense dP)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
