"""cptron._torch_compat: each shim still works, and torch still needs it.

Every `test_still_needed_*` asserts that the installed torch still has the behaviour (or
lacks the public API) that a shim works around. When one fails after a torch upgrade,
torch no longer needs that shim: delete it from cptron/_torch_compat.py, use the public
way at its call sites, and delete its tests here. The other tests check that the shims do
their job, and that the public APIs that replaced private ones give the same numbers.
"""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cptron import _torch_compat as compat
from cptron.models.config import model_config_from_preset
from cptron.models.llama import Transformer, build_model, canonical_param_name, rope_inv_freq
from cptron.testing.distributed import DistributedTestError, run_distributed
from cptron.train.optim import clip_gradients, global_grad_norm

# torch.compile's first use imports TorchScript modules that warn about their own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]
TINY = model_config_from_preset("tiny", n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64,
                                vocab_size=250, pad_vocab_to_multiple_of=64)


def _tied_pair() -> nn.Module:
    m = nn.Module()
    m.emb = nn.Embedding(8, 4)
    m.out = nn.Linear(4, 8, bias=False)
    m.out.weight = m.emb.weight
    return m


# ----------------------------------------------------------------------------- ConversionHookModule

def test_still_needed_to_empty_unties_shared_parameters():
    with torch.device("meta"):
        m = _tied_pair()
    m.to_empty(device="cpu")
    assert m.out.weight is not m.emb.weight, (
        "torch now keeps tied parameters tied through to_empty: drop the re-tie in "
        "Transformer._after_conversion (and ConversionHookModule if nothing else needs it)")


def test_still_needed_module_to_dtype_casts_float_buffers():
    m = nn.Module()
    m.register_buffer("freq", torch.ones(3), persistent=False)
    m.to(torch.bfloat16)
    assert m.freq.dtype == torch.bfloat16, (
        "torch's Module.to(dtype) no longer casts fp32 buffers: drop the rotary-frequency recompute in "
        "Transformer._after_conversion (and ConversionHookModule if nothing else needs it)")


def test_still_needed_no_public_conversion_hook():
    words = ("apply", "conver", "to_empty", "device", "dtype", "move", "cast")
    public = [n for n in dir(nn.Module) if "hook" in n and not n.startswith("_")]
    public += [n for n in dir(torch.nn.modules.module) if n.startswith("register_module_")]
    found = [n for n in public if any(w in n for w in words)]
    assert not found, f"torch now has {found}: use it instead of ConversionHookModule's _apply override"


