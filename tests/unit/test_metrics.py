"""Metrics: FLOP counting, peaks, throughput/MFU, memory and every sink (JSONL, log line, TensorBoard, wandb)."""
import dataclasses
import json
import logging
import math
import sys

import pytest
import torch

from cptron.config import config_from_dict, field_docs
from cptron.errors import ConfigError
from cptron.models.config import PRESETS
from cptron.train.metrics import (
    FLOP_CONVENTION,
    MetricsConfig,
    MetricsLogger,
    Throughput,
    device_peak_flops,
    flops_per_token,
    memory_stats,
    peak_tflops_for_name,
)


def make_logger(tmp_path, rank=0, start_step=0, total_steps=100, **fields):
    cfg = MetricsConfig(**{"progress_bar": "off", **fields})
    return MetricsLogger(cfg, tmp_path / "run", rank=rank, run_config={"lr": {"schedule": "cosine"}},
                         total_steps=total_steps, start_step=start_step)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- FLOPs and MFU

def test_flops_per_token_of_the_tiny_preset_by_hand():
    # tiny: dim 64, 2 layers, 4 heads of 16, 2 kv heads, ffn 176, vocab 2048, untied
    attn = 64 * 64 + 2 * 64 * (2 * 16) + 64 * 64  # q, k+v, o projections
    mlp = 3 * 64 * 176
    per_layer = attn + mlp + 2 * 64  # two RMSNorm weights
    n = 2 * per_layer + 64 + 2048 * 64  # final norm, output projection (no input embedding)
    assert n == 223_552
    assert flops_per_token(PRESETS["tiny"], 256) == 6 * n + 12 * 2 * 4 * 16 * 256 == 1_734_528


def test_tied_output_projection_still_counts():
    untied = PRESETS["tiny"]
    tied = dataclasses.replace(untied, tie_embeddings=True)
    assert flops_per_token(tied, 128) == flops_per_token(untied, 128)
    assert flops_per_token(untied, 128) - flops_per_token(untied, 64) == 12 * 2 * 4 * 16 * 64


def test_mfu_on_a_hand_computed_interval():
    clock = iter([10.0, 12.0, 13.0, 20.0, 24.0]).__next__
    tp = Throughput(flops_per_token=1e9, peak_flops=1e12, world_size=4, clock=clock)
    first = tp.update(2000)  # 2000 tokens in 2 s over 4 devices
    assert first["tokens_per_s"] == pytest.approx(1000.0)
    assert first["tokens_per_s_per_device"] == pytest.approx(250.0)
    assert first["tflops_per_device"] == pytest.approx(0.25)  # 250 tok/s * 1e9 FLOP/tok
    assert first["mfu"] == pytest.approx(0.25)
    second = tp.update(8000)  # only the interval since the last call: 8000 tokens in 1 s
    assert second["mfu"] == pytest.approx(2.0)
    tp.reset()  # t=20: the 7 s before it (a checkpoint save, say) are not counted
    assert tp.update(4000)["tokens_per_s"] == pytest.approx(1000.0)


def test_no_mfu_without_a_peak_and_a_stuck_clock_is_an_error():
    tp = Throughput(1e6, None, 1, clock=iter([0.0, 1.0, 1.0]).__next__)
    out = tp.update(100)
    assert "mfu" not in out and out["tokens_per_s"] == 100.0
    with pytest.raises(ValueError, match="did not advance"):
        tp.update(100)


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.5),
    ("NVIDIA H100 NVL", torch.float16, 835.5),
    ("NVIDIA H200", torch.bfloat16, 989.5),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.5),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312.0),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),
    ("NVIDIA A100-SXM4-40GB", torch.int8, None),
])
def test_peak_table(name, dtype, tflops):
    assert peak_tflops_for_name(name, dtype)[0] == tflops


def test_float32_peak_follows_the_tf32_setting():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert peak_tflops_for_name("NVIDIA A100-SXM4-80GB", torch.float32) == (19.5, "A100, fp32 dense")
        torch.set_float32_matmul_precision("high")
        assert peak_tflops_for_name("NVIDIA A100-SXM4-80GB", torch.float32) == (156.0, "A100, tf32 dense")
    finally:
        torch.set_float32_matmul_precision(before)


