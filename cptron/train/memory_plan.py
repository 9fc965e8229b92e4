"""The memory plan: what each rank of a train config holds, estimated before launch (`cptron plan`).

From the model, the layout, the batch and the compute dtype alone: no GPU, no process group, and
the model is never allocated (parameter shapes come from the meta device). Per rank (one row per
pipeline rank; the other ranks of a pipeline rank hold the same) the plan counts:

- parameters: fp32 master weights, split over `tp` (attention and MLP matrices, the vocabulary),
  over pipeline ranks by stage, and over `dp_shard` when FSDP2 wraps the model;
- gradients: fp32. FSDP2 reduce-scatters them to shards, but under gradient accumulation (several
  microbatches per step, and every pipeline schedule) the reduction waits for the last microbatch,
  so each unit's *unsharded* gradient (parameters / tp, fp32) is held through the whole step;
- optimizer state: AdamW's two fp32 moments per trainable parameter;
- activations: the tensors autograd saves in one of cptron's blocks (RMSNorm's fp32 input and
  normalized output, the q/k/v and SDPA output, the reshaped attention output, SwiGLU's four
  hidden-width tensors, SDPA's float mask with packed documents), counted as Korthikanti et al.
  2022 ("Reducing Activation Recomputation in Large Transformer Models") count Megatron's; with
  activation checkpointing a wrapped block keeps only its input, and one block is recomputed at a
  time in backward; times the microbatches the pipeline schedule keeps in flight;
- transients: the loss over the logits (the logits, the fp32 log-softmax, their gradients; on the
  chunked path one chunk's and the gradients it holds), and
  the FSDP2 units all-gathered in compute dtype (the root's embedding and output stay gathered for
  the step, one block is prefetched, the last one kept for backward).

The sum is the device total; with `parallel.offload=all` parameters, sharded gradients and the
optimizer state move to CPU memory (the `cpu` column). Not counted: the CUDA context and NCCL
buffers (about 1 GB per GPU), the caching allocator's fragmentation, and on CPU the interpreter and
libraries. tests/distributed/test_memory_plan.py checks the totals against measured peaks on CPU.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from cptron.errors import ConfigError, CptronError, require
from cptron.models.config import ModelConfig
from cptron.models.flex import resolve_attention
from cptron.parallel import pipeline as pl
from cptron.parallel.dims import ParallelDims, mixed_precision_dtype, resolve_parallel_dims
from cptron.parallel.parallelize import fsdp_enabled
from cptron.train.chunked_loss import resolve_loss_path
from cptron.train.config import JobConfig

GB = 10**9
TP_SPLIT = ("attention.", "feed_forward.", "tok_embeddings.", "output.")
"""Parameters tensor parallelism splits (everything but the norm gains)."""
COLUMNS = ("params", "grads", "optimizer", "activations", "fsdp_units", "transient")
LOSS_TENSORS = 4.5
"""The loss's peak in fp32 logit-sized tensors (logits, log-softmax, the gradients of both, and
cross-entropy's scratch), as measured on CPU."""
LOSS_PARALLEL_TENSORS = 6.0
"""The same under loss parallelism, whose sharded log-softmax keeps more intermediates."""
CHUNK_TENSORS = 1.5
"""The chunked loss's peak in fp32 chunk-logit-sized tensors, beside the fp32 head gradient and the
hidden-state gradient it holds from forward to backward (benchmarks/loss_memory.py at 128k x 2048, CPU)."""


@dataclass
class PlanConfig(JobConfig):
    """Estimate each rank's device memory (and CPU memory under offload) for a train config, say whether it fits, and which layouts would."""

    device_memory: str = ""
    """Memory of one device, e.g. 80GB (decimal units; GiB for binary); default: the visible GPU's, required without one."""
    world_size: int = 0
    """Number of ranks to plan for; 0: WORLD_SIZE if set, else pp x dp_replicate x dp_shard x tp (dp_shard must then be set)."""
    search: bool = True
    """Also search layouts of the same world size (tp, pp, activation checkpointing, offload) and list those that fit."""


