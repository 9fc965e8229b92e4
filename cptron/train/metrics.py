"""Training metrics: throughput and MFU, memory, and the sinks they are written to.

Sinks (rank 0 only; every other rank's logger is a no-op): one compact log line
per call, `run_dir/metrics.jsonl`, TensorBoard under `run_dir/tensorboard` and
Weights & Biases under `run_dir/wandb` (offline by default, so it needs no login
and no network). TensorBoard and wandb are imported only when enabled.

FLOP convention (the one torchtitan uses, so MFU figures are comparable with it):
a training token costs 6·N FLOPs for the weight matmuls (forward 2·N, backward
4·N), where N counts every parameter except the input embedding table, plus
12·L·H·Dh·T for attention (QK^T and AV, forward and backward, over the full
T×T score matrix: no halving for the causal mask, no recomputation counted).
MFU = achieved FLOP/s per device / the device's dense peak FLOP/s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from tqdm import tqdm

from cptron.errors import CptronError, invalid, require

log = logging.getLogger("cptron.metrics")

GiB = float(1 << 30)

FLOP_CONVENTION = (
    "FLOPs/token = 6·N (N = parameters except the input embedding) + 12·L·H·Dh·T attention, "
    "no causal halving (torchtitan's convention)"
)


@dataclass
class MetricsConfig:
    """Where and how often training metrics are reported."""

    log_every: int = 10
    """Log metrics every this many optimizer steps (and on the last step)."""
    jsonl: bool = True
    """Append one JSON object per log to run_dir/metrics.jsonl."""
    tensorboard: bool = False
    """Write TensorBoard event files under run_dir/tensorboard (needs the tensorboard package)."""
    wandb: bool = False
    """Log to Weights & Biases under run_dir/wandb (needs the wandb package)."""
    wandb_project: str = "cptron"
    """Weights & Biases project name."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """offline: write locally for a later `wandb sync` (no login needed); online: stream to the server; disabled: no wandb at all."""
    wandb_run_name: Optional[str] = None
    """Display name of the wandb run; None lets wandb pick one."""
    progress_bar: Literal["auto", "on", "off"] = "auto"
    """tqdm progress bar on rank 0: auto shows it only when stderr is a terminal."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device for MFU; None looks the device up in the built-in table (none on CPU)."""
    profile_steps: list[int] = field(default_factory=list)
    """Optimizer steps (1-based, as logged) to record with torch.profiler on every rank: CPU and CUDA activity with shapes and memory, as Chrome traces run_dir/profile/step-N-rank-R.json (open in Perfetto or chrome://tracing); rank 0 logs the top operators."""

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible field."""
        require(self.log_every >= 1, "metrics.log_every", self.log_every, "an integer >= 1")
        require(
            self.wandb_mode in ("offline", "online", "disabled"),
            "metrics.wandb_mode",
            self.wandb_mode,
            "one of offline, online, disabled",
        )
        require(
            self.progress_bar in ("auto", "on", "off"),
            "metrics.progress_bar",
            self.progress_bar,
            "one of auto, on, off",
        )
        require(
            not self.wandb or bool(self.wandb_project),
            "metrics.wandb_project",
            self.wandb_project,
            "a non-empty project name when metrics.wandb is true",
        )
        require(
            self.peak_tflops is None or (math.isfinite(self.peak_tflops) and self.peak_tflops > 0),
            "metrics.peak_tflops",
            self.peak_tflops,
            "None or a float > 0",
        )
        require(
            all(isinstance(s, int) and s >= 1 for s in self.profile_steps),
            "metrics.profile_steps",
            self.profile_steps,
            "a list of optimizer steps >= 1",
        )


class StepProfiler:
    """torch.profiler around the optimizer steps in `MetricsConfig.profile_steps` (1-based)."""

    def __init__(self, steps: list[int], run_dir: str, rank: int, device: torch.device):
        self.steps, self.rank, self.device = set(steps), rank, device
        self.folder = os.path.join(run_dir, "profile")

    @contextlib.contextmanager
    def step(self, step: int):
        """Profile the body if optimizer step `step` (1-based) is one to record."""
        if step not in self.steps:
            yield
            return
        # Deferred: the profiler is needed only on the steps metrics.profile_steps names.
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"step-{step}-rank-{self.rank}.json")
        prof.export_chrome_trace(path)
        if self.rank == 0:
            key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            log.info(
                "profile of step %d written to %s (one file per rank); top operators:\n%s",
                step,
                path,
                prof.key_averages().table(sort_by=key, row_limit=12),
            )


# ---------------------------------------------------------------- FLOPs, peaks, memory


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token of a `ModelConfig` at sequence length `seq_len` (see the module docstring).

    N is model_cfg.num_params(include_embedding=False), which leaves out the input embedding
    table (a lookup, no matmul) and keeps the output projection. With tied embeddings that count
    drops the shared matrix altogether, but the output projection still runs as a matmul, so its
    vocab·dim is added back. Sliding windows are not discounted either (as torchtitan counts).
    """
    require(seq_len >= 1, "seq_len", seq_len, "an integer >= 1")
    n = model_cfg.num_params(include_embedding=False)
    if model_cfg.tie_embeddings:
        n += model_cfg.padded_vocab_size * model_cfg.dim
    attention = 12 * model_cfg.n_layers * model_cfg.n_heads * model_cfg.head_size * seq_len
    return float(6 * n + attention)


# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets, by matmul precision. Rows are
# tried in order and a row matches when all its substrings are in the upper-cased device name,
# so the PCIe and NVL variants must come before the plain SXM name.
_PEAK_TFLOPS: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("H100", "NVL"), "H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H200", "NVL"), "H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H100", "PCIE"), "H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (("H100",), "H100 SXM", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    (("H200",), "H200 SXM", {"bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),  # GH200 too: same GPU die
    (("A100",), "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def _matmul_precision(dtype: torch.dtype) -> Optional[str]:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        # float32 matmuls run on TF32 tensor cores only when PyTorch is allowed to use them.
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"
    return None


def peak_tflops_for_name(device_name: str, dtype: torch.dtype) -> tuple[Optional[float], str]:
    """(peak dense TFLOP/s or None, which table row matched) for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    precision = _matmul_precision(dtype)
    upper = device_name.upper()
    for needles, label, peaks in _PEAK_TFLOPS:
        if all(n in upper for n in needles):
            if precision is None:
                return None, f"{device_name}: no peak known for dtype {dtype}"
            return peaks[precision], f"{label}, {precision} dense"
    return None, f"{device_name}: not in the peak table"


def device_peak_flops(
    device: torch.device, dtype: torch.dtype, *, override_tflops: Optional[float] = None
) -> tuple[Optional[float], str]:
    """(peak FLOP/s of one device or None, a description naming the peak and FLOP convention for the log).

    `override_tflops` (metrics.peak_tflops) wins over the table; without it, CPUs and devices
    not in the table give None, and MFU is left out of the metrics.
    """
    device = torch.device(device)
    if override_tflops is not None:
        return override_tflops * 1e12, (
            f"MFU against {override_tflops:g} TFLOP/s per device (metrics.peak_tflops); {FLOP_CONVENTION}"
        )
    if device.type != "cuda":
        return None, f"no peak FLOP/s known for {device.type}: MFU not reported (set metrics.peak_tflops to get it)"
    tflops, what = peak_tflops_for_name(torch.cuda.get_device_name(device), dtype)
    if tflops is None:
        return None, f"{what}: MFU not reported (set metrics.peak_tflops to get it)"
    return tflops * 1e12, f"MFU against {tflops:g} TFLOP/s per device ({what}); {FLOP_CONVENTION}"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory since the previous call, in GiB.

    CUDA: the caching allocator's peak allocated and reserved bytes (the peaks are reset, so
    each call covers one logging interval). Elsewhere: the process's peak resident set size,
    which the OS never resets, so it is the peak since the process started.
    """
    device = torch.device(device)
    if device.type == "cuda":
        stats = {
            "mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "mem_max_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    import resource  # POSIX only, so imported where it is needed

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return {"mem_peak_rss_gib": peak_bytes / GiB}


class Throughput:
    """Tokens/s and MFU over the interval since the previous `update` (or `reset`)."""

    def __init__(
        self,
        flops_per_token: float,
        peak_flops: Optional[float],
        world_size: int,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ):
        require(flops_per_token > 0, "flops_per_token", flops_per_token, "a float > 0")
        require(peak_flops is None or peak_flops > 0, "peak_flops", peak_flops, "None or a float > 0")
        require(world_size >= 1, "world_size", world_size, "an integer >= 1")
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self._clock = clock
        self._last = clock()

    def reset(self) -> None:
        """Start a new interval without reporting (e.g. after a checkpoint save or an evaluation)."""
        self._last = self._clock()

    def update(self, tokens: int) -> dict[str, float]:
        """Rates for `tokens` trained by all ranks together since the previous update.

        Returns tokens_per_s (global), tokens_per_s_per_device, tflops_per_device (achieved) and,
        when the peak is known, mfu as a fraction of the peak.
        """
        now = self._clock()
        elapsed, self._last = now - self._last, now
        if elapsed <= 0:
            raise ValueError(f"Throughput.update: the clock did not advance ({elapsed} s since the last call)")
        tokens_per_s = tokens / elapsed
        per_device = tokens_per_s / self.world_size
        flops_per_device = per_device * self.flops_per_token
        out = {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "tflops_per_device": flops_per_device / 1e12,
        }
        if self.peak_flops is not None:
            out["mfu"] = flops_per_device / self.peak_flops
        return out


# ---------------------------------------------------------------- the logger


def _scalar(key: str, value: Any) -> float | int:
    if hasattr(value, "item"):  # torch and numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r}={value!r} is invalid: expected a number (int, float or 1-element tensor)")
    return value


def _format_line(step: int, total_steps: int, kind: str, values: dict[str, float | int]) -> str:
    parts = [f"{kind} step {step}/{total_steps}"]
    # Keys left off the line to keep it short (the other sinks have them) or formatted below.
    handled = {"tokens_per_s_per_device", "tflops_per_device", "mem_max_reserved_gib"}
    formats = [
        ("loss", "loss {:.4f}"),
        ("lr", "lr {:.3e}"),
        ("grad_norm", "grad_norm {:.3f}"),
        ("tokens_per_s", "tokens/s {:,.0f}"),
        ("mfu", "mfu {:.1%}"),
        ("mem_max_allocated_gib", "mem {:.2f} GiB"),
        ("mem_peak_rss_gib", "rss {:.2f} GiB"),
    ]
    for key, fmt in formats:
        if key in values:
            parts.append(fmt.format(values[key]))
            handled.add(key)
    parts += [f"{k} {v:.4g}" for k, v in values.items() if k not in handled]
    return " | ".join(parts)


class MetricsLogger:
    """Writes metrics to every enabled sink on rank 0; on other ranks every method does nothing.

    `step` is the number of optimizer updates completed when the metrics were measured, so a run
    resumed from a checkpoint at `start_step` logs steps > start_step. Records that an earlier run
    in the same run_dir wrote for steps > start_step come from after that checkpoint and would
    duplicate the new ones: they are moved from metrics.jsonl to metrics.discarded.jsonl (nothing
    is deleted) and purged from TensorBoard's view. A resumed wandb run continues the run id
    stored in run_dir/wandb_run_id.
    """

    def __init__(
        self,
        cfg: MetricsConfig,
        run_dir: str | Path,
        *,
        rank: int,
        run_config: dict,
        total_steps: int,
        start_step: int = 0,
    ):
        self.cfg, self.run_dir, self.rank = cfg, Path(run_dir), rank
        self.total_steps, self.start_step = total_steps, start_step
        self._jsonl = self._tensorboard = self._wandb_run = self._bar = None
        self._closed = False
        if rank != 0:
            return
        cfg.validate()
        require(
            0 <= start_step <= total_steps, "start_step", start_step, f"an integer in [0, total_steps={total_steps}]"
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        sinks = ["log"]
        try:
            if cfg.jsonl:
                self._jsonl = self._open_jsonl()
                sinks.append(str(self.run_dir / "metrics.jsonl"))
            if cfg.tensorboard:
                self._tensorboard = self._open_tensorboard(run_config)
                sinks.append(f"tensorboard {self.run_dir / 'tensorboard'}")
            if cfg.wandb and cfg.wandb_mode != "disabled":
                self._wandb_run = self._open_wandb(run_config)
                sinks.append(f"wandb {cfg.wandb_mode} {self.run_dir / 'wandb'} (run id {self._wandb_run.id})")
            if cfg.progress_bar == "on" or (cfg.progress_bar == "auto" and sys.stderr.isatty()):
                self._bar = tqdm(
                    total=total_steps,
                    initial=start_step,
                    desc="train",
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
        except BaseException:
            self.close()
            raise
        if cfg.wandb and cfg.wandb_mode == "disabled":
            log.info("metrics.wandb is true but metrics.wandb_mode is disabled: no wandb run")
        log.info("metrics every %d steps to: %s", cfg.log_every, "; ".join(sinks))

    # -------------------------------------------------------------- sinks

    def _open_jsonl(self):
        path, discarded = self.run_dir / "metrics.jsonl", self.run_dir / "metrics.discarded.jsonl"
        if path.exists():
            keep, stale = [], []
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    fresh = json.loads(line)["step"] <= self.start_step
                except (ValueError, KeyError, TypeError):  # e.g. a line cut off by a crash
                    fresh = False
                (keep if fresh else stale).append(line if line.endswith("\n") else line + "\n")
            if stale:
                with open(discarded, "a", encoding="utf-8") as fh:
                    fh.writelines(stale)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(keep), encoding="utf-8")
                os.replace(tmp, path)
                log.info(
                    "moved %d records for steps after start_step=%d (or unreadable) from %s to %s",
                    len(stale),
                    self.start_step,
                    path,
                    discarded,
                )
        return open(path, "a", encoding="utf-8")

    def _open_tensorboard(self, run_config: dict):
        try:  # an optional dependency, imported only when metrics.tensorboard is on
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise invalid(
                "metrics.tensorboard",
                True,
                f"the tensorboard package (pip install tensorboard, or set metrics.tensorboard=false): {e}",
            ) from e
        log_dir = self.run_dir / "tensorboard"
        # purge_step hides events an earlier run wrote after the checkpoint this run resumes from.
        writer = SummaryWriter(log_dir=str(log_dir), purge_step=self.start_step + 1 if log_dir.exists() else None)
        writer.add_text(
            "config", "```\n" + json.dumps(run_config, indent=2, default=str) + "\n```", global_step=self.start_step
        )
        return writer

    def _open_wandb(self, run_config: dict):
        try:  # an optional dependency, imported only when metrics.wandb is on
            import wandb
        except ImportError as e:
            raise invalid(
                "metrics.wandb", True, f"the wandb package (pip install wandb, or set metrics.wandb=false): {e}"
            ) from e
        id_file = self.run_dir / "wandb_run_id"
        if self.start_step > 0 and id_file.exists():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:  # a fresh start is a new wandb run, even in a reused run_dir
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        return wandb.init(
            project=self.cfg.wandb_project,
            name=self.cfg.wandb_run_name,
            mode=self.cfg.wandb_mode,
            dir=str(self.run_dir),
            config=run_config,
            id=run_id,
            resume="allow",
        )

    # -------------------------------------------------------------- public

    def should_log(self, step: int) -> bool:
        """Whether `step` (updates completed) is a logging step: every log_every, the first and the last."""
        return step % self.cfg.log_every == 0 or step == self.total_steps or step == self.start_step + 1

    def log(self, step: int, metrics: dict[str, float], *, kind: str = "train") -> None:
        """Write `metrics` measured after `step` updates to every sink; `kind` groups them (train, eval, ...)."""
        if self.rank != 0:
            return
        if self._closed:
            raise RuntimeError(f"MetricsLogger.log(step={step}) after close()")
        require(bool(kind) and "/" not in kind, "kind", kind, "a non-empty name without '/'")
        values = {key: _scalar(key, value) for key, value in metrics.items()}
        for reserved in ("step", "kind", "time"):
            require(reserved not in values, "metric name", reserved, "a name other than step, kind and time")
        line = _format_line(step, self.total_steps, kind, values)
        if self._bar is not None:
            with tqdm.external_write_mode(file=sys.stderr):
                log.info(line)
        else:
            log.info(line)
        if self._jsonl is not None:
            record = {"step": step, "kind": kind, "time": time.time(), **values}
            # Non-finite values are written as NaN/Infinity, which Python's json and pandas read back.
            try:
                self._jsonl.write(json.dumps(record) + "\n")
                self._jsonl.flush()
            except OSError as e:  # a full disk: the error of a write names no file
                raise CptronError(f"writing {self.run_dir / 'metrics.jsonl'} failed: {e.strerror or e}") from e
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(f"{kind}/{key}", value, global_step=step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{kind}/{key}": value for key, value in values.items()}, step=step)

    def progress(self, step: int, postfix: dict) -> None:
        """Move the progress bar to `step` updates completed and show `postfix` beside it."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        """Flush and close every sink (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- one run's metrics


class RunMetrics:
    """What a training run reports: each step's row (with throughput, MFU and, every log_every
    steps, memory), held-out losses, and the profiled steps; the trainer's one metrics component."""

    def __init__(
        self,
        cfg: MetricsConfig,
        run_dir: str,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        dtype: torch.dtype,
        model_cfg,
        seq_len: int,
        global_batch_size: int,
        total_steps: int,
        start_step: int,
        run_config: dict,
    ):
        self.cfg, self.device, self.total_steps = cfg, device, total_steps
        self.logger = MetricsLogger(
            cfg, run_dir, rank=rank, run_config=run_config, total_steps=total_steps, start_step=start_step
        )
        peak, peak_desc = device_peak_flops(device, dtype, override_tflops=cfg.peak_tflops)
        fpt = flops_per_token(model_cfg, seq_len)
        if rank == 0:
            log.info("%.4g FLOP/token; %s", fpt, peak_desc)
        self.meter = Throughput(fpt, peak, world_size)
        self.profiler = StepProfiler(cfg.profile_steps, run_dir, rank, device)
        self.tokens_per_step = global_batch_size * seq_len

    def train_step(self, step: int, values: dict[str, float]) -> None:
        """Report the step that completed update `step` (1-based: step N is the state after N
        optimizer steps, the number a checkpoint carries); `values` holds at least "loss"."""
        row = {**values, **self.meter.update(self.tokens_per_step)}
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            row.update(memory_stats(self.device))
            self.logger.log(step, row)
        self.logger.progress(step, {"loss": f"{values['loss']:.4f}"})

    def evaluation(self, step: int, losses: dict[str, float], derived: Optional[dict[str, float]] = None) -> None:
        """Report held-out losses (`val/<set>`) and what `derived` adds to them (perplexities, the change
        since step 0: `cptron.train.report`); the time they took does not count as training throughput."""
        self.logger.log(step, {**{f"val/{k}": v for k, v in losses.items()}, **(derived or {})}, kind="eval")
        self.meter.reset()

    def paused(self) -> None:
        """Training paused (a checkpoint save): leave the pause out of the next throughput interval."""
        self.meter.reset()

    def close(self) -> None:
        self.logger.close()
