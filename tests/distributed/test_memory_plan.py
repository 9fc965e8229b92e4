"""The memory plan against measured peaks, and `cptron plan` itself.

Each configuration trains 2 steps (the second holds AdamW state, accumulated gradients and
activations at once) in forked ranks; the measured peak is the rank's peak RSS growth over its
RSS before the Trainer was built (VmHWM, reset through /proc/self/clear_refs). glibc's malloc is
told to serve every allocation over 64 KiB with mmap, so freed tensors leave the RSS and its peak
tracks live memory instead of heap high-water marks.
"""

from __future__ import annotations

import ctypes
import logging
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cptron.models.config import model_config_from_preset
from cptron.parallel.dims import ParallelConfig
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.memory_plan import estimate_memory
from cptron.train.trainer import Trainer

TOLERANCE = 0.15
REPO = Path(__file__).resolve().parents[2]


def in_fresh_parent(fn_name: str, world_size: int, tmp_path: Path, *args):
    """run_distributed(fn_name of this module, ...) from a new interpreter. Ranks forked from the pytest
    process inherit the heap that earlier tests freed: reusing it costs no RSS, so their peaks read low by
    an amount that depends on which tests ran before (34 MB for a 700 MB run after a parent that had freed
    1.3 GB of small tensors; malloc_trim in the rank over-corrects by up to 50 MB)."""
    result = tmp_path / f"{fn_name}-{world_size}.pkl"
    code = (
        "import pickle, sys; from tests.distributed import test_memory_plan as m; "
        "from cptron.testing.distributed import run_distributed; "
        "name, world, out, args = pickle.loads(sys.stdin.buffer.read()); "
        "open(out, 'wb').write(pickle.dumps(run_distributed(getattr(m, name), world, *args, timeout=300)))"
    )
    payload = pickle.dumps((fn_name, world_size, str(result), args))
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    return pickle.loads(result.read_bytes())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def job(run_dir, parallel, *, vocab, seq, mb=2, batch=4, layers=4, masking=False):
    cfg = make_train_config(
        run_dir, parallel, steps=2, global_batch_size=batch, micro_batch_size=mb, seq_len=seq, document_masking=masking
    )
    cfg.model = model_config_from_preset(
        "tiny",
        dim=256,
        n_layers=layers,
        n_heads=8,
        n_kv_heads=4,
        ffn_hidden_dim=704,
        vocab_size=vocab,
        pad_vocab_to_multiple_of=64,
        max_seq_len=seq,
    )
    return cfg


def measure(rank, world_size, run_dir, parallel, kwargs):
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD, fixed (no dynamic raise)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    cfg = job(run_dir, parallel, **kwargs)
    seq, batch = cfg.training.seq_len, cfg.training.global_batch_size
    Trainer(cfg, data_factory=lambda r, n: (PackedSource(seq, batch, r, n), {})).run()
    return (_status_kib("VmHWM") - base) * 1024


CASES = [
    ("1 proc", 1, ParallelConfig(), dict(vocab=32000, seq=256)),
    ("1 proc, AC full", 1, ParallelConfig(activation_checkpoint="full"), dict(vocab=8000, seq=1024)),
    ("1 proc, no AC", 1, ParallelConfig(), dict(vocab=8000, seq=1024)),
    ("1 proc, docs masked", 1, ParallelConfig(), dict(vocab=8000, seq=512, masking=True)),
    ("dp_shard=2", 2, ParallelConfig(dp_shard=2), dict(vocab=32000, seq=256, batch=8)),
    ("tp=2 sp", 2, ParallelConfig(tp=2, dp_shard=1), dict(vocab=16000, seq=512)),
    (
        "dp_shard=2 bf16 AC sel.",
        2,
        ParallelConfig(dp_shard=2, mixed_precision="bfloat16", activation_checkpoint="selective"),
        dict(vocab=16000, seq=512, batch=8),
    ),
    ("pp=2 1f1b", 2, ParallelConfig(pp=2, dp_shard=1), dict(vocab=32000, seq=256)),
]


@pytest.mark.slow  # 8 configurations, about 60 s on a loaded 2-core machine
def test_plan_matches_measured_peaks(tmp_path, capsys):
    rows = []
    for i, (name, world, parallel, kwargs) in enumerate(CASES):
        measured = in_fresh_parent("measure", world, tmp_path, str(tmp_path / str(i)), parallel, kwargs)
        plan = estimate_memory(job(str(tmp_path), parallel, **kwargs), world, "cpu")
        for rank, got in enumerate(measured):
            est = plan.ranks[plan.dims.pp * rank // world].total
            rows.append((name, rank, est, got, est / got - 1))
    with capsys.disabled():
        print("\nconfiguration            rank  estimate MB  measured MB   error")
        for name, rank, est, got, err in rows:
            print(f"{name:<24} {rank:>4} {est / 1e6:>12.1f} {got / 1e6:>12.1f} {err:>+7.1%}")
    bad = [r for r in rows if abs(r[4]) > TOLERANCE]
    assert not bad, bad


def train_and_log_memory(rank, world_size, run_dir):
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # as in `measure`: RSS follows live memory
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("cptron.train").addHandler(handler)
    logging.getLogger("cptron.train").setLevel(logging.INFO)
    cfg = job(run_dir, ParallelConfig(dp_shard=2), vocab=32000, seq=256, batch=8)
    cfg.training.steps = 3
    Trainer(cfg, data_factory=lambda r, n: (PackedSource(256, 8, r, n), {})).run()
    return [line for line in lines if line.startswith("memory after step")]


def test_trainer_logs_each_ranks_peak_beside_the_estimate(tmp_path):
    results = in_fresh_parent("train_and_log_memory", 2, tmp_path, str(tmp_path / "run"))
    assert results[1] == [], "rank 0 logs for every rank"
    (line,) = results[0]
    assert "memory after step 3: peak RSS growth since the model was built per rank" in line
    measured = [float(v) for v in line.split("per rank ")[1].split(" MB")[0].split(", ")]
    estimate = [float(v) for v in line.split("estimate ")[1].split(" MB")[0].split(", ")]
    assert len(measured) == len(estimate) == 2
    for got, est in zip(measured, estimate):
        assert abs(est / got - 1) <= TOLERANCE, line