@dataclass
class RankMemory:
    """Estimated bytes of one pipeline rank (every rank of it holds the same)."""

    pp_rank: int
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    """Saved for backward by the microbatches in flight."""
    fsdp_units: int = 0
    """FSDP2 units gathered while others compute (prefetch, the last block kept for backward)."""
    transient: int = 0
    """The largest short-lived allocation on top of everything else (see `transient_of`)."""
    transient_of: str = "-"
    """What it is: the loss over the logits, a recomputed block, a fresh gradient before accumulation."""
    cpu: int = 0
    """Bytes in CPU memory (offload), not on the device."""

    @property
    def total(self) -> int:
        """Device bytes at the step's peak."""
        return sum(getattr(self, c) for c in COLUMNS)


@dataclass
class Plan:
    """The estimate of one config: one `RankMemory` per pipeline rank, and what it was made for."""

    cfg: JobConfig
    model_cfg: ModelConfig
    dims: ParallelDims
    device_type: str
    dtype: torch.dtype
    microbatches: int
    ranks: list[RankMemory] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(r.total for r in self.ranks)

    def describe_layout(self) -> str:
        p = self.cfg.parallel
        return (
            f"{self.dims.describe()}, activation_checkpoint={p.activation_checkpoint}, offload={p.offload}, "
            f"{str(self.dtype).removeprefix('torch.')} compute"
        )


# ----------------------------------------------------------------------------- the estimate


def plan_model_config(cfg: JobConfig) -> ModelConfig:
    """The run's architecture: the init weights' (a local file read) or the model section."""
    if cfg.checkpoint.init_from:
        from cptron.train.initial_weights import model_config_for_init  # reads a directory: only when asked

        return model_config_for_init(cfg.checkpoint.init_from, cfg.model.pad_vocab_to_multiple_of)
    return cfg.model


def estimate_memory(
    cfg: JobConfig, world_size: int, device_type: str = "cuda", model_cfg: Optional[ModelConfig] = None
) -> Plan:
    """Each pipeline rank's memory for `cfg` on `world_size` ranks of `device_type` (see the module doc).
    Invalid layouts raise the trainer's own ConfigError."""
    from cptron.train.param_groups import model_param_shapes
    from cptron.train.train_module import plan_microbatches

    mc = model_cfg or plan_model_config(cfg)
    pcfg, t = cfg.parallel, cfg.training
    dims = resolve_parallel_dims(pcfg, world_size, mc)
    dtype = mixed_precision_dtype(pcfg, torch.device(device_type))
    mb = plan_microbatches(cfg, dims, dtype)
    e = dtype.itemsize
    fsdp = fsdp_enabled(dims, pcfg, dtype)
    offload = pcfg.offload == "all"
    shapes = model_param_shapes(mc)
    if mc.tie_embeddings and dims.pp > 1:  # the last stage holds its own copy of the tied weight
        shapes["output.weight"] = shapes["tok_embeddings.weight"]
    trainable = _trainable(cfg, shapes)
    n_stages = dims.pp * pcfg.pp_stages_per_rank
    ranges = pl.split_layers(mc.n_layers, n_stages, pcfg.pp_layers_per_stage if dims.pp > 1 else None)
    # Gradient accumulation keeps FSDP2's unsharded gradients through the step (no reduce-scatter
    # until the last microbatch); pipeline schedules always run several microbatches.
    accumulating = mb.microbatches > 1 or dims.pp > 1
    tokens = t.micro_batch_size * t.seq_len
    plan = Plan(cfg, mc, dims, device_type, dtype, mb.microbatches)
    for r in range(dims.pp):
        stages = pl.stage_ids_for_rank(r, dims.pp, pcfg.pp_stages_per_rank, pcfg.pp_schedule) if dims.pp > 1 else [0]
        rank = RankMemory(pp_rank=r)
        sharded = trained_full = trained_sharded = 0
        acts, units, kept, phases = 0.0, [], 0, {}
        for s in stages:
            names = _stage_params(shapes, ranges[s], first=s == 0, last=s == n_stages - 1)
            root = largest_root = 0
            for name in names:
                split = dims.tp if name.startswith(TP_SPLIT) else 1
                n_tp, n_shard = _numel(shapes[name], split), _numel(shapes[name], split, dims.dp_shard if fsdp else 1)
                sharded += n_shard
                if name in trainable:
                    trained_full, trained_sharded = trained_full + n_tp, trained_sharded + n_shard
                if not name.startswith("layers."):
                    root += n_tp
                    largest_root = max(largest_root, n_tp if name in trainable else 0)
            block_units = [
                sum(_numel(shapes[n], dims.tp if n.startswith(TP_SPLIT) else 1) for n in names if _in_layer(n, i))
                for i in ranges[s]
            ]
            units += block_units
            # FSDP2 keeps the last block gathered after forward (cptron's choice: it is needed first in backward);
            # without reshard_after_forward every unit, the root included, stays gathered until its backward.
            kept += sum(block_units[-1:]) if pcfg.fsdp_reshard_after_forward else sum(block_units) + root
            stage_acts, recompute = _stage_activations(cfg, mc, dims, dtype, ranges[s], s == n_stages - 1, device_type)
            acts += stage_acts * _in_flight(pcfg, dims, mb, r, len(stages))
            if recompute:
                phases["recomputed block"] = max(phases.get("recomputed block", 0), int(recompute * tokens))
            if accumulating and largest_root:
                # A fresh gradient exists beside the accumulated one until AccumulateGrad adds it.
                key = "loss" if s == n_stages - 1 else "embedding gradient"
                phases[key] = phases.get(key, 0) + largest_root * 4
            if s == n_stages - 1:
                held = _last_stage_in_flight(pcfg, dims, mb) - 1  # other microbatches' logits kept (gpipe)
                loss = _loss_bytes(cfg, mc, dims, e, tokens)
                phases["loss"] = phases.get("loss", 0) + loss + held * _held_logits(cfg, mc, dims, e, tokens)
        rank.params = 4 * sharded
        rank.optimizer = 8 * trained_sharded
        rank.grads = 4 * (trained_full if fsdp and accumulating else trained_sharded)
        rank.activations = int(acts * tokens)
        if fsdp:
            prefetch = max(units or [0]) if pcfg.fsdp_reshard_after_forward else 0  # the next block
            rank.fsdp_units = (kept + prefetch) * e
            if not accumulating:  # a unit's unsharded gradient waits for its reduce-scatter
                phases["unsharded unit gradient"] = max(units or [0]) * (e + 4)
        if phases:
            rank.transient_of, rank.transient = max(phases.items(), key=lambda kv: kv[1])
        if offload:
            rank.cpu = rank.params + 4 * trained_sharded + rank.optimizer
            rank.params = rank.optimizer = 0
            rank.grads = 4 * trained_full if accumulating else 0
        plan.ranks.append(rank)
    return plan


