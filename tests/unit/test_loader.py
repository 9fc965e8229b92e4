"""The mixture loader, checked through its sample ledger: packing, epochs, resume, DP sizes, stages, errors."""
import json
import os
from collections import defaultdict

import numpy as np
import pytest
import torch

from cptron.data.build import build_data_loaders
from cptron.data.config import DataConfig, ReplayConfig, SourceConfig, StageConfig
from cptron.data.indexed import IndexedDataset
from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.data.interface import IGNORE_INDEX, BatchSource
from cptron.errors import ConfigError, CptronError

VOCAB = 1000
SEQ = 16


def write_source(root, name, shards, docs, seed, lo=1, hi=60, vocab=VOCAB, empty_every=0):
    rng = np.random.default_rng(seed)
    for k in range(shards):
        with IndexedDatasetWriter(os.path.join(root, name, f"part_{k:02d}"), vocab_size=vocab) as w:
            for d in range(docs):
                n = 0 if empty_every and d % empty_every == 3 else int(rng.integers(lo, hi))
                w.add_document(rng.integers(0, vocab, n))
    return os.path.join(root, name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {"web": write_source(root, "web", 3, 40, 1), "code": write_source(root, "code", 2, 30, 2),
            "med": write_source(root, "med", 2, 25, 3, empty_every=7)}


def config(shards, names=("web", "med"), weights=(3.0, 1.0), **kw):
    return DataConfig(sources={n: SourceConfig(paths=[shards[n]], weight=w) for n, w in zip(names, weights)}, **kw)


def build(cfg, tmp_path, rank=0, size=1, gbs=8, seq=SEQ, total_steps=None, seed=7):
    return build_data_loaders(cfg, seq_len=seq, global_batch_size=gbs, dp_rank=rank, dp_size=size,
                              vocab_size=VOCAB, seed=seed, total_steps=total_steps, cache_dir=str(tmp_path / "cache"))


def ledger(loader, steps):
    out = []
    for _ in range(steps):
        next(loader)
        out += [(r.index, r.source, r.epoch, r.position, r.window) for r in loader.last_samples]
    return out


def test_rows_hold_the_ledgers_tokens_and_document_ids(shards, tmp_path):
    loader, _ = build(config(shards), tmp_path)
    assert isinstance(loader, BatchSource)
    batch = next(loader)
    assert batch.tokens.shape == (8, SEQ) and batch.tokens.dtype == torch.int64
    opened = {}
    for row, ref in enumerate(loader.last_samples):
        pieces = loader.describe(ref)
        assert sum(p.length for p in pieces) == SEQ + 1
        window = np.concatenate([opened.setdefault(p.shard, IndexedDataset(p.shard)).document(p.shard_doc)
                                 [p.offset:p.offset + p.length] for p in pieces]).astype(np.int64)
        doc_ids = np.repeat(np.arange(len(pieces)), [p.length for p in pieces])
        assert torch.equal(batch.tokens[row], torch.from_numpy(window[:-1]))
        assert torch.equal(batch.labels[row], torch.from_numpy(window[1:]))
        assert torch.equal(batch.doc_ids[row], torch.from_numpy(doc_ids[:-1]))
        assert all(p.offset == 0 for p in pieces[1:])  # later pieces start at a document's beginning
    assert any(len(loader.describe(r)) > 1 for r in loader.last_samples)  # packing crosses documents


def test_an_epoch_labels_every_training_token_once_and_the_next_reshuffles(shards, tmp_path):
    cfg = DataConfig(sources={"med": SourceConfig(paths=[shards["med"]])})
    cfg.validation.held_out_fraction = 0.2
    loader, _ = build(cfg, tmp_path, gbs=4)
    windows = loader.windows[0]
    index = loader.sources[0].epoch(0)
    refs = []
    while len(refs) < 2 * windows:
        next(loader)
        refs += loader.last_samples
    first, second = refs[:windows], refs[windows:2 * windows]
    assert {r.epoch for r in first} == {0} and {r.epoch for r in second} == {1}
    assert sorted(r.window for r in first) == list(range(windows))
    assert [r.window for r in first] != [r.window for r in second]
    assert not np.array_equal(np.asarray(index.order), np.asarray(loader.sources[0].epoch(1).order))
    # Labels (tokens 1..seq of each window) tile the epoch's stream exactly once, in whole documents.
    seen = defaultdict(list)
    for ref in first:
        taken = 0
        for p in loader.describe(ref):
            lo, hi = max(p.offset, p.offset + (1 - taken)), p.offset + p.length  # drop the window's first token
            if hi > lo:
                seen[p.doc].append((lo, hi))
            taken += p.length
    train_docs = set(np.asarray(index.order).tolist())
    lengths = np.concatenate([IndexedDataset(p).sequence_lengths for p in loader.sources[0].prefixes])
    assert set(seen) <= train_docs
    assert (lengths == 0).any() and not (lengths[list(train_docs)] == 0).any()  # empty documents are skipped
    covered = 0
    for doc, spans in seen.items():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"doc {doc} labelled twice"
        covered += sum(hi - lo for lo, hi in spans)
    assert covered == windows * SEQ
    assert int(lengths[list(train_docs)].sum()) - 1 - covered < SEQ  # only the epoch's last partial window is cut
    held = set(range(len(lengths))) - train_docs - set(np.flatnonzero(lengths == 0).tolist())
    assert held and not (held & set(seen))
    val_docs = set(np.asarray(loader.sources[0].validation().order).tolist())
    assert val_docs == held


def test_documents_of_several_sequences_are_packed_and_held_out_as_one_document(tmp_path):
    """Megatron's sentence-split shards: a document's sequences must not be cut apart by the document masking
    or by the held-out split; the loader treats the document exactly as if it were stored as one sequence."""
    rng = np.random.default_rng(11)
    docs = [rng.integers(0, VOCAB, int(rng.integers(1, 60))) for _ in range(60)]
    for split, prefix in ((True, tmp_path / "split" / "part"), (False, tmp_path / "whole" / "part")):
        with IndexedDatasetWriter(prefix, vocab_size=VOCAB) as w:
            for d in docs:
                cuts = None
                if split and len(d) > 3:
                    at = np.sort(rng.choice(np.arange(1, len(d)), size=2, replace=False))
                    cuts = np.diff(np.concatenate([[0], at, [len(d)]]))
                w.add_document(d, sequence_lengths=cuts)
    assert len(IndexedDataset(tmp_path / "split" / "part")) > len(docs)
    out = {}
    for name in ("split", "whole"):
        cfg = DataConfig(sources={"web": SourceConfig(paths=[str(tmp_path / name)])})
        cfg.validation.held_out_fraction = 0.25
        loader, val = build(cfg, tmp_path / name, gbs=4)
        batches = [next(loader) for _ in range(6)]
        assert loader.sources[0].num_documents == len(docs)
        # built once into the cache and memory-mapped, not recomputed per rank
        assert bool(list((tmp_path / name / "cache").rglob("documents-00000.npy"))) == (name == "split")
        pieces = [loader.describe(r) for r in loader.last_samples]
        out[name] = (batches, list(val["web"]()), pieces, np.asarray(loader.sources[0].epoch(0).order).tolist())
    (b_split, v_split, p_split, order_split), (b_whole, v_whole, p_whole, order_whole) = out["split"], out["whole"]
    assert order_split == order_whole  # the same training documents, in the same order
    assert len(v_split) == len(v_whole) > 0  # and the same held-out ones
    for x, y in zip(b_split + v_split, b_whole + v_whole):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.doc_ids, y.doc_ids)
    assert [(p.doc, p.offset, p.length) for ps in p_split for p in ps] == \
        [(p.doc, p.offset, p.length) for ps in p_whole for p in ps]
    for ps in p_split:
        for p in ps:  # the ledger's (shard, shard_doc, offset, length) address whole documents
            assert np.array_equal(IndexedDataset(p.shard).document(p.shard_doc)[p.offset:p.offset + p.length],
                                  docs[p.doc][p.offset:p.offset + p.length])


