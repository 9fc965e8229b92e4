"""One optimizer step on CPU: cptron's Trainer against a bare PyTorch loop and HF transformers.

    python benchmarks/train_step.py [--dim 384] [--n-layers 6] [--n-heads 6] [--n-kv-heads 2]
                                    [--ffn-hidden-dim 1024] [--vocab 16384] [--seq-len 512] [--batch 2]
                                    [--warmup 2] [--rounds 15] [--optim auto] [--compile] [--threads N]
                                    [--profile]

Three contenders train the same Llama-style model (default: ~22M parameters, GQA,
untied embeddings) in fp32 in this one process, on the same batch each round,
with the same AdamW settings (the kernel the trainer resolves `--optim` to,
foreach on CPU by default; decay on matrices only), global-norm clipping and
the same per-step learning rate:

1. cptron: `Trainer.train_step(batch)` (its token-normalized loss, the global
   grad norm and clipping, AdamW, the LR schedule), built with a `data_factory`
   that injects an in-memory source; checkpoints and metrics files are off.
2. bare: `cptron.models.llama.Transformer` + `F.cross_entropy` +
   `torch.nn.utils.clip_grad_norm_` + `torch.optim.AdamW`, no framework.
3. HF: transformers' `LlamaForCausalLM` from the equivalent `LlamaConfig`
   (attn_implementation="sdpa", use_cache=False), its own loss from `labels`
   (`shift_labels` passes the same targets cptron uses), AdamW + clip_grad_norm_.

All three start from the same weights (the HF model gets cptron's through the
name mapping of `cptron.hf_config`), so their first losses agree; the last losses are
printed too, as a check that all three did the same arithmetic.

Timing: `--warmup` untimed steps each, then `--rounds` rounds of one timed step
per contender, the order rotating every round (ABC, BCA, CAB, ...) so slow
phases of this shared machine hit everyone alike. Per-step medians give the
tokens/s. The two ratios come last, each the median of the per-round ratios
(the ratio of the medians and of the minima follow in parentheses), with goals:
  cptron / bare  <= 1.05  (the framework adds at most 5%)
  HF / cptron    >= 1.2
`--profile` prints torch.profiler's top operators of one cptron and one HF step.
`--compile` compiles each block of cptron (parallel.compile) and of the bare
loop while HF stays eager: it shows what compilation buys, and is not the
like-for-like comparison the default run is.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

OVERHEAD_GOAL = 1.05
HF_SPEEDUP_GOAL = 1.2


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def adamw_groups(named_params) -> list[dict]:
    """The Trainer's grouping: weight decay on matrices only (cptron.train.optim.build_optimizers)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------ contenders

class CptronStep:
    """The Trainer's full optimizer step."""

    name = "cptron"

    def __init__(self, args, run_dir: str):
        from cptron.data.interface import InMemoryTokenSource
        from cptron.parallel.dims import ParallelConfig
        from cptron.train.checkpointer import CheckpointConfig
        from cptron.train.config import JobConfig, TrainingConfig
        from cptron.train.lr import LRConfig
        from cptron.train.metrics import MetricsConfig
        from cptron.train.optim import OptimizerConfig
        from cptron.train.trainer import Trainer

        self.cfg = JobConfig(
            model=model_config(args),
            training=TrainingConfig(run_dir=run_dir, steps=args.warmup + args.rounds, global_batch_size=args.batch,
                                    micro_batch_size=args.batch, seq_len=args.seq_len, seed=0, device="cpu"),
            parallel=ParallelConfig(compile=args.compile),
            optim=OptimizerConfig(lr=args.lr, weight_decay=0.1, grad_clip=args.grad_clip,
                                  implementation=args.optim),
            lr=LRConfig(schedule="cosine", warmup_steps=1),
            checkpoint=CheckpointConfig(interval=0, save_final=False, resume=False),
            metrics=MetricsConfig(jsonl=False, progress_bar="off"))
        # Random tokens: the step costs the same whatever the text.
        tokens = torch.randint(0, args.vocab, (max(1 << 20, 4 * args.batch * (args.seq_len + 1)),),
                               generator=torch.Generator().manual_seed(1))
        self.trainer = Trainer(self.cfg, data_factory=lambda dp_rank, dp_size: (
            InMemoryTokenSource(tokens, args.seq_len, args.batch, dp_rank, dp_size, seed=0), {}))
        self.model = self.trainer.parts[0]
        # The baselines copy the AdamW kernel the trainer resolved (implementation=auto
        # picks by device), so the comparison is kernel for kernel.
        defaults = self.trainer.optimizers[0].defaults
        self.adamw_kernel = {"fused": bool(defaults.get("fused")), "foreach": bool(defaults.get("foreach"))}

    def next_batch(self):
        return next(self.trainer.data)

    def lr_at(self, step: int) -> float:
        return self.cfg.optim.lr * self.trainer.lr_schedule.factor(step)

    def step(self, batch) -> float:
        loss, _, stepped = self.trainer.train_step(batch)
        if not stepped:
            raise RuntimeError(f"cptron step {self.trainer.step} was skipped: non-finite loss {loss}")
        self.trainer.step += 1  # what Trainer.run does after each step; the LR schedule reads it
        return loss


