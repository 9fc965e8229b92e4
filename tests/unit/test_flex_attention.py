"""training.attention=flex: FlexAttention block masks against torch's own construction, the
flex path against the SDPA-mask path (outputs and gradients, fp32 CPU), start-up checks,
and the trainer under tensor and pipeline parallelism against one process.

CPU only: torch 2.13 runs flex attention's backward on CPU only through its dense
reference implementation, so these tests check numbers and tile lists, not speed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import cptron.models.flex as flex
from cptron.errors import ConfigError
from cptron.models.config import model_config_from_preset
from cptron.models.flex import block_tile_flags, build_block_mask, check_attention_support, document_mask_mod
from cptron.models.llama import attention_mask_for, build_attention_mask, build_model, positions_and_segments
from cptron.parallel.dims import ParallelConfig
from cptron.testing.distributed import run_distributed
from cptron.testing.training import PackedSource, make_train_config, train_recording_grads
from cptron.train.trainer import Trainer, attention_description

# Three rows with different document layouts (one document, several, a one-token one).
DOC_LAYOUTS = [[0] * 64, [0] * 7 + [1] * 30 + [2] * 27, [5] * 20 + [9] + [5] * 43]


def doc_ids(T: int = 50) -> torch.Tensor:
    return torch.tensor([row[:T] for row in DOC_LAYOUTS])


def listed(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Dense tile flags from a BlockMask's (counts, indices)."""
    nk = idx.shape[-1]
    ranks = torch.arange(nk).expand_as(idx)
    dense = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool)
    dense.scatter_(-1, idx.long(), ranks < num[..., None])
    return dense


# ---------------------------------------------------------------- tile lists

@pytest.mark.parametrize("T,block", [(50, 8), (64, 16), (37, 4), (20, 128)])
@pytest.mark.parametrize("window", [None, 5, 19])
@pytest.mark.parametrize("with_docs", [True, False])
def test_tiles_match_torch_create_block_mask(T, block, window, with_docs):
    segments = positions_and_segments(doc_ids(T))[1] if with_docs else None
    mask_mod = document_mask_mod(segments, window)
    B = segments.shape[0] if segments is not None else 1
    ref = create_block_mask(mask_mod, B, None, T, T, device="cpu", BLOCK_SIZE=block)
    ref_partial = listed(ref.kv_num_blocks, ref.kv_indices)
    ref_full = listed(ref.full_kv_num_blocks, ref.full_kv_indices)

    got = build_block_mask(T, "cpu", segments, window, block_size=block)
    partial = listed(got.kv_num_blocks, got.kv_indices)
    full = listed(got.full_kv_num_blocks, got.full_kv_indices)
    assert got.shape == (B, 1, T, T) and got.BLOCK_SIZE == (block, block)
    # The kernel skips mask_mod on full tiles: they must be exactly torch's.
    assert torch.equal(full, ref_full)
    assert not (partial & full).any()
    if window is None:
        assert torch.equal(partial, ref_partial)
    else:  # with both rules a few empty tiles may be listed, never one missing
        assert not (ref_partial & ~partial).any()
    # The transposed (query-tile) lists the backward uses agree with the key-tile lists.
    assert torch.equal(listed(got.q_num_blocks, got.q_indices), partial.transpose(-2, -1))


def test_tiles_of_two_documents_with_a_block_boundary_inside_one():
    segments = torch.tensor([[1] * 6 + [2] * 10])  # tiles of 4: document 1 ends inside tile 1
    partial, full = block_tile_flags(16, "cpu", segments, None, block_size=4)
    assert full[0, 0].int().tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert partial[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1]]


# ------------------------------------------------- flex vs SDPA, fp32 on CPU

def mistral(**kw):
    return model_config_from_preset("tiny", family="mistral", **kw)


CASES = {
    "documents": dict(window=None, docs=True),
    "window": dict(window=6, docs=False),
    "documents_and_window": dict(window=6, docs=True),
}