def test_a_document_whose_sequences_are_not_contiguous_is_refused_naming_the_shard(tmp_path):
    prefix = tmp_path / "src" / "part"
    with IndexedDatasetWriter(prefix, vocab_size=VOCAB) as w:
        w.add_document(np.arange(40), sequence_lengths=[10, 10, 20])
        w.add_document(np.arange(30))
    raw = bytearray((tmp_path / "src" / "part.idx").read_bytes())
    at = 34 + 4 * 4  # header, then 4 int32 lengths: the int64 pointers
    pointers = np.frombuffer(bytes(raw[at:at + 32]), dtype="<i8").copy()
    pointers[[1, 2]] = pointers[[2, 1]]  # the document's 2nd and 3rd sequences swap places in the .bin
    raw[at:at + 32] = pointers.tobytes()
    (tmp_path / "src" / "part.idx").write_bytes(bytes(raw))
    cfg = DataConfig(sources={"web": SourceConfig(paths=[str(tmp_path / "src")])})
    with pytest.raises(CptronError, match=r"part: document 0 is not stored contiguously"):
        build(cfg, tmp_path)


def test_interrupted_and_resumed_run_reproduces_the_ledger_and_tokens(shards, tmp_path):
    cfg = config(shards, names=("web", "code", "med"), weights=(5.0, 2.0, 1.0))
    full, _ = build(cfg, tmp_path)
    expected, expected_tokens = [], []
    for _ in range(12):
        b = next(full)
        expected += full.last_samples
        expected_tokens.append(b.tokens)
    first, _ = build(cfg, tmp_path)
    got, got_tokens = [], []
    for _ in range(5):
        got_tokens.append(next(first).tokens)
        got += first.last_samples
    state = json.loads(json.dumps(first.state_dict()))
    resumed, _ = build(cfg, tmp_path)
    resumed.load_state_dict(state)
    for _ in range(7):
        got_tokens.append(next(resumed).tokens)
        got += resumed.last_samples
    assert got == expected
    assert len(got_tokens) == len(expected_tokens)
    assert all(torch.equal(a, b) for a, b in zip(got_tokens, expected_tokens))
    assert resumed.state_dict() == full.state_dict()


