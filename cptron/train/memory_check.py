"""The trainer's memory check: after the first steps, the peak memory each rank reached beside the
memory plan's estimate for it (`cptron.train.memory_plan`), in one line of rank 0's log.

Measured: on CUDA `torch.cuda.max_memory_allocated` (the metrics reset it at every log line, so it is
the peak of the latest logging interval, which by then is a steady-state step); on CPU the growth of
the peak resident set size over the RSS just before the model was built (the plan does not count the
interpreter, libraries or data loaders). glibc's malloc keeps freed heap memory for reuse, so on CPU
the RSS can run well above the live memory the plan estimates (about 2x for small models); with
MALLOC_MMAP_THRESHOLD_=65536 in the environment large tensors are returned on free and it tracks it. The estimate never stops a run: where the plan cannot be
made, the line says why.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch
import torch.distributed as dist

from cptron.train.memory_plan import GB, estimate_memory

log = logging.getLogger("cptron.train")

CHECK_STEP = 3
"""Optimizer steps of an invocation after which the check runs (the second is the first with AdamW state)."""


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


class MemoryCheck:
    """Built before the model (its CPU baseline); `after_step(step)` on every rank at every step."""

    def __init__(self, cfg, world_size: int, device: torch.device, model_cfg, pp_rank: int, total_steps: int):
        self.device, self.at, self.steps_seen = device, min(CHECK_STEP, total_steps), 0
        self.baseline = _status_bytes("VmRSS") if device.type == "cpu" else 0
        self.estimate: Optional[float] = None
        self.note = ""
        try:
            self.estimate = float(estimate_memory(cfg, world_size, device.type, model_cfg).ranks[pp_rank].total)
        except Exception as e:  # noqa: BLE001 (a plan that cannot be made must not stop training)
            self.note = f"; no plan estimate ({type(e).__name__}: {e})"

    def measured(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        return float(max(_status_bytes("VmHWM") - self.baseline, 0))

    def after_step(self, step: int) -> None:
        """Collective at this invocation's check step (a resumed run counts from its first step): every
        rank's peak and estimate go to rank 0, which logs them."""
        self.steps_seen += 1
        if self.steps_seen != self.at:
            return
        mine = torch.tensor([self.measured(), self.estimate or 0.0], dtype=torch.float64, device=self.device)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rows = [torch.zeros_like(mine) for _ in range(world)]
        if world > 1:
            dist.all_gather(rows, mine)
        else:
            rows = [mine]
        if (dist.get_rank() if dist.is_initialized() else 0) != 0:
            return
        peaks = [float(r[0]) for r in rows]
        what = "max_memory_allocated" if self.device.type == "cuda" else "peak RSS growth since the model was built"
        line = f"memory after step {step}: {what} per rank {_sizes(peaks)}"
        if self.estimate is not None:
            est = [float(r[1]) for r in rows]
            worst = max(range(world), key=lambda i: abs(est[i] / max(peaks[i], 1.0) - 1))
            line += (
                f"; memory plan estimate {_sizes(est)} (rank {worst} off by "
                f"{est[worst] / max(peaks[worst], 1.0) - 1:+.0%}; `cptron plan` shows the terms)"
            )
        log.info("%s%s", line, self.note)


def _sizes(values: list[float]) -> str:
    """`1.23, 1.25 GB` (MB below 1 GB), the first 8 ranks."""
    unit, scale = ("GB", GB) if max(values) >= GB else ("MB", 10**6)
    shown = ", ".join(f"{v / scale:.2f}" for v in values[:8])
    return shown + (f", ... ({len(values)} ranks)" if len(values) > 8 else "") + f" {unit}"