@pytest.mark.parametrize("heads", ["gqa", "mha"])
@pytest.mark.parametrize("case", list(CASES))
def test_flex_matches_sdpa_outputs_and_gradients(case, heads):
    window, docs = CASES[case]["window"], CASES[case]["docs"]
    cfg = mistral(sliding_window=window, n_kv_heads=2 if heads == "gqa" else 4)
    sdpa, flex_model = build_model(cfg, seed=3), build_model(cfg, seed=3)
    flex_model.attention_impl = "flex"
    tokens = torch.randint(0, cfg.vocab_size, (3, 50), generator=torch.Generator().manual_seed(0))
    ids = doc_ids() if docs else None
    out_sdpa, out_flex = sdpa(tokens, doc_ids=ids), flex_model(tokens, doc_ids=ids)
    assert (out_flex - out_sdpa).abs().max().item() <= 1e-5
    targets = torch.randint(0, cfg.vocab_size, (3 * 50,), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(out_sdpa.flatten(0, 1), targets).backward()
    F.cross_entropy(out_flex.flatten(0, 1), targets).backward()
    flex_params = dict(flex_model.named_parameters())
    for name, p in sdpa.named_parameters():
        err = (p.grad - flex_params[name].grad).abs().max().item()
        scale = p.grad.abs().max().item()
        # Absolute 1e-5, and relative to the parameter's own gradient scale, since
        # q/k gradients are ~1e-4 here and an absolute bound alone would be loose.
        assert err <= 1e-5 and err <= 1e-4 * scale, f"{name}: max |grad diff| {err:.2e} (scale {scale:.2e})"
    # The mask matters: attending across documents / beyond the window changes the output.
    plain = build_model(mistral(n_kv_heads=cfg.n_kv_heads), seed=3)(tokens)  # same weights, no mask
    assert (plain - out_flex).abs().max().item() > 1e-3


def test_flex_in_eval_without_grad():
    cfg = mistral(sliding_window=8)
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 50))
    with torch.no_grad():
        ref = model(tokens, doc_ids=doc_ids())
        model.attention_impl = "flex"
        got = model(tokens, doc_ids=doc_ids())
    assert (got - ref).abs().max().item() <= 1e-5


def test_one_block_mask_per_forward_and_plain_causal_stays_on_sdpa(monkeypatch):
    calls = {"build": 0, "flex": 0}
    real_build, real_forward = flex.build_block_mask, flex.flex_attention_forward

    def counting_build(*a, **kw):
        calls["build"] += 1
        return real_build(*a, **kw)

    def counting_forward(*a, **kw):
        calls["flex"] += 1
        return real_forward(*a, **kw)

    monkeypatch.setattr(flex, "build_block_mask", counting_build)
    monkeypatch.setattr(flex, "flex_attention_forward", counting_forward)
    model = build_model(model_config_from_preset("tiny", n_layers=3), seed=0)
    model.attention_impl = "flex"
    tokens = torch.randint(0, 2048, (3, 50))
    model(tokens)
    assert calls == {"build": 0, "flex": 0}, "plain causal attention must keep SDPA's is_causal kernel"
    model(tokens, doc_ids=doc_ids())
    assert calls == {"build": 1, "flex": 3}, calls
    assert attention_mask_for("flex", 50, "cpu", None, sliding_window=50) is None
    assert isinstance(attention_mask_for("flex", 50, "cpu", None, sliding_window=49), BlockMask)
    assert isinstance(attention_mask_for("sdpa", 50, "cpu", positions_and_segments(doc_ids())[1]), torch.Tensor)
    with pytest.raises(ValueError, match="attention_impl='xformers'"):
        attention_mask_for("xformers", 50, "cpu")


# ----------------------------------------------------------- start-up checks