def _numel(shape: tuple[int, ...], tp: int, shard: int = 1) -> int:
    """Elements of one rank's piece: dim 0 split over tp (row/column split and the vocabulary), then over
    dp_shard with FSDP2's padding of dim 0 to a multiple of it."""
    rows = math.ceil(shape[0] / tp)
    return math.ceil(rows / shard) * math.prod(shape[1:])


def _stage_params(shapes: dict, layers: range, *, first: bool, last: bool) -> list[str]:
    out = [n for n in shapes if n.startswith("layers.") and int(n.split(".")[1]) in layers]
    if first:
        out += [n for n in shapes if n.startswith("tok_embeddings.")]
    if last:
        out += [n for n in shapes if n.startswith(("norm.", "output."))]
    return out


def _in_layer(name: str, layer: int) -> bool:
    return name.startswith(f"layers.{layer}.")


def _trainable(cfg: JobConfig, shapes: dict) -> set[str]:
    """Parameter names that get gradients and AdamW state (optim.frozen; train_new_rows_only
    trains the embedding and output matrices, whose old rows are masked, not absent)."""
    o = cfg.optim
    if o.train_new_rows_only:
        return {n for n in shapes if n.startswith(("tok_embeddings.", "output."))}
    return {n for n in shapes if not any(fnmatch.fnmatch(n, p) for p in o.frozen)}


