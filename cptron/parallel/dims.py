"""Parallel layout: the `parallel:` config section and the DeviceMesh built from it.

The mesh has four named dimensions, outermost first: pp, dp_replicate, dp_shard,
tp. Tensor parallelism is innermost so its ranks are neighbours (same node on a
cluster), pipeline outermost so its point-to-point traffic is the one that
crosses nodes. Two flattened dimensions are added: `dp` (dp_replicate x
dp_shard: the ranks that see different data) and, when FSDP runs, `fsdp`
(the same ranks, used to shard parameters; HSDP when dp_replicate > 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cptron.errors import ConfigError, require
from cptron.models.config import ModelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")

PipelineScheduleName = Literal[
    "gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble"
]


@dataclass
class ParallelConfig:
    """How the model and the batch are split over ranks (pp x dp_replicate x dp_shard x tp = world size)."""

    pp: int = 1
    """Pipeline-parallel degree: number of pipeline ranks the layers are split over."""
    dp_replicate: int = 1
    """Data-parallel replicas that each hold a full (or dp_shard-sharded) copy (DDP; HSDP with dp_shard > 1)."""
    dp_shard: int = -1
    """Data-parallel ranks that shard parameters, grads and optimizer state (FSDP2/ZeRO-3); -1: the rest of the world."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-style column/row split of attention heads and MLP)."""
    sequence_parallel: bool = True
    """With tp > 1: also split norms and residual activations along the sequence (saves activation memory)."""
    loss_parallel: bool = True
    """With tp > 1: compute cross-entropy on vocab-sharded logits without gathering them."""
    fsdp_reshard_after_forward: bool = True
    """True: ZeRO-3 (free gathered params after forward). False: keep them until backward (ZeRO-2-like, faster, more memory)."""
    offload: Literal["none", "all"] = "none"
    """CPU offload (FSDP2 CPUOffloadPolicy, ZeRO-Offload style): all keeps this rank's sharded fp32 parameters, gradients and AdamW state in CPU memory and runs the optimizer step on CPU (works without data parallelism too: FSDP2 then wraps a 1-rank mesh); an optimizer-only mode is not offered, FSDP2 offloads the three together."""
    offload_pin_memory: bool = True
    """With offload=all on CUDA: pin the CPU copies (faster copies that overlap compute, but the memory is locked); ignored on CPU, where pinning needs an accelerator."""
    mixed_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype of params in forward/backward (master weights and grad reduction stay fp32); auto: bfloat16 on cuda, float32 on cpu."""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: full (every block), selective (every `ac_every`-th block)."""
    ac_every: int = 2
    """With selective activation checkpointing: checkpoint one block out of every ac_every."""
    compile: bool = False
    """torch.compile each transformer block."""
    pp_schedule: PipelineScheduleName = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved_1f1b, looped_bfs, interleaved_zero_bubble, zbv_zero_bubble."""
    pp_microbatches: Optional[int] = None
    """Microbatches per pipeline step; None: the number of pipeline stages."""
    pp_stages_per_rank: int = 1
    """Virtual pipeline stages per rank (interleaved and zero-bubble schedules need >= 2)."""
    pp_layers_per_stage: Optional[list[int]] = None
    """Layers of each pipeline stage (uneven splits), in stage order; None: as even as possible."""
    peer_timeout_minutes: float = 5.0
    """Minutes without a heartbeat after which a peer rank counts as lost (its node died): every other rank exits naming it instead of hanging in a collective; collectives time out after twice this (at least 1 more minute); 0: torch's default timeouts (NCCL 10, gloo 30 minutes) and no heartbeats."""

    def validate(self) -> None:
        for name in ("pp", "dp_replicate", "tp", "pp_stages_per_rank", "ac_every"):
            require(getattr(self, name) >= 1, f"parallel.{name}", getattr(self, name), "an integer >= 1")
        require(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", self.dp_shard, "-1 or an integer >= 1")
        require(
            0 <= self.peer_timeout_minutes < float("inf"),
            "parallel.peer_timeout_minutes",
            self.peer_timeout_minutes,
            "a number of minutes >= 0 (0: no heartbeats)",
        )
        require(
            self.pp_microbatches is None or self.pp_microbatches >= 1,
            "parallel.pp_microbatches",
            self.pp_microbatches,
            "None or an integer >= 1",
        )
        multi = self.pp_schedule in ("interleaved_1f1b", "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble")
        if self.pp > 1 and multi:
            require(
                self.pp_stages_per_rank >= 2,
                "parallel.pp_stages_per_rank",
                self.pp_stages_per_rank,
                f">= 2 for pp_schedule={self.pp_schedule}",
            )
        if self.pp > 1 and not multi:
            require(
                self.pp_stages_per_rank == 1,
                "parallel.pp_stages_per_rank",
                self.pp_stages_per_rank,
                f"1 for the single-stage schedule {self.pp_schedule} (use interleaved_1f1b for virtual stages)",
            )
        if self.pp_schedule == "zbv_zero_bubble" and self.pp > 1:
            require(
                self.pp_stages_per_rank == 2,
                "parallel.pp_stages_per_rank",
                self.pp_stages_per_rank,
                "2 for zbv_zero_bubble (a V-shaped two-stage-per-rank schedule)",
            )


@dataclass(frozen=True)
class ParallelDims:
    """The resolved degrees of one run."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def num_stages(self) -> int:
        return self.pp

    def describe(self) -> str:
        return f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp}"


def resolve_parallel_dims(cfg: ParallelConfig, world_size: int, model: ModelConfig) -> ParallelDims:
    """Check the layout against the world size and the model; fail with the field's name."""
    cfg.validate()
    other = cfg.pp * cfg.dp_replicate * cfg.tp
    if cfg.dp_shard == -1:
        if world_size % other:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by pp x dp_replicate x tp = "
                f"{cfg.pp} x {cfg.dp_replicate} x {cfg.tp} = {other}, so dp_shard=-1 cannot fill it"
            )
        dp_shard = world_size // other
    else:
        dp_shard = cfg.dp_shard
    dims = ParallelDims(cfg.pp, cfg.dp_replicate, dp_shard, cfg.tp)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel: {dims.describe()} = {dims.world_size} ranks, but the world size is "
            f"{world_size}: the product must equal the number of processes"
        )
    if cfg.tp > 1:
        require(model.n_heads % cfg.tp == 0, "parallel.tp", cfg.tp, f"a divisor of model.n_heads={model.n_heads}")
        require(model.kv_heads % cfg.tp == 0, "parallel.tp", cfg.tp, f"a divisor of model.n_kv_heads={model.kv_heads}")
        require(
            model.ffn_hidden_dim % cfg.tp == 0,
            "parallel.tp",
            cfg.tp,
            f"a divisor of model.ffn_hidden_dim={model.ffn_hidden_dim}",
        )
        if model.padded_vocab_size % cfg.tp:
            raise ConfigError(
                f"parallel.tp={cfg.tp} is invalid: the padded vocabulary ({model.padded_vocab_size} rows) is not "
                f"divisible by it; set model.pad_vocab_to_multiple_of to a multiple of {cfg.tp} (e.g. {cfg.tp * 64})"
            )
    if cfg.pp > 1:
        n_stages = cfg.pp * cfg.pp_stages_per_rank
        require(
            n_stages <= model.n_layers,
            "parallel.pp",
            cfg.pp,
            f"pp x pp_stages_per_rank = {n_stages} stages <= model.n_layers={model.n_layers}",
        )
        if cfg.pp_layers_per_stage is not None:
            lps = cfg.pp_layers_per_stage
            require(
                len(lps) == n_stages and all(n >= 1 for n in lps) and sum(lps) == model.n_layers,
                "parallel.pp_layers_per_stage",
                lps,
                f"{n_stages} positive layer counts summing to model.n_layers={model.n_layers}",
            )
    elif cfg.pp_layers_per_stage is not None:
        require(
            cfg.pp_layers_per_stage == [model.n_layers],
            "parallel.pp_layers_per_stage",
            cfg.pp_layers_per_stage,
            "None when pp=1",
        )
    return dims


def build_mesh(dims: ParallelDims, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
    """The 4-D mesh, and the flattened `dp` mesh (the ranks that see different data).
    Needs the default process group."""
    mesh = init_device_mesh(device_type, (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=MESH_DIMS)
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh, dp_mesh


def mixed_precision_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.mixed_precision)