def test_startup_check_passes_on_cpu_and_refuses_what_cannot_run(monkeypatch):
    check_attention_support("flex", torch.device("cpu"))
    assert flex._probe(torch.device("cpu")) < 1e-5
    check_attention_support("sdpa", torch.device("cpu"), compiled=True)
    with pytest.raises(ConfigError, match=r"training.attention='flex' is invalid on cpu with parallel.compile"):
        check_attention_support("flex", torch.device("cpu"), compiled=True)
    with pytest.raises(ConfigError, match=r"training.attention='auto' is invalid: expected one of sdpa, flex"):
        check_attention_support("auto", torch.device("cpu"))

    def broken(device):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(flex, "_probe", broken)
    with pytest.raises(ConfigError, match=r"training.attention='flex' is invalid on cpu: .*no kernel for this"):
        check_attention_support("flex", torch.device("cpu"))
    monkeypatch.setattr(flex, "_probe", lambda device: 0.5)
    with pytest.raises(ConfigError, match="differs from SDPA by 0.5"):
        check_attention_support("flex", torch.device("cpu"))


def _start_compiled_flex_trainer(rank, world_size, run_dir):
    cfg = make_train_config(run_dir, ParallelConfig(compile=True), attention="flex")
    try:
        Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {}))
    except ConfigError as e:
        return str(e)
    return None


def test_trainer_refuses_flex_with_compiled_blocks_on_cpu_at_startup(tmp_path):
    message = run_distributed(_start_compiled_flex_trainer, 1, str(tmp_path))[0]
    assert message is not None and "training.attention='flex'" in message and "parallel.compile" in message


def test_attention_log_line_names_the_kernel():
    mc = mistral(sliding_window=6)
    cpu = torch.device("cpu")
    assert attention_description(True, cpu, mc, "flex").startswith(
        "FlexAttention with a block-sparse document and sliding-window (6 tokens) causal mask")
    assert "compile" in attention_description(False, torch.device("cuda"), mc, "flex")
    assert attention_description(True, cpu, mc, "sdpa").startswith("SDPA")
    assert attention_description(False, cpu, model_config_from_preset("tiny"), "flex").startswith("SDPA causal")


# ------------------------------------------- the block-sparse kernel (compiled)

def _compiled_kernel_errors(rank, world_size):
    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(0)
    T, block = 200, 32  # T is not a multiple of the tile size
    q, k, v = (torch.randn(2, h, T, 16, generator=gen) for h in (4, 2, 2))
    segments = torch.tensor([[0] * 10 + [1] * 150 + [2] * 40, [0] * 125 + [1] * 75])
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=build_attention_mask(T, "cpu", segments, 70))
    kernel = torch.compile(flex_attention, dynamic=False)
    bm = build_block_mask(T, "cpu", segments, 70, block_size=block)
    good = kernel(q, k, v, block_mask=bm, enable_gqa=True)
    # Negative control: the same mask with its full tiles dropped must change the result,
    # so the kernel really reads the tile lists this test checks.
    no_full = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, torch.zeros_like(bm.full_kv_num_blocks),
                                       bm.full_kv_indices, BLOCK_SIZE=block, mask_mod=bm.mask_mod,
                                       seq_lengths=(T, T))
    dropped = kernel(q, k, v, block_mask=no_full, enable_gqa=True)
    return (good - ref).abs().max().item(), (dropped - ref).abs().max().item()


def test_compiled_block_sparse_kernel_matches_sdpa_on_cpu():
    """torch's compiled CPU flex kernel (forward only) skips unlisted tiles and runs
    full tiles without mask_mod, as the GPU kernel does: it checks the tile lists."""
    good, dropped = run_distributed(_compiled_kernel_errors, 1, timeout=300)[0]
    assert good <= 1e-5
    assert dropped > 1e-2


