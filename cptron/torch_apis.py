"""Check that the installed torch has every torch API cptron uses, before a run needs one.

cptron runs on whatever torch a machine carries (>= 2.8), and several of the APIs it
uses are private or young (`cptron._torch_compat` holds the private ones behind shims):
an older or newer torch can lack one, and the run would then fail minutes in, in the
middle of set-up or of the first step. `missing_torch_apis()` resolves every entry of
`TORCH_APIS` (imports the module, follows the attributes, checks the keyword arguments
where a Python signature exists) and `check_torch_apis()` raises one error naming each
missing API. `python -m cptron.torch_apis` prints the report (benchmarks/gpu_train.py and
benchmarks/gpu_check.sh run it first on GPU machines).

`tests/unit/test_torch_api_check.py` parses every `from torch... import` in cptron and fails
when one is not listed here, so the list follows the code.

Entry syntax: `module` (the module imports), `module:attr.attr` (the attribute exists),
`module:callable(kw, kw)` (it also takes these keyword arguments).
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Optional

from cptron.errors import CptronError

_D, _DT, _DCP, _PP = (
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.checkpoint",
    ("torch.distributed.pipelining"),
)

TORCH_APIS: tuple[str, ...] = (
    # core, compile, attention kernels
    "torch:compile",
    "torch.compiler:is_compiling",
    "torch._dynamo:OptimizedModule",  # private: cptron._torch_compat.is_compiled_module
    "torch.nn:Module._apply",  # private: cptron._torch_compat.ConversionHookModule
    "torch.nn.functional:rms_norm",
    "torch.nn.functional:scaled_dot_product_attention",
    "torch.nn.functional:cross_entropy",
    "torch.nn.utils:clip_grads_with_norm_",
    "torch.nn.utils:get_total_norm",
    "torch.nn.attention.flex_attention:flex_attention(block_mask, enable_gqa)",
    "torch.nn.attention.flex_attention:BlockMask.from_kv_blocks(BLOCK_SIZE, mask_mod, seq_lengths)",
    "torch.nn.attention.flex_attention:BlockMask.as_tuple",
    "torch._higher_order_ops.flex_attention:flex_attention",  # private: flex_attention_dense (CPU)
    "torch.backends.cuda:flash_sdp_enabled",
    "torch.backends.cuda:mem_efficient_sdp_enabled",
    "torch.backends.cuda:cudnn_sdp_enabled",
    "torch.backends.cuda:math_sdp_enabled",
    "torch.optim:AdamW(fused, foreach)",
    "torch.utils.checkpoint:checkpoint",
    "torch.profiler:profile",
    "torch.profiler:ProfilerActivity",
    "torch.utils.tensorboard:SummaryWriter",
    "torch.utils:cpp_extension",  # JIT build of csrc/ kernels (cptron.kernels), with a fallback
    # process groups
    f"{_D}:init_process_group",
    f"{_D}:destroy_process_group",
    f"{_D}:new_group",
    f"{_D}:all_reduce",
    f"{_D}:all_gather",
    f"{_D}:all_gather_object",
    f"{_D}:broadcast_object_list",
    f"{_D}:barrier",
    f"{_D}:ReduceOp",
    f"{_D}:ProcessGroup",
    f"{_D}:TCPStore",
    f"{_D}:HashStore",
    f"{_D}:run",
    f"{_D}.elastic.multiprocessing.errors:ChildFailedError",
    # DeviceMesh, DTensor, tensor parallelism
    f"{_D}.device_mesh:DeviceMesh",
    f"{_D}.device_mesh:init_device_mesh",
    f"{_DT}:DTensor",
    f"{_DT}:Replicate",
    f"{_DT}:Shard",
    f"{_DT}:Partial",
    f"{_DT}:distribute_module",
    f"{_DT}._utils:compute_local_shape_and_global_offset",  # private: cptron.distributed.local_shard_region
    f"{_DT}.parallel:ColwiseParallel",
    f"{_DT}.parallel:RowwiseParallel",
    f"{_DT}.parallel:SequenceParallel",
    f"{_DT}.parallel:PrepareModuleInput",
    f"{_DT}.parallel:ParallelStyle",
    f"{_DT}.parallel:parallelize_module",
    f"{_DT}.parallel:loss_parallel",
    # FSDP2, activation checkpointing
    f"{_D}.fsdp:fully_shard(mesh, reshard_after_forward, mp_policy, offload_policy)",
    f"{_D}.fsdp:MixedPrecisionPolicy",
    f"{_D}.fsdp:OffloadPolicy",
    f"{_D}.fsdp:CPUOffloadPolicy",
    f"{_D}.algorithms._checkpoint.checkpoint_wrapper:checkpoint_wrapper",  # private: _torch_compat
    # pipelining
    f"{_PP}:PipelineStage",
    f"{_PP}:PipelineStage.get_local_bwd_output",  # overridden: _torch_compat.EvalSafePipelineStage
    f"{_PP}:PipelineStage.set_local_bwd_input",
    f"{_PP}:Schedule1F1B",
    f"{_PP}:ScheduleGPipe",
    f"{_PP}:ScheduleInterleaved1F1B",
    f"{_PP}:ScheduleInterleavedZeroBubble",
    f"{_PP}:ScheduleLoopedBFS",
    f"{_PP}:ScheduleZBVZeroBubble",
    # distributed checkpoints
    _DCP,
    f"{_DCP}:save",
    f"{_DCP}:load",
    f"{_DCP}:async_save",
    f"{_DCP}:FileSystemWriter",
    f"{_DCP}:FileSystemReader",
    f"{_DCP}:DefaultLoadPlanner",
    f"{_DCP}.api:CheckpointException",
    f"{_DCP}.default_planner:DefaultSavePlanner",
    f"{_DCP}.filesystem:_StorageInfo",  # private: _torch_compat.dcp_file_extents
    f"{_DCP}.metadata:BytesStorageMetadata",
    f"{_DCP}.metadata:Metadata",
    f"{_DCP}.metadata:StorageMeta",
    f"{_DCP}.metadata:TensorStorageMetadata",
    f"{_DCP}.planner:LoadItemType",
    f"{_DCP}.planner:LoadPlan",
    f"{_DCP}.state_dict:StateDictOptions",
    f"{_DCP}.state_dict:get_model_state_dict",
    f"{_DCP}.state_dict:get_optimizer_state_dict",
    f"{_DCP}.state_dict:set_model_state_dict",
    f"{_DCP}.state_dict:set_optimizer_state_dict",
)
"""Every torch API cptron calls or imports (see the module docstring for the syntax)."""

OPTIONAL_TORCH_APIS = frozenset({"torch.utils.tensorboard:SummaryWriter", "torch.utils:cpp_extension"})
"""Entries that need a package besides torch (tensorboard), or whose absence cptron works around (the JIT
kernel build falls back to the PyTorch reference): reported, but not an error."""

_ENTRY = re.compile(r"^(?P<module>[\w.]+)(?::(?P<attr>[\w.]+)(?:\((?P<kwargs>[\w, ]*)\))?)?$")


def parse_entry(entry: str) -> tuple[str, Optional[str], tuple[str, ...]]:
    """`module:attr.path(kw, kw)` -> (module, attr path or None, keyword names)."""
    m = _ENTRY.match(entry)
    if m is None:
        raise ValueError(
            f"torch API entry {entry!r} is invalid: expected 'module', 'module:attr' or 'module:f(kw, ...)'"
        )
    kwargs = tuple(k.strip() for k in (m["kwargs"] or "").split(",") if k.strip())
    return m["module"], m["attr"], kwargs


def _resolve(module: str, attr: Optional[str]):
    obj = importlib.import_module(module)
    path = module
    for part in (attr or "").split(".") if attr else ():
        path = f"{path}.{part}"
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif inspect.ismodule(obj):  # a submodule not yet imported (torch.distributed.run)
            obj = importlib.import_module(path)
        else:
            raise AttributeError(f"{path} does not exist")
    return obj


def _missing_kwargs(obj, kwargs: tuple[str, ...]) -> list[str]:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a builtin without a Python signature: existence is what can be checked
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in kwargs if k not in params]


def missing_torch_apis(entries=TORCH_APIS) -> list[tuple[str, str]]:
    """(entry, why) for each entry the installed torch does not provide; [] when all are there."""
    missing = []
    for entry in entries:
        module, attr, kwargs = parse_entry(entry)
        try:
            obj = _resolve(module, attr)
        except Exception as e:  # ImportError, AttributeError, or an import that fails on this platform
            missing.append((entry, f"{type(e).__name__}: {e}"))
            continue
        if lacking := _missing_kwargs(obj, kwargs):
            missing.append((entry, f"takes no keyword argument {', '.join(lacking)}"))
    return missing


def check_torch_apis(entries=TORCH_APIS) -> int:
    """Raise CptronError naming every missing required API; returns how many entries were checked.
    Missing optional ones (OPTIONAL_TORCH_APIS) are left to the code that needs them."""
    missing = [(e, why) for e, why in missing_torch_apis(entries) if e not in OPTIONAL_TORCH_APIS]
    if missing:
        import torch

        lines = "\n".join(f"  {entry}: {why}" for entry, why in missing)
        raise CptronError(
            f"torch {torch.__version__} lacks {len(missing)} of the {len(entries)} torch APIs cptron uses "
            f"(cptron.torch_apis.TORCH_APIS):\n{lines}"
        )
    return len(entries)


def main() -> int:
    import torch

    cuda = torch.version.cuda or "none"
    missing = missing_torch_apis()
    for entry, why in missing:
        tag = "optional, missing" if entry in OPTIONAL_TORCH_APIS else "MISSING"
        print(f"  {tag}: {entry}: {why}")
    required = [e for e, _ in missing if e not in OPTIONAL_TORCH_APIS]
    verdict = "all present" if not required else f"{len(required)} MISSING"
    print(f"torch {torch.__version__} (CUDA {cuda}): {len(TORCH_APIS)} torch APIs cptron uses: {verdict}")
    return 1 if required else 0


if __name__ == "__main__":
    sys.exit(main())
