"""AdamW over the model parts, and gradient clipping by the true global norm.

One optimizer per model part (pipeline virtual stages give a rank several
parts); they always step together. Weight decay applies to matrices only:
norm gains and biases are not decayed (as in Megatron-LM and GPT-NeoX).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from cptron.errors import require


@dataclass
class OptimizerConfig:
    """AdamW and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate (the `lr:` schedule scales it per step)."""
    weight_decay: float = 0.1
    """Decoupled weight decay of weight matrices (norm gains and biases are not decayed)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Clip the gradient to this global L2 norm (over all parallel dimensions); 0 disables clipping."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """AdamW kernel: fused (one kernel per step), foreach (grouped), for_loop; auto: fused on cuda and cpu, foreach elsewhere."""

    def validate(self) -> None:
        require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", self.lr, "a positive finite number")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "a number in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "a number in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "a positive number")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")


def build_optimizers(parts: list[nn.Module], cfg: OptimizerConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    impl = resolve_adamw_implementation(cfg, device)
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    optimizers = []
    for part in parts:
        decay, no_decay = [], []
        for p in part.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizers.append(
            torch.optim.AdamW(
                [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs
            )
        )
    return optimizers


def resolve_adamw_implementation(cfg: OptimizerConfig, device: torch.device) -> str:
    """auto: the fused kernel (one pass over all parameters; on CPU about 5x faster than
    foreach for a 20M-parameter model) on cuda and cpu, foreach elsewhere."""
    if cfg.implementation != "auto":
        return cfg.implementation
    return "fused" if device.type in ("cuda", "cpu") else "foreach"


def global_grad_norm(
    parts: list[nn.Module], pp_group: Optional[dist.ProcessGroup] = None, skip: Sequence[torch.Tensor] = ()
) -> torch.Tensor:
    """L2 norm of all gradients of the model, whatever the layout.

    DTensor gradients are grouped by their mesh and placements, so each group's
    norm (`torch.nn.utils.get_total_norm`, which takes DTensors of one layout) costs
    one collective (the DTensor norm reduces over sharded mesh dimensions and
    leaves replicated ones alone). Plain tensors are replicated copies and count
    once. Pipeline stages hold disjoint parameters: their squared norms are summed
    over `pp_group`. Parameters in `skip` (the second copy of a parameter that two
    stages share, e.g. tied embeddings) are not counted."""
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    plain: list[torch.Tensor] = []
    skipped = {id(p) for p in skip}
    for part in parts:
        for p in part.parameters():
            if p.grad is None or id(p) in skipped:
                continue
            if isinstance(p.grad, DTensor):
                groups[(p.grad.device_mesh, p.grad.placements)].append(p.grad)
            else:
                plain.append(p.grad)
    device = next((g.device for gs in groups.values() for g in gs), None)
    device = device or (plain[0].device if plain else torch.device("cpu"))
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups.values():
        sq = sq + get_total_norm(grads).float().full_tensor() ** 2
    if plain:
        sq = sq + get_total_norm(plain).float() ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


@torch.no_grad()
def clip_gradients(parts: list[nn.Module], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale all gradients by min(1, max_norm / (total_norm + 1e-6)) with torch's
    `clip_grads_with_norm_`, given the global `total_norm` (a plain tensor); nothing when
    no gradient needs scaling. Gradients go to it grouped by DTensor mesh (plain tensors
    on their own): one foreach kernel cannot mix meshes, or DTensors and plain tensors."""
    if float(max_norm / (total_norm + 1e-6)) >= 1.0:
        return
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for part in parts:
        for p in part.parameters():
            if p.grad is not None:
                groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    for params in groups.values():
        clip_grads_with_norm_(params, max_norm, total_norm)
