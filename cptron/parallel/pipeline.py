"""Pipeline parallelism: split the decoder into stages and run them with torch.distributed.pipelining.

The pieces, in the order the trainer uses them:

1. `split_layers` and `stage_ids_for_rank` decide which blocks form each stage
   and which stages this pipeline rank holds.
2. `build_stage_modules` builds those stages (on the meta device) as
   `StageTransformer`s: the original `Transformer` with the blocks and
   embeddings a stage does not own removed, so every parameter keeps its
   full-model name and checkpoints reshard between layouts with different pp.
3. The trainer parallelizes (TP/SP, activation checkpointing, compile, FSDP2)
   and materializes the stages (`to_empty` + `init_weights(seed)`).
4. `build_pipeline_schedule` wraps them in torch's `PipelineStage`s and the
   chosen schedule, and returns a `PipelineRuntime`.
5. `pipeline_train_step` / `pipeline_eval_step` run one batch.
6. With tied embeddings, `TiedEmbeddingSync` keeps the first stage's
   `tok_embeddings.weight` and the last stage's `output.weight` one parameter:
   they start equal, their gradients are summed before clipping, and AdamW then
   moves both copies the same way (as Megatron-LM's embedding group does).

Each stage takes `(x, ids)`: token ids (first stage) or hidden states, and the
per-token `ids` (document ids of packed sequences, or positions). A non-last
stage returns `(h, ids)` so the next stage can rebuild rotary positions and the
attention mask; the last stage returns logits, or with the chunked loss (the
`stage_labels` of pipeline_train_step) what `Transformer.head_loss` returns.
`ids` is an integer tensor and never requires grad: torch's runtime sends no
gradient for it.

Schedules (names as in `ParallelConfig.pp_schedule`): GPipe (Huang et al. 2019),
1F1B (Narayanan et al. 2019, PipeDream-Flush), interleaved 1F1B (Narayanan et
al. 2021), looped BFS (Lamy-Poirier 2023, breadth-first pipeline parallelism),
interleaved zero bubble ZB1P and zero bubble V (Qi et al. 2024). Losses are
sums: the runtime never divides gradients by the number of microbatches
(`scale_grads=False`); the trainer's loss function already divides by the
global token count.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor

from cptron._torch_compat import EvalSafePipelineStage, is_compiled_module
from cptron.errors import ConfigError, invalid
from cptron.models.config import ModelConfig
from cptron.models.llama import Transformer

__all__ = [
    "SCHEDULES",
    "PipelineRuntime",
    "StageTransformer",
    "build_pipeline_schedule",
    "build_stage_modules",
    "check_pipeline_schedule",
    "pipeline_eval_step",
    "pipeline_train_step",
    "split_layers",
    "stage_ids_for_rank",
    "TiedEmbeddingSync",
    "tied_stage_ranks",
]

# One stage per rank.
SINGLE_STAGE_SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
# Several stages per rank; stage s on rank s % pp, except zbv (V-shaped placement).
MULTI_STAGE_SCHEDULES = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv_zero_bubble": ScheduleZBVZeroBubble,
}
SCHEDULES = {**SINGLE_STAGE_SCHEDULES, **MULTI_STAGE_SCHEDULES}
# These split each backward into an input-gradient and a weight-gradient pass
# by walking the autograd graph; torch refuses them for torch.compile'd stages.
SPLIT_BACKWARD_SCHEDULES = ("interleaved_zero_bubble", "zbv_zero_bubble")


# ----------------------------------------------------------------------------- layout


def split_layers(n_layers: int, n_stages: int, layers_per_stage: list[int] | None = None) -> list[range]:
    """The global block indices of each stage, in stage order.

    With `layers_per_stage` None the split is as even as possible and the
    earlier stages take the extra blocks: the last stage already carries the
    final norm, the output projection (vocab x dim, for Llama 3 as many FLOPs
    as two to three blocks) and the loss, while the first stage's embedding is
    a cheap lookup. Pass `layers_per_stage` to balance differently.
    """
    if n_stages < 1:
        raise invalid("parallel.pp", n_stages, "a number of pipeline stages >= 1")
    if layers_per_stage is None:
        if n_stages > n_layers:
            raise invalid(
                "parallel.pp",
                n_stages,
                f"at most model.n_layers={n_layers} pipeline stages (every stage holds at least one block)",
            )
        base, extra = divmod(n_layers, n_stages)
        layers_per_stage = [base + (1 if s < extra else 0) for s in range(n_stages)]
    elif (
        len(layers_per_stage) != n_stages
        or any(int(n) != n or n < 1 for n in layers_per_stage)
        or sum(layers_per_stage) != n_layers
    ):
        raise invalid(
            "parallel.pp_layers_per_stage",
            layers_per_stage,
            f"{n_stages} positive layer counts (one per stage) summing to model.n_layers={n_layers}",
        )
    ranges, start = [], 0
    for count in layers_per_stage:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def _check_schedule_name(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise invalid("parallel.pp_schedule", schedule, f"one of {', '.join(SCHEDULES)}")


def stage_ids_for_rank(pp_rank: int, pp_size: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stages pipeline rank `pp_rank` holds, in increasing order.

    Loop placement (stage s on rank s % pp_size) for every schedule but
    zbv_zero_bubble, whose V places stages r and 2*pp_size-1-r on rank r so the
    turn of the V (stages pp_size-1 and pp_size) stays on the last rank. This
    must agree with the mapping torch's schedules use for their send/recv peers
    (tests check it against torch's generate_stage_to_rank_mapping).
    """
    _check_schedule_name(schedule)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is out of range for pp_size={pp_size}")
    if schedule in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
        raise invalid("parallel.pp_stages_per_rank", stages_per_rank, f"1 for the single-stage schedule {schedule}")
    if schedule == "zbv_zero_bubble":
        if stages_per_rank != 2:
            raise invalid(
                "parallel.pp_stages_per_rank", stages_per_rank, "2 for zbv_zero_bubble (a V of two stages per rank)"
            )
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def check_pipeline_schedule(
    schedule: str,
    pp_size: int,
    stages_per_rank: int,
    n_microbatches: int,
    compiled: bool = False,
    fsdp_reshard_after_forward: bool = False,
) -> None:
    """Refuse, at start-up, a schedule torch 2.13's runtime cannot run with these numbers.

    The constraints come from the schedule classes themselves: 1F1B needs at
    least as many microbatches as stages; the interleaved schedules need the
    microbatch count to be a multiple of its number of rounds
    (max(1, n_microbatches // pp)); ZBV needs exactly 2 stages per rank.
    The zero-bubble schedules split each backward into an input-gradient and a
    weight-gradient pass by walking the autograd graph from the module's
    registered parameters. torch refuses that for compiled blocks, and with
    FSDP parameters resharded after forward (`fsdp_reshard_after_forward`:
    pass True when FSDP shards with that setting) the walk misses the
    unsharded parameters autograd actually used, and their gradients stay None.
    """
    _check_schedule_name(schedule)
    n_stages = pp_size * stages_per_rank
    stage_ids_for_rank(0, pp_size, stages_per_rank, schedule)  # placement constraints
    if n_microbatches < 1:
        raise invalid("parallel.pp_microbatches", n_microbatches, "an integer >= 1")
    if schedule == "1f1b" and n_microbatches < n_stages:
        raise invalid("parallel.pp_microbatches", n_microbatches, f">= the {n_stages} pipeline stages for 1f1b")
    if schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
        rounds = max(1, n_microbatches // pp_size)
        if n_microbatches % rounds:
            raise invalid(
                "parallel.pp_microbatches",
                n_microbatches,
                f"a multiple of max(1, pp_microbatches // pp) = {rounds} for {schedule} "
                f"(e.g. {rounds * pp_size}), or fewer than pp={pp_size}",
            )
    if compiled and schedule in SPLIT_BACKWARD_SCHEDULES:
        raise ConfigError(
            f"parallel.pp_schedule={schedule!r} is invalid with parallel.compile=true: "
            "torch 2.13 splits the backward of zero-bubble schedules by walking the autograd "
            "graph, which compiled blocks hide; use interleaved_1f1b or set compile=false"
        )
    if fsdp_reshard_after_forward and schedule in SPLIT_BACKWARD_SCHEDULES:
        raise ConfigError(
            f"parallel.pp_schedule={schedule!r} is invalid with parallel.fsdp_reshard_after_forward="
            "true: torch 2.13's split backward then computes no weight gradients for resharded "
            "parameters; set fsdp_reshard_after_forward=false (also avoids one all-gather per "
            "microbatch) or use interleaved_1f1b"
        )


# ------------------------------------------------------------------------------ stages


class StageTransformer(Transformer):
    """One pipeline stage of the decoder, with the full model's parameter names.

    forward(x, ids): `x` is token ids [B, T] on the first stage and hidden
    states on the others; `ids` [B, T] are document ids (`ids_are_doc_ids`,
    packed documents) or positions (plain causal). Returns (h, ids) on a
    non-last stage and logits over the padded vocabulary on the last.
    """

    def __init__(self, cfg: ModelConfig, stage_index: int, n_stages: int, layer_ids: range, ids_are_doc_ids: bool):
        if not 0 <= stage_index < n_stages:
            raise ValueError(f"stage_index={stage_index} is out of range for {n_stages} stages")
        if len(layer_ids) == 0 or layer_ids[0] < 0 or layer_ids[-1] >= cfg.n_layers:
            raise ValueError(
                f"layer_ids={layer_ids} is invalid: expected a non-empty range of block "
                f"indices within model.n_layers={cfg.n_layers}"
            )
        # The full model is built and trimmed, so names and module types are the
        # full model's by construction; build stages on the meta device, where
        # the blocks that are dropped cost nothing.
        super().__init__(cfg)
        self.stage_index, self.n_stages = stage_index, n_stages
        self.layer_ids = layer_ids
        self.ids_are_doc_ids = ids_are_doc_ids
        for key in [k for k in self.layers if int(k) not in layer_ids]:
            del self.layers[key]
        if not self.is_first:
            # With tied embeddings a last stage keeps output.weight as a copy of its own (checkpointed
            # as tok_embeddings.weight, initialized from that name); TiedEmbeddingSync keeps it equal.
            self.tok_embeddings = None
        if not self.is_last:
            self.norm = None
            self.output = None

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.n_stages - 1

    def forward(self, x: Tensor, ids: Tensor, labels: Tensor | None = None):
        # `labels` reach every stage of a rank (torch passes keyword arguments to all); only the
        # last, with a head, computes the loss from them (Transformer.head_loss).
        labels = labels if self.is_last else None
        if self.ids_are_doc_ids:
            out = super().forward(x, doc_ids=ids, labels=labels)
        else:
            out = super().forward(x, positions=ids, labels=labels)
        return out if self.is_last else (out, ids)

    def extra_repr(self) -> str:
        return (
            f"stage={self.stage_index}/{self.n_stages}, layers={self.layer_ids.start}..{self.layer_ids.stop - 1}, "
            f"ids={'doc_ids' if self.ids_are_doc_ids else 'positions'}"
        )


def build_stage_modules(
    model_cfg: ModelConfig,
    stage_ids: list[int],
    n_stages: int,
    layer_ranges: list[range],
    ids_are_doc_ids: bool,
    device="meta",
) -> list[StageTransformer]:
    """The stages `stage_ids` (this rank's), built on `device` (meta by default, uninitialized).

    Materialize with `to_empty(device=...)` and `init_weights(seed)`: each
    parameter is drawn from generators seeded by (seed, parameter name, tile) and the
    depth-scaled std uses model_cfg.n_layers, so a stage initializes exactly as
    the same parameters of the full model do.
    """
    if len(layer_ranges) != n_stages:
        raise ValueError(f"layer_ranges has {len(layer_ranges)} entries, expected one per stage ({n_stages})")
    # TiedEmbeddingSync keeps one tied weight in step across stages, not a factorized pair.
    if n_stages > 1 and model_cfg.tie_embeddings and model_cfg.embedding_rank is not None:
        raise invalid(
            "model.embedding_rank",
            model_cfg.embedding_rank,
            "None with model.tie_embeddings under pipeline parallelism (tied factorized embeddings need parallel.pp=1)",
        )
    if sorted(set(stage_ids)) != sorted(stage_ids) or not all(0 <= s < n_stages for s in stage_ids):
        raise ValueError(f"stage_ids={stage_ids} is invalid: expected distinct stage indices in [0, {n_stages})")
    with torch.device(device):
        return [StageTransformer(model_cfg, s, n_stages, layer_ranges[s], ids_are_doc_ids) for s in stage_ids]


# ------------------------------------------------------------------------------ tied embeddings


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def tied_stage_ranks(pp_size: int, stages_per_rank: int, schedule: str) -> tuple[int, int]:
    """(pipeline rank holding the first stage, pipeline rank holding the last stage)."""
    last = pp_size * stages_per_rank - 1
    holders = [r for r in range(pp_size) if last in stage_ids_for_rank(r, pp_size, stages_per_rank, schedule)]
    return 0, holders[0]


class TiedEmbeddingSync:
    """Tied input and output embeddings across pipeline stages.

    The first stage holds `tok_embeddings.weight`, the last `output.weight`: two
    copies of one parameter. Both are initialized and checkpointed under the name
    `tok_embeddings.weight`, so they start equal. After every backward,
    `reduce_grads` sets both copies' gradients to their sum (over one process
    group per data/tensor-parallel coordinate, joining the pipeline ranks that
    hold the two stages; no communication when one rank holds both, as in the
    zbv V). Clipping scales both alike, and AdamW applied to equal weights, equal
    gradients and equal moments keeps them equal. `duplicates` are the
    `output.weight` copies, left out of the global gradient norm so that the
    parameter counts once.

    Collective at construction: every rank of the world must build it (process
    groups are created), in the same order relative to other group creations.
    """

    def __init__(self, parts: list[nn.Module], mesh, pp_rank_of_first: int, pp_rank_of_last: int):
        embedding = [p.tok_embeddings.weight for p in parts if getattr(p, "tok_embeddings", None) is not None]
        self.duplicates = [
            p.output.weight
            for p in parts
            if getattr(p, "output", None) is not None and getattr(p, "tok_embeddings", None) is None
        ]
        self.params = embedding + self.duplicates
        self.group = None
        if pp_rank_of_first != pp_rank_of_last:
            ranks = mesh.mesh  # global ranks, [pp, dp_replicate, dp_shard, tp]
            me = dist.get_rank()
            for coord in itertools.product(*(range(n) for n in ranks.shape[1:])):
                pair = [int(ranks[(pp_rank_of_first, *coord)]), int(ranks[(pp_rank_of_last, *coord)])]
                group = dist.new_group(pair)  # every rank creates every group, in the same order
                if me in pair:
                    self.group = group
        self._check_layouts()

    def _check_layouts(self) -> None:
        """Both copies must be split alike (same global shape and placements), or summing local shards is
        wrong. Collective over the world, so that every rank (middle stages too) raises together."""
        mine = [(tuple(p.shape), tuple(_local(p).shape), str(getattr(p, "placements", None))) for p in self.params]
        if self.group is not None:
            seen: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(seen, mine, group=self.group)
            mine = [desc for descs in seen for desc in descs]
        error = None
        if len(set(mine)) > 1:
            error = f"tied embeddings across pipeline stages need identically split copies, got {sorted(set(mine))}"
        if dist.is_initialized() and dist.get_world_size() > 1:
            errors: list = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise ConfigError(error)

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Set the gradient of every copy to the sum of both copies' gradients."""
        if not self.params:
            return
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                # A vocab-parallel embedding's backward gives a replicated gradient: take this rank's
                # slice (no communication), so that both copies' local shards line up.
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            grads.append(_local(p.grad))
        total = grads[0] if len(grads) == 1 else grads[0] + grads[1]
        if self.group is not None:
            total = total.contiguous()
            dist.all_reduce(total, group=self.group)
        for g in grads:
            if g is not total:
                g.copy_(total)


# ------------------------------------------------------------------------------ runtime


@dataclass
class PipelineRuntime:
    """This rank's stages and the torch schedule that drives them.

    `schedule` is the torch.distributed.pipelining schedule object (its `step`
    runs forward and backward of every microbatch, `eval` forward only);
    `stages` are the `PipelineStage`s and `modules` the stage modules, both in
    `stage_ids` order. Use it through pipeline_train_step / pipeline_eval_step.
    """

    schedule: object
    stages: list[PipelineStage]
    modules: list[nn.Module]
    stage_ids: list[int]
    n_stages: int
    n_microbatches: int
    schedule_name: str
    # torch sizes its receive buffers from the first batch after each switch
    # between training and eval, so each mode keeps one batch shape.
    batch_shapes: dict = field(default_factory=dict)

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids


def build_pipeline_schedule(
    stage_modules: list[nn.Module],
    stage_ids: list[int],
    n_stages: int,
    pp_group,
    device: torch.device,
    n_microbatches: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    schedule: str,
) -> PipelineRuntime:
    """Wrap this rank's (parallelized, materialized) stage modules and build the schedule.

    `stage_modules` are in `stage_ids` order; `pp_group` is the pipeline process
    group (mesh["pp"].get_group()). `loss_fn(logits, labels)` runs once per
    microbatch on the last stage and must return that microbatch's share of the
    batch loss (a sum, already normalized by the trainer): gradients of all
    microbatches are summed, never divided by the number of microbatches.
    FSDP2-wrapped stages are fine: torch defers their gradient reduce-scatter to
    the last microbatch.
    """
    if len(stage_modules) != len(stage_ids):
        raise ValueError(f"{len(stage_modules)} stage modules for {len(stage_ids)} stage ids {stage_ids}")
    pp_size = dist.get_world_size(pp_group)
    if n_stages % pp_size:
        raise ValueError(f"{n_stages} pipeline stages do not divide over {pp_size} pipeline ranks")
    stages_per_rank = n_stages // pp_size
    check_pipeline_schedule(
        schedule, pp_size, stages_per_rank, n_microbatches, compiled=any(is_compiled_module(m) for m in stage_modules)
    )
    pp_rank = dist.get_rank(pp_group)
    expected = stage_ids_for_rank(pp_rank, pp_size, stages_per_rank, schedule)
    if list(stage_ids) != expected:
        raise ValueError(
            f"stage_ids={stage_ids} do not match the {schedule} placement for pipeline rank "
            f"{pp_rank}: expected {expected} (see stage_ids_for_rank)"
        )
    # EvalSafePipelineStage: torch's PipelineStage, fixed for eval() of V-shaped schedules.
    stages = [
        EvalSafePipelineStage(module, stage_id, n_stages, device, group=pp_group)
        for module, stage_id in zip(stage_modules, stage_ids, strict=True)
    ]
    cls = SCHEDULES[schedule]
    if schedule in SINGLE_STAGE_SCHEDULES:
        torch_schedule = cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        torch_schedule = cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return PipelineRuntime(
        torch_schedule, stages, list(stage_modules), list(stage_ids), n_stages, n_microbatches, schedule
    )


def _step_inputs(runtime: PipelineRuntime, mode: str, tokens, ids, labels, stage_labels=None):
    args: tuple = ()
    given = {}
    if runtime.has_first_stage:
        if tokens is None or ids is None:
            raise ValueError("this rank holds the first pipeline stage: tokens and ids are required")
        args = (tokens, ids)
        given.update(tokens=tokens, ids=ids)
    target = None
    if runtime.has_last_stage:
        if labels is None:
            raise ValueError("this rank holds the last pipeline stage: labels are required")
        target = labels
        given.update(labels=labels)
        if stage_labels is not None:
            given.update(stage_labels=stage_labels)
    for name, t in given.items():
        if t.dim() < 1 or t.shape[0] % runtime.n_microbatches:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}: its batch dimension must be a multiple of "
                f"parallel.pp_microbatches={runtime.n_microbatches}"
            )
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    before = runtime.batch_shapes.setdefault(mode, shapes)
    if before != shapes:
        raise ValueError(
            f"pipeline {mode} batch shapes changed from {before} to {shapes}: torch's pipeline "
            "runtime keeps the receive buffers sized by the first batch, so every batch of a mode "
            "must have the same shape (pad the last one)"
        )
    return args, target