def test_conversion_hook_runs_after_every_conversion_and_for_parents():
    class Counting(compat.ConversionHookModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.calls = []

        def _after_conversion(self):
            self.calls.append(self.lin.weight.dtype)

    with torch.device("meta"):
        m = Counting()
    m.to_empty(device="cpu")
    m.to(torch.float64)
    nn.Sequential(m).to(torch.bfloat16)  # a parent's conversion reaches the child's _apply
    assert m.calls == [torch.float32, torch.float64, torch.bfloat16]
    assert m.to(torch.float32) is m


def test_transformer_reties_and_keeps_exact_fp32_rotary_frequencies():
    cfg = model_config_from_preset("tiny", tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.rope_inv_freq, rope_inv_freq(cfg))  # not the uninitialized memory of to_empty
    model.to(torch.bfloat16)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.rope_inv_freq.dtype == torch.float32 and torch.equal(model.rope_inv_freq, rope_inv_freq(cfg))
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- is_compiled_module

def test_still_needed_is_compiled_module():
    from torch._dynamo import OptimizedModule

    assert not any(getattr(torch.compiler, n) is OptimizedModule for n in dir(torch.compiler)), \
        "torch.compiler now exports OptimizedModule: import it from there"
    assert not any(n.startswith("is_compiled") for n in dir(torch.compiler) + dir(nn.Module)), \
        "torch now has a public is-compiled check: use it instead of is_compiled_module"
    m = nn.Linear(2, 2)
    m.compile()
    assert m._compiled_call_impl is not None and not any(
        "compiled" in n for n in vars(m) if not n.startswith("_")), \
        "Module.compile() now leaves a public marker: use it in is_compiled_module"


def test_is_compiled_module_sees_both_ways_of_compiling_at_any_depth():
    assert not compat.is_compiled_module(nn.Sequential(nn.Linear(2, 2)))
    assert compat.is_compiled_module(torch.compile(nn.Linear(2, 2)))  # wrapping only; nothing compiles yet
    in_place = nn.Linear(2, 2)
    in_place.compile()
    assert compat.is_compiled_module(nn.Sequential(nn.Identity(), in_place))
    assert compat.is_compiled_module(nn.Sequential(nn.Sequential(torch.compile(nn.Linear(2, 2)))))


# ----------------------------------------------------------------------------- EvalSafePipelineStage

def _zbv_eval(rank, world_size, safe: bool):
    from torch.distributed.pipelining import PipelineStage, ScheduleZBVZeroBubble

    torch.manual_seed(0)
    modules = [nn.Linear(4, 4), nn.Linear(4, 4)]
    cls = compat.EvalSafePipelineStage if safe else PipelineStage
    # One rank holds both stages of the V, so torch hands gradients between them locally.
    stages = [cls(m, i, 2, torch.device("cpu"), group=dist.group.WORLD) for i, m in enumerate(modules)]

    def loss_fn(out, target):
        return ((out - target) ** 2).sum()

    schedule = ScheduleZBVZeroBubble(stages, 2, loss_fn=loss_fn, scale_grads=False)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    with torch.no_grad():
        expected = [loss_fn(modules[1](modules[0](xs)), ys).item() for xs, ys in zip(x.chunk(2), y.chunk(2))]
    losses: list = []
    schedule.step(x, target=y, losses=losses)  # training: torch's own backward hand-over
    grads = [p.grad.clone() for m in modules for p in m.parameters()]
    losses = []
    with torch.no_grad():
        schedule.eval(x, target=y, losses=losses)
    return expected, [loss.item() for loss in losses], grads


@pytest.mark.distributed
def test_still_needed_eval_safe_pipeline_stage():
    with pytest.raises(DistributedTestError, match="doesn't have backward"):
        run_distributed(_zbv_eval, 1, False, timeout=60)


@pytest.mark.distributed
def test_eval_safe_pipeline_stage_runs_eval_and_training_of_a_v_schedule():
    [(expected, losses, grads)] = run_distributed(_zbv_eval, 1, True, timeout=60)
    assert losses == pytest.approx(expected, rel=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)
    assert compat.EvalSafePipelineStage.__module__ == "cptron._torch_compat"


# ----------------------------------------------------------------------------- flex_attention_dense

def _flex_inputs():
    from cptron.models.flex import build_block_mask

    gen = torch.Generator().manual_seed(0)
    T, D = 20, 8
    q = torch.randn(2, 4, T, D, generator=gen).requires_grad_()
    k = torch.randn(2, 2, T, D, generator=gen).requires_grad_()
    v = torch.randn(2, 2, T, D, generator=gen).requires_grad_()
    segments = torch.tensor([[0] * 9 + [1] * 11, [0] * 2 + [1] * 18])
    return q, k, v, segments, build_block_mask(T, "cpu", segments, sliding_window=6, block_size=8)


def test_still_needed_flex_attention_dense():
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, _, block_mask = _flex_inputs()
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True).sum().backward()
    # If this assertion fails instead, the public function differentiates on CPU: use it.


def test_flex_attention_dense_matches_sdpa_with_gradients():
    q, k, v, segments, block_mask = _flex_inputs()
    out = compat.flex_attention_dense(q, k, v, block_mask, 1.0 / math.sqrt(q.shape[-1]))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    pos = torch.arange(q.shape[2])
    mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 6)
    mask = mask[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip((out, *grads), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- checkpoint_wrapper, names

def test_still_needed_checkpoint_wrapper():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    assert "._" in checkpoint_wrapper.__module__, \
        "torch's checkpoint_wrapper moved to a public module: import it from there"
    import torch.distributed.algorithms
    import torch.utils.checkpoint

    for namespace in (torch.utils.checkpoint, torch.distributed.algorithms, nn.utils):
        assert not hasattr(namespace, "checkpoint_wrapper"), \
            f"{namespace.__name__}.checkpoint_wrapper is public now: use it in cptron.parallel.parallelize"


def test_checkpoint_wrapper_recomputes_with_the_same_numbers_and_names():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6))
    wrapped = nn.Sequential(compat.checkpoint_wrapper(copy.deepcopy(plain), preserve_rng_state=False))
    x = torch.randn(3, 6)
    plain(x).square().sum().backward()
    wrapped(x).square().sum().backward()
    names = [n for n, _ in wrapped.named_parameters()]
    assert all("_checkpoint_wrapped_module." in n for n in names)
    assert [canonical_param_name(n).removeprefix("0.") for n in names] == [n for n, _ in plain.named_parameters()]
    for p, q in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_still_needed_wrapper_name_segments():
    child = nn.Linear(2, 2)
    ac = nn.Module()
    ac.block = compat.checkpoint_wrapper(child, preserve_rng_state=False)
    compiled = nn.Module()
    compiled.block = torch.compile(nn.Linear(2, 2))
    names = [n for m in (ac, compiled) for n, _ in m.named_parameters()]
    assert any("._checkpoint_wrapped_module." in n for n in names), names
    assert any("._orig_mod." in n for n in names), names
    # All of them are inserted: canonical_param_name still has to strip them.


