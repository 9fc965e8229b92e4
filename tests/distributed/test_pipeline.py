"""Pipeline parallelism: every schedule matches the single-process model in loss and gradients."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining.schedules import ScheduleZBVZeroBubble  # noqa: F401  (import before forking)
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from cptron.errors import ConfigError
from cptron.models.config import model_config_from_preset
from cptron.models.llama import build_model
from cptron.parallel.pipeline import (
    SCHEDULES,
    StageTransformer,
    build_pipeline_schedule,
    build_stage_modules,
    check_pipeline_schedule,
    pipeline_eval_step,
    pipeline_train_step,
    split_layers,
    stage_ids_for_rank,
)
from cptron.testing.distributed import run_distributed

CFG = model_config_from_preset("tiny", n_layers=4, dim=32, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64,
                               vocab_size=250, pad_vocab_to_multiple_of=64)
SEED = 11
SEQ = 12
TOL = 1e-5


def _batch(batch_size: int, doc_ids: bool):
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CFG.vocab_size, (batch_size, SEQ), generator=gen)
    labels = torch.randint(0, CFG.vocab_size, (batch_size, SEQ), generator=gen)
    labels[:, -1] = -100  # padding that the loss ignores
    if doc_ids:
        # packed documents of uneven lengths, boundaries differing per row
        ids = (torch.rand(batch_size, SEQ, generator=gen) < 0.25).cumsum(dim=1)
    else:
        ids = torch.arange(SEQ).expand(batch_size, SEQ) + 3 * torch.arange(batch_size)[:, None]
    return tokens, ids, labels


def _loss_fn(n_tokens: int):
    vocab = CFG.vocab_size
    return lambda out, tgt: F.cross_entropy(out[..., :vocab].flatten(0, 1).float(), tgt.flatten(), reduction="sum",
                                            ignore_index=-100) / n_tokens


def _reference(batch_size: int, doc_ids: bool):
    tokens, ids, labels = _batch(batch_size, doc_ids)
    model = build_model(CFG, seed=SEED)
    logits = model(tokens, doc_ids=ids) if doc_ids else model(tokens, positions=ids)
    loss = _loss_fn(int((labels != -100).sum()))(logits, labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _grads(modules):
    return {n: (None if p.grad is None else p.grad.clone()) for m in modules for n, p in m.named_parameters()}


def _pipeline(rank, world_size, schedule, spr, n_mb, mb_size, layers_per_stage, doc_ids, with_eval):
    n_stages = world_size * spr
    stage_ids = stage_ids_for_rank(rank, world_size, spr, schedule)
    ranges = split_layers(CFG.n_layers, n_stages, layers_per_stage)
    modules = build_stage_modules(CFG, stage_ids, n_stages, ranges, doc_ids)
    for m in modules:
        m.to_empty(device="cpu")
        m.init_weights(SEED)
    tokens, ids, labels = _batch(n_mb * mb_size, doc_ids)
    loss_fn = _loss_fn(int((labels != -100).sum()))
    runtime = build_pipeline_schedule(modules, stage_ids, n_stages, dist.group.WORLD, torch.device("cpu"),
                                      n_mb, loss_fn, schedule)
    # Only the first stage's rank needs the inputs, only the last's the labels.
    first, last = runtime.has_first_stage, runtime.has_last_stage
    out = {"loss": pipeline_train_step(runtime, tokens if first else None, ids if first else None,
                                       labels if last else None)}
    out["grads"] = _grads(modules)
    if with_eval:
        for m in modules:
            m.zero_grad(set_to_none=True)
        out["eval_loss"] = pipeline_eval_step(runtime, tokens, ids, labels)
        out["grads_after_eval"] = _grads(modules)
        # Back to training after eval: the runtime switches modes and must reproduce the first step.
        out["loss_again"] = pipeline_train_step(runtime, tokens, ids, labels)
        out["grads_again"] = _grads(modules)
    return out


def _check(results, ref_loss, ref_grads, key="grads", loss_key="loss"):
    losses = [r[loss_key] for r in results if r[loss_key] is not None]
    assert len(losses) == 1, "exactly one rank holds the last stage and returns the loss"
    assert abs(losses[0].item() - ref_loss) <= TOL, (losses[0].item(), ref_loss)
    grads = {}
    for r in results:
        assert not set(grads) & set(r[key]), "a parameter lives on two ranks"
        grads.update(r[key])
    assert set(grads) == set(ref_grads)
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    assert worst <= TOL, worst
    return worst


CASES = [
    # schedule, pp, stages per rank, microbatches, microbatch size, layers per stage, doc_ids
    ("gpipe", 2, 1, 2, 2, None, True),
    ("1f1b", 2, 1, 4, 1, [1, 3], False),
    ("interleaved_1f1b", 2, 2, 4, 1, None, True),
    ("looped_bfs", 2, 2, 2, 2, None, False),
    ("interleaved_zero_bubble", 2, 2, 4, 1, None, True),
    ("zbv_zero_bubble", 2, 2, 4, 1, None, False),
]


@pytest.mark.parametrize("schedule, pp, spr, n_mb, mb_size, layers_per_stage, doc_ids", CASES,
                         ids=[c[0] for c in CASES])
def test_schedule_matches_single_process(schedule, pp, spr, n_mb, mb_size, layers_per_stage, doc_ids):
    ref_loss, ref_grads = _reference(n_mb * mb_size, doc_ids)
    results = run_distributed(_pipeline, pp, schedule, spr, n_mb, mb_size, layers_per_stage, doc_ids, True,
                              timeout=120)
    _check(results, ref_loss, ref_grads)
    # Eval: same loss, no gradient anywhere.
    eval_losses = [r["eval_loss"] for r in results if r["eval_loss"] is not None]
    assert len(eval_losses) == 1 and abs(eval_losses[0].item() - ref_loss) <= TOL
    assert all(g is None for r in results for g in r["grads_after_eval"].values())
    _check(results, ref_loss, ref_grads, key="grads_again", loss_key="loss_again")
