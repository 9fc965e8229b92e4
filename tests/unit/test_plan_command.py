"""`cptron plan`: the llama3-8b example of the README, and the rules the estimate follows."""

from __future__ import annotations

import pytest
import torch

from cptron.config import parse_config
from cptron.errors import ConfigError
from cptron.models.config import model_config_from_preset
from cptron.parallel.dims import ParallelConfig
from cptron.train.memory_plan import GB, PlanConfig, default_device_memory, estimate_memory, run_plan

LLAMA3_8B = [
    "--model.preset",
    "llama3-8b",
    "--training.seq_len",
    "8192",
    "--training.micro_batch_size",
    "1",
    "--training.global_batch_size",
    "32",
    "--world_size",
    "8",
    "--device_memory",
    "80GB",
]


def plan_config(args):
    return parse_config(PlanConfig, args, prog="cptron plan", description="", allow_positional_yaml=True)


def test_llama3_8b_on_8_x_80gb_explains_the_misfit_and_finds_a_layout(capsys):
    text = run_plan(plan_config(LLAMA3_8B))
    assert "dp_shard=8 x tp=1, activation_checkpoint=none" in text
    assert "does NOT fit" in text and "largest terms: activations" in text
    assert "32.1 GB of unsharded gradients while it accumulates 4 microbatches" in text
    first = text.split("cheapest first):\n")[1].splitlines()[0]
    peak = float(first.rsplit("peak ", 1)[1].split()[0])
    assert peak <= 80.0 and "fits" in text.split("the first of them in detail:")[1]


def test_parameters_and_optimizer_match_the_model_and_the_layout():
    cfg = plan_config(LLAMA3_8B)
    n = cfg.model.num_params()
    plan = estimate_memory(cfg, 8, "cuda")
    (rank,) = plan.ranks
    assert abs(rank.params - 4 * n / 8) / (4 * n / 8) < 0.01  # fp32 master weights sharded 8 ways
    assert abs(rank.optimizer - 8 * n / 8) / (8 * n / 8) < 0.01
    assert abs(rank.grads - 4 * n) / (4 * n) < 0.01  # unsharded during accumulation (4 microbatches)
    cfg.training.global_batch_size = 8  # one microbatch per rank: FSDP2 reduce-scatters right away
    assert estimate_memory(cfg, 8, "cuda").ranks[0].grads == rank.params


def test_offload_moves_parameters_gradients_and_optimizer_to_cpu():
    cfg = plan_config(LLAMA3_8B)
    base = estimate_memory(cfg, 8, "cuda").ranks[0]
    cfg.parallel.offload = "all"
    off = estimate_memory(cfg, 8, "cuda").ranks[0]
    assert off.params == off.optimizer == 0 and off.cpu == base.params + base.params + base.optimizer
    assert off.grads == base.grads  # FSDP2 accumulates unsharded gradients on the device
    assert off.total < base.total


def test_activation_checkpointing_tensor_and_pipeline_parallelism_shrink_the_activations():
    cfg = plan_config(LLAMA3_8B)
    acts = {}
    for name, layout, world in [
        ("none", ParallelConfig(dp_shard=8), 8),
        ("full", ParallelConfig(dp_shard=8, activation_checkpoint="full"), 8),
        ("tp2", ParallelConfig(dp_shard=4, tp=2), 8),
        ("pp2", ParallelConfig(dp_shard=4, pp=2), 8),
    ]:
        cfg.parallel = layout
        acts[name] = max(r.activations for r in estimate_memory(cfg, world, "cuda").ranks)
    assert acts["full"] < acts["none"] / 20
    assert acts["tp2"] < 0.6 * acts["none"]
    assert acts["pp2"] < acts["none"]  # 1f1b: the first stage holds 2 microbatches of half the layers


def test_the_model_is_never_allocated():
    # 70B-class fp32 weights would need 280 GB: only the meta device can count them here.
    mc = model_config_from_preset("llama3-8b", n_layers=80, dim=8192, n_heads=64, n_kv_heads=8, ffn_hidden_dim=28672)
    cfg = plan_config(LLAMA3_8B)
    cfg.model = mc
    assert estimate_memory(cfg, 8, "cuda", mc).ranks[0].params > 30 * GB


def test_device_memory_is_required_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: its memory is the default")
    with pytest.raises(ConfigError, match="device_memory is required"):
        default_device_memory("", "cuda")
    with pytest.raises(ConfigError, match="device_memory='eighty'"):
        default_device_memory("eighty", "cuda")
    assert default_device_memory("80GB", "cuda") == 80 * GB


def test_the_chunked_loss_path_is_planned_by_its_chunks_not_the_full_logits():
    cfg = plan_config(LLAMA3_8B)
    cfg.training.loss_impl = "plain"
    plain = estimate_memory(cfg, 8, "cuda").ranks[0]
    cfg.training.loss_impl = "auto"  # 8192 x 128256 logits per microbatch: auto takes the chunked path
    chunked = estimate_memory(cfg, 8, "cuda").ranks[0]
    assert plain.transient_of == chunked.transient_of == "loss"
    logits = 8192 * 128256 * 4
    assert plain.transient > 3 * logits  # the fp32 logits, their log-softmax and gradients
    # 512-token chunks: the fp32 head gradient it holds and a fresh gradient of the head dominate instead
    head_gradient = 128256 * 4096 * 4
    assert 2 * head_gradient < chunked.transient < 2 * head_gradient + logits / 4 < plain.transient / 3
