"""Model initialization on 2 ranks: local tiled init against the former full-tensor init.

cptron path:  each rank draws only the tiles of its own FSDP2 shards (cptron.models.init, the default
              of Transformer.init_weights).
baseline:     the former scheme (`initialize_parameters(..., full_tensors=True)`): one generator per
              parameter, every rank draws each full tensor and keeps its slice.

The model is the llama3-8b shape (dim 4096, FFN 14336, vocabulary 128256, 32 heads, 8 KV heads) with
its layers reduced to fit a small machine, fp32, built as the trainer builds it (meta device,
parallelize_llama with dp_shard=2, to_empty, init). Each phase runs on freshly forked ranks (the
shared harness, one thread per rank). Per rank it measures the init's wall time and the peak RSS
(VmHWM, reset just before the init), and the peak above the RSS of the materialized shards (their
pages faulted in first): the memory the init itself needs. CPU time is shown beside the wall time,
which other processes on a shared machine inflate.

It then checks that the layout does not change the model: every rank hashes its local shards after
the local init under dp_shard=2 (and tp=2), and the parent compares them with the same regions of a
1-rank build_model. Ratios (local / full-tensor, the slower rank) are printed last.

    python benchmarks/init_time.py [--layers 2] [--skip-tp]
"""

from __future__ import annotations

import argparse
import hashlib
import time

import torch

from cptron.distributed import local_shard_region
from cptron.models.config import model_config_from_preset
from cptron.models.init import initialize_parameters
from cptron.models.llama import Transformer, build_model, canonical_param_name
from cptron.parallel.dims import ParallelConfig, ParallelDims, build_mesh
from cptron.parallel.parallelize import parallelize_llama
from cptron.testing.distributed import run_distributed

SEED = 1234
GIB = 1024**3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} is not in /proc/self/status (Linux only)")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def init_rank(rank, world_size, preset, layers, parallel, full_tensors):
    cfg = model_config_from_preset(preset, n_layers=layers)
    dims = ParallelDims(1, 1, world_size // parallel.tp, parallel.tp)
    mesh, _ = build_mesh(dims, "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize_llama(model, mesh, dims, parallel)
    model.to_empty(device="cpu")
    params = [(canonical_param_name(n), p) for n, p in model.named_parameters()]
    with torch.no_grad():  # fault the shards' pages in, so that the RSS before counts the shards
        for _, p in params:
            local_shard_region(p)[0].zero_()
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    stats = initialize_parameters(params, cfg, SEED, full_tensors=full_tensors)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _status_kib("VmHWM")
    shards = {}
    if not full_tensors:  # the full-tensor path draws other values: nothing to compare
        for name, p in params:
            local, region = local_shard_region(p)
            shards[name] = ([(s.start, s.stop) for s in region], _digest(local))
    return dict(
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        peak_gib=peak * 1024 / GIB,
        init_gib=(peak - before) * 1024 / GIB,
        drawn=stats.drawn_elements,
        local=stats.local_elements,
        shards=shards,
    )


def compare_with_one_rank(reference: dict[str, torch.Tensor], results: list[dict]) -> tuple[int, list[str]]:
    checked, wrong = 0, []
    for rank, result in enumerate(results):
        for name, (bounds, digest) in result["shards"].items():
            region = tuple(slice(a, b) for a, b in bounds)
            checked += 1
            if _digest(reference[name][region]) != digest:
                wrong.append(f"rank {rank} {name}")
    return checked, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b", help="model shape (tiny: a smoke test)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (llama3-8b has 32)")
    parser.add_argument("--skip-tp", action="store_true", help="skip the tp=2 layout check")
    options = parser.parse_args()
    if options.layers < 1:
        parser.error(f"--layers={options.layers} is invalid: expected an integer >= 1")
    cfg = model_config_from_preset(options.preset, n_layers=options.layers)
    print(f"{options.preset} shape, {options.layers} layers: {cfg.num_params() / 1e6:,.1f}M parameters, fp32, 2 ranks")

    fsdp = ParallelConfig(dp_shard=2)
    timeout = 1800
    local = run_distributed(init_rank, 2, options.preset, options.layers, fsdp, False, timeout=timeout)
    full = run_distributed(init_rank, 2, options.preset, options.layers, fsdp, True, timeout=timeout)
    tp = (
        None
        if options.skip_tp
        else run_distributed(
            init_rank, 2, options.preset, options.layers, ParallelConfig(tp=2, dp_shard=1), False, timeout=timeout
        )
    )

    _reset_peak_rss()
    start = time.perf_counter()
    reference = dict(build_model(cfg, seed=SEED).named_parameters(remove_duplicate=False))
    one_rank_s, one_rank_peak = time.perf_counter() - start, _status_kib("VmHWM") * 1024 / GIB

    print(
        f"{'init, dp_shard=2':<28} {'rank':>4} {'time (s)':>9} {'CPU time (s)':>12} {'peak RSS (GiB)':>15}"
        f" {'init needs (GiB)':>17} {'drawn / local':>14}"
    )
    for label, results in (("local tiles (cptron)", local), ("full tensors (former)", full)):
        for rank, r in enumerate(results):
            print(
                f"{label:<28} {rank:>4} {r['seconds']:>9.2f} {r['cpu_seconds']:>12.2f} {r['peak_gib']:>15.2f}"
                f" {r['init_gib']:>17.2f}"
                f" {r['drawn'] / r['local']:>14.3f}"
            )
    print(f"{'1 rank, local tiles':<28} {0:>4} {one_rank_s:>9.2f} {'':>12} {one_rank_peak:>15.2f}")
    checks = [("dp_shard=2", local)] + ([("tp=2", tp)] if tp is not None else [])
    identical = True
    for layout, results in checks:
        checked, wrong = compare_with_one_rank(reference, results)
        identical &= not wrong
        verdict = "identical" if not wrong else f"DIFFERENT in {len(wrong)}: {', '.join(wrong[:5])}"
        print(f"layout check {layout} vs 1 rank: {checked} shards compared by SHA-256, {verdict}")

    def ratio(key: str) -> str:
        slow_local, slow_full = (max(r[key] for r in results) for results in (local, full))
        return f"{slow_local / slow_full:.3f}x" if slow_full > 0 else "n/a (the full-tensor init needed none)"

    print(
        "ratios (local / full-tensor init, slower rank): "
        f"time {ratio('seconds')}, CPU time {ratio('cpu_seconds')}, peak RSS {ratio('peak_gib')}, "
        f"memory the init needs {ratio('init_gib')}; "
        f"layouts {'identical' if identical else 'DIFFER'}"
    )
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
