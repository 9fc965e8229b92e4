"""Tokens/s and MFU of cptron's Trainer on one GPU: {compile off, on} x {activation checkpointing none, full}.

    python benchmarks/gpu_train.py [--preset llama3.2-1b] [--seq-len 4096] [--micro-batch 1] [--accum 2]
                                   [--warmup 3] [--steps 6] [--configs eager,eager+ac,compile,compile+ac]
    python benchmarks/gpu_train.py --dry-run      # no GPU: build and validate the four configs, print the plan
    python benchmarks/gpu_train.py --device cpu --preset tiny --seq-len 64 --warmup 1 --steps 2   # code path on CPU

Usually started by benchmarks/gpu_train.sh. Each configuration runs in its own
child process (a fresh allocator, compile cache state and CUDA context, and an
out-of-memory in one does not take the others down) and trains the preset's
shape from random initialization on random tokens from an in-memory source (no
network, no files): `Trainer.train_step` per optimizer step, as `Trainer.run`
calls it, in bf16 mixed precision (fp32 master weights, fused AdamW). The
batch is plain causal windows (no packed documents), so SDPA can use its flash
kernel. With one GPU FSDP2 only casts the weights to bf16; it keeps them
gathered between forward and backward (`fsdp_reshard_after_forward=false`),
since with one rank resharding frees nothing that is not needed again.

The first `--warmup` steps (compilation happens in the first) are not timed;
then `--steps` steps are, each between two `cuda.synchronize()` calls; the
median counts. MFU = tokens/s x FLOPs per token / the device's dense bf16 peak
(cptron.train.metrics: 6·N + 12·L·H·Dh·T, N without the input embedding, no
causal halving; the H100 SXM peak is 989.5 TFLOP/s). The best MFU is compared
with the goal last.
"""
from __future__ import annotations

import os
import sys

# Set before torch initializes CUDA: expandable segments keep long-sequence
# activations from fragmenting the cache (the wrapper script sets it as well).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse
import json
import statistics
import subprocess
import tempfile
import time

MFU_GOAL = 0.55
RESULT_TAG = "GPU_TRAIN_RESULT "
CONFIGS = {  # name -> (parallel.compile, parallel.activation_checkpoint)
    "eager": (False, "none"),
    "eager+ac": (False, "full"),
    "compile": (True, "none"),
    "compile+ac": (True, "full"),
}


def train_config(args, name: str, run_dir: str):
    """The JobConfig of one benchmark configuration (validated by the Trainer, or by --dry-run)."""
    from cptron.models.config import model_config_from_preset
    from cptron.parallel.dims import ParallelConfig
    from cptron.train.checkpointer import CheckpointConfig
    from cptron.train.config import JobConfig, TrainingConfig
    from cptron.train.lr import LRConfig
    from cptron.train.metrics import MetricsConfig
    from cptron.train.optim import OptimizerConfig

    compile_blocks, ac = CONFIGS[name]
    overrides = {} if args.n_layers is None else {"n_layers": args.n_layers}
    model = model_config_from_preset(args.preset, **overrides)
    if model.max_seq_len < args.seq_len:
        model.max_seq_len = args.seq_len
    return JobConfig(
        model=model,
        training=TrainingConfig(run_dir=run_dir, steps=args.warmup + args.steps,
                                global_batch_size=args.micro_batch * args.accum, micro_batch_size=args.micro_batch,
                                seq_len=args.seq_len, seed=0, device=args.device),
        parallel=ParallelConfig(compile=compile_blocks, activation_checkpoint=ac, mixed_precision=args.dtype,
                                fsdp_reshard_after_forward=False),
        optim=OptimizerConfig(lr=3e-4, grad_clip=1.0),
        lr=LRConfig(schedule="cosine", warmup_steps=1),
        checkpoint=CheckpointConfig(interval=0, save_final=False, resume=False),
        metrics=MetricsConfig(jsonl=False, progress_bar="off", peak_tflops=args.peak_tflops))


# ------------------------------------------------------------ one configuration (child process)

