"""Apply tensor/sequence parallelism, activation checkpointing, compile and FSDP2 to
one model part (the whole model, or a pipeline stage), from outside the model.

`parallelize_llama` applies them in this order, and the order matters:
  1. TP/SP first: it replaces weights with DTensors on the `tp` mesh, which the
     later steps must see (FSDP2 shards the already tensor-parallel weights,
     giving 2-D DTensors over (dp, tp)).
  2. Activation checkpointing wraps each block, so a block's recomputation
     includes its TP collectives.
  3. torch.compile each (wrapped) block: compiling after AC lets the compiler
     see the recomputation boundary; compiling blocks, not the model, keeps
     graphs small and identical across blocks.
  4. FSDP2 last, per block then the root, so each block's parameters are
     all-gathered just in time and freed after use.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from cptron._torch_compat import checkpoint_wrapper
from cptron.errors import ConfigError
from cptron.models.factorized import FactorizedEmbedding, FactorizedHead
from cptron.parallel.dims import ParallelConfig, ParallelDims

log = logging.getLogger("cptron.parallel")


def parallelize_llama(
    model: nn.Module,
    mesh: DeviceMesh,
    dims: ParallelDims,
    cfg: ParallelConfig,
    param_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Parallelize one Transformer (or pipeline-stage) part in place and return it.

    The part may still be on the meta device; materialize it afterwards with
    `to_empty(device=...)` and `init_weights(seed)` (or load weights)."""
    if dims.tp > 1:
        apply_tensor_parallel(
            model, mesh["tp"], sequence_parallel=cfg.sequence_parallel, loss_parallel=cfg.loss_parallel
        )
    if cfg.activation_checkpoint != "none":
        apply_activation_checkpointing(model, cfg.activation_checkpoint, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    if fsdp_enabled(dims, cfg, param_dtype):
        apply_fsdp(
            model,
            fsdp_mesh(mesh, dims),
            param_dtype=param_dtype,
            reshard_after_forward=cfg.fsdp_reshard_after_forward,
            offload=cfg.offload,
            pin_memory=cfg.offload_pin_memory,
        )
    return model


def fsdp_enabled(dims: ParallelDims, cfg: ParallelConfig, param_dtype: torch.dtype) -> bool:
    """FSDP2 wraps the model for data parallelism, for mixed precision (fp32 master weights),
    and for CPU offload, which FSDP2 provides (over a 1-rank mesh without data parallelism)."""
    return dims.dp > 1 or param_dtype != torch.float32 or cfg.offload != "none"


def offload_pins(cfg: ParallelConfig, device_type: str) -> bool:
    """Whether offloaded copies are pinned: pinning needs an accelerator, so never on CPU."""
    return cfg.offload != "none" and cfg.offload_pin_memory and device_type != "cpu"


def materialize_device(cfg: ParallelConfig, device: torch.device) -> torch.device:
    """Where a part's parameters are materialized: FSDP2's CPU offload wants them on CPU
    (its lazy init checks), buffers (rotary frequencies) go to `device` afterwards."""
    return torch.device("cpu") if cfg.offload != "none" else device


def fsdp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP2 shards over: HSDP (replicate x shard) when dp_replicate > 1."""
    if dims.dp_replicate > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


def apply_tensor_parallel(
    model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool, loss_parallel: bool
) -> None:
    """Megatron-style TP: q/k/v and w1/w3 split by output columns (heads, hidden units),
    wo and w2 by input rows, so each block needs one reduction per sublayer. With
    sequence parallelism the residual stream and the norms are split along the
    sequence between sublayers (an all-gather before, a reduce-scatter after,
    instead of an all-reduce), and the embedding and output are vocab-parallel."""
    seq = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, object] = {}
    if isinstance(model.tok_embeddings, FactorizedEmbedding):
        top.update(_factorized_embedding_plan(model.tok_embeddings, seq))
    elif model.tok_embeddings is not None:
        # Row-wise on the embedding = each rank owns a vocabulary slice and
        # contributes zeros for ids outside it; the sum gives the lookup.
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if isinstance(model.output, FactorizedHead):
        top.update(_factorized_head_plan(seq, loss_parallel))
    elif model.output is not None:
        # With loss parallelism the logits stay vocab-sharded (a DTensor) and the
        # cross-entropy runs on shards (cptron.train.loss), never gathering
        # [batch, seq, vocab] on one rank.
        top["output"] = ColwiseParallel(
            input_layouts=seq,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    if top:
        parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        plan: dict[str, object] = {
            # Attention/MLP want the full sequence; their other inputs (cos, sin,
            # mask) are plain tensors every rank already holds.
            "attention": PrepareModuleInput(
                input_layouts=(seq, None, None, None), desired_input_layouts=(Replicate(), None, None, None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


def _factorized_embedding_plan(embedding: FactorizedEmbedding, seq) -> dict[str, object]:
    """P vocabulary-sharded, B replicated: each rank gathers its vocabulary slice of the r-wide
    coordinate rows (zeros elsewhere) and the all-reduce (reduce-scatter under SP) sums r-wide rows,
    not H-wide embeddings; then every rank projects its rows by B, a replicated DTensor
    (`ReplicateParallel`): under SP each rank's rows are its sequence slice and autograd sums B's
    gradient over the TP ranks; without SP every rank holds all rows and the same full gradient."""
    embedding.vocab_parallel = True  # run the lookup as its two halves, the reduction between them
    plan: dict[str, object] = {
        "tok_embeddings.coordinates": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    }
    plan["tok_embeddings.basis"] = ReplicateParallel(seq)
    return plan


def _factorized_head_plan(seq, loss_parallel: bool) -> dict[str, object]:
    """h B^T on every rank (on its sequence slice under SP: the all-gather then carries r-wide rows),
    then the scores against the vocabulary-sharded coordinates, column-parallel as a full head."""
    plan: dict[str, object] = {
        "output.coordinates": ColwiseParallel(
            input_layouts=seq,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    }
    plan["output.basis"] = ReplicateParallel(seq)
    return plan


class ReplicateParallel(ParallelStyle):
    """A module computed on every TP rank from its own rows: parameters become replicated DTensors,
    a plain input is read as `layout` (Shard(1): this rank's sequence slice) and the output is
    returned as a plain tensor in the same layout. Autograd then sums the parameters' gradients over
    the ranks where the input is sharded, and keeps the one full gradient where it is replicated.
    (torch's SequenceParallel is this for Shard(1) only; the AdamW of a part wants every parameter
    of a TP-parallelized part to be a DTensor, so the replicated case needs it too.)"""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            return tuple(
                x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, (self.layout,), run_check=False)
                for x in inputs
            )

        return distribute_module(
            module, device_mesh, input_fn=input_fn, output_fn=lambda mod, out, mesh: out.to_local()
        )


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int) -> None:
    """Wrap blocks so their activations are recomputed in backward: all of them
    (full), or one in `every` (selective, trading memory for less recompute).
    The wrapper is torch's (private) checkpoint_wrapper: `cptron._torch_compat.checkpoint_wrapper`."""
    for i, (name, block) in enumerate(list(model.layers.items())):
        if mode == "full" or (mode == "selective" and i % every == 0):
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block on its own (same graph for every block, short compile)."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, fullgraph=True)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reshard_after_forward: bool,
    offload: str = "none",
    pin_memory: bool = True,
) -> None:
    """FSDP2 per block, then the root (embedding, final norm, output).

    With offload="all", FSDP2's CPUOffloadPolicy keeps the sharded parameters, their gradients
    and (since the optimizer sees CPU parameters) the AdamW state in CPU memory, the ZeRO-Offload
    split of Ren et al. 2021 (arXiv:2101.06840): each unit is copied to the device just before
    its all-gather and its reduced gradient back right after the reduce-scatter.

    Gradients are reduced in fp32 whatever the compute dtype. The gradient
    divide factor is 1: cptron's loss is already normalized by the global token
    count, so the data-parallel reduction must sum, not average."""
    # On use: importing FSDP2 costs about 0.7 s, and runs without data parallelism never need it.
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    policy = CPUOffloadPolicy(pin_memory=pin_memory and mesh.device_type != "cpu")
    kw = {"mp_policy": mp, "offload_policy": policy if offload == "all" else OffloadPolicy()}
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again first in backward:
        # keeping them gathered saves one all-gather per step.
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **kw)
    if not hasattr(model, "set_force_sum_reduction_for_comms"):
        raise ConfigError(
            f"torch {torch.__version__} is too old for sharded data parallelism: cptron needs "
            "FSDP2's set_gradient_divide_factor and set_force_sum_reduction_for_comms (torch >= 2.8)"
        )
    for m in [model, *blocks]:
        m.set_gradient_divide_factor(1.0)
        # A plain SUM reduction: gloo has no pre-multiplied sum, and with a
        # factor of 1 there is nothing to pre-multiply.
        m.set_force_sum_reduction_for_comms(True)