def test_resuming_at_dp_2_then_4_then_1_continues_the_same_global_ledger(shards, tmp_path):
    cfg = config(shards, names=("web", "code", "med"), weights=(0.5, 0.3, 0.2))
    single, _ = build(cfg, tmp_path)
    expected = ledger(single, 9)
    got, state = [], None
    for size in (2, 4, 1):
        loaders = [build(cfg, tmp_path, rank=r, size=size)[0] for r in range(size)]
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        for _ in range(3):
            for loader in loaders:
                next(loader)
            rows = [r for loader in loaders for r in loader.last_samples]
            got += [(r.index, r.source, r.epoch, r.position, r.window) for r in rows]
        states = [json.dumps(loader.state_dict(), sort_keys=True) for loader in loaders]
        assert len(set(states)) == 1, "every rank must hold the same state"
        state = json.loads(states[0])
    assert got == expected


def test_stage_change_mid_run_loses_and_repeats_nothing(shards, tmp_path):
    cfg = config(shards, stages=[StageConfig(start_fraction=0.5, weights={"med": 3.0})])
    loader, _ = build(cfg, tmp_path, total_steps=10)
    per_source = defaultdict(list)
    shares_seen = []
    for _ in range(10):
        shares_seen.append(loader.current_shares)
        next(loader)
        for r in loader.last_samples:
            per_source[r.source].append(r)
    assert shares_seen[4] == {"med": 0.25, "web": 0.75} and shares_seen[5] == {"med": 0.5, "web": 0.5}
    for name, refs in per_source.items():
        w = loader.windows[loader.names.index(name)]
        assert [r.epoch * w + r.position for r in refs] == list(range(len(refs))), name
        for epoch in {r.epoch for r in refs}:
            windows = [r.window for r in refs if r.epoch == epoch]
            assert len(windows) == len(set(windows)), f"{name} repeated a window in epoch {epoch}"
    after = [r.source for r in per_source["med"] + per_source["web"] if r.index >= 40]
    assert after.count("med") == 20 and after.count("web") == 20


def test_changed_stage_schedule_is_accepted_on_resume(shards, tmp_path):
    loader, _ = build(config(shards), tmp_path)
    ledger(loader, 3)
    state = loader.state_dict()
    cfg = config(shards, stages=[StageConfig(start_step=4, scale={"med": 3.0})])
    resumed, _ = build(cfg, tmp_path)
    resumed.load_state_dict(state)
    next(resumed)
    refs = resumed.last_samples
    assert next(r.position for r in refs if r.source == "med") == state["sources"]["med"]["position"]
    assert resumed.current_shares == {"med": 0.5, "web": 0.5}


