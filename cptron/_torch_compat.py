"""Every use of PyTorch internals in cptron, each behind one named shim.

cptron needs torch >= 2.8 and is tested on torch 2.13. Where a public API does the job
cptron uses it (the global gradient norm and clipping use `torch.nn.utils.get_total_norm`
and `torch.nn.utils.clip_grads_with_norm_`; a DTensor shard's place in its global tensor
comes from `cptron.distributed.local_shard_region`). What has no public equivalent is here,
imported lazily so that importing this module costs nothing beyond torch itself.
`tests/unit/test_torch_compat.py` holds, for each shim, a test that fails once the installed
torch no longer shows the behaviour the shim works around (then delete the shim and use the
public way), and tests that each shim works.

Shims (name: torch versions; why). Versions: 2.13 is checked by the tests; a range from 2.8,
cptron's floor, means the behaviour or the missing API is older than the floor.
- `ConversionHookModule`: torch 2.8-2.13; overrides the private `nn.Module._apply`, the one
  method every tensor conversion of a module goes through (`to`, `to_empty`, `cuda`, `half`,
  a parent's conversion...). `to_empty` off the meta device unties parameters shared by two
  modules, and `Module.to(dtype)` casts every float buffer (fp32 rotary frequencies
  included) with no per-buffer opt-out; torch has no public post-conversion hook.
- `is_compiled_module`: torch 2.8-2.13; `torch.compile(m)` returns a
  `torch._dynamo.OptimizedModule` and `m.compile()` sets the private `_compiled_call_impl`;
  torch has no public "is this module compiled" check.
- `EvalSafePipelineStage`: torch 2.13; a `PipelineStage` subclass whose overrides of
  `get_local_bwd_output`/`set_local_bwd_input` (runtime internals) make `schedule.eval()`
  work for V-shaped schedules (zbv), where torch's stage asserts because it has no backward.
- `flex_attention_dense`: torch 2.8-2.13; the public `flex_attention` refuses a backward on
  CPU, so CPU runs call the operator `torch._higher_order_ops.flex_attention` itself, whose
  dense CPU implementation differentiates.
- `checkpoint_wrapper`: torch 2.8-2.13; the activation-checkpointing module wrapper lives only
  in `torch.distributed.algorithms._checkpoint`; `torch.utils.checkpoint.checkpoint` is a
  function, and the wrapper's parameter-name segment is the one DCP's state-dict helpers strip.
- `WRAPPER_NAME_SEGMENTS`: torch 2.8-2.13; the private attribute names that wrappers insert
  into parameter names (`_checkpoint_wrapped_module.`, torch.compile's `_orig_mod.`, FSDP1's
  `_fsdp_wrapped_module.`), stripped to get checkpoint keys.
- `preimport_torch_dynamo`: torch 2.13; DTensor (TP, FSDP2, DCP) imports the private
  `torch._dynamo` lazily on its first op, about 2 s; the test harness
  (`cptron.testing.distributed`) imports it once before forking ranks.
- `dcp_file_extents`: torch 2.8-2.13; a DCP checkpoint's data files and their lengths are
  known only from the private `torch.distributed.checkpoint.filesystem._StorageInfo` entries
  of its metadata, and torch checks no length: a truncated `.distcp` fails inside DCP with an
  error that does not name the file (`cptron.safe_dcp` checks them first).

Not here: `cptron/distributed.py` (`local_shard_region`) is the one home of
`torch.distributed.tensor._utils.compute_local_shape_and_global_offset`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# ----------------------------------------------------------------------------- module conversions


class ConversionHookModule(nn.Module):
    """An nn.Module whose `_after_conversion()` runs after every conversion of its tensors.

    Shim (torch 2.8-2.13) for the lack of a public hook: it overrides the private
    `nn.Module._apply`, which `to`, `to_empty`, `cuda`, `cpu`, `half`, `bfloat16`, `float`,
    `type`... call, and which a parent module calls on its children directly (torch's own
    FSDP2 `FSDPModule` overrides it for the same reason). A model needs it because:
    - `to_empty` (any conversion between incompatible tensor types, e.g. off the meta device)
      gives each module a new Parameter, so one parameter shared by two modules (tied
      embeddings) comes back as two independent ones, and it leaves non-persistent buffers
      uninitialized;
    - `Module.to(dtype)` casts every floating-point buffer, with no per-buffer opt-out.
    Remove it once torch offers a public post-conversion hook, or keeps ties through
    `to_empty` and lets a buffer keep its dtype (tests/unit/test_torch_compat.py watches both).
    """

    def _after_conversion(self) -> None:
        """Called after each conversion of this module, its tensors already converted."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._after_conversion()
        return self


# ----------------------------------------------------------------------------- torch.compile


def is_compiled_module(module: nn.Module) -> bool:
    """Whether `module` or any submodule is compiled, by `torch.compile(m)` or `m.compile()`.

    Shim (torch 2.8-2.13): torch has no public check. `torch.compile(m)` wraps m in
    `torch._dynamo.OptimizedModule` (not exported publicly); `m.compile()` compiles in place
    and only sets the private attribute `_compiled_call_impl`."""
    from torch._dynamo import OptimizedModule  # on use: keeps importing this module free of torch._dynamo

    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()
    )


# ----------------------------------------------------------------------------- wrapper names

