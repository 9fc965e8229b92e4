"""Small reliability fixes: which value is non-finite, step numbers as logged, the skip limit,
paths in write errors, the `data plan` description, reruns of a finished run, per-rank logging
under torchrun and the CLI's shutdown order."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import threading
import weakref

import numpy as np
import pytest
import torch.distributed as dist

from cptron.cli import _setup_logging, main, run_train
from cptron.config import field_docs
from cptron.data.index_cache import CacheWriteError, atomic_save, atomic_write_json
from cptron.errors import CptronError
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config
from cptron.train.checkpointer import CheckpointConfig
from cptron.train.config import TrainingConfig
from cptron.train.metrics import MetricsConfig, MetricsLogger
from cptron.train.trainer import NonFiniteLossError, Trainer, nonfinite_description


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def _capture_logs() -> list[str]:
    """The "cptron" loggers' records from here on (in a forked rank: nothing leaks to the test)."""
    handler = _Lines()
    logger = logging.getLogger("cptron")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler.lines


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- (a), (b), (c) the non-finite guard


def _train(rank, world_size, run_dir, policy, max_skipped=10, inf_grad_at=(), nan_loss_at=(), steps=3):
    cfg = make_train_config(run_dir, steps=steps, nonfinite=policy, max_skipped_steps=max_skipped)
    cfg.metrics = MetricsConfig(log_every=1, jsonl=True, progress_bar="off")

    def grad_hook(index, parts):
        if index in inf_grad_at:
            next(parts[0].parameters()).grad.fill_(float("inf"))

    def loss_hook(index, loss):
        return loss * float("nan") if index in nan_loss_at else loss

    lines = _capture_logs()
    trainer = Trainer(
        cfg,
        data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}),
        grad_hook=grad_hook,
        loss_hook=loss_hook,
    )
    try:
        result = trainer.run()
    except NonFiniteLossError as e:
        return {"error": str(e), "lines": lines}
    return {"lines": lines, "skipped": result.skipped_steps, "losses": sorted(result.losses)}


def test_nonfinite_description_names_only_what_is_nonfinite():
    assert nonfinite_description(2.5, float("inf")) == "non-finite grad norm inf (loss 2.5 is finite)"
    assert nonfinite_description(float("nan"), 1.0) == "non-finite loss nan (grad norm 1.0 is finite)"
    assert nonfinite_description(float("nan"), float("nan")) == "non-finite loss nan and grad norm nan"


def test_a_skip_names_the_grad_norm_and_the_step_as_logged(tmp_path):
    out = run_distributed(_train, 1, str(tmp_path), "skip", 10, {1})[0]
    warnings = [line for line in out["lines"] if line.startswith("WARNING")]
    assert len(warnings) == 1, out["lines"]
    # The second update (0-based index 1) is "step 2", as in metrics.jsonl; the loss was finite.
    assert warnings[0].startswith("WARNING step 2: non-finite grad norm inf (loss "), warnings
    assert "non-finite loss" not in warnings[0] and "1 of at most 10 skipped steps" in warnings[0]
    assert out["skipped"] == [1] and out["losses"] == [0, 1, 2]  # TrainResult keeps 0-based indices
    records = {r["step"]: r for r in _read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"}
    assert (records[1]["skipped_steps"], records[2]["skipped_steps"]) == (0, 1)


def test_a_stop_names_the_grad_norm_and_the_step_as_logged(tmp_path):
    out = run_distributed(_train, 1, str(tmp_path), "stop", 10, {2})[0]
    assert out["error"].startswith("step 3: non-finite grad norm inf (loss "), out["error"]
    assert "non-finite loss" not in out["error"] and "weights stay those of step 2" in out["error"]


def test_max_skipped_steps_is_the_most_skips_tolerated(tmp_path):
    out = run_distributed(_train, 1, str(tmp_path / "one"), "skip", 1, (), {0, 1})[0]
    warnings = [line for line in out["lines"] if line.startswith("WARNING")]
    assert warnings == [
        "WARNING step 1: non-finite loss nan and grad norm nan; update skipped (1 of at most 1 skipped steps)"
    ]
    assert out["error"] == (
        "step 2: non-finite loss nan and grad norm nan; 2 steps skipped, more than "
        "training.max_skipped_steps=1: steps [1, 2]"
    )
    out = run_distributed(_train, 1, str(tmp_path / "zero"), "skip", 0, (), {0})[0]
    assert "1 step skipped, more than training.max_skipped_steps=0: steps [1]" in out["error"]
    doc = field_docs(TrainingConfig)["max_skipped_steps"]
    assert "the most steps the run may skip" in doc and "one more stops it" in doc


# ---------------------------------------------------------------- (d) write errors name the file


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_the_index_cache_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "save", _no_space)
    path = str(tmp_path / "epoch-00000.npy")
    with pytest.raises(CacheWriteError, match=f"{path} failed: No space left on device; .*data.cache_dir"):
        atomic_save(path, np.zeros(3))
    monkeypatch.setattr(json, "dump", _no_space)
    with pytest.raises(CacheWriteError, match=f"{tmp_path / 'source.json'} failed: No space left on device"):
        atomic_write_json(str(tmp_path / "source.json"), {"a": 1})
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def test_a_full_disk_while_writing_metrics_names_the_file(tmp_path):
    logger = MetricsLogger(
        MetricsConfig(progress_bar="off"), tmp_path, rank=0, run_config={}, total_steps=10, start_step=0
    )
    jsonl = logger._jsonl
    logger._jsonl = type("Full", (), {"write": _no_space, "flush": lambda self: None, "close": jsonl.close})()
    with pytest.raises(CptronError, match=f"writing {tmp_path / 'metrics.jsonl'} failed: No space left on device"):
        logger.log(1, {"loss": 1.0})
    jsonl.close()


