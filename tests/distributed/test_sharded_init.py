"""init_weights on sharded (DTensor) parameters equals the single-process initialization."""
import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model
from cptron.testing.distributed import run_distributed

CFG = model_config_from_preset("tiny", vocab_size=1000, pad_vocab_to_multiple_of=8, tie_embeddings=True)


def _init_sharded(rank, world_size, mesh_shape, two_d):
    names = ("dp_shard", "tp")[: len(mesh_shape)]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = build_model(CFG, seed=None)
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if two_d:
                placements = [Shard(0), Shard(1) if p.dim() == 2 else Replicate()]
            else:
                placements = [Shard(0)]
            module.register_parameter(pname, torch.nn.Parameter(distribute_tensor(torch.zeros_like(p), mesh,
                                                                                    placements)))
    model.output.weight = model.tok_embeddings.weight
    model.init_weights(13)
    return {n: p.full_tensor() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mesh_shape, two_d", [((2,), False), ((2, 2), True)])
def test_sharded_init_matches_full_init(mesh_shape, two_d):
    reference = dict(build_model(CFG, seed=13).named_parameters())
    world = 1
    for n in mesh_shape:
        world *= n
    for full in run_distributed(_init_sharded, world, mesh_shape, two_d):
        assert set(full) == set(reference)
        for name, tensor in full.items():
            assert torch.equal(tensor, reference[name]), name