WRAPPER_NAME_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
"""Segments that wrappers applied from outside insert into parameter names (torch 2.8-2.13):
`checkpoint_wrapper` (private `_CHECKPOINT_PREFIX`), `torch.compile` (`OptimizedModule._orig_mod`)
and FSDP1 (private `FSDP_PREFIX`). torch has no public function that strips them (DCP does it
internally); `cptron.models.llama.canonical_param_name` removes them to get checkpoint keys."""


# ----------------------------------------------------------------------------- activation checkpointing


def checkpoint_wrapper(module: nn.Module, *, preserve_rng_state: bool) -> nn.Module:
    """`module` wrapped so that its activations are recomputed in backward (non-reentrant
    `torch.utils.checkpoint`).

    Shim (torch 2.8-2.13): the module wrapper exists only as the private
    `torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper`. The public
    `torch.utils.checkpoint.checkpoint` is a function, and a wrapper of our own would change the
    parameter-name segment (`_checkpoint_wrapped_module.`) that torch's DCP state-dict helpers
    (`torch.distributed.checkpoint.state_dict`) strip by name."""
    # On use, as every private import here (see the module docstring).
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module, preserve_rng_state=preserve_rng_state)


# ----------------------------------------------------------------------------- flex attention

# Options torch's public flex_attention passes to its operator for CPU inputs; the dense
# implementation does not read them, but the operator expects them.
_FLEX_CPU_KERNEL_OPTIONS = {
    "BACKEND": "AUTO",
    "PRESCALE_QK": False,
    "ROWS_GUARANTEED_SAFE": False,
    "BLOCKS_ARE_CONTIGUOUS": False,
    "WRITE_DQ": True,
    "OUTPUT_LOGSUMEXP": True,
    "OUTPUT_MAX": False,
}


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def flex_attention_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v over the pairs `block_mask` allows, by torch's dense reference
    implementation of flex attention (it evaluates `mask_mod` on the full score matrix and
    differentiates through it); k/v may have fewer heads than q (grouped-query attention).

    Shim (torch 2.8-2.13): the public `torch.nn.attention.flex_attention.flex_attention`
    refuses a backward on CPU ("FlexAttention does not support backward on CPU"), eager or
    compiled. This calls the private operator `torch._higher_order_ops.flex_attention`
    directly, as the public function does, with the options it passes for CPU inputs."""
    # On use, as every private import here (see the module docstring).
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op

    out, _, _ = flex_attention_op(
        q, k, v, _identity_score, block_mask.as_tuple(), scale, dict(_FLEX_CPU_KERNEL_OPTIONS)
    )
    return out


# ----------------------------------------------------------------------------- checkpoint files


def dcp_file_extents(metadata: Any) -> dict[str, int]:
    """{data file, relative to the checkpoint: bytes it must hold} for the DCP metadata of a
    checkpoint written by `FileSystemWriter`.

    Shim (torch 2.8-2.13): `Metadata.storage_data` is typed `Any`; the filesystem storage fills
    it with the private `_StorageInfo(relative_path, offset, length)`, and nothing public reads
    it. torch's reader checks no file length, so a truncated data file fails deep inside DCP
    (`EOFError`, or a zip error from `torch.load`) without naming the file."""
    extents: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = int(info.offset) + int(info.length)
        extents[info.relative_path] = max(extents.get(info.relative_path, 0), end)
    return extents


# ----------------------------------------------------------------------------- test harness


def preimport_torch_dynamo() -> None:
    """Import `torch._dynamo` now.

    Shim (torch 2.13): DTensor, and with it TP, FSDP2 and DCP, imports the private
    `torch._dynamo` lazily on its first op (some 300 modules, about 2 s on 2 cores). The
    test harness calls this before forking ranks, so that they share one import instead of
    each repeating it."""
    importlib.import_module("torch._dynamo")


# ----------------------------------------------------------------------------- pipelining


def _eval_safe_pipeline_stage() -> type:
    from torch.distributed.pipelining import PipelineStage  # on use: it imports torch._dynamo (about 1 s)

    class EvalSafePipelineStage(PipelineStage):
        """torch's PipelineStage, fixed for forward-only steps of V-shaped schedules.

        Shim (torch 2.13): in `eval()` torch's runtime still walks the backward actions; where
        two adjacent stages share a rank (zbv) it then hands the input gradients of one to the
        other (`get_local_bwd_output`/`set_local_bwd_input`, runtime internals), and the stage
        asserts because it has no backward. There are no gradients to hand over in eval, so
        these become no-ops there; with a backward they are torch's own."""

        def get_local_bwd_output(self, mb_index):
            return super().get_local_bwd_output(mb_index) if self.has_backward else ()

        def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index) -> None:
            if self.has_backward:
                super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    EvalSafePipelineStage.__module__ = __name__
    EvalSafePipelineStage.__qualname__ = "EvalSafePipelineStage"
    return EvalSafePipelineStage


_LAZY: dict[str, Callable[[], Any]] = {"EvalSafePipelineStage": _eval_safe_pipeline_stage}


def __getattr__(name: str) -> Any:
    # `EvalSafePipelineStage` subclasses torch.distributed.pipelining.PipelineStage, whose import
    # pulls in torch._dynamo (about 1 s); it is built on first use so the model need not pay that.
    if name in _LAZY:
        value = _LAZY[name]()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
