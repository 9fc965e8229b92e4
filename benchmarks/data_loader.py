"""cptron's mixture loader against megatron-core's GPTDataset + BlendedDataset on the same shards.

    python benchmarks/data_loader.py [--tokens 1e9] [--seq-len 2048] [--batch 32] [--access-samples 6000]
                                     [--rounds 3] [--workdir DIR] [--keep]
    python benchmarks/data_loader.py --tokens 1e8        # a quick look (about 10 s)

The default (10^9 tokens, the acceptance size) takes about half a minute on 2 cores,
two thirds of it writing the 2 GB of shards.

What it does:

1. Writes two sources of random uint16 tokens (vocabulary 32,000), each half of
   `--tokens`, in cptron's (= Megatron's) .bin/.idx format with IndexedDatasetWriter;
   document lengths are log-normal around 700 tokens (1 .. 16,384). Generated once
   per work directory and reused by later runs with the same sizes.
2. Runs each loader in its own child process (so peak RSS is separable), on a cold
   index cache, for the same 75/25 blend at `--seq-len`:
   * index build: everything from the config to a loader that can serve the
     first sample (fastest of `--rounds` builds, each into an empty cache), with
     indices covering one pass of the data
     (tokens / seq_len samples): cptron's build_data_loaders plus the source
     epochs those samples reach; megatron-core's BlendedMegatronDatasetBuilder
     (GPTDataset per source, BlendedDataset on top, create_attention_mask=False).
   * access: `--access-samples` samples as global batches of `--batch` rows of
     seq_len tokens + labels: cptron's training iterator (its samples are random
     windows of shuffled sources, with per-token document ids as well);
     megatron-core's dataset at uniformly random indices, stacked like a DataLoader's
     default collate. Pages are warm for both (the shards were just written). Both
     children run torch with one thread, as DataLoader workers do. `--rounds` timed
     rounds of new samples each; the fastest counts (the host is shared and noisy).
   * RSS: the child's post-import RSS, then the peak over the build and access
     (VmHWM after resetting it through /proc/self/clear_refs).
3. Prints one line per loader, then the ratios (cptron over megatron-core) last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULT_TAG = "DATA_LOADER_BENCH "
VOCAB = 32_000
WEIGHTS = {"a": 0.75, "b": 0.25}


# ------------------------------------------------------------ shards

def write_shards(workdir: str, tokens: int, seed: int = 0) -> dict[str, str]:
    """Two sources of random documents, `tokens` in all; reuses shards a previous run left."""
    from cptron.data.indexed import IndexedDataset
    from cptron.data.indexed_writer import IndexedDatasetWriter

    out = {}
    for k, name in enumerate(WEIGHTS):
        prefix = os.path.join(workdir, f"shards-{tokens}", name, "part_00")
        out[name] = prefix
        if os.path.exists(prefix + ".idx"):
            continue
        rng = np.random.default_rng(seed + k)
        target, written = tokens // len(WEIGHTS), 0
        with IndexedDatasetWriter(prefix, vocab_size=VOCAB, overwrite=True) as w:
            while written < target:
                lengths = np.clip(rng.lognormal(6.2, 1.0, 4096).astype(np.int64), 1, 16_384)
                keep = np.cumsum(lengths) <= target - written  # a prefix: lengths are positive
                lengths = lengths[keep] if keep.any() else np.array([target - written])
                chunk = rng.integers(0, VOCAB, int(lengths.sum()), dtype=np.uint16)
                for piece in np.split(chunk, np.cumsum(lengths)[:-1]):
                    w.add_document(piece)
                written += int(lengths.sum())
        IndexedDataset(prefix)  # fail here, not in a child, if the shard is unreadable
    return out


# ------------------------------------------------------------ children

def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_cptron(args, shards: dict[str, str], cache: str) -> dict:

    from cptron.data.build import build_data_loaders
    from cptron.data.config import DataConfig, SourceConfig

    base = _rss_mb("VmRSS")
    reset = _reset_peak()
    samples = args.tokens // args.seq_len
    builds = []
    for k in range(args.rounds):  # each build starts from an empty cache directory
        t0 = time.perf_counter()
        cfg = DataConfig(sources={n: SourceConfig(paths=[p], weight=WEIGHTS[n]) for n, p in shards.items()},
                         cache_dir=os.path.join(cache, str(k)))
        # total_steps covering `samples`: the loader builds every epoch that many steps reach, up front
        loader, _ = build_data_loaders(cfg, seq_len=args.seq_len, global_batch_size=args.batch, dp_rank=0,
                                       dp_size=1, vocab_size=VOCAB, seed=1234, total_steps=-(-samples // args.batch))
        builds.append(time.perf_counter() - t0)
    for i, name in enumerate(loader.names):
        need = -(-int(samples * WEIGHTS[name]) // loader.windows[i])
        assert all(os.path.exists(os.path.join(loader.sources[i].dir, f"epoch-{e:05d}.npy")) for e in range(need))
    build_s = min(builds)
    steps = max(args.access_samples // args.batch, 1)
    next(loader)  # first touch outside the timing, as for megatron-core's first (cached-mask) sample
    rounds = []
    for _ in range(args.rounds):  # each round reads new samples, so its pages are as cold as the first's
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = next(loader)
        rounds.append(time.perf_counter() - t0)
    access_s = min(rounds)
    assert batch.tokens.shape == (args.batch, args.seq_len)
    return {"build_s": build_s, "samples": steps * args.batch, "access_s": access_s, "rss_base_mb": base,
            "rss_peak_mb": _rss_mb("VmHWM") if reset else float("nan")}


class _StubTokenizer:
    """What GPTDataset reads from a tokenizer: the vocabulary size and the eod/pad ids."""

    vocab_size = VOCAB
    eod = 0
    pad = VOCAB  # out of range: no real token is treated as padding
    unique_identifiers = {"class": "StubTokenizer", "vocab_size": VOCAB}  # hashed into megatron's cache names

    @property
    def eos(self):
        return self.eod


def run_megatron(args, shards: dict[str, str], cache: str) -> dict:
    import logging
    import warnings

    import torch

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    # BlendedDataset asks torch.distributed for the rank when it caches its index: one gloo rank.
    torch.distributed.init_process_group("gloo", init_method=f"file://{cache}/pg", rank=0, world_size=1)
    base = _rss_mb("VmRSS")
    reset = _reset_peak()
    names = list(shards)
    samples = args.tokens // args.seq_len
    builds = []
    for k in range(args.rounds):  # each build starts from an empty cache directory
        t0 = time.perf_counter()
        config = GPTDatasetConfig(
            random_seed=1234, sequence_length=args.seq_len,
            blend=([shards[n] for n in names], [WEIGHTS[n] for n in names]), split="100,0,0",
            path_to_cache=os.path.join(cache, str(k)), tokenizer=_StubTokenizer(), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()
        builds.append(time.perf_counter() - t0)
    build_s = min(builds)
    steps = max(args.access_samples // args.batch, 1)
    rng = np.random.default_rng(0)
    train[0]
    rounds = []
    for _ in range(args.rounds):
        order = rng.integers(0, len(train), (steps, args.batch))
        t0 = time.perf_counter()
        for rows in order:
            items = [train[int(i)] for i in rows]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])}
        rounds.append(time.perf_counter() - t0)
    access_s = min(rounds)
    assert batch["tokens"].shape == (args.batch, args.seq_len)
    return {"build_s": build_s, "samples": steps * args.batch, "access_s": access_s, "rss_base_mb": base,
            "rss_peak_mb": _rss_mb("VmHWM") if reset else float("nan")}


def child(args) -> None:
    import torch

    # As in a DataLoader worker (which sets one thread): the batch collation of
    # megatron-core's samples would otherwise wait on torch's intra-op pool.
    torch.set_num_threads(1)
    shards = json.loads(args.shards)
    cache = tempfile.mkdtemp(prefix=f"{args.child}-index-", dir=args.workdir)  # cold: a fresh cache
    try:
        result = (run_cptron if args.child == "cptron" else run_megatron)(args, shards, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(RESULT_TAG + json.dumps(result), flush=True)


def spawn(args, which: str, shards: dict[str, str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--shards", json.dumps(shards),
           "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--access-samples", str(args.access_samples), "--rounds", str(args.rounds), "--workdir", args.workdir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{which} child failed with exit status {proc.returncode}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=1e9, help="total tokens over both sources")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32, help="rows per global batch")
    p.add_argument("--access-samples", type=int, default=6000, help="samples read per timed round")
    p.add_argument("--rounds", type=int, default=3,
                   help="timed index builds and access rounds per loader; the fastest counts")
    p.add_argument("--workdir", default=None, help="where shards and caches go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (reuse its shards next time)")
    p.add_argument("--child", choices=["cptron", "megatron"], help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = int(args.tokens)
    if args.child:
        child(args)
        return 0
    own = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cptron-loader-bench-")
    os.makedirs(args.workdir, exist_ok=True)
    try:
        t0 = time.perf_counter()
        shards = write_shards(args.workdir, args.tokens)
        print(f"shards: 2 sources x {args.tokens // 2:,} random tokens in {args.workdir} "
              f"({time.perf_counter() - t0:.1f} s to write or find); blend 75/25, seq_len {args.seq_len}, "
              f"batch {args.batch}, index for {args.tokens // args.seq_len:,} samples", flush=True)
        results = {}
        for which in ("megatron", "cptron"):
            r = spawn(args, which, shards)
            r["samples_s"] = r["samples"] / r["access_s"]
            r["tokens_s"] = r["samples_s"] * args.seq_len
            results[which] = r
            label = "megatron-core 0.16.1" if which == "megatron" else "cptron"
            print(f"{label:>21}: index build {r['build_s']:7.2f} s | {r['samples_s']:9,.0f} samples/s "
                  f"{r['tokens_s'] / 1e6:7.1f} M tokens/s | RSS after imports {r['rss_base_mb']:6.0f} MB, "
                  f"peak {r['rss_peak_mb']:6.0f} MB (+{r['rss_peak_mb'] - r['rss_base_mb']:.0f} MB)")
        c, m = results["cptron"], results["megatron"]
        print(f"ratios cptron/megatron-core: samples/s {c['samples_s'] / m['samples_s']:.2f}x | index build time "
              f"{c['build_s'] / m['build_s']:.2f}x (lower is faster) | peak RSS over imports "
              f"{(c['rss_peak_mb'] - c['rss_base_mb']) / max(m['rss_peak_mb'] - m['rss_base_mb'], 1e-9):.2f}x")
    finally:
        if own and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
