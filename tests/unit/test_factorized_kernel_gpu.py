"""The fused factorized-embedding CUDA kernel (csrc/) on a GPU; skipped without one.

What benchmarks/gpu_kernel.py checks before it times, as tests: every case of
cptron.kernels.factorized_embedding_check (relative error against the float64 op: fp32 < 1e-5,
bf16 < 1e-2, fp16 < 5e-3; NaN-poisoned outputs), a bit-for-bit repeatable deterministic backward,
torch.compile through the op, and a training run with model.embedding_rank whose log names the
kernel and whose losses match the reference path's within bf16 tolerance.

Each body runs in a forked rank (cptron.testing.distributed), so this process never initializes
CUDA and the forked tests that follow can still use it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from cptron.testing.distributed import run_distributed

pytestmark = pytest.mark.gpu


def _extension_or_skip_reason():
    from cptron.kernels.factorized_embedding_op import load_extension

    ext, how = load_extension()
    return None if ext is not None else how


def _checks(rank, world_size):
    import torch

    from cptron.kernels.factorized_embedding_check import check_all, repeatable

    reason = _extension_or_skip_reason()
    if reason is not None:
        return reason, [], False
    device = torch.device("cuda")
    return None, check_all(device, seed=int.from_bytes(os.urandom(2), "little")), repeatable(device)


def test_kernel_matches_the_float64_reference_on_every_case_and_repeats():
    reason, results, same = run_distributed(_checks, 1, timeout=900)[0]
    if reason is not None:
        pytest.skip(f"CUDA extension unavailable: {reason}")
    failed = [r for r in results if not r["ok"]]
    assert results and not failed, failed
    assert same, "the deterministic backward gave different gradients on two runs"


def _compiled(rank, world_size):
    import torch

    from cptron.kernels.factorized_embedding_op import factorized_embedding_fused

    if (reason := _extension_or_skip_reason()) is not None:
        return reason, None
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 1000, (7, 130), device="cuda", generator=g)
    coords = torch.randn(1000, 72, device="cuda", dtype=torch.bfloat16, generator=g)
    basis = torch.randn(72, 300, device="cuda", dtype=torch.bfloat16, generator=g)
    dout = torch.randn(7, 130, 300, device="cuda", dtype=torch.bfloat16, generator=g)

    def step(p, b):
        out = factorized_embedding_fused(ids, p, b, vocab_start=0)
        return (out, *torch.autograd.grad(out, (p, b), dout))

    compiled = torch.compile(step, fullgraph=True)
    p, b = coords.requires_grad_(True), basis.requires_grad_(True)
    eager, traced = step(p, b), compiled(p, b)
    # Same kernels on both paths: the deterministic backward makes them bit-identical.
    return None, all(torch.equal(x, y) for x, y in zip(eager, traced))


def test_torch_compile_fullgraph_through_the_cuda_op():
    reason, same = run_distributed(_compiled, 1, timeout=600)[0]
    if reason is not None:
        pytest.skip(f"CUDA extension unavailable: {reason}")
    assert same


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _train(rank, world_size, run_dir, kernel):
    from cptron.kernels.factorized_embedding import KERNEL_ENV
    from cptron.parallel.dims import ParallelConfig
    from cptron.testing.training import PackedSource, make_train_config
    from cptron.train.trainer import Trainer

    if kernel != "reference" and (reason := _extension_or_skip_reason()) is not None:
        return reason, None, []
    os.environ[KERNEL_ENV] = kernel
    handler = _Lines()
    logger = logging.getLogger("cptron.kernels.factorized_embedding")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    cfg = make_train_config(run_dir, ParallelConfig(), steps=4, device="cuda")
    cfg.model = dataclasses.replace(cfg.model, embedding_rank=24)
    result = Trainer(cfg, data_factory=lambda r, n: (PackedSource(16, 8, r, n), {})).run()
    logger.removeHandler(handler)
    return None, result.losses, handler.lines


@pytest.mark.parametrize("kernel", ["auto", "atomic"])
def test_training_with_embedding_rank_uses_the_kernel_and_matches_the_reference(tmp_path, kernel):
    reason, losses, lines = run_distributed(_train, 1, str(tmp_path / kernel), kernel, backend="nccl", timeout=600)[0]
    if reason is not None:
        pytest.skip(f"CUDA extension unavailable: {reason}")
    _, ref_losses, ref_lines = run_distributed(
        _train, 1, str(tmp_path / "ref"), "reference", backend="nccl", timeout=600
    )[0]
    assert any("fused CUDA kernel" in line for line in lines), lines
    assert any("PyTorch reference" in line for line in ref_lines), ref_lines
    assert sorted(losses) == sorted(ref_losses) == [0, 1, 2, 3]
    # bf16 compute (the trainer's default on CUDA): the kernel rounds once where the reference
    # rounds the gathered rows and the product; over 4 steps the losses agree to bf16 resolution.
    for step, loss in losses.items():
        assert abs(loss - ref_losses[step]) <= 2e-2 * max(1.0, abs(ref_losses[step])), (step, loss, ref_losses[step])
