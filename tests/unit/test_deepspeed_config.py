"""`cptron train CONFIG --deepspeed_config ds.json` (and `cptron data plan`): each DeepSpeed key with a cptron
meaning sets its cptron fields, between the YAML file and the command line's options; DeepSpeed's batch identity
is checked (or completed) with the data-parallel size; every other key is refused in one line naming it."""

import json
import logging
from functools import reduce
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml

from cptron.cli import main
from cptron.deepspeed_config import (
    parse_with_deepspeed_config,
    read_deepspeed_config,
    take_deepspeed_options,
    translate_deepspeed_config,
)
from cptron.errors import ConfigError
from cptron.testing.launch import write_tiny_run
from cptron.train.config import JobConfig

REPO = Path(__file__).resolve().parents[2]
LINEAR = {"warmup_type": "linear"}


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """The in-process training run starts a one-process group; later tests must not inherit it."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def write(tmp_path: Path, ds, name: str = "ds.json") -> Path:
    path = tmp_path / name
    path.write_text(ds if isinstance(ds, str) else json.dumps(ds))
    return path


def parse(tmp_path: Path, ds, *argv: str, config: dict | None = None, world_size: int = 1) -> JobConfig:
    """The config `cptron train [train.yaml] --deepspeed_config ds.json ARGV...` runs with, through cli.main's path."""
    head = []
    if config is not None:
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
        head = [str(tmp_path / "train.yaml")]
    args = [*head, "--deepspeed_config", str(write(tmp_path, ds)), *argv]
    return parse_with_deepspeed_config(JobConfig, args, prog="cptron train", description="", world_size=world_size)


def get(cfg: JobConfig, dotted: str):
    return reduce(getattr, dotted.split("."), cfg)


MAPPINGS = [
    (
        {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4},
        {"training.global_batch_size": 16, "training.micro_batch_size": 4},
    ),
    ({"gradient_clipping": 0.25}, {"optim.grad_clip": 0.25}),
    ({"bf16": {"enabled": True}}, {"parallel.mixed_precision": "bfloat16"}),
    ({"bfloat16": {"enabled": True}}, {"parallel.mixed_precision": "bfloat16"}),
    (
        {"bf16": {"enabled": False}, "fp16": {"enabled": False, "loss_scale": 0}},
        {"parallel.mixed_precision": "float32"},
    ),
    ({"zero_optimization": {"stage": 3}}, {"parallel.fsdp_reshard_after_forward": True, "parallel.dp_shard": -1}),
    ({"zero_optimization": {"stage": 2}}, {"parallel.fsdp_reshard_after_forward": False}),
    ({"zero_optimization": {"stage": 1}}, {"parallel.fsdp_reshard_after_forward": False}),
    ({"zero_optimization": {"stage": 0}}, {"parallel.dp_shard": 1, "parallel.dp_replicate": 1}),
    (
        {
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
                "offload_param": {"device": "cpu"},
            }
        },
        {"parallel.offload": "all", "parallel.offload_pin_memory": False},
    ),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}, {"parallel.offload": "none"}),
    (
        {
            "optimizer": {
                "type": "adam",
                "params": {"lr": 2e-4, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.01},
            }
        },
        {"optim.lr": 2e-4, "optim.beta1": 0.8, "optim.beta2": 0.99, "optim.eps": 1e-6, "optim.weight_decay": 0.01},
    ),
    (
        {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}},
        {"optim.lr": 1e-3, "optim.beta2": 0.95},
    ),
    (
        {
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_num_steps": 5, **LINEAR}},
        },
        {
            "lr.schedule": "constant",
            "lr.warmup_steps": 5,
            "lr.warmup_start_ratio": 0.1,
            "lr.decay_steps": None,
            "optim.lr": 1e-3,
        },
    ),
    (
        {
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {"warmup_max_lr": 4e-4, "warmup_num_steps": 10, "total_num_steps": 100, **LINEAR},
            }
        },
        {
            "lr.schedule": "linear",
            "lr.min_lr_ratio": 0.0,
            "lr.warmup_steps": 10,
            "lr.warmup_start_ratio": 0.0,
            "training.steps": 100,
            "optim.lr": 4e-4,
        },
    ),
    (  # DeepSpeed's WarmupDecayLR decays to warmup_min_lr (min + (max - min) x gamma, gamma falling to 0)
        {
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {
                    "warmup_min_lr": 1e-4,
                    "warmup_max_lr": 4e-4,
                    "warmup_num_steps": 10,
                    "total_num_steps": 100,
                    **LINEAR,
                },
            }
        },
        {"lr.schedule": "linear", "lr.min_lr_ratio": 0.25, "lr.warmup_start_ratio": 0.25, "optim.lr": 4e-4},
    ),
    (  # WarmupDecayLR's own default peak, 0.001, as in DeepSpeed
        {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10, "total_num_steps": 50, **LINEAR}}},
        {"optim.lr": 0.001, "training.steps": 50},
    ),
    (
        {
            "scheduler": {
                "type": "WarmupCosineLR",
                "params": {
                    "total_num_steps": 50,
                    "warmup_num_steps": 5,
                    "warmup_min_ratio": 0.2,
                    "cos_min_ratio": 0.05,
                    **LINEAR,
                },
            }
        },
        {
            "lr.schedule": "cosine",
            "lr.min_lr_ratio": 0.05,
            "lr.warmup_start_ratio": 0.2,
            "lr.warmup_steps": 5,
            "training.steps": 50,
        },
    ),
    (  # DeepSpeed's defaults for absent params: 1000 warmup steps, cos_min_ratio 0.0001
        {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 2000, **LINEAR}}},
        {"lr.warmup_steps": 1000, "lr.min_lr_ratio": 0.0001, "lr.warmup_start_ratio": 0.0},
    ),
    ({"steps_per_print": 3}, {"metrics.log_every": 3}),
    ({"wall_clock_breakdown": False}, {"metrics.log_every": 10}),
]