# ---------------------------------------------------------------- (e) `cptron --help`


def test_data_plan_has_its_own_description(capsys):
    assert main(["--help"]) == 0
    lines = {
        line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")
    }
    assert "Continually pretrain" in lines["train"]
    assert "Continually pretrain" not in lines["data plan"] and "data section" in lines["data plan"]
    with pytest.raises(SystemExit):
        main(["data", "plan", "--help"])
    help_text = capsys.readouterr().out
    assert "data section" in help_text and "Continually pretrain" not in help_text


# ---------------------------------------------------------------- (f) rerunning a finished run


def _train_with_eval(rank, world_size, run_dir):
    cfg = make_train_config(run_dir, steps=2)
    cfg.checkpoint = CheckpointConfig(save_final=True, resume=True)
    cfg.metrics = MetricsConfig(log_every=1, jsonl=True, progress_bar="off")

    def data(dp_rank, dp_size):
        val = {"heldout": lambda: [next(PackedSource(16, 8, dp_rank, dp_size, seed=5))]}
        return PackedSource(16, 8, dp_rank, dp_size), val

    lines = _capture_logs()
    result = Trainer(cfg, data_factory=data).run()
    return {"last": result.last_step, "losses": result.losses, "evals": sorted(result.eval_losses), "lines": lines}


def test_rerunning_a_finished_run_adds_no_metrics(tmp_path):
    first = run_distributed(_train_with_eval, 1, str(tmp_path))[0]
    assert first["evals"] == [0, 2]
    before = (tmp_path / "metrics.jsonl").read_text()
    again = run_distributed(_train_with_eval, 1, str(tmp_path))[0]
    assert again["last"] == 2 and again["losses"] == {} and again["evals"] == []
    assert "INFO already finished at step 2 (training.steps=2): nothing to do" in again["lines"]
    assert (tmp_path / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------- (g) logging under torchrun


@contextlib.contextmanager
def bare_root_logger():
    """The root logger without handlers, as at the start of `cptron` (pytest adds its own for each
    test's call phase, which would make basicConfig a no-op); restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        yield root
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = handlers
        root.setLevel(level)


@pytest.mark.parametrize("rank, info_shown", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_logs_info(rank, info_shown, monkeypatch, capsys):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with bare_root_logger():
        _setup_logging()
        log = logging.getLogger("cptron.train")
        log.info("an info line")
        log.warning("a warning line")
    err = capsys.readouterr().err
    assert ("an info line" in err) == info_shown
    assert f"[rank {rank}] WARNING cptron.train: a warning line" in err


def test_a_single_process_logs_info_without_a_rank(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with bare_root_logger():
        _setup_logging()
        logging.getLogger("cptron.train").info("an info line")
    err = capsys.readouterr().err
    assert "INFO cptron.train: an info line" in err and "[rank" not in err


# ---------------------------------------------------------------- (h) the CLI's shutdown order


def _train_through_cli(rank, world_size, run_dir):
    import cptron.train.trainer as trainer_module

    trainers, seen = [], {}

    class FakeDataTrainer(trainer_module.Trainer):
        def __init__(self, cfg):
            super().__init__(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}))
            trainers.append(weakref.ref(self))

    real_destroy = dist.destroy_process_group

    def destroy(group=None):
        if group is None and "at_destroy" in seen and not dist.is_initialized():
            return  # the harness's own teardown, after run_train's
        if group is None:
            seen["at_destroy"] = {
                "async_group": trainers[0]().checkpointer._async_group is not None,
                "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith(("prune-", "finish-"))),
            }
        real_destroy(group)

    trainer_module.Trainer = FakeDataTrainer
    dist.destroy_process_group = destroy
    cfg = make_train_config(run_dir, ParallelConfig(dp_shard=2), steps=4)
    cfg.checkpoint = CheckpointConfig(interval=1, keep_last=1, async_save=True, save_final=True, resume=True)
    run_train(cfg)
    seen["trainer_freed"] = trainers[0]() is None
    return seen


def test_the_cli_ends_background_work_and_frees_the_groups_before_exit(tmp_path):
    for seen in run_distributed(_train_through_cli, 2, str(tmp_path)):
        # The async-save group went before the default one, no checkpoint thread was left running
        # then, and the trainer (which holds every group) is freed before the interpreter's shutdown.
        assert seen == {"at_destroy": {"async_group": False, "threads": []}, "trainer_freed": True}
