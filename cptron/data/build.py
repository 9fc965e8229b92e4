"""Building the mixture loader and its validation sets from a DataConfig.

`build_data_loaders` opens the sources (`open_sources`: shards found and fingerprinted),
refuses shards made with another tokenizer (`cptron.data.tokenizer_check`), checks the token ids and builds the missing sample indices on rank 0 (sources in
parallel, up to BUILD_THREADS at a time) while the other ranks wait, memory-maps
them on every rank, and returns the `MixtureLoader` plus one finite, deterministic
validation set per source with held-out documents.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from cptron.data.config import DataConfig
from cptron.data.indexed import shard_prefixes
from cptron.data.interface import IGNORE_INDEX, Batch, dp_slice
from cptron.data.loader import MixtureLoader, batch_from_windows
from cptron.data.mixture import exact
from cptron.data.sample_index import SourceIndex
from cptron.data.tokenizer_check import check_tokenizers
from cptron.distributed import local_errors, raise_on_every_rank, run_on_rank0
from cptron.errors import ConfigError, CptronError

# ---------------------------------------------------------------- validation sets


def _validation_batches(
    source: SourceIndex, *, seq_len: int, global_batch_size: int, rows: tuple[int, int], num_batches: int
) -> Iterator[Batch]:
    """This rank's rows of the source's held-out windows, in global batches; the last one is padded with
    rows whose labels are all IGNORE_INDEX so every rank gets the same number of rows."""
    index = source.validation()
    total = min(index.windows, num_batches * global_batch_size)
    lo, hi = rows
    span = seq_len + 1
    for b in range(-(-total // global_batch_size)):
        first = b * global_batch_size
        real = np.arange(first + lo, first + hi)
        real = real[real < total]
        tokens = np.zeros((hi - lo, span), dtype=np.int64)
        doc_ids = np.zeros((hi - lo, seq_len), dtype=np.int64)
        if len(real):
            source.read(index, real, tokens, doc_ids, np.arange(len(real)))
        batch = batch_from_windows(tokens, doc_ids)
        batch.labels[len(real) :] = IGNORE_INDEX
        yield batch


class _ValidationSet:
    """A fresh, finite, deterministic iterable of this rank's validation batches of one source."""

    def __init__(self, source: SourceIndex, **kw):
        self.source, self.kw = source, kw

    def __call__(self) -> Iterable[Batch]:
        return _validation_batches(self.source, **self.kw)


# ---------------------------------------------------------------- building

BUILD_THREADS = max(1, min(4, os.cpu_count() or 1))
"""Sources whose indices are built at the same time (numpy's shuffles and sorts release the GIL)."""


def _in_parallel(tasks: list[Callable[[], None]]) -> None:
    """Run `tasks` on up to BUILD_THREADS threads; the first failure (in task order) is raised."""
    if len(tasks) <= 1 or BUILD_THREADS == 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=min(len(tasks), BUILD_THREADS)) as pool:
        futures = [pool.submit(task) for task in tasks]
    for future in futures:
        future.result()


def open_sources(cfg: DataConfig, *, seq_len: int, seed: int, cache_dir: Optional[str]) -> dict[str, SourceIndex]:
    """A SourceIndex per configured source (shards opened and fingerprinted; nothing built yet)."""
    out = {}
    for name in sorted(cfg.sources):
        src = cfg.sources[name]
        prefixes: list[str] = []
        for spec in src.paths:
            try:
                found = shard_prefixes(spec)
            except CptronError as e:
                raise ConfigError(f"data.sources.{name}.paths: {e}") from None
            prefixes += [p for p in found if p not in prefixes]
        fraction = src.held_out_fraction if src.held_out_fraction is not None else cfg.validation.held_out_fraction
        try:
            out[name] = SourceIndex(
                name, prefixes, seq_len=seq_len, seed=seed, held_out_fraction=exact(fraction), cache_dir=cache_dir
            )
        except ConfigError:
            raise
        except CptronError as e:
            raise CptronError(f"data.sources.{name}: {e}") from None
    return out


def build_data_loaders(
    cfg: DataConfig,
    *,
    seq_len: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    vocab_size: int,
    seed: int,
    total_steps: Optional[int] = None,
    cache_dir=None,
    tokenizer: Optional[str] = None,
) -> tuple[MixtureLoader, dict[str, Callable[[], Iterable[Batch]]]]:
    """The training loader and one validation set per source with held-out documents.

    Every rank of the default process group must call this together: rank 0 checks
    the token ids against `vocab_size` and builds the missing sample indices while
    the others wait, then every rank memory-maps them. `seed` is the run's seed
    (used unless data.seed is set); `total_steps` resolves stages given by
    start_fraction; `cache_dir` overrides data.cache_dir; `tokenizer` is the model's tokenizer
    (directory or file), which the shards' recorded tokenizer must match, as must each other's
    (`cptron.data.tokenizer_check`).
    """
    cfg.validate()
    if not cfg.sources:
        raise ConfigError("data.sources={} is invalid: expected at least one named source with shard paths")
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} is invalid: expected an integer >= 1")
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size={global_batch_size} is invalid: expected an integer >= 1")
    rows = dp_slice(global_batch_size, dp_rank, dp_size)
    data_seed = int(cfg.seed if cfg.seed is not None else seed)
    cache = cache_dir if cache_dir is not None else cfg.cache_dir
    sources = open_sources(cfg, seq_len=seq_len, seed=data_seed, cache_dir=None if cache is None else str(cache))
    # Before any index is built, and on every rank even if only one rank's view of the files differs.
    _, error = local_errors(lambda: check_tokenizers(sources, tokenizer, allow_mismatch=cfg.allow_tokenizer_mismatch))
    raise_on_every_rank(error)

    def make_loader() -> MixtureLoader:
        return MixtureLoader(
            cfg,
            sources,
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            seed=data_seed,
            total_steps=total_steps,
        )

    def check_and_prepare(name: str, source: SourceIndex) -> None:
        source.prepare_meta()
        try:
            source.check_vocab(vocab_size)
        except CptronError as e:
            raise CptronError(f"data.sources.{name}: {e}") from None

    def build_indices() -> None:
        try:
            _in_parallel([lambda n=n, s=s: check_and_prepare(n, s) for n, s in sources.items()])
            expected = dict.fromkeys(sources, 1)
            if total_steps is not None:  # the epochs the run will reach, so that no rank builds one mid-run
                for source in sources.values():
                    source.load_meta()
                expected = make_loader().expected_epochs(total_steps)
            _in_parallel([lambda s=s, e=e: s.prepare_epoch(e) for n, s in sources.items() for e in range(expected[n])])
        finally:
            for source in sources.values():
                source.release()

    run_on_rank0(build_indices, "building the sample indices")  # the others wait, then read the cache
    for source in sources.values():
        source.load()
    loader = make_loader()
    validation = {}
    for name, source in sources.items():
        meta = source.meta
        if meta["validation_documents"] == 0:
            continue
        if meta["validation_windows"] < 1:
            raise ConfigError(
                f"data.sources.{name}: its {meta['validation_documents']} held-out documents hold "
                f"{meta['validation_tokens']} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}: "
                "expected a larger held_out_fraction (or 0)"
            )
        validation[name] = _ValidationSet(
            source,
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            rows=rows,
            num_batches=cfg.validation.num_batches,
        )
    return loader, validation


__all__ = ["build_data_loaders", "open_sources"]