@pytest.mark.parametrize(
    "ds, want", MAPPINGS, ids=lambda x: "-".join(x) if isinstance(x, dict) and "-" not in str(list(x)) else None
)
def test_each_key_sets_its_cptron_fields(tmp_path, ds, want):
    cfg = parse(tmp_path, ds)
    assert {k: get(cfg, k) for k in want} == want


def test_each_mapped_key_is_logged_in_one_line(tmp_path, caplog):
    ds = {"gradient_clipping": 0.5, "zero_optimization": {"stage": 2}, "steps_per_print": 4}
    with caplog.at_level(logging.INFO, logger="cptron"):
        parse(tmp_path, ds)
    lines = [r.getMessage() for r in caplog.records if r.name == "cptron.deepspeed_config"]
    prefix = f"deepspeed config {tmp_path / 'ds.json'}: "
    assert lines[0] == prefix + "gradient_clipping=0.5 -> optim.grad_clip=0.5"
    assert lines[1].startswith(prefix + "zero_optimization.stage=2 -> parallel.fsdp_reshard_after_forward=false (")
    assert lines[2] == prefix + "steps_per_print=4 -> metrics.log_every=4"
    assert len(lines) == 3


def test_yaml_then_deepspeed_file_then_command_line(tmp_path):
    config = {
        "optim": {"lr": 1e-2, "grad_clip": 0.3, "weight_decay": 0.2},
        "training": {"global_batch_size": 32},
        "metrics": {"log_every": 7},
    }
    ds = {"gradient_clipping": 0.5, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}}
    cfg = parse(tmp_path, ds, "--optim.lr", "5e-4", config=config)
    assert cfg.optim.lr == 5e-4  # command line over the file
    assert cfg.optim.grad_clip == 0.5 and cfg.optim.weight_decay == 0.0  # file over YAML
    assert cfg.training.global_batch_size == 32 and cfg.metrics.log_every == 7  # YAML where the file says nothing
    # The option may also come before the YAML path, or with `=`, next to DeepSpeed scripts' bare --deepspeed.
    args = ["--deepspeed", f"--deepspeed_config={tmp_path / 'ds.json'}", str(tmp_path / "train.yaml")]
    cfg = parse_with_deepspeed_config(JobConfig, args, prog="cptron train", description="", world_size=1)
    assert cfg.optim.lr == 1e-3 and cfg.metrics.log_every == 7