def test_changed_mixture_is_refused_unless_allowed(shards, tmp_path):
    loader, _ = build(config(shards), tmp_path)
    ledger(loader, 3)
    state = loader.state_dict()
    changed, _ = build(config(shards, weights=(1.0, 1.0)), tmp_path)
    with pytest.raises(CptronError, match=r"sources.web.weight 3.0 -> 1.0.*allow_mixture_change"):
        changed.load_state_dict(state)
    allowed, _ = build(config(shards, weights=(1.0, 1.0), allow_mixture_change=True), tmp_path)
    allowed.load_state_dict(state)
    next(allowed)
    first = {}
    for r in allowed.last_samples:
        first.setdefault(r.source, r.position)
    assert first == {n: state["sources"][n]["position"] for n in ("web", "med")}
    assert [r.source for r in allowed.last_samples].count("med") == 4
    # a new source starts at its beginning
    grown, _ = build(config(shards, names=("web", "med", "code"), weights=(1.0, 1.0, 1.0),
                            allow_mixture_change=True), tmp_path)
    grown.load_state_dict(state)
    next(grown)
    assert min(r.position for r in grown.last_samples if r.source == "code") == 0


def test_changed_data_seq_len_or_seed_is_refused_even_when_mixture_changes_are_allowed(shards, tmp_path):
    loader, _ = build(config(shards), tmp_path)
    state = loader.state_dict()
    with pytest.raises(CptronError, match="seq_len changed since the checkpoint"):
        build(config(shards), tmp_path, seq=32)[0].load_state_dict(state)
    with pytest.raises(CptronError, match="seed changed since the checkpoint"):
        build(config(shards, allow_mixture_change=True), tmp_path, seed=8)[0].load_state_dict(state)
    cfg = config(shards, allow_mixture_change=True)
    cfg.sources["med"].paths = [shards["med"], shards["code"]]
    with pytest.raises(CptronError, match="data.sources.med: its shards or held-out split changed"):
        build(cfg, tmp_path)[0].load_state_dict(state)


def test_capped_source_drops_out_and_the_others_take_its_share(shards, tmp_path):
    cfg = config(shards, weights=(1.0, 1.0))
    cfg.sources["med"].max_samples = 6
    loader, _ = build(cfg, tmp_path)
    refs = [r.source for r in (next(loader), loader.last_samples)[1]] + \
           [r.source for _ in range(2) for r in (next(loader), loader.last_samples)[1]]
    assert refs.count("med") == 6 and refs[:12].count("med") == 6 and set(refs[12:]) == {"web"}
    state = loader.state_dict()
    assert state["sources"]["med"]["exhausted"] and loader.current_shares == {"med": 0.0, "web": 1.0}
    cfg.sources["web"].max_samples = 10
    with pytest.raises(ConfigError, match="caps .* allow 16 samples"):
        build(cfg, tmp_path, total_steps=3)


def test_natural_weights_and_replay_fraction(shards, tmp_path):
    cfg = DataConfig(sources={n: SourceConfig(paths=[shards[n]]) for n in ("web", "code", "med")})
    cfg.sources["med"].epochs = 2.0
    loader, _ = build(cfg, tmp_path)
    w = dict(zip(loader.names, loader.windows))
    total = w["web"] + w["code"] + 2 * w["med"]
    assert loader.current_shares == pytest.approx({"web": w["web"] / total, "code": w["code"] / total,
                                                   "med": 2 * w["med"] / total})
    cfg = config(shards, names=("web", "code", "med"), weights=(3.0, 1.0, 7.0),
                 replay=ReplayConfig(fraction=0.2, sources=["web", "code"]))
    loader, _ = build(cfg, tmp_path, gbs=20)
    assert loader.current_shares == pytest.approx({"web": 0.15, "code": 0.05, "med": 0.8})
    next(loader)
    assert [r.source for r in loader.last_samples].count("med") == 16