def pipeline_train_step(
    runtime: PipelineRuntime,
    tokens: Tensor | None,
    ids: Tensor | None,
    labels: Tensor | None,
    stage_labels: Tensor | None = None,
) -> Tensor | None:
    """Forward and backward of every microbatch of the batch; gradients accumulate into .grad.

    tokens/ids [B, T] are needed on the rank holding the first stage, labels on
    the rank holding the last (other ranks may pass None); B is split into
    n_microbatches equal microbatches. `stage_labels` [B, T], given on the rank
    holding the last stage, go to that stage's forward as `labels` (the chunked
    loss computes the loss inside it); `labels` still go to the loss function.
    Returns the sum of the microbatch losses (detached) where this rank holds
    the last stage, else None.
    """
    args, target = _step_inputs(runtime, "train", tokens, ids, labels, stage_labels)
    losses: list[Tensor] = []
    kwargs = {} if stage_labels is None else {"labels": stage_labels}
    # return_outputs=False: the last stage would otherwise keep every microbatch's logits.
    runtime.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
    missing = [name for m in runtime.modules for name, p in m.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise RuntimeError(
            f"pipeline schedule {runtime.schedule_name} left {len(missing)} parameters without a gradient "
            f"({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}). With the zero-bubble schedules this "
            "happens when FSDP reshards parameters after forward: set parallel.fsdp_reshard_after_forward=false"
        )
    return _summed(runtime, losses)


def pipeline_eval_step(
    runtime: PipelineRuntime,
    tokens: Tensor | None,
    ids: Tensor | None,
    labels: Tensor | None,
    stage_labels: Tensor | None = None,
) -> Tensor | None:
    """Forward only (no autograd graph, no gradients), summing the microbatch losses as in training
    (`stage_labels` as in pipeline_train_step).

    Uses the schedule's own eval(). Switching between training and eval makes
    torch re-run its shape inference once (one extra forward of the first
    microbatch, and forward+backward when switching back).
    """
    args, target = _step_inputs(runtime, "eval", tokens, ids, labels, stage_labels)
    losses: list[Tensor] = []
    kwargs = {} if stage_labels is None else {"labels": stage_labels}
    with torch.no_grad():
        runtime.schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
    return _summed(runtime, losses)


def _summed(runtime: PipelineRuntime, losses: list[Tensor]) -> Tensor | None:
    if not runtime.has_last_stage:
        return None
    if len(losses) != runtime.n_microbatches:
        raise RuntimeError(f"the pipeline returned {len(losses)} microbatch losses, expected {runtime.n_microbatches}")
    return torch.stack([loss.detach() for loss in losses]).sum()