BATCH = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}


def test_batch_identity_with_world_size_and_tp(tmp_path):
    # 8 processes, tp=2: 4 data-parallel ranks; 32 = 2 x 4 x 4.
    cfg = parse(tmp_path, {"train_batch_size": 32, **BATCH}, "--parallel.tp", "2", world_size=8)
    assert (cfg.training.global_batch_size, cfg.training.micro_batch_size) == (32, 2)
    with pytest.raises(ConfigError) as refused:
        parse(tmp_path, {"train_batch_size": 32, **BATCH}, "--parallel.tp", "4", world_size=8)
    message = str(refused.value)
    assert "train_batch_size 32" in message and "train_micro_batch_size_per_gpu 2" in message
    assert (
        "gradient_accumulation_steps 4 x data-parallel size 2 (WORLD_SIZE 8 / (parallel.tp 4 x parallel.pp 1))"
        in message
    )
    assert "\n" not in message


def test_absent_batch_sizes_are_derived_as_deepspeed_derives_them(tmp_path):
    # train_batch_size = micro x gas x data-parallel size (8 / (tp 2 x pp 2) = 2)
    cfg = parse(tmp_path, BATCH, "--parallel.tp", "2", "--parallel.pp", "2", world_size=8)
    assert (cfg.training.global_batch_size, cfg.training.micro_batch_size) == (16, 2)
    # micro = train_batch_size / (gas x data-parallel size)
    cfg = parse(
        tmp_path, {"train_batch_size": 64, "gradient_accumulation_steps": 2}, "--parallel.tp", "2", world_size=8
    )
    assert (cfg.training.global_batch_size, cfg.training.micro_batch_size) == (64, 8)
    # only the micro batch: no accumulation
    cfg = parse(tmp_path, {"train_micro_batch_size_per_gpu": 3}, world_size=4)
    assert (cfg.training.global_batch_size, cfg.training.micro_batch_size) == (12, 3)
    # the command line's micro batch wins over the file's, and the derived global batch follows it
    cfg = parse(
        tmp_path, BATCH, "--training.micro_batch_size", "3", world_size=2, config={"training": {"global_batch_size": 7}}
    )
    assert (cfg.training.global_batch_size, cfg.training.micro_batch_size) == (24, 3)
    # an explicit global batch on the command line is kept, and checked against the file's accumulation
    with pytest.raises(
        ConfigError, match="train_batch_size 10 .* gradient_accumulation_steps 4 x data-parallel size 1"
    ):
        parse(tmp_path, BATCH, "--training.global_batch_size", "10")


def test_zero_stage_0_is_plain_data_parallelism_over_the_data_parallel_ranks(tmp_path):
    cfg = parse(tmp_path, {"zero_optimization": {"stage": 0}}, "--parallel.tp", "2", world_size=8)
    assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard, cfg.parallel.tp) == (4, 1, 2)
    cfg = parse(tmp_path, {"zero_optimization": {"stage": 0}}, "--parallel.dp_replicate", "2", world_size=8)
    assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard) == (2, 1)  # the command line's choice stays