def test_validation_sets_are_fixed_global_rows_split_by_rank(shards, tmp_path):
    cfg = config(shards)
    cfg.sources["web"].held_out_fraction = 0.25
    cfg.validation.num_batches = 2
    _, val = build(cfg, tmp_path, gbs=4)
    assert set(val) == {"web"}  # med holds nothing out
    whole = list(val["web"]())
    assert len(whole) == 2 and all(b.tokens.shape == (4, SEQ) for b in whole)
    assert list(val["web"]())[1].tokens.equal(whole[1].tokens)  # a fresh, identical iterable
    parts = [list(build(cfg, tmp_path, rank=r, size=2, gbs=4)[1]["web"]()) for r in range(2)]
    for b, (p0, p1) in enumerate(zip(*parts)):
        assert torch.equal(torch.cat([p0.tokens, p1.tokens]), whole[b].tokens)
    cfg.validation.num_batches = 1000
    _, val = build(cfg, tmp_path, gbs=4)
    batches = list(val["web"]())
    padded = (batches[-1].labels == IGNORE_INDEX).all(dim=1)
    windows = sum(int((~(b.labels == IGNORE_INDEX).all(dim=1)).sum()) for b in batches)
    loader = build(cfg, tmp_path)[0]
    assert windows == loader.sources[loader.names.index("web")].meta["validation_windows"]
    assert padded.any() == (windows % 4 != 0)


def test_index_cache_is_built_once_under_a_fingerprinted_name_and_memory_mapped(shards, tmp_path):
    loader, _ = build(config(shards), tmp_path)
    src = loader.sources[loader.names.index("web")]
    assert os.path.basename(src.dir) == f"web-{src.data_fingerprint[:16]}"
    files = sorted(os.listdir(src.dir))
    assert files == ["epoch-00000.npy", "source.json"]  # no temporary or lock files; no validation index
    stamp = os.stat(os.path.join(src.dir, "epoch-00000.npy")).st_mtime_ns
    again, _ = build(config(shards), tmp_path)
    assert os.stat(os.path.join(src.dir, "epoch-00000.npy")).st_mtime_ns == stamp
    index = again.sources[again.names.index("web")].epoch(0)
    owner = index.order
    while owner is not None and not isinstance(owner, np.memmap):
        owner = owner.base
    assert isinstance(owner, np.memmap) and owner.filename.endswith("epoch-00000.npy")
    assert not index.order.flags.writeable
    # the default cache sits beside the shards
    cfg = config(shards)
    loader, _ = build_data_loaders(cfg, seq_len=SEQ, global_batch_size=8, dp_rank=0, dp_size=1, vocab_size=VOCAB,
                                   seed=7)
    assert os.path.dirname(loader.sources[0].dir) == os.path.join(shards["med"], ".cptron-index")


def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_shard(shards, tmp_path):
    path = write_source(tmp_path, "big", 1, 5, 4, vocab=5000)
    cfg = DataConfig(sources={"big": SourceConfig(paths=[path])})
    with pytest.raises(CptronError, match=r"data.sources.big: .*part_00.* >= vocab_size=1000"):
        build(cfg, tmp_path)


def test_empty_and_missing_sources_are_refused(shards, tmp_path):
    tiny = write_source(tmp_path, "tiny", 1, 1, 5, lo=3, hi=4)
    cfg = DataConfig(sources={"web": SourceConfig(paths=[shards["web"]]), "tiny": SourceConfig(paths=[tiny])})
    with pytest.raises(ConfigError, match=r"data.sources.tiny is empty: .* 3 tokens in 1 documents"):
        build(cfg, tmp_path)
    cfg = DataConfig(sources={"web": SourceConfig(paths=[shards["web"], str(tmp_path / "nowhere")])})
    with pytest.raises(ConfigError, match=r"data.sources.web.paths: no shard at .*nowhere"):
        build(cfg, tmp_path)
    os.remove(os.path.join(tiny, "part_00.bin"))
    cfg = DataConfig(sources={"tiny": SourceConfig(paths=[os.path.join(tiny, "part_00")])})
    with pytest.raises(CptronError, match=r"data.sources.tiny: missing shard .*part_00.bin not found"):
        build(cfg, tmp_path)
    with pytest.raises(ConfigError, match="expected at least one named source"):
        build(DataConfig(), tmp_path)


