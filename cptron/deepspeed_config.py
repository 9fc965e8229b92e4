"""A DeepSpeed JSON config (`--deepspeed_config ds.json`) read as cptron config values.

DeepSpeed users keep batch sizes, optimizer, LR schedule, precision and ZeRO stage in one JSON
file. `cptron train` and `cptron data plan` take that file with --deepspeed_config: each key with a
cptron meaning becomes the cptron field(s) it stands for, and every other key is refused by its
dotted JSON name. A key read and dropped would make a different run than the file describes, so
nothing is skipped; the table of what maps to what is in launch/README.md.

Precedence: the YAML file < this file < `--section.field` options. The translation is a list of
dotted options inserted after the YAML path and before the user's own, so the config parser's order
gives the precedence and its checks name the fields. Values that need the data-parallel size
(a batch size DeepSpeed derives, ZeRO stage 0's replica count) are set after parsing, from
WORLD_SIZE / (parallel.tp x parallel.pp), unless a command-line option sets that field itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cptron.config import parse_config, validate_config
from cptron.config.parse import command_line_options
from cptron.errors import ConfigError, invalid, require

log = logging.getLogger(__name__)

# The commands whose config is the train config (JobConfig): they take --deepspeed_config.
DEEPSPEED_COMMANDS = (("train",), ("data", "plan"))

DEEPSPEED_HELP = (
    "--deepspeed_config PATH reads a DeepSpeed JSON config: batch sizes, optimizer, scheduler, "
    "gradient_clipping, bf16, zero_optimization and steps_per_print become cptron fields (one log line "
    "each), applied after the YAML file and before --section.field options; every other key is refused "
    "by name (see launch/README.md). --deepspeed, which DeepSpeed job scripts pass, is accepted and does "
    "nothing."
)

_OPTION_NAMES = ("--deepspeed_config", "--deepspeed-config")

# Top-level keys with no cptron meaning whose refusal can say where cptron does the same thing.
_ELSEWHERE = {
    "activation_checkpointing": "set parallel.activation_checkpoint (full or selective) instead",
    "amp": "cptron has no apex AMP; use bf16",
    "tensorboard": "set metrics.tensorboard instead",
    "wandb": "set metrics.wandb instead",
    "csv_monitor": "metrics.jsonl is written every metrics.log_every steps",
    "flops_profiler": "cptron logs throughput and MFU with every metrics row",
    **dict.fromkeys(
        ("prescale_gradients", "gradient_predivide_factor", "communication_data_type"),
        "cptron reduces gradients in fp32 as a sum normalized by the global token count",
    ),
}
# Switches whose DeepSpeed default (off) changes nothing in a run: that value is accepted, any other refused.
_OFF_SWITCHES = {"wall_clock_breakdown": False, "memory_breakdown": False}
_BOOL, _OBJECT = "true or false", "a JSON object"
_AUTO = '"auto" is the Hugging Face Trainer\'s placeholder, filled in from its own arguments; write the value'
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


class _FileError(Exception):
    """Raised inside json.loads hooks (which know no path); read_deepspeed_config names the file."""


def take_deepspeed_options(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """`argv` without `--deepspeed_config PATH` (or `=PATH`) and the bare `--deepspeed` flag, and the PATH."""
    out, path, i = [], None, 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=")
        i += 1
        if token == "--deepspeed":  # DeepSpeed scripts' switch for their own argparse: nothing to do
            continue
        if name not in _OPTION_NAMES:
            out.append(token)
            continue
        if not eq:
            value = argv[i] if i < len(argv) and not argv[i].startswith("--") else ""
            i += 1 if value else 0
        require(bool(value), "--deepspeed_config", value, "a DeepSpeed JSON config file")
        require(path is None, "--deepspeed_config", value, f"one file, given once (it was also given as {path!r})")
        path = value
    return out, path


def read_deepspeed_config(path: str) -> dict:
    """The JSON object in `path`, or ConfigError naming the file (and the line and column of a JSON error)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read deepspeed config file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"deepspeed config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"deepspeed config file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except _FileError as e:
        raise ConfigError(f"deepspeed config file {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"deepspeed config file {path} is nested too deeply to be a DeepSpeed config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed config file {path} must hold a JSON object of keys, got {type(data).__name__}")
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:  # json keeps the last silently; a DeepSpeed run would have used that one
            raise _FileError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _FileError(f"{name} is not a JSON number")


def _show(value: Any) -> str:
    """A value as a command-line option spells it (and as the log shows it)."""
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else repr(value) if isinstance(value, float) else str(value)


class _Json(str):
    """A value's JSON text (true, null, "auto"), which `invalid` shows as is: its repr is itself."""

    __repr__ = str.__str__


@dataclass
class DeepSpeedTranslation:
    """What a DeepSpeed config sets: cptron options, the batch sizes resolved after parsing, log lines."""

    path: str
    options: dict[str, Any] = field(default_factory=dict)
    """Dotted cptron field -> value, given to the parser before the command line's own options."""
    lines: list[str] = field(default_factory=list)  # one per mapped key, logged once the config is parsed
    batch: dict[str, int] = field(default_factory=dict)
    """The batch keys the file gives (train_batch_size, ...), resolved against the data-parallel size."""
    replicate_only: bool = False  # ZeRO stage 0: parallel.dp_replicate = the data-parallel size
    total_num_steps: Optional[int] = None
    """The scheduler's total_num_steps (training.steps), to warn when the command line changes the run length."""
    optimizer_lr: Optional[float] = None

    # ------------------------------------------------------------ helpers

    def set(self, key: str, value: Any, fields: dict[str, Any], why: str = "") -> None:
        self.options.update(fields)
        mapped = ", ".join(f"{name}={_show(v)}" for name, v in fields.items()) or "nothing"
        self.lines.append(f"{key}={_show(value)} -> {mapped}" + (f" ({why})" if why else ""))

    def where(self, key: str) -> str:
        return f"deepspeed config {self.path}: {key}"

    def refuse(self, key: str, why: str, many: bool = False) -> ConfigError:
        return ConfigError(f"{self.where(key)} {'are' if many else 'is'} refused: {why}")

    def only(self, key: str, obj: dict, allowed: tuple[str, ...], why: str) -> None:
        extra = [f"{key}.{_name(name)}" for name in obj if name not in allowed]  # all of them, in one line
        if extra:
            raise self.refuse(", ".join(extra), f"{why} (cptron reads {key}.{{{','.join(allowed)}}})", len(extra) > 1)

    def bad(self, key: str, value: Any, expected: str) -> ConfigError:
        text = json.dumps(value)  # the file's spelling, cut to a short line
        return invalid(self.where(key), _Json(text if len(text) <= 80 else text[:77] + "..."), expected)

    def check(self, ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise self.bad(key, value, expected)

    def auto(self, key: str, value: Any, expected: str) -> None:
        if value == "auto":
            raise self.bad(key, value, f"{expected}: {_AUTO}")

    def typed(self, key: str, value: Any, kind: type, expected: str) -> Any:
        self.auto(key, value, expected)
        self.check(isinstance(value, kind), key, value, expected)
        return value

    def integer(self, key: str, value: Any, low: int, high: Optional[int] = None, why: str = "") -> int:
        expected = (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]") + why
        self.auto(key, value, expected)
        ok = type(value) is int and value >= low and (high is None or value <= high)
        self.check(ok, key, value, expected)
        return value

    def number(self, key: str, value: Any, expected: str, ok: Any) -> float:
        self.auto(key, value, expected)
        good = type(value) in (int, float) and math.isfinite(value) and ok(value)
        self.check(good, key, value, expected)
        return float(value)

    # ------------------------------------------------------------ after parsing

    def placeholders(self, user_argv: list[str]) -> dict[str, int]:
        """Batch sizes that pass the parser's checks until resolve() derives the real ones from the data-parallel
        size: a global batch that is a multiple of the micro batch (the command line's, when it sets one)."""
        out = {}
        if self.batch and "train_micro_batch_size_per_gpu" not in self.batch:
            out["training.micro_batch_size"] = 1  # divides any global batch
        if self.batch and "train_batch_size" not in self.batch:
            micro = _cli_values(user_argv).get("training.micro_batch_size", "")
            micro = int(micro) if micro.isdigit() and int(micro) else self.batch["train_micro_batch_size_per_gpu"]
            out["training.global_batch_size"] = micro * self.batch.get("gradient_accumulation_steps", 1)
        return out

    def resolve(self, cfg: Any, user_argv: list[str], world_size: int) -> None:
        """Set the values that need the data-parallel size on the parsed `cfg`, and check DeepSpeed's
        batch identity train_batch_size = micro x gradient_accumulation_steps x data-parallel size."""
        p, t = cfg.parallel, cfg.training
        given = set(_cli_values(user_argv))
        if self.total_num_steps is not None and t.steps != self.total_num_steps:
            why = f"training.steps={t.steps} from the command line: the schedule decays to that step instead"
            log.warning("%s: %s", self.where(f"scheduler.params.total_num_steps={self.total_num_steps}"), why)
        if not self.batch and not self.replicate_only:
            return
        if world_size % (p.tp * p.pp):
            raise ConfigError(
                f"{self.where('batch sizes')}: WORLD_SIZE={world_size} is not divisible by parallel.tp x parallel.pp"
                f" = {p.tp} x {p.pp}, so the data-parallel size is undefined"
            )
        dp = world_size // (p.tp * p.pp)
        dp_text = f"data-parallel size {dp} (WORLD_SIZE {world_size} / (parallel.tp {p.tp} x parallel.pp {p.pp}))"
        if self.replicate_only and not {"parallel.dp_replicate", "parallel.dp_shard"} & given:
            p.dp_replicate = dp
            self.lines.append(f"zero_optimization.stage=0 -> parallel.dp_replicate={dp}, the {dp_text}")
        if self.batch:
            self._resolve_batch(t, dp, dp_text, given)
        try:
            validate_config(cfg)
        except ConfigError as e:
            raise ConfigError(f"{e} (with the values of deepspeed config {self.path})") from e

    def _resolve_batch(self, t: Any, dp: int, dp_text: str, given: set[str]) -> None:
        train, gas = self.batch.get("train_batch_size"), self.batch.get("gradient_accumulation_steps")
        micro = self.batch.get("train_micro_batch_size_per_gpu")
        if train is None and "training.global_batch_size" not in given:
            t.global_batch_size = t.micro_batch_size * (gas or 1) * dp
            self.lines.append(
                f"train_batch_size (absent) = micro {t.micro_batch_size} x gradient_accumulation_steps {gas or 1} x "
                f"{dp_text} -> training.global_batch_size={t.global_batch_size}"
            )
        if micro is None and train is not None and "training.micro_batch_size" not in given:
            t.micro_batch_size = max(1, t.global_batch_size // ((gas or 1) * dp))  # a remainder fails the check below
            self.lines.append(
                f"train_micro_batch_size_per_gpu (absent) = train_batch_size {t.global_batch_size} / "
                f"(gradient_accumulation_steps {gas or 1} x {dp_text}) -> training.micro_batch_size={t.micro_batch_size}"
            )
        accumulation = gas if gas is not None else t.global_batch_size // (t.micro_batch_size * dp)
        if t.global_batch_size != t.micro_batch_size * accumulation * dp or accumulation < 1:
            shown = "gradient_accumulation_steps" if gas is not None else "its gradient accumulation (derived)"
            raise ConfigError(
                f"{self.where('batch sizes')}: train_batch_size {t.global_batch_size} (training.global_batch_size) != "
                f"train_micro_batch_size_per_gpu {t.micro_batch_size} (training.micro_batch_size) x {shown} "
                f"{accumulation} x {dp_text}; DeepSpeed requires them equal"
            )


def _name(key: Any) -> str:
    """A JSON key as it can be shown on one line."""
    return key if isinstance(key, str) and key.isprintable() and "." not in key else repr(key)


def _cli_values(argv: list[str]) -> dict[str, str]:
    """Dotted field -> raw value (the last one; "" when bare) of each command-line option, dashes in
    the names read as underscores, as the config parser reads them."""
    options = command_line_options(argv)
    return {name.replace("-", "_"): raw if isinstance(raw, str) else "" for name, raw in options if name}


# ---------------------------------------------------------------- translation


def translate_deepspeed_config(data: dict, path: str) -> DeepSpeedTranslation:
    """The cptron values `data` (a DeepSpeed config read from `path`) stands for; ConfigError on any other key."""
    t = DeepSpeedTranslation(path)
    readers = {
        **dict.fromkeys(_BATCH_KEYS, _batch),
        "gradient_clipping": _gradient_clipping,
        "bf16": _bf16,
        "bfloat16": _bf16,
        "fp16": _fp16,
        "zero_optimization": _zero,
        "optimizer": _optimizer,
        "scheduler": _scheduler,  # after the optimizer, whose lr it is checked against
        "steps_per_print": _steps_per_print,
        **dict.fromkeys(_OFF_SWITCHES, _off_switch),
    }
    unknown = [key for key in data if key not in readers]  # all of them, in one line
    if unknown:
        whys = [_ELSEWHERE.get(key, "a DeepSpeed key with no cptron equivalent") for key in unknown]
        why = whys[0] if len(unknown) == 1 else "; ".join(f"{_name(k)}: {w}" for k, w in zip(unknown, whys))
        read = ", ".join(k for k in readers if k != "bfloat16")
        raise t.refuse(", ".join(map(_name, unknown)), f"{why} (cptron reads {read})", len(unknown) > 1)
    if "bf16" in data and "bfloat16" in data:
        raise t.refuse("bfloat16", "bf16 is given too (bfloat16 is DeepSpeed's other name for it): keep one")
    for key, reader in readers.items():
        if key in data and not (reader is _batch and t.batch):  # _batch reads its three keys at once
            reader(t, data, key)
    return t


def _batch(t: DeepSpeedTranslation, data: dict, _: str) -> None:
    for key in _BATCH_KEYS:
        if key in data:
            t.batch[key] = t.integer(key, data[key], 1)
    train, micro = t.batch.get("train_batch_size"), t.batch.get("train_micro_batch_size_per_gpu")
    gas = t.batch.get("gradient_accumulation_steps")
    if train is None and micro is None:
        why = "it needs train_batch_size or train_micro_batch_size_per_gpu beside it, as in DeepSpeed"
        raise t.refuse("gradient_accumulation_steps", why)
    if train is not None and micro is not None and train % micro:
        raise t.bad("train_batch_size", train, f"a multiple of train_micro_batch_size_per_gpu={micro}")
    if train is not None:
        t.set("train_batch_size", train, {"training.global_batch_size": train})
    if micro is not None:
        t.set("train_micro_batch_size_per_gpu", micro, {"training.micro_batch_size": micro})
    if gas is not None:
        why = "cptron's is training.global_batch_size / (training.micro_batch_size x data-parallel size): checked"
        t.set("gradient_accumulation_steps", gas, {}, why)


def _gradient_clipping(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    value = t.number(key, data[key], "a number >= 0 (0: no clipping)", lambda v: v >= 0)
    t.set(key, data[key], {"optim.grad_clip": value})


def _bf16(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    block = t.typed(key, data[key], dict, _OBJECT)
    enabled = t.typed(f"{key}.enabled", block.get("enabled", False), bool, _BOOL)
    if not enabled:  # DeepSpeed reads nothing else of a disabled block, and trains in fp32 (fp16 is refused)
        t.set(f"{key}.enabled", enabled, {"parallel.mixed_precision": "float32"}, "DeepSpeed trains in fp32 then")
        return
    t.only(key, block, ("enabled",), "a DeepSpeed bf16 optimizer option; cptron keeps fp32 master weights and grads")
    t.set(f"{key}.enabled", True, {"parallel.mixed_precision": "bfloat16"}, "fp32 master weights, fp32 reduction")


def _fp16(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    block = t.typed(key, data[key], dict, _OBJECT)
    if t.typed(f"{key}.enabled", block.get("enabled", False), bool, _BOOL):
        raise t.refuse(
            f"{key}.enabled",
            'cptron has no fp16 loss scaling; use "bf16": {"enabled": true} (parallel.mixed_precision=bfloat16)',
        )
    t.set(f"{key}.enabled", False, {}, "fp16 off; the block's other keys have no effect, as in DeepSpeed")


def _off_switch(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    off = _OFF_SWITCHES[key]
    if t.typed(key, data[key], bool, _BOOL) != off:
        raise t.refuse(key, f"a DeepSpeed profiling switch with no cptron equivalent; only its default {_show(off)}")
    t.set(key, off, {}, "off, DeepSpeed's default")


def _steps_per_print(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    t.set(key, data[key], {"metrics.log_every": t.integer(key, data[key], 1)})


def _offload(t: DeepSpeedTranslation, key: str, value: Any) -> tuple[bool, Optional[bool]]:
    """(whether `key` offloads to CPU, its pin_memory or None)."""
    if value is None:
        return False, None
    block = t.typed(key, value, dict, _OBJECT)
    t.only(key, block, ("device", "pin_memory"), "a DeepSpeed offload tuning knob; FSDP2's CPU offload has none")
    device = t.typed(f"{key}.device", block.get("device", "none"), str, '"cpu" or "none"')
    if device == "nvme":
        raise t.refuse(f"{key}.device", "NVMe offload (ZeRO-Infinity) has no FSDP2 equivalent; cptron offloads to CPU")
    t.check(device in ("cpu", "none"), f"{key}.device", device, '"cpu" or "none"')
    pin = t.typed(f"{key}.pin_memory", block["pin_memory"], bool, _BOOL) if "pin_memory" in block else None
    return device == "cpu", pin


def _zero(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    block = t.typed(key, data[key], dict, _OBJECT)
    t.only(
        key,
        block,
        ("stage", "offload_optimizer", "offload_param"),
        "a DeepSpeed ZeRO tuning knob with no FSDP2 equivalent (FSDP2 sizes, buckets and overlaps its communication itself)",
    )
    stage = t.integer(f"{key}.stage", block.get("stage", 0), 0, 3)
    shards = "FSDP2 always shards parameters, gradients and optimizer state over the data-parallel ranks"
    plain = "plain data parallelism: every rank keeps full parameters, gradients and optimizer state"
    keep = ({"parallel.fsdp_reshard_after_forward": False}, f"{shards}; stages 1, 2 keep gathered ones until backward")
    t.set(
        f"{key}.stage",
        stage,
        *{
            0: ({"parallel.dp_shard": 1}, f"{plain}; parallel.dp_replicate: the data-parallel size, set after parsing"),
            1: keep,
            2: keep,
            3: ({"parallel.fsdp_reshard_after_forward": True}, f"{shards}, freeing gathered ones after forward"),
        }[stage],
    )
    t.replicate_only = stage == 0
    optimizer, pin_o = _offload(t, f"{key}.offload_optimizer", block.get("offload_optimizer"))
    params, pin_p = _offload(t, f"{key}.offload_param", block.get("offload_param"))
    together = "FSDP2 offloads parameters, gradients and optimizer state together"
    if optimizer != params:
        given, missing = ("offload_optimizer", "offload_param") if optimizer else ("offload_param", "offload_optimizer")
        raise t.refuse(
            f"{key}.{given}",
            f'{together}: add "{missing}": {{"device": "cpu"}} (ZeRO stage 3) or set parallel.offload=all',
        )
    blocks = [name for name in ("offload_optimizer", "offload_param") if name in block]
    if not optimizer:
        for name in blocks:
            t.set(f"{key}.{name}.device", "none", {"parallel.offload": "none"})
        return
    if stage != 3:
        raise t.bad(f"{key}.stage", stage, "3 with offload_param (DeepSpeed offloads parameters at stage 3)")
    if pin_o is not None and pin_p is not None and pin_o != pin_p:
        raise t.refuse(
            f"{key}.offload_param.pin_memory", f"offload_optimizer.pin_memory={_show(pin_o)} differs; {together}"
        )
    fields = {"parallel.offload": "all"}
    if pin_o is not None or pin_p is not None:
        fields["parallel.offload_pin_memory"] = pin_o if pin_o is not None else pin_p
    t.set(f"{key}.offload_optimizer.device", "cpu", {}, "with offload_param")
    t.set(f"{key}.offload_param.device", "cpu", fields, together + ", in CPU memory")


def _optimizer(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    block = t.typed(key, data[key], dict, _OBJECT)
    t.only(key, block, ("type", "params"), "not a DeepSpeed optimizer key cptron knows")
    kind = t.typed(f"{key}.type", block.get("type"), str, '"Adam" or "AdamW"')
    if kind.lower() not in ("adam", "adamw"):
        raise t.refuse(f"{key}.type={json.dumps(kind)}", "cptron trains with AdamW only (type Adam or AdamW)")
    params = t.typed(f"{key}.params", block.get("params", {}), dict, _OBJECT)
    known = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction")
    why = "an optimizer option cptron's AdamW does not have"
    if "max_grad_norm" in params:
        why = "DeepSpeed refuses it too; use the top-level gradient_clipping"
    t.only(f"{key}.params", params, known, why)
    p = f"{key}.params"
    if not t.typed(f"{p}.adam_w_mode", params.get("adam_w_mode", True), bool, _BOOL) and kind.lower() == "adam":
        raise t.refuse(
            f"{p}.adam_w_mode",
            "false makes DeepSpeed's Adam add the weight decay to the gradient (L2); cptron's AdamW decays the "
            "weights directly (decoupled): drop it, or use type AdamW",
        )
    if not t.typed(f"{p}.bias_correction", params.get("bias_correction", True), bool, _BOOL):
        raise t.refuse(f"{p}.bias_correction", "cptron's AdamW always corrects the moments' bias")
    fields: dict[str, Any] = {}
    if "lr" in params:
        t.optimizer_lr = fields["optim.lr"] = t.number(f"{p}.lr", params["lr"], "a number > 0", lambda v: v > 0)
    if "betas" in params:
        betas = params["betas"]
        t.auto(f"{p}.betas", betas, "a list of two numbers in [0, 1)")
        good = isinstance(betas, list) and len(betas) == 2
        good = good and all(type(b) in (int, float) and 0 <= b < 1 for b in betas)
        t.check(good, f"{p}.betas", betas, "a list of two numbers in [0, 1)")
        fields["optim.beta1"], fields["optim.beta2"] = float(betas[0]), float(betas[1])
    if "eps" in params:
        fields["optim.eps"] = t.number(f"{p}.eps", params["eps"], "a number > 0", lambda v: v > 0)
    if "weight_decay" in params:
        wd = t.number(f"{p}.weight_decay", params["weight_decay"], "a number >= 0", lambda v: v >= 0)
        fields["optim.weight_decay"] = wd
    kept = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in params]
    note = "decoupled decay of weight matrices; norm gains and biases are not decayed"
    if kept:
        note += f"; {', '.join(kept)} not given: cptron's values stay (YAML or defaults), not DeepSpeed's"
    if "torch_adam" in params:
        t.typed(f"{p}.torch_adam", params["torch_adam"], bool, _BOOL)
        note += "; torch_adam picks a kernel only: cptron's is optim.implementation"
    t.set(f"{key}.type", kind, fields, note)


def _scheduler(t: DeepSpeedTranslation, data: dict, key: str) -> None:
    block = t.typed(key, data[key], dict, _OBJECT)
    t.only(key, block, ("type", "params"), "not a DeepSpeed scheduler key cptron knows")
    kind = t.typed(f"{key}.type", block.get("type"), str, f"one of {list(_SCHEDULERS)}")
    if kind not in _SCHEDULERS:
        raise t.refuse(
            f"{key}.type={json.dumps(kind)}", f"cptron maps only {', '.join(_SCHEDULERS)} (or set the lr section)"
        )
    params = t.typed(f"{key}.params", block.get("params", {}), dict, _OBJECT)
    p = f"{key}.params"
    cosine = kind == "WarmupCosineLR"
    known = ["warmup_num_steps", "warmup_type"]
    known += ["total_num_steps", "warmup_min_ratio", "cos_min_ratio"] if cosine else ["warmup_min_lr", "warmup_max_lr"]
    known += ["total_num_steps"] if kind == "WarmupDecayLR" else []
    t.only(p, params, tuple(known), f"not a parameter of DeepSpeed's {kind}")
    linear_only = "cptron warms up linearly only; DeepSpeed's log(step) ramp has no cptron equivalent"
    if "warmup_type" not in params:
        raise ConfigError(
            f"{t.where(p + '.warmup_type')} is missing, so DeepSpeed would warm up along log(step) (its default): "
            f'add "warmup_type": "linear" ({linear_only.split("; ")[0]})'
        )
    kind_of_warmup = params["warmup_type"]
    t.auto(f"{p}.warmup_type", kind_of_warmup, '"linear"')
    t.check(kind_of_warmup == "linear", f"{p}.warmup_type", kind_of_warmup, f'"linear" ({linear_only})')
    warmup = t.integer(
        f"{p}.warmup_num_steps", params.get("warmup_num_steps", 1000), 2, why=" (DeepSpeed warms up over at least 2)"
    )
    fields: dict[str, Any] = {"lr.warmup_steps": warmup, "lr.decay_steps": None}
    if kind != "WarmupLR":
        if "total_num_steps" not in params:
            raise t.refuse(p, f"{kind} needs total_num_steps (DeepSpeed requires it too)")
        total = t.integer(f"{p}.total_num_steps", params["total_num_steps"], warmup, why=" (warmup_num_steps)")
        fields["training.steps"] = t.total_num_steps = total
    if cosine:
        start = t.number(f"{p}.warmup_min_ratio", params.get("warmup_min_ratio", 0.0), "a number in [0, 1]", _unit)
        floor = t.number(f"{p}.cos_min_ratio", params.get("cos_min_ratio", 0.0001), "a number in [0, 1]", _unit)
        fields.update({"lr.schedule": "cosine", "lr.warmup_start_ratio": start, "lr.min_lr_ratio": floor})
    else:
        fields.update(_warmup_lrs(t, kind, params, p))
        fields["lr.schedule"] = "constant" if kind == "WarmupLR" else "linear"
        if kind == "WarmupDecayLR":  # DeepSpeed's linear decay ends where its warmup starts: warmup_min_lr
            fields["lr.min_lr_ratio"] = fields["lr.warmup_start_ratio"]
    shape = {
        "WarmupLR": "linear warmup, then constant",
        "WarmupDecayLR": "linear warmup, then linear decay to warmup_min_lr at the last step (training.steps)",
        "WarmupCosineLR": "linear warmup, then cosine decay to cos_min_ratio at the last step (training.steps)",
    }[kind]
    t.set(f"{key}.type", kind, dict(sorted(fields.items())), f"{shape}; DeepSpeed's defaults for absent params")


def _unit(value: float) -> bool:
    return 0 <= value <= 1


def _warmup_lrs(t: DeepSpeedTranslation, kind: str, params: dict, p: str) -> dict[str, Any]:
    """WarmupLR/WarmupDecayLR: warmup_max_lr is the peak (optim.lr), warmup_min_lr / peak where warmup starts."""
    # WarmupLR's peak defaults to the optimizer's lr; WarmupDecayLR's to 0.001, whatever the optimizer's lr.
    peak = params.get("warmup_max_lr", 0.001 if kind == "WarmupDecayLR" else None)
    shown = "warmup_max_lr" if "warmup_max_lr" in params else "warmup_max_lr (absent: DeepSpeed's default 0.001)"
    fields: dict[str, Any] = {}
    if peak is not None:
        peak = t.number(f"{p}.warmup_max_lr", peak, "a number > 0", lambda v: v > 0)
        if t.optimizer_lr is not None and peak != t.optimizer_lr:
            raise t.refuse(
                f"{p}.{shown}",
                f"it is the peak LR and optimizer.params.lr={t.optimizer_lr!r} differs ({peak!r}); make them equal",
            )
        fields["optim.lr"] = peak
    else:
        peak = t.optimizer_lr
    low = t.number(f"{p}.warmup_min_lr", params.get("warmup_min_lr", 0.0), "a number >= 0", lambda v: v >= 0)
    if low and peak is None:
        raise t.refuse(
            f"{p}.warmup_min_lr",
            "it is a fraction of the peak LR in cptron (lr.warmup_start_ratio): give warmup_max_lr or optimizer.params.lr",
        )
    if low > (peak or 0.0):
        raise t.bad(f"{p}.warmup_min_lr", low, f"at most the peak LR {peak!r}")
    fields["lr.warmup_start_ratio"] = low / peak if low else 0.0
    return fields


# ---------------------------------------------------------------- the command line


def parse_with_deepspeed_config(
    cls: type, argv: list[str], *, prog: str, description: str, world_size: Optional[int] = None
) -> Any:
    """The `cls` (the train config) of a command line that may carry --deepspeed_config PATH: defaults, the YAML
    file, the DeepSpeed file's values, then the command line's options. `world_size` defaults to WORLD_SIZE (1)."""
    argv, path = take_deepspeed_options(argv)
    if path is None or "-h" in argv or "--help" in argv:
        return parse_config(cls, argv, prog=prog, description=description, allow_positional_yaml=True)
    translation = translate_deepspeed_config(read_deepspeed_config(path), path)
    at = 1 if argv and not argv[0].startswith("-") else 0  # after the positional YAML path
    values = {**translation.placeholders(argv[at:]), **translation.options}
    options = [f"--{name}={_show(value)}" for name, value in values.items()]
    try:
        cfg = parse_config(
            cls, argv[:at] + options + argv[at:], prog=prog, description=description, allow_positional_yaml=True
        )
    except ConfigError as e:
        raise ConfigError(f"{e} (with the values of deepspeed config {path})") from e
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    translation.resolve(cfg, argv[at:], world)
    for line in translation.lines:
        log.info("deepspeed config %s: %s", path, line)
    return cfg


__all__ = ["DEEPSPEED_COMMANDS", "DEEPSPEED_HELP", "parse_with_deepspeed_config", "translate_deepspeed_config"]