def run_one(args) -> dict:
    import torch

    from cptron.data.interface import InMemoryTokenSource
    from cptron.train.metrics import device_peak_flops, flops_per_token
    from cptron.train.trainer import Trainer

    name = args.one
    with tempfile.TemporaryDirectory(prefix="cptron-gpu-train-") as run_dir:
        cfg = train_config(args, name, run_dir)
        vocab = cfg.model.vocab_size
        tokens = torch.randint(0, vocab, (1 << 22,), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        trainer = Trainer(cfg, data_factory=lambda dp_rank, dp_size: (
            InMemoryTokenSource(tokens, cfg.training.seq_len, cfg.training.global_batch_size, dp_rank, dp_size),
            {}))
        setup_s = time.perf_counter() - t0
        device = trainer.device
        cuda = device.type == "cuda"

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        times, losses = [], []
        first_step_s = None
        for i in range(args.warmup + args.steps):
            batch = next(trainer.data)
            sync()
            t0 = time.perf_counter()
            loss, _, stepped = trainer.train_step(batch)
            sync()
            dt = time.perf_counter() - t0
            trainer.step += 1  # as Trainer.run does; the LR schedule reads it
            if not stepped:
                raise RuntimeError(f"{name}: step {i} was skipped: non-finite loss {loss}")
            losses.append(loss)
            if i == 0:
                first_step_s = dt
            if i >= args.warmup:
                times.append(dt)
        mc = trainer.model_cfg
        tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_len
        step_s = statistics.median(times)
        fpt = flops_per_token(mc, cfg.training.seq_len)
        peak, peak_desc = device_peak_flops(device, trainer.param_dtype, override_tflops=args.peak_tflops)
        achieved = tokens_per_step / step_s * fpt
        return {
            "config": name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "dtype": str(trainer.param_dtype).removeprefix("torch."), "params": mc.num_params(),
            "tokens_per_step": tokens_per_step, "setup_s": setup_s, "first_step_s": first_step_s,
            "step_s": step_s, "min_step_s": min(times), "tokens_per_s": tokens_per_step / step_s,
            "tflops": achieved / 1e12, "mfu": None if peak is None else achieved / peak, "peak_desc": peak_desc,
            "flops_per_token": fpt,
            "max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
            "first_loss": losses[0], "last_loss": losses[-1],
        }


# ------------------------------------------------------------ driver

def child_argv(args, name: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--one", name, "--preset", args.preset,
            "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--accum", str(args.accum),
            "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device,
            "--dtype", args.dtype]
    if args.n_layers is not None:
        argv += ["--n-layers", str(args.n_layers)]
    if args.peak_tflops is not None:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


def run_child(args, name: str, timeout: float) -> dict:
    """One configuration in a fresh interpreter; its failure (OOM, timeout) is reported, not raised."""
    try:
        proc = subprocess.run(child_argv(args, name), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": name, "error": f"timed out after {timeout:.0f} s (--timeout / --budget)"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {"config": name, "error": f"exit status {proc.returncode}", "tail": tail}


def dry_run(args) -> int:
    """Build every configuration's JobConfig and check it as the Trainer would, without a GPU."""
    import torch

    from cptron.config import validate_config
    from cptron.parallel.dims import mixed_precision_dtype, resolve_parallel_dims
    from cptron.train.metrics import flops_per_token

    device = torch.device("cuda" if args.device in ("auto", "cuda") else "cpu")
    print(f"dry run: {len(args.configs)} configurations of preset {args.preset}, seq {args.seq_len}, "
          f"{args.micro_batch} x {args.accum} sequences per step, as they would run on {device.type}")
    for name in args.configs:
        cfg = train_config(args, name, "unused")
        validate_config(cfg)
        dims = resolve_parallel_dims(cfg.parallel, 1, cfg.model)
        if cfg.training.seq_len > cfg.model.max_seq_len:
            raise SystemExit(f"{name}: training.seq_len={cfg.training.seq_len} > model.max_seq_len")
        dtype = mixed_precision_dtype(cfg.parallel, device)
        print(f"  {name:<11} compile={cfg.parallel.compile!s:<5} activation_checkpoint="
              f"{cfg.parallel.activation_checkpoint:<4} {dims.describe()} dtype={str(dtype).removeprefix('torch.')} "
              f"params={cfg.model.num_params():,} FLOP/token={flops_per_token(cfg.model, args.seq_len):.4g}: valid")
    return 0


def print_table(args, results: list[dict]) -> int:
    ok = [r for r in results if "error" not in r]
    head = ok[0] if ok else {}
    if ok:
        print(f"device {head['device']}, {head['dtype']} mixed precision, preset {args.preset} "
              f"({head['params']:,} params), seq {args.seq_len}, {args.micro_batch} x {args.accum} sequences = "
              f"{head['tokens_per_step']:,} tokens/step, {args.warmup} warmup + {args.steps} timed steps each")
        print(f"FLOP/token {head['flops_per_token']:.4g}; {head['peak_desc']}")
    print()
    print(f"{'config':<11} {'compile':>7} {'AC':>4} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} "
          f"{'max alloc GiB':>13} {'setup s':>8} {'1st step s':>10} {'loss first->last':>17}")
    for r in results:
        compile_blocks, ac = CONFIGS[r["config"]]
        if "error" in r:
            print(f"{r['config']:<11} {str(compile_blocks):>7} {ac:>4}  FAILED: {r['error']}")
            for line in r.get("tail", []):
                print(f"    | {line}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["max_allocated_gib"] is None else f"{r['max_allocated_gib']:.1f}"
        print(f"{r['config']:<11} {str(compile_blocks):>7} {ac:>4} {r['step_s']:>8.4f} {r['tokens_per_s']:>10,.0f} "
              f"{r['tflops']:>8.1f} {mfu:>7} {mem:>13} {r['setup_s']:>8.1f} {r['first_step_s']:>10.1f} "
              f"{r['first_loss']:>8.3f}->{r['last_loss']:.3f}")
    print()
    with_mfu = [r for r in ok if r["mfu"] is not None]
    if not with_mfu:
        print(f"best MFU: n/a (no configuration {'ran' if not ok else 'has a known peak'}), goal >= "
              f"{100 * MFU_GOAL:.0f}%: MISS")
        return 1
    best = max(with_mfu, key=lambda r: r["mfu"])
    print(f"best MFU: {100 * best['mfu']:.1f}% ({best['config']}), goal >= {100 * MFU_GOAL:.0f}%: "
          f"{'PASS' if best['mfu'] >= MFU_GOAL else 'MISS'}")
    return 0 if len(ok) == len(results) else 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="llama3.2-1b", help="model preset (cptron.models.config.PRESETS)")
    ap.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per forward pass")
    ap.add_argument("--accum", type=int, default=2, help="microbatches per optimizer step (gradient accumulation)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (the first one compiles)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="cuda",
                    help="cpu only checks the code path (no MFU without --peak-tflops)")
    ap.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                    help="parallel.mixed_precision (auto: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense TFLOP/s per device for MFU (default: the table in cptron.train.metrics)")
    ap.add_argument("--timeout", type=int, default=150, help="seconds per configuration at most")
    ap.add_argument("--budget", type=int, default=285,
                    help="seconds for all configurations together; later ones get what is left")
    ap.add_argument("--dry-run", action="store_true", help="only build and validate the configurations")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's configuration
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        if c not in CONFIGS:
            ap.error(f"--configs: {c!r} is not a configuration: expected a subset of {', '.join(CONFIGS)}")
    for name, low in (("seq_len", 1), ("micro_batch", 1), ("accum", 1), ("warmup", 1), ("steps", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected an integer >= {low}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(RESULT_TAG + json.dumps(run_one(args)), flush=True)
        return 0
    if args.dry_run:
        return dry_run(args)
    import torch

    if args.device in ("auto", "cuda") and not torch.cuda.is_available():
        print("error: no CUDA device is available (torch.cuda.is_available() is False): this benchmark needs one "
              "GPU. Use --dry-run to check the configurations, or --device cpu with a small shape to run the "
              "code path.", file=sys.stderr)
        return 2
    if args.device == "auto":
        args.device = "cuda"
    print(f"torch {torch.__version__}, PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}")
    results = []
    t0 = time.perf_counter()
    for name in args.configs:
        left = args.budget - (time.perf_counter() - t0)
        if left < 20:
            results.append({"config": name, "error": f"not run: the --budget of {args.budget} s is spent"})
        else:
            results.append(run_child(args, name, min(args.timeout, left)))
        r = results[-1]
        status = r["error"] if "error" in r else f"{r['tokens_per_s']:,.0f} tokens/s"
        print(f"  {name}: {status} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    return print_table(args, results)


if __name__ == "__main__":
    sys.exit(main())