def test_bad_weights_and_names_are_refused_at_build(shards, tmp_path):
    with pytest.raises(ConfigError, match="data.sources.web.weight=-2.0 is invalid"):
        build(config(shards, weights=(-2.0, 1.0)), tmp_path)
    with pytest.raises(ConfigError, match="sum to zero"):
        build(config(shards, weights=(0.0, 0.0)), tmp_path)
    with pytest.raises(ConfigError, match=r"unknown: \['wbe'\]"):
        build(config(shards, replay=ReplayConfig(fraction=0.5, sources=["wbe"])), tmp_path)
    with pytest.raises(ConfigError, match=r"data.stages\[0\].scale.*unknown: \['mde'\]"):
        build(config(shards, stages=[StageConfig(start_step=2, scale={"mde": 2.0})]), tmp_path)


def test_every_prefix_of_the_ledger_stays_within_one_sample_of_the_shares(shards, tmp_path):
    cfg = config(shards, names=("web", "code", "med"), weights=(0.45, 0.35, 0.2))
    loader, _ = build(cfg, tmp_path, gbs=20)
    counts = dict.fromkeys(loader.names, 0)
    for n, ref in enumerate([r for _ in range(10) for r in (next(loader), loader.last_samples)[1]], start=1):
        counts[ref.source] += 1
        for name, share in (("web", 0.45), ("code", 0.35), ("med", 0.2)):
            assert abs(counts[name] - share * n) < 1, (n, counts)


def test_a_failed_step_consumes_nothing(shards, tmp_path, monkeypatch):
    cfg = config(shards)
    expected = ledger(build(cfg, tmp_path)[0], 3)
    loader, _ = build(cfg, tmp_path)
    got = ledger(loader, 1)
    before = loader.state_dict()
    from cptron.data.sample_index import SourceIndex
    real = SourceIndex.read

    def failing(self, *a, **kw):
        raise OSError("disk gone")

    monkeypatch.setattr(SourceIndex, "read", failing)
    with pytest.raises(OSError, match="disk gone"):
        next(loader)
    assert loader.state_dict() == before
    monkeypatch.setattr(SourceIndex, "read", real)
    assert got + ledger(loader, 2) == expected


def test_running_out_of_capped_sources_is_an_error_not_a_silent_stop(shards, tmp_path):
    cfg = config(shards, weights=(1.0, 1.0))
    cfg.sources["web"].max_samples, cfg.sources["med"].max_samples = 5, 6
    loader, _ = build(cfg, tmp_path)
    next(loader)
    before = loader.state_dict()
    with pytest.raises(CptronError, match=r"no samples left at step 1: sources \['med \(cap 6\)', 'web \(cap 5\)'\]"):
        next(loader)
    assert loader.state_dict() == before