def test_wrapper_name_segments_are_torchs_own():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
    from torch.distributed.fsdp._common_utils import FSDP_PREFIX

    assert compat.WRAPPER_NAME_SEGMENTS == (_CHECKPOINT_PREFIX, "_orig_mod.", FSDP_PREFIX)
    assert canonical_param_name("layers.0._checkpoint_wrapped_module._orig_mod.attention.wq.weight") == \
        "layers.0.attention.wq.weight"


# ----------------------------------------------------------------------------- preimport_torch_dynamo

_DYNAMO_PROBE = """
import sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
before = "torch._dynamo" in sys.modules
distribute_tensor(torch.ones(4), init_device_mesh("cpu", (1,)), [Shard(0)])
print(before, "torch._dynamo" in sys.modules)
dist.destroy_process_group()
"""


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_still_needed_preimport_torch_dynamo():
    before, after = _run_python(_DYNAMO_PROBE).split()
    assert before == "False", "importing DTensor now imports torch._dynamo: drop preimport_torch_dynamo"
    assert after == "True", "DTensor ops no longer import torch._dynamo: drop preimport_torch_dynamo"


def test_preimport_torch_dynamo_imports_it_and_importing_the_shims_does_not():
    out = _run_python("import sys; import cptron._torch_compat as c; print('torch._dynamo' in sys.modules); "
                      "c.preimport_torch_dynamo(); print('torch._dynamo' in sys.modules)")
    assert out.split() == ["False", "True"]


# ----------------------------------------------------------------------------- public APIs that replaced private ones

def test_grad_norm_and_clipping_match_torchs_clip_grad_norm():
    model = build_model(TINY, seed=0)
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    model(x).square().mean().backward()
    reference = copy.deepcopy(model)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        q.grad = p.grad.clone()
    for max_norm in (1e-3, 1e6):  # clipping, and a norm below the limit (left alone)
        norm = global_grad_norm([model])
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        assert torch.equal(norm, ref_norm)
        clip_gradients([model], max_norm, norm)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_importing_the_model_does_not_import_pipelining():
    out = _run_python("import sys, cptron.models.llama; print('torch.distributed.pipelining' in sys.modules)")
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- dcp_file_extents

def _dcp_checkpoint(tmp_path):
    from cptron import checkpoint as ckpt

    state = {"model": {"w": torch.randn(32, 32), "b": torch.randn(32)}}
    return ckpt.write_checkpoint(tmp_path / "c", state, {"step": 0}), state


def test_still_needed_dcp_file_extents(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path, state = _dcp_checkpoint(tmp_path)
    data = path / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(BaseException) as info:  # DCP's CheckpointException is a BaseException
        dcp.load(state, storage_reader=FileSystemReader(str(path)))
    assert data.name not in str(info.value), \
        "torch's FileSystemReader now names a truncated data file: drop dcp_file_extents and cptron.safe_dcp's check"


def test_dcp_file_extents_are_the_lengths_of_the_files_written(tmp_path):
    path, _ = _dcp_checkpoint(tmp_path)
    from cptron.safe_dcp import read_dcp_metadata

    extents = compat.dcp_file_extents(read_dcp_metadata(path))
    assert extents == {f.name: f.stat().st_size for f in path.glob("*.distcp")} and extents