def test_device_peak_flops_on_cpu_and_with_an_override():
    peak, why = device_peak_flops(torch.device("cpu"), torch.bfloat16)
    assert peak is None and "metrics.peak_tflops" in why
    peak, why = device_peak_flops(torch.device("cpu"), torch.bfloat16, override_tflops=400.0)
    assert peak == 4e14 and "400 TFLOP/s" in why and FLOP_CONVENTION in why


def test_memory_stats_on_cpu_reports_peak_rss():
    stats = memory_stats(torch.device("cpu"))
    assert set(stats) == {"mem_peak_rss_gib"}
    assert 0.01 < stats["mem_peak_rss_gib"] < 1024  # this process holds torch: tens of MiB at least


# ---------------------------------------------------------------- config

def test_metrics_config_fields_and_validation():
    assert set(field_docs(MetricsConfig)) == {f.name for f in dataclasses.fields(MetricsConfig)}
    for fields, message in [({"log_every": 0}, "metrics.log_every=0 is invalid: expected an integer >= 1"),
                            ({"peak_tflops": -1.0}, "metrics.peak_tflops=-1.0 is invalid"),
                            ({"wandb": True, "wandb_project": ""}, "metrics.wandb_project='' is invalid")]:
        with pytest.raises(ConfigError) as err:
            MetricsConfig(**fields).validate()
        assert message in str(err.value)
    with pytest.raises(ConfigError, match="wandb_mode"):
        config_from_dict(MetricsConfig, {"wandb_mode": "cloud"})


# ---------------------------------------------------------------- JSONL and the log line

def test_jsonl_records(tmp_path):
    logger = make_logger(tmp_path)
    logger.log(10, {"loss": torch.tensor(2.5), "lr": 3e-4, "tokens": 4096})
    logger.log(10, {"loss": 2.75}, kind="eval")
    logger.log(20, {"loss": float("nan")})
    logger.close()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in records] == [(10, "train"), (10, "eval"), (20, "train")]
    assert records[0]["loss"] == 2.5 and records[0]["lr"] == 3e-4 and records[0]["tokens"] == 4096
    assert records[1]["loss"] == 2.75
    assert math.isnan(records[2]["loss"])
    assert all(isinstance(r["time"], float) for r in records)


def test_jsonl_is_flushed_per_line(tmp_path):
    logger = make_logger(tmp_path)
    logger.log(1, {"loss": 1.0})
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["loss"] == 1.0  # before close
    logger.close()


def test_resume_moves_records_after_the_checkpoint_aside(tmp_path):
    first = make_logger(tmp_path)
    for step in (10, 20, 30):
        first.log(step, {"loss": float(step)})
    first.close()
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "a") as fh:
        fh.write('{"step": 40, "kind": "tra')  # cut off by a crash
    resumed = make_logger(tmp_path, start_step=20)
    resumed.log(30, {"loss": 3.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(10, 10.0), (20, 20.0), (30, 3.5)]
    discarded = (tmp_path / "run" / "metrics.discarded.jsonl").read_text().splitlines()
    assert json.loads(discarded[0])["step"] == 30 and discarded[1] == '{"step": 40, "kind": "tra'


def test_log_line(tmp_path, caplog):
    logger = make_logger(tmp_path, total_steps=1000)
    with caplog.at_level(logging.INFO, logger="cptron.metrics"):
        logger.log(10, {"loss": 3.21456, "lr": 3e-4, "grad_norm": 1.5, "tokens_per_s": 12345.6, "mfu": 0.4123,
                        "mem_max_allocated_gib": 12.345, "tokens_per_s_per_device": 1.0, "aux": 0.5})
    logger.close()
    line = caplog.records[-1].getMessage()
    assert line == ("train step 10/1000 | loss 3.2146 | lr 3.000e-04 | grad_norm 1.500 | tokens/s 12,346 | "
                    "mfu 41.2% | mem 12.35 GiB | aux 0.5")


def test_bad_metrics_are_refused(tmp_path):
    logger = make_logger(tmp_path)
    with pytest.raises(TypeError, match="metric 'loss'='high'"):
        logger.log(1, {"loss": "high"})
    with pytest.raises(ConfigError, match="metric name='step'"):
        logger.log(1, {"step": 1})
    logger.close()
    with pytest.raises(RuntimeError, match="after close"):
        logger.log(2, {"loss": 1.0})


def test_should_log_every_n_first_and_last(tmp_path):
    logger = make_logger(tmp_path, log_every=10, total_steps=35, start_step=12)
    assert [s for s in range(13, 36) if logger.should_log(s)] == [13, 20, 30, 35]
    logger.close()


def test_progress_bar(tmp_path, capsys):
    logger = make_logger(tmp_path, progress_bar="on", total_steps=10)
    logger.progress(5, {"loss": 1.25})
    logger.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=1.25" in err


# ---------------------------------------------------------------- other ranks, TensorBoard, wandb

def test_other_ranks_write_nothing(tmp_path, caplog):
    logger = make_logger(tmp_path, rank=1, tensorboard=True, wandb=True, progress_bar="on")
    with caplog.at_level(logging.INFO, logger="cptron.metrics"):
        logger.log(10, {"loss": 1.0})
        logger.progress(10, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()
    assert caplog.records == []


def test_tensorboard_event_file_is_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = make_logger(tmp_path, tensorboard=True)
    logger.log(10, {"loss": 2.0, "lr": 1e-3})
    logger.log(20, {"loss": 1.5})
    logger.log(20, {"loss": 1.75}, kind="eval")
    logger.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 2.0), (20, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(20, 1.75)]


def test_missing_packages_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ConfigError, match="metrics.tensorboard=True is invalid: expected the tensorboard package"):
        make_logger(tmp_path, tensorboard=True)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"metrics.wandb=True is invalid: expected the wandb package \(pip install"):
        make_logger(tmp_path, wandb=True)