class BareStep:
    """The same model with nothing around it: the loop one would write by hand."""

    name = "bare"

    def __init__(self, args, cptron: CptronStep):
        from cptron.models.llama import Transformer, canonical_param_name

        self.model = Transformer(cptron.trainer.model_cfg)
        self.model.load_state_dict({canonical_param_name(k): v for k, v in cptron.model.state_dict().items()})
        self.model.train()
        if args.compile:  # what the trainer does with parallel.compile: each block on its own
            for name, block in list(self.model.layers.items()):
                self.model.layers[name] = torch.compile(block, fullgraph=True)
        self.lr_at, self.clip, self.step_no = cptron.lr_at, args.grad_clip, 0
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(adamw_groups(self.model.named_parameters()), lr=args.lr, betas=(0.9, 0.95),
                                     eps=1e-8, weight_decay=0.1, **cptron.adamw_kernel)

    def step(self, batch) -> float:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_no)
        logits = self.model(batch.tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return loss.item()


class HFStep:
    """transformers' LlamaForCausalLM with its own loss, trained the usual way."""

    name = "HF"

    def __init__(self, args, cptron: CptronStep):
        from transformers import LlamaForCausalLM

        from cptron.hf_config import cptron_to_hf_name, hf_config_from_model_config
        from cptron.models.llama import canonical_param_name

        hf_cfg = hf_config_from_model_config(cptron.trainer.model_cfg, dtype=torch.float32)
        hf_cfg._attn_implementation = "sdpa"
        self.model = LlamaForCausalLM(hf_cfg).float()
        if self.model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"HF model uses attention {self.model.config._attn_implementation!r}, expected sdpa")
        state = {cptron_to_hf_name(canonical_param_name(k)): v for k, v in cptron.model.state_dict().items()}
        self.model.load_state_dict(state, strict=True)
        self.model.train()
        self.lr_at, self.clip, self.step_no = cptron.lr_at, args.grad_clip, 0
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(adamw_groups(self.model.named_parameters()), lr=args.lr, betas=(0.9, 0.95),
                                     eps=1e-8, weight_decay=0.1, **cptron.adamw_kernel)

    def step(self, batch) -> float:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step_no)
        # shift_labels: HF would otherwise shift `labels` itself and score T-1 tokens;
        # this way it scores exactly the T targets the other two do.
        out = self.model(input_ids=batch.tokens, labels=batch.labels, shift_labels=batch.labels, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return out.loss.item()


def model_config(args):
    from cptron.models.config import ModelConfig

    return ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                       ffn_hidden_dim=args.ffn_hidden_dim, vocab_size=args.vocab, pad_vocab_to_multiple_of=1,
                       max_seq_len=args.seq_len, rope_theta=500000.0)


# ------------------------------------------------------------ measurement

def timed(step: Callable, batch) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = step(batch)
    return time.perf_counter() - t0, loss


