"""Training checkpoints across layouts: FSDP2 <-> one process, tensor parallel -> one process,
a pipeline-like split <-> one process, async saves on several ranks, and HF initial weights
streamed into FSDP and tensor-parallel shards."""
import dataclasses

import pytest
import torch
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from cptron import checkpoint as ckpt
from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model
from cptron.testing.distributed import run_distributed
from cptron.train.checkpointer import CheckpointConfig, TrainCheckpointer
from cptron.train.initial_weights import load_initial_weights, model_config_for_init

TIED = model_config_from_preset("tiny", vocab_size=500, pad_vocab_to_multiple_of=64, tie_embeddings=True)
UNTIED = dataclasses.replace(TIED, tie_embeddings=False)
STATE = {"step": 1, "data": {"offset": 3}}


def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _full_state(model, opt) -> dict:
    """name -> global param, exp_avg, exp_avg_sq, step (whatever the sharding)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            out[names[id(p)]] = {"param": _full(p), **{k: _full(v) for k, v in st.items()}}
    return out


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys() == {"param", "step", "exp_avg", "exp_avg_sq"}, name
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def _step(model, opt, cfg, seed):
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(tokens).float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def _fsdp(model, world_size):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tp(model, world_size):
    """Megatron-style tensor parallelism of the blocks (heads and MLP columns split)."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
    for block in model.layers.values():
        parallelize_module(block, mesh, plan)
    return model


LAYOUTS = {"fsdp": _fsdp, "tp": _tp}


def _checkpointer(run_dir, cfg, **kw):
    return TrainCheckpointer(CheckpointConfig(**kw), run_dir, model_cfg=cfg)


def _plain_trained(cfg, seed):
    model = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _step(model, opt, cfg, seed)
    return model, opt