BAD = [
    ({"fp16": {"enabled": True}}, 'fp16.enabled is refused: cptron has no fp16 loss scaling; use "bf16"'),
    (
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        "zero_optimization.offload_optimizer is refused: FSDP2 offloads parameters, gradients and optimizer state together",
    ),
    (
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
        "zero_optimization.offload_param is refused",
    ),
    (
        {
            "zero_optimization": {
                "stage": 3,
                "offload_optimizer": {"device": "nvme"},
                "offload_param": {"device": "nvme"},
            }
        },
        "zero_optimization.offload_optimizer.device is refused: NVMe",
    ),
    ({"zero_optimization": {"stage": 2, "overlap_comm": True}}, "zero_optimization.overlap_comm is refused"),
    (
        {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e9}},
        "zero_optimization.stage3_max_live_parameters is refused",
    ),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4 is invalid: expected an integer in [0, 3]"),
    ({"zero_optimization": 2}, "zero_optimization=2 is invalid: expected a JSON object"),
    ({"foo": 1}, "foo is refused: a DeepSpeed key with no cptron equivalent"),
    ({"activation_checkpointing": {}}, "activation_checkpointing is refused: set parallel.activation_checkpoint"),
    ({"wall_clock_breakdown": True}, "wall_clock_breakdown is refused"),
    (
        {"train_batch_size": "auto"},
        'train_batch_size="auto" is invalid: expected an integer >= 1: "auto" is the Hugging Face Trainer\'s placeholder',
    ),
    ({"gradient_clipping": "auto"}, 'gradient_clipping="auto" is invalid'),
    ({"gradient_clipping": True}, "gradient_clipping=true is invalid: expected a number >= 0"),
    (
        {"gradient_accumulation_steps": 4},
        "gradient_accumulation_steps is refused: it needs train_batch_size or train_micro_batch_size_per_gpu",
    ),
    (
        {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4},
        "train_batch_size=10 is invalid: expected a multiple of train_micro_batch_size_per_gpu=4",
    ),
    ('{"train_batch_size": 8,\n "gradient_clipping": }', "is not valid JSON: Expecting value at line 2 column 23"),
    ('{"gradient_clipping": NaN}', "is not valid JSON: NaN is not a JSON number"),
    ('{"steps_per_print": 1, "steps_per_print": 2}', "is not valid JSON: key 'steps_per_print' appears twice"),
    ("[1, 2]", "must hold a JSON object of keys, got list"),
    ('"zero"', "must hold a JSON object of keys, got str"),
    (
        {"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}},
        "optimizer.params.adam_w_mode is refused: false makes DeepSpeed's Adam add the weight decay to the gradient (L2)",
    ),
    ({"optimizer": {"type": "Lamb"}}, 'optimizer.type="Lamb" is refused: cptron trains with AdamW only'),
    ({"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}}, "optimizer.params.max_grad_norm is refused"),
    (
        {"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}},
        "optimizer.params.betas=[0.9] is invalid: expected a list of two numbers",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "log"}}},
        'scheduler.params.warmup_type="log" is invalid: expected "linear"',
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {}}},
        "scheduler.params.warmup_type is missing, so DeepSpeed would warm up along log(step)",
    ),
    (
        {
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, **LINEAR}},
        },
        "scheduler.params.warmup_max_lr is refused: it is the peak LR and optimizer.params.lr=0.0001 differs",
    ),
    (
        {
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 2000, **LINEAR}},
        },
        "scheduler.params.warmup_max_lr (absent: DeepSpeed's default 0.001) is refused",
    ),
    (
        {"scheduler": {"type": "OneCycle", "params": {}}},
        'scheduler.type="OneCycle" is refused: cptron maps only WarmupLR, WarmupDecayLR, WarmupCosineLR',
    ),
    (
        {"scheduler": {"type": "WarmupDecayLR", "params": LINEAR}},
        "scheduler.params is refused: WarmupDecayLR needs total_num_steps",
    ),
    (
        {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_max_lr": 1, **LINEAR}}},
        "scheduler.params.warmup_max_lr is refused: not a parameter of DeepSpeed's WarmupCosineLR",
    ),
    (
        {"scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-5, **LINEAR}}},
        "scheduler.params.warmup_min_lr is refused: it is a fraction of the peak LR",
    ),
    ({"bf16": {"enabled": True}, "bfloat16": {"enabled": True}}, "bfloat16 is refused: bf16 is given too"),
    ({"bf16": {"enabled": True, "immediate_grad_update": True}}, "bf16.immediate_grad_update is refused"),
]


@pytest.mark.parametrize("ds, needle", BAD, ids=[needle.split(" ")[0][:40] for _, needle in BAD])
def test_every_refusal_is_one_line_naming_the_key(tmp_path, ds, needle, capsys):
    path = write(tmp_path, ds)
    assert main(["train", "--deepspeed_config", str(path), "--training.run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert str(path) in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--deepspeed_config"], "--deepspeed_config='' is invalid: expected a DeepSpeed JSON config file"),
        (["train", "--deepspeed_config", "a.json", "--deepspeed_config=b.json"], "given once"),
        (
            ["train", "--deepspeed_config", "/nonexistent/ds.json"],
            "cannot read deepspeed config file /nonexistent/ds.json",
        ),
        (["init", "--deepspeed"], "unknown field 'deepspeed'"),
        (["lr-plot", "--deepspeed_config", "ds.json"], "unknown field 'deepspeed_config'"),
    ],
)
def test_option_problems_and_other_commands(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_the_options_are_taken_out_of_the_command_line():
    argv = ["c.yaml", "--deepspeed", "--deepspeed_config", "ds.json", "--optim.lr", "1"]
    assert take_deepspeed_options(argv) == (["c.yaml", "--optim.lr", "1"], "ds.json")
    assert take_deepspeed_options(["--deepspeed-config=x.json"]) == ([], "x.json")
    assert take_deepspeed_options(["c.yaml"]) == (["c.yaml"], None)


@pytest.mark.parametrize("path", [("train",), ("data", "plan")])
def test_help_documents_the_option(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--deepspeed_config", "/nonexistent.json", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--deepspeed_config PATH reads a DeepSpeed JSON config" in out and "--deepspeed," in out


def test_the_example_config_maps_cleanly(tmp_path):
    ds = json.loads((REPO / "launch" / "ds_config.example.json").read_text())
    cfg = parse(tmp_path, ds, world_size=8)  # 256 = 4 x 8 x 8 data-parallel ranks
    assert (cfg.training.global_batch_size, cfg.training.micro_batch_size, cfg.training.steps) == (256, 4, 20000)
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (3e-5, 0.95, 0.1, 1.0)
    assert (cfg.lr.schedule, cfg.lr.warmup_steps, cfg.lr.min_lr_ratio) == ("cosine", 500, 0.1)
    assert cfg.parallel.mixed_precision == "bfloat16" and cfg.parallel.fsdp_reshard_after_forward is True
    assert cfg.metrics.log_every == 10


def test_data_plan_reads_the_deepspeed_config(tmp_path, capsys):
    config = write_tiny_run(tmp_path, steps=4, docs=60)
    ds = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 6, **LINEAR}},
    }
    argv = ["data", "plan", str(config), "--deepspeed_config", str(write(tmp_path, ds))]
    assert main([*argv, "--training.run_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out  # 6 steps x 4 sequences, not the YAML's 4 x 8
    assert "4 samples of seq_len + 1 = 33 tokens per step, steps 0..6\n" in out and "~24 more samples" in out


def test_a_short_run_trains_with_the_mapped_values(tmp_path, caplog):
    config = write_tiny_run(tmp_path, steps=100, docs=100)
    ds = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.05}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 1e-4,
                "warmup_max_lr": 1e-3,
                "warmup_num_steps": 2,
                "total_num_steps": 4,
                **LINEAR,
            },
        },
        "steps_per_print": 1,
    }
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="cptron"):
        argv = ["train", str(config), "--deepspeed", "--deepspeed_config", str(write(tmp_path, ds))]
        assert main([*argv, "--training.run_dir", str(run), "--training.eval_at_start", "false"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if r.get("kind") == "train"}
    # linear warmup from 1e-4 to the peak 1e-3 over 2 steps, then linear decay back to warmup_min_lr 1e-4 at
    # step 4 (total_num_steps), where DeepSpeed's WarmupDecayLR ends too
    assert lrs == pytest.approx({1: 5.5e-4, 2: 1e-3, 3: 5.5e-4, 4: 1e-4}, abs=1e-12)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["global_batch_size"] == 4 and saved["training"]["micro_batch_size"] == 2
    assert (
        saved["optim"]["grad_clip"] == 0.5
        and saved["optim"]["beta2"] == 0.99
        and saved["optim"]["weight_decay"] == 0.05
    )
    assert saved["parallel"]["fsdp_reshard_after_forward"] is False
    assert any("scheduler.type=WarmupDecayLR -> " in r.getMessage() for r in caplog.records)


def test_every_refused_key_is_named_in_one_line(tmp_path):
    """A config with several keys cptron does not read names them all at once, not one per attempt."""
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_batch_size": 8,
                "foo": 1,
                "wall_clock_breakdownx": False,
                "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        translate_deepspeed_config(read_deepspeed_config(str(path)), str(path))
    message = str(err.value)
    assert "\n" not in message
    assert f"deepspeed config {path}: foo, wall_clock_breakdownx are refused: foo: a DeepSpeed key" in message
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e8}}))
    with pytest.raises(ConfigError) as err:
        translate_deepspeed_config(read_deepspeed_config(str(path)), str(path))
    assert "zero_optimization.overlap_comm, zero_optimization.reduce_bucket_size are refused" in str(err.value)