def _stage_activations(
    cfg: JobConfig, mc: ModelConfig, dims: ParallelDims, dtype: torch.dtype, layers: range, last: bool, device_type: str
) -> tuple[float, float]:
    """(bytes per token one microbatch of this stage keeps for backward, bytes per token of one block
    recomputed in backward under activation checkpointing)."""
    t, pcfg = cfg.training, cfg.parallel
    e, d, f = dtype.itemsize, mc.dim, mc.ffn_hidden_dim
    kv = mc.kv_heads * mc.head_size
    seq_split = dims.tp if dims.tp > 1 and pcfg.sequence_parallel else 1
    masked = t.document_masking and resolve_attention(t.attention, device_type, masked=True) == "sdpa"
    # RMSNorm: its fp32 input and the cast normalized output (sequence-split), and its output as the next
    # linears see it (all-gathered over the sequence under sequence parallelism).
    norm = d * (4 + e) / seq_split + d * e
    # With a mask SDPA gets k/v expanded to every query head; without one it shares them (enable_gqa).
    kv_saved = 2 * d if masked and mc.kv_heads != mc.n_heads else 2 * kv
    heads = (3 * d + kv_saved + 4 * f) * e + mc.n_heads * 4  # q, sdpa out, its reshaped copy, k/v, SwiGLU, logsumexp
    mask = t.seq_len * e if masked else 0  # SDPA's float copy of the boolean mask, saved per layer
    block = 2 * norm + heads / dims.tp + mask
    checkpointed = d * e / seq_split  # a wrapped block keeps its input
    keep = 0.0
    for i, _ in enumerate(layers):
        ac = pcfg.activation_checkpoint
        wrapped = ac == "full" or (ac == "selective" and layers[i] % pcfg.ac_every == 0)
        keep += checkpointed if wrapped else block
    keep += 2 * mc.head_size * e + (t.seq_len if masked else 0)  # rotary cos/sin, the boolean mask
    if last:
        keep += norm  # final norm
    recompute = block if pcfg.activation_checkpoint != "none" else 0.0
    return keep, recompute