def test_wandb_offline_writes_a_run_directory(tmp_path, monkeypatch):
    for key, value in {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DISABLE_CODE": "true", "WANDB_X_DISABLE_STATS": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = make_logger(tmp_path, wandb=True, wandb_run_name="unit")
    logger.log(1, {"loss": 2.0})
    logger.log(2, {"loss": 1.0})
    logger.close()
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and (runs[0] / f"run-{run_id}.wandb").stat().st_size > 0
    # a resumed run continues the same wandb run id
    resumed = make_logger(tmp_path, wandb=True, start_step=2)
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == run_id
    assert len(list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2


def test_wandb_disabled_mode_creates_no_run(tmp_path):
    make_logger(tmp_path, wandb=True, wandb_mode="disabled").close()
    assert not (tmp_path / "run" / "wandb").exists()


@pytest.mark.gpu
def test_cuda_peak_lookup_and_memory_peaks_reset():
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak, why = device_peak_flops(device, torch.bfloat16)
    if any(chip in name for chip in ("H100", "H200", "A100")):
        assert peak is not None and FLOP_CONVENTION in why, (name, why)
    memory_stats(device)  # start a fresh interval
    before = torch.cuda.memory_allocated(device) / (1 << 30)  # other tests may hold CUDA memory
    block = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 0.25 GiB
    del block
    assert memory_stats(device)["mem_max_allocated_gib"] >= before + 0.25  # freed, but within this interval
    assert memory_stats(device)["mem_max_allocated_gib"] < before + 0.25  # the previous call reset the peak


def test_tensorboard_resume_hides_the_old_tail(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = make_logger(tmp_path, tensorboard=True, jsonl=False)
    for step in (10, 20, 30):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = make_logger(tmp_path, tensorboard=True, jsonl=False, start_step=20)
    resumed.log(30, {"loss": 3.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 10.0), (20, 20.0), (30, 3.5)]


def test_profiled_steps_write_a_chrome_trace_per_rank(tmp_path):
    from cptron.data.interface import InMemoryTokenSource
    from cptron.parallel.dims import ParallelConfig
    from cptron.testing.distributed import run_distributed
    from cptron.testing.training import make_train_config
    from cptron.train.trainer import Trainer

    def train(rank, world_size, run_dir):
        cfg = make_train_config(run_dir, ParallelConfig(dp_shard=world_size), steps=3)
        cfg.metrics.profile_steps = [2]
        tokens = torch.randint(3, 500, (4000,), generator=torch.Generator().manual_seed(0))
        Trainer(cfg, data_factory=lambda r, n: (InMemoryTokenSource(tokens, 16, 8, r, n), {})).run()

    run_distributed(train, 2, str(tmp_path))
    files = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert files == ["step-2-rank-0.json", "step-2-rank-1.json"]
    trace = json.loads((tmp_path / "profile" / "step-2-rank-0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names and any(n and "adamw" in n.lower() for n in names)
    with pytest.raises(ConfigError, match="metrics.profile_steps"):
        MetricsConfig(profile_steps=[0]).validate()