def test_later_epochs_are_built_up_front_or_on_first_use_and_a_cut_file_is_rebuilt(shards, tmp_path):
    cfg = DataConfig(sources={"med": SourceConfig(paths=[shards["med"]])})
    loader, _ = build(cfg, tmp_path, gbs=4, total_steps=60)
    src = loader.sources[0]
    expected_epochs = -(-60 * 4 // src.windows_per_epoch)
    assert sorted(f for f in os.listdir(src.dir) if f.startswith("epoch")) == \
        [f"epoch-{e:05d}.npy" for e in range(expected_epochs)]
    reference = ledger(loader, 60)
    path = os.path.join(src.dir, "epoch-00001.npy")
    with open(path, "r+b") as fh:  # as a crash between write and rename could leave it on a filesystem without order
        fh.truncate(os.path.getsize(path) // 2)
    os.remove(os.path.join(src.dir, "epoch-00002.npy"))
    again, _ = build(cfg, tmp_path, gbs=4)  # no total_steps: nothing more is built up front
    assert not os.path.exists(os.path.join(src.dir, "epoch-00002.npy"))
    assert ledger(again, 60) == reference
    assert os.path.exists(os.path.join(src.dir, "epoch-00002.npy"))


def test_an_index_lock_left_by_a_dead_builder_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    from cptron.data.index_cache import load_or_build
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = str(tmp_path / "index.npy")
    with open(target + ".lock", "w") as fh:
        fh.write(f"{socket.gethostname()} {dead.pid}")
    load_or_build(target, lambda: np.save(target, np.arange(3)), wait_s=30)
    assert np.load(target).tolist() == [0, 1, 2] and not os.path.exists(target + ".lock")
    # a live builder is waited for, up to the deadline
    other = str(tmp_path / "other.npy")
    with open(other + ".lock", "w") as fh:
        fh.write(f"{socket.gethostname()} {os.getpid()}")
    load_or_build(other, lambda: np.save(other, np.arange(2)), wait_s=0.2)
    assert np.load(other).tolist() == [0, 1]


def test_data_seed_overrides_the_run_seed(shards, tmp_path):
    runs = {}
    for name, cfg_seed, run_seed in (("a", None, 1), ("b", 1, 2), ("c", None, 2)):
        cfg = config(shards, seed=cfg_seed)
        runs[name] = ledger(build(cfg, tmp_path, seed=run_seed)[0], 2)
    assert runs["a"] == runs["b"] != runs["c"]


def test_foreign_or_malformed_states_are_refused_and_leave_the_loader_unchanged(shards, tmp_path):
    loader, _ = build(config(shards), tmp_path)
    ledger(loader, 1)
    earlier = loader.state_dict()
    ledger(loader, 1)
    before = loader.state_dict()
    with pytest.raises(CptronError, match="not saved by the mixture loader"):
        loader.load_state_dict({"kind": "memory", "step": 3, "fingerprint": "x"})
    broken = json.loads(json.dumps(earlier))
    del broken["segment"]
    with pytest.raises(CptronError, match="malformed.*segment"):
        loader.load_state_dict(broken)
    assert loader.state_dict() == before


@pytest.mark.parametrize("big_ids", [False, True])
def test_packed_index_round_trips_with_32_and_64_bit_document_ids(big_ids):
    from cptron.data.sample_index import PackedIndex, pack
    from cptron.data.shuffle import seed_words
    lengths = np.array([5, 0, 7, 3, 9], dtype=np.int64)
    ids = np.array([0, 1, 2, 3, 4], dtype=np.int64) + (2**31 if big_ids else 0)
    raw = pack(ids, lengths, 4, seed_words("t"), seed_words("w"))
    index = PackedIndex.from_bytes(raw, "test")
    assert index.order.dtype == (np.int64 if big_ids else np.int32) and index.perm.dtype == np.int32
    assert sorted(index.order.tolist()) == ids.tolist() and index.windows == (24 - 1) // 4
    assert np.array_equal(np.diff(index.offsets), lengths[index.order - ids[0]]) and index.offsets[0] == 0
    assert sorted(index.perm.tolist()) == list(range(index.windows))
    assert PackedIndex.from_bytes(pack(ids, lengths, 4, seed_words("t"), None), "test").perm is None
    with pytest.raises(CptronError, match="is corrupt"):
        PackedIndex.from_bytes(raw[:-8], "cut")


@pytest.mark.parametrize("resume_at", [0, 8])
def test_the_plan_predicts_the_samples_each_source_gives_in_every_stretch(shards, tmp_path, resume_at):
    """Stages and a cap that runs out mid-run: the plan's per-source counts match the ledger's to within one
    sample per stretch, also when planned from a resumed state."""
    cfg = DataConfig(sources={"web": SourceConfig(paths=[shards["web"]]),
                              "med": SourceConfig(paths=[shards["med"]], max_samples=70)},
                     replay=ReplayConfig(fraction=0.25, sources=["web"]),
                     stages=[StageConfig(start_step=30, replay_fraction=0.5)])
    loader, _ = build(cfg, tmp_path, total_steps=40)
    for _ in range(resume_at):
        next(loader)
    parts = loader.plan(40)
    text = loader.describe_plan(40)
    assert [p["stage"] for p in parts] == [0, 0, 1] and parts[0]["ran_out"] == ["med"]
    assert "med reach(es) the cap" in text and "steps 30..40 (stage 1): med 0.0%, web 100.0%" in text
    got = defaultdict(int)
    for _ in range(resume_at, 40):
        next(loader)
        for r in loader.last_samples:
            got[r.source] += 1
    for name in ("web", "med"):
        planned = float(sum(p["samples"][name] for p in parts))
        assert abs(planned - got[name]) <= len(parts), (name, planned, got[name])