def _deepspeed_lrs(kind: str, params: dict, peak: float, steps: int) -> list[float]:
    """The LR DeepSpeed's own scheduler gives at its iterations (last_batch_iteration) 1, 2, ..., steps."""
    schedules = pytest.importorskip("deepspeed.runtime.lr_schedules")
    import torch

    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([weight], lr=peak)
    scheduler = getattr(schedules, kind)(opt, **params)
    out = []
    for iteration in range(1, steps + 1):
        scheduler.step(iteration)
        out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize(
    "kind, params",
    [
        ("WarmupLR", {"warmup_min_lr": 1e-4, "warmup_max_lr": 2e-3, "warmup_num_steps": 5}),
        ("WarmupDecayLR", {"warmup_min_lr": 1e-4, "warmup_max_lr": 2e-3, "warmup_num_steps": 5, "total_num_steps": 17}),
        ("WarmupDecayLR", {"warmup_max_lr": 2e-3, "warmup_num_steps": 4, "total_num_steps": 9}),
    ],
)
def test_warmup_schedules_equal_deepspeeds_own_from_its_iteration_1(tmp_path, kind, params):
    """cptron's update u (counting from 1) takes the LR DeepSpeed's scheduler gives at its iteration u: the same
    curve without DeepSpeed's iteration 0, which runs at warmup_min_lr, while cptron's first update warms up."""
    from cptron.train.lr import build_lr_schedule

    steps = params.get("total_num_steps", 12)
    cfg = parse(tmp_path, {"scheduler": {"type": kind, "params": {**params, **LINEAR}}}, "--training.steps", str(steps))
    schedule = build_lr_schedule(cfg.lr, cfg.training.steps)
    ours = [cfg.optim.lr * schedule.factor(u) for u in range(steps)]
    theirs = _deepspeed_lrs(kind, {**params, **LINEAR}, cfg.optim.lr, steps)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def test_warmup_cosine_ends_where_deepspeeds_does_and_decays_one_update_later(tmp_path):
    """WarmupCosineLR: the warmup is DeepSpeed's from its iteration 1 (as above); cptron then takes the peak for
    one update, which DeepSpeed's cosine never does, so its decay is DeepSpeed's one iteration later and both end
    at cos_min_ratio x lr on the last update."""
    from cptron.train.lr import build_lr_schedule

    params = {"warmup_min_ratio": 0.1, "warmup_num_steps": 4, "total_num_steps": 15, "cos_min_ratio": 0.05, **LINEAR}
    cfg = parse(
        tmp_path,
        {
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "scheduler": {"type": "WarmupCosineLR", "params": params},
        },
    )
    schedule = build_lr_schedule(cfg.lr, cfg.training.steps)
    ours = [cfg.optim.lr * schedule.factor(u) for u in range(15)]
    theirs = _deepspeed_lrs("WarmupCosineLR", params, 1e-3, 15)
    assert ours[:3] == pytest.approx(theirs[:3], rel=1e-9)  # warmup, one update ahead
    assert ours[3] == pytest.approx(1e-3)  # the peak
    assert ours[4:] == pytest.approx([theirs[u - 1] for u in range(4, 15)], rel=1e-9)  # the decay, one later
    assert ours[-1] == pytest.approx(theirs[-1]) == pytest.approx(0.05e-3)