def profile_step(contender, batch, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        contender.step(batch)
    print(f"\nprofile of one {contender.name} step (top {top} operators by self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=44))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--n-heads", type=int, default=6)
    ap.add_argument("--n-kv-heads", type=int, default=2)
    ap.add_argument("--ffn-hidden-dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="sequences per step (one micro batch)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    ap.add_argument("--rounds", type=int, default=15, help="timed steps per contender")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--optim", choices=("auto", "fused", "foreach", "for_loop"), default="auto",
                    help="the trainer's optim.implementation; the baselines use the kernel it resolves to")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each block of cptron (parallel.compile) and of the bare loop; HF stays eager")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    ap.add_argument("--profile", action="store_true", help="also profile one cptron and one HF step")
    ap.add_argument("--profile-top", type=int, default=18)
    args = ap.parse_args(argv)
    for name, low in (("warmup", 0), ("rounds", 1), ("batch", 1), ("seq_len", 2)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected an integer >= {low}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    import transformers

    with tempfile.TemporaryDirectory(prefix="cptron-train-step-") as run_dir:
        cptron = CptronStep(args, run_dir)
        bare = BareStep(args, cptron)
        hf = HFStep(args, cptron)
        contenders = [cptron, bare, hf]
        mc = cptron.trainer.model_cfg
        tokens_per_step = args.batch * args.seq_len
        kernel = "fused" if cptron.adamw_kernel["fused"] else "foreach" if cptron.adamw_kernel["foreach"] \
            else "for_loop"
        print(f"torch {torch.__version__}, transformers {transformers.__version__}, {threads} torch threads "
              f"({available_cores()} cores available), fp32, one process")
        print(f"model: {mc.num_params():,} params = dim {mc.dim}, {mc.n_layers} layers, heads {mc.n_heads}/"
              f"{mc.kv_heads} kv, ffn {mc.ffn_hidden_dim}, vocab {mc.vocab_size} (untied)")
        print(f"step: {args.batch} x {args.seq_len} = {tokens_per_step:,} tokens, causal; AdamW {kernel} "
              f"(optim.implementation={args.optim}), clip {args.grad_clip}, lr {args.lr:g} cosine; blocks "
              f"{'compiled (cptron, bare; HF eager)' if args.compile else 'eager'}")
        print(f"timing: {args.warmup} warmup + {args.rounds} timed steps each, order rotating per round; "
              f"load average {os.getloadavg()[0]:.1f} at start")

        times: dict[str, list[float]] = {c.name: [] for c in contenders}
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for i in range(args.warmup + args.rounds):
            batch = cptron.next_batch()
            k = i % len(contenders)
            for c in contenders[k:] + contenders[:k]:
                dt, loss = timed(c.step, batch)
                first.setdefault(c.name, loss)
                last[c.name] = loss
                if i >= args.warmup:
                    times[c.name].append(dt)
        load_end = os.getloadavg()[0]

        if args.profile:
            batch = cptron.next_batch()
            for c in (cptron, hf):
                profile_step(c, batch, args.profile_top)

        med = {name: statistics.median(ts) for name, ts in times.items()}
        print()
        print(f"{'contender':<10} {'median s/step':>13} {'min':>8} {'max':>8} {'tokens/s':>10} "
              f"{'first loss':>11} {'last loss':>10}")
        for c in contenders:
            ts = times[c.name]
            print(f"{c.name:<10} {med[c.name]:>13.4f} {min(ts):>8.4f} {max(ts):>8.4f} "
                  f"{tokens_per_step / med[c.name]:>10,.0f} {first[c.name]:>11.5f} {last[c.name]:>10.5f}")
        print(f"load average {load_end:.1f} at the end of the timed steps ({available_cores()} cores): "
              f"a load above the core count means other work stretched these times")
        # The figure is the median of the per-round ratios: both steps of a pair ran
        # seconds apart, so a busy phase of this shared machine stretches both, where
        # the ratio of the medians can pair a quiet step with a busy one.
        overhead = statistics.median(a / b for a, b in zip(times["cptron"], times["bare"]))
        speedup = statistics.median(a / b for a, b in zip(times["HF"], times["cptron"]))
        print()
        print(f"overhead cptron/bare step time: {overhead:.3f} (median of {args.rounds} per-round ratios; "
              f"ratio of medians {med['cptron'] / med['bare']:.3f}, of minima "
              f"{min(times['cptron']) / min(times['bare']):.3f}), goal <= {OVERHEAD_GOAL}: "
              f"{'PASS' if overhead <= OVERHEAD_GOAL else 'MISS'}")
        print(f"speedup  HF/cptron step time:   {speedup:.3f} (median of {args.rounds} per-round ratios; "
              f"ratio of medians {med['HF'] / med['cptron']:.3f}, of minima "
              f"{min(times['HF']) / min(times['cptron']):.3f}), goal >= {HF_SPEEDUP_GOAL}: "
              f"{'PASS' if speedup >= HF_SPEEDUP_GOAL else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