def _compiled_block_error(rank, world_size):
    cfg = mistral(sliding_window=6, n_layers=1)
    eager, compiled = build_model(cfg, seed=1).eval(), build_model(cfg, seed=1).eval()
    compiled.attention_impl = "flex"
    compiled.layers["0"] = torch.compile(compiled.layers["0"], fullgraph=True)
    tokens = torch.randint(0, cfg.vocab_size, (3, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (compiled(tokens, doc_ids=doc_ids()) - eager(tokens, doc_ids=doc_ids())).abs().max().item()


def test_flex_inside_a_compiled_block_traces_in_one_graph():
    """parallel.compile's path (fullgraph blocks) on CPU, forward only: the block's own
    compile takes the flex call and the BlockMask input."""
    assert run_distributed(_compiled_block_error, 1, timeout=300)[0] <= 1e-5


# ---------------------------------------- trainer: tp=2 and pp=2 with flex

STEPS = 3


def _train(rank, world_size, run_dir, parallel, attention, window):
    cfg = make_train_config(run_dir, parallel, steps=STEPS, attention=attention)
    if window is not None:
        cfg.model.family, cfg.model.sliding_window = "mistral", window
    _, result, grads = train_recording_grads(cfg)
    return result.losses, grads


_SINGLE: dict = {}


def _single(tmp_path_factory, attention, window):
    key = (attention, window)
    if key not in _SINGLE:
        _SINGLE[key] = run_distributed(_train, 1, str(tmp_path_factory.mktemp("single")), ParallelConfig(),
                                       attention, window)[0]
    return _SINGLE[key]


LAYOUTS = [
    pytest.param(ParallelConfig(tp=2, sequence_parallel=False, loss_parallel=False), None, id="tp2"),
    pytest.param(ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True), 5, id="tp2_sp_window"),
    pytest.param(ParallelConfig(pp=2, dp_shard=1, pp_schedule="1f1b"), None, id="pp2_1f1b"),
    pytest.param(ParallelConfig(pp=2, dp_shard=1, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2), 5,
                 id="pp2_interleaved_window"),
]


@pytest.mark.parametrize("parallel,window", LAYOUTS)
def test_flex_layout_matches_single_process_flex_and_sdpa(parallel, window, tmp_path, tmp_path_factory):
    ref_flex, ref_flex_grads = _single(tmp_path_factory, "flex", window)
    ref_sdpa, _ = _single(tmp_path_factory, "sdpa", window)
    results = run_distributed(_train, 2, str(tmp_path), parallel, "flex", window, timeout=300)
    losses = results[0][0]
    grads = {s: {} for s in range(STEPS)}
    for _, rank_grads in results:  # pipeline stages hold disjoint parameters
        for step, named in rank_grads.items():
            grads[step].update(named)
    assert sorted(losses) == list(range(STEPS))
    for step in range(STEPS):
        assert abs(losses[step] - ref_flex[step]) <= 1e-5, (step, losses[step], ref_flex[step])
        assert abs(losses[step] - ref_sdpa[step]) <= 1e-5, (step, losses[step], ref_sdpa[step])
        assert set(grads[step]) == set(ref_flex_grads[step])
        for name, g in grads[step].items():
            err = (g - ref_flex_grads[step][name]).abs().max().item()
            assert err <= 1e-5, f"step {step} {name}: max |grad diff| = {err:.2e}"
    # The window changes the loss, so the comparison above covers it.
    if window is not None:
        assert abs(ref_flex[0] - _single(tmp_path_factory, "flex", None)[0][0]) > 1e-4


# ------------------------------------------------------------- GPU (not run here)

@pytest.mark.gpu
def test_compiled_flex_on_cuda_matches_sdpa():
    """The compiled GPU kernel (block-sparse, 128-token tiles, T not a multiple of them)
    against the SDPA mask path, forward and backward."""
    device = torch.device("cuda")
    check_attention_support("flex", device)
    cfg = mistral(sliding_window=100, n_kv_heads=2)
    sdpa, flex_model = build_model(cfg, seed=3, device=device), build_model(cfg, seed=3, device=device)
    flex_model.attention_impl = "flex"
    tokens = torch.randint(0, cfg.vocab_size, (2, 300), device=device)
    ids = torch.tensor([[0] * 130 + [1] * 170, [0] * 300], device=device)
    out_sdpa, out_flex = sdpa(tokens, doc_ids=ids), flex_model(tokens, doc_ids=ids)
    assert (out_flex - out_sdpa).abs().max().item() <= 1e-3
    out_sdpa.float().logsumexp(-1).mean().backward()
    out_flex.float().logsumexp(-1).mean().backward()
    flex_params = dict(flex_model.named_parameters())
    for name, p in sdpa.named_parameters():
        scale = p.grad.abs().max().item()
        assert (p.grad - flex_params[name].grad).abs().max().item() <= 1e-2 * max(scale, 1e-6), name
