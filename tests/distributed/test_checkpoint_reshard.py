"""The checkpoint format stores global tensors: written sharded one way, read sharded another."""
import dataclasses

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from cptron import checkpoint as ckpt
from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model
from cptron.testing.distributed import run_distributed

CFG = model_config_from_preset("tiny", vocab_size=1000, pad_vocab_to_multiple_of=8, tie_embeddings=True)


def _reference():
    return {n: p.detach() for n, p in build_model(CFG, seed=21).named_parameters()}


def _save_sharded(rank, world_size, path):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
    state = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in _reference().items()}
    ckpt.write_checkpoint(path, {"model": state}, {"model": dataclasses.asdict(CFG), "step": 3})
    return state["tok_embeddings.weight"].to_local().shape[0]


def _load_2d(rank, world_size, path):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    ref = _reference()
    state = {}
    for name, t in ref.items():
        placements = [Shard(0), Shard(1)] if t.dim() == 2 else [Shard(0), Replicate()]
        state[name] = distribute_tensor(torch.zeros_like(t), mesh, placements)
    ckpt.load_state(path, {"model": state})
    return all(torch.equal(state[n].full_tensor(), ref[n]) for n in ref)


def test_written_on_two_ranks_read_on_one_and_on_a_2x2_mesh(tmp_path):
    path = tmp_path / ckpt.step_dir_name(3)
    local_rows = run_distributed(_save_sharded, 2, path)
    assert local_rows == [500, 500]
    assert ckpt.latest_complete_checkpoint(tmp_path) == path
    assert ckpt.read_meta(path)["step"] == 3

    model = ckpt.load_model(path)
    ref = _reference()
    for name, p in model.named_parameters():
        assert torch.equal(p, ref[name]), name
    assert model.output.weight is model.tok_embeddings.weight

    assert run_distributed(_load_2d, 4, path) == [True] * 4


def _write_existing(rank, world_size, path):
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp_shard",))
    state = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in _reference().items()}
    try:
        ckpt.write_checkpoint(path, {"model": state}, {"model": dataclasses.asdict(CFG)})
    except ckpt.CheckpointError as e:
        return str(e)
    return "no error"


def test_a_refusal_on_rank0_is_raised_on_every_rank(tmp_path):
    path = tmp_path / "exists"
    path.mkdir()
    messages = run_distributed(_write_existing, 2, path, timeout=60)
    assert all("already exists" in m for m in messages), messages