def describe_parallelism(
    dims: ParallelDims, cfg: ParallelConfig, param_dtype: torch.dtype, device: torch.device
) -> str:
    parts = [dims.describe(), f"device={device.type}", f"compute dtype={str(param_dtype).removeprefix('torch.')}"]
    if dims.tp > 1:
        parts.append(f"sequence_parallel={cfg.sequence_parallel} loss_parallel={cfg.loss_parallel}")
    if fsdp_enabled(dims, cfg, param_dtype):
        parts.append(
            "FSDP2 "
            + ("ZeRO-3" if cfg.fsdp_reshard_after_forward else "ZeRO-2-like")
            + (" (HSDP)" if dims.dp_replicate > 1 else "")
        )
        parts.append(describe_offload(cfg, device))
    if dims.pp > 1:
        parts.append(f"pipeline {cfg.pp_schedule} x {cfg.pp_stages_per_rank} stage(s)/rank")
    parts.append(f"activation_checkpoint={cfg.activation_checkpoint} compile={cfg.compile}")
    return ", ".join(parts)


def describe_offload(cfg: ParallelConfig, device: torch.device) -> str:
    """What lives where, for the start-up log."""
    if cfg.offload == "none":
        return f"offload=none: sharded parameters, gradients and AdamW state on {device.type}"
    where = (
        "pinned CPU memory"
        if offload_pins(cfg, device.type)
        else "CPU memory (not pinned: pinning needs an accelerator)"
        if device.type == "cpu"
        else "CPU memory (not pinned: parallel.offload_pin_memory=false)"
    )
    return (
        f"offload=all: sharded fp32 parameters, gradients and AdamW state in {where}, optimizer step on CPU; "
        f"gathered compute parameters and activations on {device.type}"
        + (" (the device is the CPU: offload changes no placement, only the copies)" if device.type == "cpu" else "")
    )


def model_parts_params(parts: list[nn.Module]) -> list[nn.Parameter]:
    return [p for part in parts for p in part.parameters()]