def _chunked_loss(cfg: JobConfig, mc: ModelConfig, dims: ParallelDims, tokens: int) -> Optional[int]:
    """Tokens per chunk when the run takes the chunked loss path (training.loss_impl), else None."""
    t = cfg.training
    return resolve_loss_path(t.loss_impl, t.loss_chunk_tokens, tokens, mc.padded_vocab_size // dims.tp).chunk_tokens


def _chunked_held(mc: ModelConfig, dims: ParallelDims, tokens: int) -> int:
    """What the chunked loss holds from forward to backward: the fp32 head gradient (the head's own
    rows; coordinates of a factorized head) and the hidden states' gradient."""
    width = mc.embedding_rank if mc.factorize_head else mc.dim
    return int(4 * (mc.padded_vocab_size / dims.tp * width + tokens * mc.dim))


def _loss_bytes(cfg: JobConfig, mc: ModelConfig, dims: ParallelDims, e: int, tokens: int) -> int:
    """The loss's peak over one microbatch's logits (LOSS_TENSORS fp32 copies of them; the logits and
    their gradient in compute dtype count by their size), or over one chunk's on the chunked path."""
    chunk = _chunked_loss(cfg, mc, dims, tokens)
    if chunk is not None:
        local = mc.padded_vocab_size / dims.tp
        return int(CHUNK_TENSORS * min(chunk, tokens) * local * 4) + _chunked_held(mc, dims, tokens)
    lp = dims.tp > 1 and cfg.parallel.loss_parallel
    split = dims.tp if lp else 1
    padded, real = mc.padded_vocab_size / split, mc.vocab_size / split
    fp32 = (LOSS_PARALLEL_TENSORS if lp else LOSS_TENSORS) - 2
    return int(tokens * (2 * padded * e + fp32 * real * 4))


def _held_logits(cfg: JobConfig, mc: ModelConfig, dims: ParallelDims, e: int, tokens: int) -> int:
    """One microbatch's logits and fp32 log-softmax, kept until its backward (the chunked path: its
    gradients)."""
    if _chunked_loss(cfg, mc, dims, tokens) is not None:
        return _chunked_held(mc, dims, tokens)
    split = dims.tp if dims.tp > 1 and cfg.parallel.loss_parallel else 1
    return int(tokens * (mc.padded_vocab_size * e + mc.vocab_size * 4) / split)


def _in_flight(pcfg, dims: ParallelDims, mb, pp_rank: int, stages_on_rank: int) -> float:
    """Microbatches whose activations one stage of this rank holds at once (averaged over its stages)."""
    if dims.pp == 1:
        return 1
    n = mb.pipeline_microbatches
    if pcfg.pp_schedule in ("gpipe", "looped_bfs"):
        return n  # every forward before any backward
    if pcfg.pp_schedule == "1f1b":
        return min(n, dims.pp - pp_rank)
    # Interleaved schedules: warm-up of (v-1)*pp + 2*(pp-1-r) forwards, spread over the rank's v stages.
    warm = (stages_on_rank - 1) * dims.pp + 2 * (dims.pp - 1 - pp_rank) + 1
    return min(n * stages_on_rank, warm) / stages_on_rank


def _last_stage_in_flight(pcfg, dims: ParallelDims, mb) -> int:
    """Microbatches whose loss graph (logits, log-softmax) the last stage keeps before their backward."""
    return mb.pipeline_microbatches if pcfg.pp_schedule in ("gpipe", "looped_bfs") else 1


# ----------------------------------------------------------------------------- layouts that fit


def candidate_layouts(cfg: JobConfig, world_size: int) -> list[JobConfig]:
    """The same job on `world_size` ranks with every tp, pp (dp_shard taking the rest, dp_replicate
    kept), activation checkpointing and offload setting, cheapest first: no offload before offload,
    less recomputation first, then smaller pp and tp (less communication)."""
    p = cfg.parallel
    out = []
    for offload, ac, pp, tp in itertools.product(
        ("none", "all"), ("none", "selective", "full"), _divisors(world_size), _divisors(world_size)
    ):
        if world_size % (pp * tp * p.dp_replicate):
            continue
        layout = replace(
            p,
            pp=pp,
            tp=tp,
            dp_shard=world_size // (pp * tp * p.dp_replicate),
            activation_checkpoint=ac,
            offload=offload,
            pp_stages_per_rank=p.pp_stages_per_rank if pp > 1 else 1,
            pp_layers_per_stage=p.pp_layers_per_stage if pp == p.pp else None,
        )
        if pp > 1 and p.pp == 1:
            layout = replace(layout, pp_schedule="1f1b", pp_stages_per_rank=1)
        job = copy.copy(cfg)
        job.parallel = layout
        out.append(job)
    return out


def search_layouts(
    cfg: JobConfig, world_size: int, device_type: str, device_memory: int, model_cfg: ModelConfig, limit: int = 5
) -> list[Plan]:
    """Up to `limit` plans of `candidate_layouts` whose every rank fits in `device_memory`, cheapest first."""
    fits = []
    for job in candidate_layouts(cfg, world_size):
        try:
            plan = estimate_memory(job, world_size, device_type, model_cfg)
        except (ConfigError, ValueError):  # a layout this model or batch cannot take
            continue
        if plan.peak <= device_memory:
            fits.append(plan)
            if len(fits) == limit:
                break
    return fits


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ----------------------------------------------------------------------------- the command


def format_plan(plan: Plan, device_memory: Optional[int]) -> str:
    """The per-rank table of one plan, and whether it fits."""
    mc, t = plan.model_cfg, plan.cfg.training
    lines = [
        f"model: {_count(mc.num_params())} parameters ({mc.n_layers} layers, dim {mc.dim}, vocabulary "
        f"{mc.padded_vocab_size}); batch: {t.micro_batch_size} x {t.seq_len} tokens per microbatch, "
        f"{plan.microbatches} microbatch(es) per rank and step",
        f"layout: {plan.describe_layout()}",
        "",
        f"{'rank':<8}"
        + "".join(f"{c:>13}" for c in ("params", "grads", "optimizer", "activations", "fsdp units"))
        + f"{'transient':>13}  {'(of)':<24}{'total':>9}{'cpu':>9}",
    ]
    for r in plan.ranks:
        name = f"pp {r.pp_rank}" if plan.dims.pp > 1 else "each"
        cells = "".join(f"{getattr(r, c) / GB:>13.2f}" for c in COLUMNS[:-1])
        lines.append(
            f"{name:<8}{cells}{r.transient / GB:>13.2f}  {'(' + r.transient_of + ')':<24}{r.total / GB:>9.2f}"
            f"{r.cpu / GB:>9.2f}"
        )
    lines.append(
        "(GB = 10^9 bytes per rank; gradients are unsharded while FSDP2 accumulates microbatches"
        + ("; the CUDA context and NCCL buffers, about 1 GB, are not counted)" if plan.device_type == "cuda" else ")")
    )
    if device_memory is not None:
        worst = max(plan.ranks, key=lambda r: r.total)
        verdict = "fits" if plan.peak <= device_memory else "does NOT fit"
        lines.append(
            f"peak {plan.peak / GB:.1f} GB of {device_memory / GB:.1f} GB per device: {verdict}"
            + (
                f" ({f'pp rank {worst.pp_rank}, ' if plan.dims.pp > 1 else ''}largest terms: {_largest_terms(worst)})"
                if plan.peak > device_memory
                else ""
            )
        )
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 10**9 else f"{n / 1e6:.1f}M"


def _accumulation_note(plan: Plan, world: int, device_type: str, mc: ModelConfig) -> Optional[str]:
    """What one microbatch per rank (no accumulation: FSDP2 reduce-scatters at once) would save."""
    t, dims = plan.cfg.training, plan.dims
    if plan.microbatches == 1 or dims.pp > 1 or not fsdp_enabled(dims, plan.cfg.parallel, plan.dtype):
        return None
    job = copy.copy(plan.cfg)
    job.training = replace(t, global_batch_size=dims.dp * t.micro_batch_size)
    alt = estimate_memory(job, world, device_type, mc)
    return (
        f"note: FSDP2 holds {plan.ranks[0].grads / GB:.1f} GB of unsharded gradients while it accumulates "
        f"{plan.microbatches} microbatches; with one microbatch per rank (training.global_batch_size="
        f"{job.training.global_batch_size}) they stay sharded and the peak is {alt.peak / GB:.1f} GB"
    )


def _largest_terms(r: RankMemory) -> str:
    terms = sorted(((getattr(r, c), c) for c in COLUMNS), reverse=True)[:3]
    return ", ".join(f"{c.replace('_', ' ')} {v / GB:.1f} GB" for v, c in terms)


def default_device_memory(value: str, device_type: str) -> int:
    """`--device_memory`, else the visible GPU's total memory; a ConfigError naming the field without one."""
    if value:
        from cptron.hf import parse_size

        try:
            return parse_size(value)
        except CptronError as e:
            raise ConfigError(f"device_memory={value!r} is invalid: expected a size such as 80GB or 141GiB") from e
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    raise ConfigError("device_memory is required: no GPU is visible here (give e.g. --device_memory 80GB)")


def run_plan(cfg: PlanConfig) -> str:
    """`cptron plan`: print the plan of the config's layout, whether it fits, and layouts that do."""
    world = cfg.world_size or int(os.environ.get("WORLD_SIZE", "0"))
    p = cfg.parallel
    if not world:
        require(
            p.dp_shard >= 1,
            "world_size",
            cfg.world_size,
            "a number of ranks (or set parallel.dp_shard, so the layout gives it)",
        )
        world = p.pp * p.dp_replicate * p.dp_shard * p.tp
    device_type = "cpu" if cfg.training.device == "cpu" else "cuda"
    memory = default_device_memory(cfg.device_memory, device_type)
    mc = plan_model_config(cfg)
    plan = estimate_memory(cfg, world, device_type, mc)
    lines = [f"memory plan for {world} rank(s) on {device_type}", format_plan(plan, memory)]
    if plan.peak > memory and (note := _accumulation_note(plan, world, device_type, mc)) is not None:
        lines.append(note)
    if cfg.search and plan.peak > memory:
        fits = search_layouts(cfg, world, device_type, memory, mc)
        if fits:
            lines += ["", f"layouts of {world} ranks that fit in {memory / GB:.1f} GB (cheapest first):"]
            lines += [f"  {f.describe_layout()}: peak {f.peak / GB:.1f} GB" for f in fits]
            lines += ["", "the first of them in detail:", format_plan(fits[0], memory)]
        else:
            lines += [
                "",
                f"no layout of {world} ranks fits in {memory / GB:.1f} GB: use more devices or a shorter sequence",
            ]
    text = "\n".join(lines)
    print(text)
    return text