def _plain_loaded(cfg, path):
    model = build_model(cfg, seed=99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert _checkpointer(path.parent.parent, cfg).load(path, [model], [opt]) == STATE
    return _full_state(model, opt)


# ------------------------------------------------------------------ FSDP2 <-> one process

def _fsdp_save(rank, world_size, run_dir):
    model = _fsdp(build_model(TIED, seed=3), world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _step(model, opt, TIED, seed=3)
    assert model.tok_embeddings.weight.to_local().shape[0] == 256  # really sharded
    cp = _checkpointer(run_dir, TIED, async_save=True)
    path = cp.save(1, [model], [opt], STATE)
    saved = _full_state(model, opt)
    _step(model, opt, TIED, seed=4)  # training goes on while the write runs
    cp.wait()
    return path, cp.latest(), saved


def _fsdp_load(rank, world_size, path):
    model = _fsdp(build_model(TIED, seed=7), world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert _checkpointer(path.parent.parent, TIED).load(path, [model], [opt]) == STATE
    return _full_state(model, opt)


def test_fsdp_checkpoint_loads_in_one_process_and_back(tmp_path):
    # Reference: the same model and step in one process (FSDP's mean gradient equals it).
    model, opt = _plain_trained(TIED, seed=3)
    reference = _full_state(model, opt)
    results = run_distributed(_fsdp_save, 2, tmp_path / "fsdp")
    path = results[0][0]
    assert [r[:2] for r in results] == [(path, path)] * 2 and ckpt.is_complete(path)
    loaded = _plain_loaded(TIED, path)
    _assert_equal(loaded, results[0][2])
    _assert_equal(loaded, results[1][2])
    for name in reference:  # FSDP's reduce-scatter may round differently from one process
        assert torch.allclose(loaded[name]["param"], reference[name]["param"], atol=1e-6), name

    # Exactness of the round trip: one process saves, FSDP loads, and the result is
    # saved by FSDP again and read back in one process.
    single = _checkpointer(tmp_path / "single", TIED).save(1, [model], [opt], STATE)
    fsdp_loaded = run_distributed(_fsdp_load, 2, single)
    _assert_equal(fsdp_loaded[0], reference)
    _assert_equal(fsdp_loaded[1], reference)


def _tp_save(rank, world_size, run_dir):
    model = _tp(build_model(UNTIED, seed=6), world_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _step(model, opt, UNTIED, seed=6)
    assert model.layers["0"].attention.wo.weight.to_local().shape == (64, 32)  # split along columns
    _checkpointer(run_dir, UNTIED).save(1, [model], [opt], STATE)
    return _full_state(model, opt)


def test_tensor_parallel_checkpoint_loads_in_one_process(tmp_path):
    saved = run_distributed(_tp_save, 2, tmp_path)
    _assert_equal(saved[0], saved[1])
    _assert_equal(_plain_loaded(UNTIED, tmp_path / "checkpoints" / "step-00000001"), saved[0])


# ------------------------------------------------------------------ pipeline-like split

def _stage(rank, seed):
    """Rank 0 holds the embedding and layer 0; rank 1 layer 1, the norm and the output."""
    model = build_model(UNTIED, seed=seed)
    if rank == 0:
        del model.layers["1"]
        model.norm = model.output = None
    else:
        del model.layers["0"]
        model.tok_embeddings = None
    return model


def _pipeline_save(rank, world_size, run_dir):
    model = _stage(rank, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for name, p in model.named_parameters():  # gradients that depend on the name only, not the stage
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name) * 131 + p.numel()))
    opt.step()
    _checkpointer(run_dir, UNTIED).save(1, [model], [opt], STATE)
    return _full_state(model, opt)


def _pipeline_load(rank, world_size, path):
    model = _stage(rank, seed=11)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert _checkpointer(path.parent.parent, UNTIED).load(path, [model], [opt]) == STATE
    return _full_state(model, opt)


def test_pipeline_split_checkpoint_loads_in_one_process_and_back(tmp_path):
    halves = run_distributed(_pipeline_save, 2, tmp_path / "pp")
    assert not halves[0].keys() & halves[1].keys()
    saved = {**halves[0], **halves[1]}
    path = tmp_path / "pp" / "checkpoints" / "step-00000001"
    loaded = _plain_loaded(UNTIED, path)
    _assert_equal(loaded, saved)

    model, opt = _plain_trained(UNTIED, seed=8)
    single = _checkpointer(tmp_path / "single", UNTIED).save(1, [model], [opt], STATE)
    halves = run_distributed(_pipeline_load, 2, single)
    _assert_equal({**halves[0], **halves[1]}, _full_state(model, opt))


def _different_train_state(rank, world_size, run_dir):
    model = _stage(rank, seed=5)
    try:
        _checkpointer(run_dir, UNTIED).save(1, [model], [torch.optim.AdamW(model.parameters())], {"rank": rank})
    except ckpt.CheckpointError as e:
        return str(e)
    return "saved"


def test_train_state_must_agree_across_ranks(tmp_path):
    messages = run_distributed(_different_train_state, 2, tmp_path)
    assert all("train_state differs from rank 0's" in m for m in messages), messages
    assert ckpt.latest_complete_checkpoint(tmp_path / "checkpoints") is None


# ------------------------------------------------------------------ HF initial weights into FSDP

HF_VOCAB = 300


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(path)
    return hf, path


def _hf_init(rank, world_size, hf_dir, tokens, layout):
    cfg = model_config_for_init(hf_dir, pad_vocab_to_multiple_of=64)
    model = LAYOUTS[layout](build_model(cfg, seed=1), world_size)
    with torch.no_grad():  # non-zero everywhere, so a forgotten row or tensor shows up
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).fill_(0.5)
    load_initial_weights(hf_dir, [model], cfg)
    with torch.no_grad():
        logits = model(tokens)
    return logits, _full(model.tok_embeddings.weight)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_initial_weights_stream_into_shards(hf_model, layout):
    hf, path = hf_model
    tokens = torch.randint(0, HF_VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = hf(tokens).logits
    for logits, embedding in run_distributed(_hf_init, 2, path, tokens, layout):
        assert (logits[..., :HF_VOCAB] - reference).abs().max() < 1e-5
        assert embedding.shape[0] == 320 and torch.count_nonzero(embedding[HF_VOCAB:]) == 0
        assert torch.equal(embedding[:HF_VOCAB], hf.model.embed_tokens.weight)
