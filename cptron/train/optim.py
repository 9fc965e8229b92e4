"""AdamW over the model parts, and gradient clipping by the true global norm.

One optimizer per model part (pipeline virtual stages give a rank several
parts); they always step together. Weight decay applies to matrices only:
norm gains and biases are not decayed (as in Megatron-LM and GPT-NeoX), unless
a parameter group says otherwise. Which parameters train, in which groups, and
the new-rows-only mode are resolved by `cptron.train.param_groups`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from cptron.errors import require

if TYPE_CHECKING:
    from cptron.train.param_groups import TrainablePlan


@dataclass
class ParamGroupConfig:
    """Parameters selected by name pattern that get their own LR multiplier and weight decay."""

    patterns: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names as a checkpoint names them (tok_embeddings.weight, layers.*.attention.*, output.weight)."""
    lr_scale: float = 1.0
    """Multiplier of the scheduled learning rate for these parameters."""
    weight_decay: Optional[float] = None
    """Decoupled weight decay of these parameters; none: the default rule (optim.weight_decay for matrices, 0 for norm gains and biases)."""

    def validate(self) -> None:
        """Checked by OptimizerConfig.validate, which knows the group's index and the frozen patterns."""


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
    param_groups: list[ParamGroupConfig] = field(default_factory=list)
    """Parameter groups by name pattern, each with its own LR multiplier and weight decay; the first group matching a parameter wins, unmatched ones keep the defaults."""
    frozen: list[str] = field(default_factory=list)
    """fnmatch patterns of parameter names (e.g. layers.0.*) that do not train: no gradient, no optimizer state, weights bit-exact; they win over param_groups."""
    train_new_rows_only: bool = False
    """Train only the rows of tok_embeddings and output from new_rows_from to the vocabulary size (the first stage after a vocabulary extension); every other parameter is frozen, old and padding rows get masked gradients and no decay (decay is applied to the new rows alone), so they stay bit-exact."""
    new_rows_from: int = 0
    """First new token id for train_new_rows_only; 0: old_vocab_size of vocab_extension.json in the checkpoint.init_from directory (written by `cptron vocab init`)."""

    def validate(self) -> None:
        require(self.lr > 0 and math.isfinite(self.lr), "optim.lr", self.lr, "a positive finite number")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "a number in [0, 1)")
        require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "a number in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "a positive number")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")
        require(all(isinstance(p, str) and p for p in self.frozen), "optim.frozen", self.frozen, "name patterns")
        for i, group in enumerate(self.param_groups):
            where = f"optim.param_groups[{i}]"
            require(
                bool(group.patterns) and all(isinstance(p, str) and p for p in group.patterns),
                f"{where}.patterns",
                group.patterns,
                "a non-empty list of name patterns",
            )
            require(
                math.isfinite(group.lr_scale) and group.lr_scale > 0,
                f"{where}.lr_scale",
                group.lr_scale,
                "a finite number > 0",
            )
            wd = group.weight_decay
            require(wd is None or (math.isfinite(wd) and wd >= 0), f"{where}.weight_decay", wd, "none or a number >= 0")
            for pattern in group.patterns:
                require(
                    pattern not in self.frozen,
                    f"{where}.patterns",
                    pattern,
                    "a pattern that is not also in optim.frozen (frozen parameters have no optimizer group)",
                )
        require(self.new_rows_from >= 0, "optim.new_rows_from", self.new_rows_from, "an integer >= 0")
        require(
            self.new_rows_from == 0 or self.train_new_rows_only,
            "optim.new_rows_from",
            self.new_rows_from,
            "0 unless optim.train_new_rows_only is set",
        )


def build_optimizers(
    parts: list[nn.Module], cfg: OptimizerConfig, device: torch.device, plan: Optional[TrainablePlan] = None
) -> list[torch.optim.Optimizer]:
    """One AdamW per part over its trainable parameters, grouped by `plan` (default: decayed
    matrices, undecayed vectors). A part without trainable parameters (a fully frozen pipeline
    stage) gets an AdamW over one empty group, so every part still has its optimizer."""
    impl = resolve_adamw_implementation(cfg, device)
    kwargs = {"fused": impl == "fused", "foreach": impl == "foreach"}
    optimizers = []
    for part in parts:
        if plan is not None:
            groups = plan.optimizer_groups(part)
        else:
            decay, no_decay = [], []
            for p in part.parameters():
                if p.requires_grad:
                    (decay if p.ndim >= 2 else no_decay).append(p)
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]] or [{"params": []}]
        optimizers.append(
            torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=0.0, **kwargs)
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
    # A rank whose stages are all frozen has no gradient, yet joins the pp reduction on its device.
    params = (p for part in parts for p in part.parameters())
    device = device or (plain[0].device if plain else next((p.device for p in params), torch.device("cpu")))
    # Under CPU offload the gradients' DTensors live in CPU memory on a cuda mesh: the norm is
    # reduced (and later clipped against) on the mesh's device, where its collectives run.
    meshes = [mesh for mesh, _ in groups]
    device = torch.device(meshes[0].device_type) if meshes and meshes[0].device_type != device.type else device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups.values():
        sq = sq + _to_mesh_device(get_total_norm(grads).float()).full_tensor() ** 2
    if plain:
        sq = sq + get_total_norm(plain).float().to(device) ** 2
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


def _to_mesh_device(t: DTensor) -> DTensor:
    local = t.to_local()
    if local.device.type == t.device_mesh.device_type:
        return t
    return DTensor.from_local(local.to(t.device_mesh.device_type), t.device_mesh, t.placements, run_check=False)


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
