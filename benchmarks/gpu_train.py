"""Tokens/s, MFU and peak memory of cptron's Trainer on one GPU against a plain transformers loop.

    python benchmarks/gpu_train.py [--preset llama3.2-1b] [--seq-len 4096] [--micro-batch 1] [--accum 2]
                                   [--warmup 3] [--steps 8] [--configs compile,compile+docs,hf,eager]
    python benchmarks/gpu_train.py --dry-run [--configs all]   # no GPU: check torch's APIs, validate the configs
    python benchmarks/gpu_train.py --device cpu --preset tiny --seq-len 64 --warmup 1 --steps 2   # code path on CPU

Usually started by benchmarks/gpu_train.sh (at most 8 minutes: `--budget`). It first prints
the device and the torch/CUDA versions and checks that the installed torch has every torch
API cptron uses (`cptron.torch_apis`: it stops there, naming each missing one). Then each
configuration runs in its own child process (a fresh allocator, compile cache and CUDA
context; an out-of-memory in one does not take the others down) and trains the preset's
shape from random initialization on random tokens held in memory (no network, no files):

- cptron configurations: `Trainer.train_step` per optimizer step, as `Trainer.run` calls it,
  in bf16 mixed precision (fp32 master weights, fused AdamW). `eager`/`compile`
  (`parallel.compile`) train plain causal windows (SDPA's flash kernel); `+docs` packs
  documents of random lengths (`--doc-len` mean) with document masking on, where
  `training.attention=auto` picks FlexAttention on CUDA; `compile+docs-sdpa` forces SDPA's
  boolean mask for comparison; `+ac` adds full activation checkpointing. With one GPU FSDP2
  only casts the weights to bf16 and keeps them gathered (`fsdp_reshard_after_forward=false`).
- `hf`, the baseline: transformers' `LlamaForCausalLM` of the same shape with SDPA attention,
  fp32 weights under bf16 autocast (what the HF Trainer does with bf16=True), fused AdamW,
  the same batch and gradient accumulation, gradient clipping, in a plain loop.

The first `--warmup` steps (compilation happens in the first) are not timed; then `--steps`
steps are, each between two `cuda.synchronize()` calls; the median counts. MFU is the
trainer's (`cptron.train.metrics`): tokens/s x FLOPs per token / the device's dense bf16 peak,
FLOPs per token = 6·N + 12·L·d·T (N without the input embedding, attention counted in full:
no causal halving and no discount for document masking; the H100 SXM peak is 989.5 TFLOP/s).
The table gives each configuration's tokens/s against `hf` and against its unmasked twin; the
best MFU is compared with the goal last.
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
from dataclasses import dataclass
from typing import Optional

MFU_GOAL = 0.55
RESULT_TAG = "GPU_TRAIN_RESULT "
START = time.perf_counter()


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration."""

    framework: str  # cptron or hf
    compile: bool = False
    ac: str = "none"
    docs: bool = False
    attention: str = "auto"
    unmasked: Optional[str] = None  # the configuration that differs only by document masking


CONFIGS = {
    "eager": Setup("cptron"),
    "eager+ac": Setup("cptron", ac="full"),
    "compile": Setup("cptron", compile=True),
    "compile+ac": Setup("cptron", compile=True, ac="full"),
    "compile+docs": Setup("cptron", compile=True, docs=True, unmasked="compile"),
    "eager+docs": Setup("cptron", docs=True, unmasked="eager"),
    "compile+docs-sdpa": Setup("cptron", compile=True, docs=True, attention="sdpa", unmasked="compile"),
    "hf": Setup("hf"),
}
# Run order = priority: what the budget must not starve comes first.
DEFAULT_CONFIGS = "compile,compile+docs,hf,eager"


def train_config(args, name: str, run_dir: str):
    """The JobConfig of one cptron configuration (validated by the Trainer, or by --dry-run)."""
    from cptron.models.config import model_config_from_preset
    from cptron.parallel.dims import ParallelConfig
    from cptron.train.checkpointer import CheckpointConfig
    from cptron.train.config import JobConfig, TrainingConfig
    from cptron.train.lr import LRConfig
    from cptron.train.metrics import MetricsConfig
    from cptron.train.optim import OptimizerConfig

    s = CONFIGS[name]
    overrides = {} if args.n_layers is None else {"n_layers": args.n_layers}
    model = model_config_from_preset(args.preset, **overrides)
    model.max_seq_len = max(model.max_seq_len, args.seq_len)
    return JobConfig(
        model=model,
        training=TrainingConfig(
            run_dir=run_dir,
            steps=args.warmup + args.steps,
            global_batch_size=args.micro_batch * args.accum,
            micro_batch_size=args.micro_batch,
            seq_len=args.seq_len,
            seed=0,
            device=args.device,
            document_masking=s.docs,
            attention=s.attention,
        ),
        parallel=ParallelConfig(
            compile=s.compile, activation_checkpoint=s.ac, mixed_precision=args.dtype, fsdp_reshard_after_forward=False
        ),
        optim=OptimizerConfig(lr=3e-4, grad_clip=1.0),
        lr=LRConfig(schedule="cosine", warmup_steps=1),
        checkpoint=CheckpointConfig(interval=0, save_final=False, resume=False),
        metrics=MetricsConfig(jsonl=False, progress_bar="off", peak_tflops=args.peak_tflops),
    )


def doc_ids_for(step: int, rows: int, seq_len: int, mean_len: float):
    """[rows, seq_len] document ids of packed documents with exponentially distributed lengths
    (mean `mean_len`, at least 1 token), drawn from a generator seeded by the step."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 + step)
    out = []
    for _ in range(rows):
        lengths = torch.empty(seq_len).exponential_(1.0 / mean_len, generator=g).ceil().long().clamp_min(1)
        n = int((lengths.cumsum(0) < seq_len).sum()) + 1
        out.append(torch.repeat_interleave(torch.arange(n), lengths[:n])[:seq_len])
    return torch.stack(out)


def make_source(args, cfg, tokens, docs: bool, dp_rank: int = 0, dp_size: int = 1):
    """The in-memory token source of the benchmark, with packed-document ids when `docs`."""
    from cptron.data.interface import Batch, BatchSource, InMemoryTokenSource

    inner = InMemoryTokenSource(tokens, cfg.training.seq_len, cfg.training.global_batch_size, dp_rank, dp_size)
    if not docs:
        return inner

    class PackedDocs(BatchSource):
        def __next__(self) -> Batch:
            step, b = inner.step, next(inner)
            return Batch(b.tokens, b.labels, doc_ids_for(step, b.rows, b.tokens.shape[1], args.doc_len))

        def state_dict(self):
            return inner.state_dict()

        def load_state_dict(self, state) -> None:
            inner.load_state_dict(state)

    return PackedDocs()


# ------------------------------------------------------------ one configuration (child process)


def timed_steps(args, step, next_batch, sync) -> dict:
    """Run warmup + timed steps of `step(batch) -> loss`; the median timed step counts."""
    times, losses, first = [], [], None
    for i in range(args.warmup + args.steps):
        batch = next_batch()
        sync()
        t0 = time.perf_counter()
        loss = step(batch)
        sync()
        dt = time.perf_counter() - t0
        losses.append(loss)
        first = dt if first is None else first
        if i >= args.warmup:
            times.append(dt)
    return {
        "step_s": statistics.median(times),
        "min_step_s": min(times),
        "first_step_s": first,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def run_cptron(args, name: str, tokens) -> tuple[dict, object, object, object]:
    from cptron.train.trainer import Trainer, attention_description

    with tempfile.TemporaryDirectory(prefix="cptron-gpu-train-") as run_dir:
        cfg = train_config(args, name, run_dir)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, data_factory=lambda r, n: (make_source(args, cfg, tokens, CONFIGS[name].docs, r, n), {}))
        setup_s = time.perf_counter() - t0

        def step(batch):
            loss, _, stepped = trainer.train_step(batch)
            trainer.step += 1  # as Trainer.run does; the LR schedule reads it
            if not stepped:
                raise RuntimeError(f"{name}: step {trainer.step} was skipped: non-finite loss {loss}")
            return loss

        impl = trainer.parts[0].attention_impl
        kernel = attention_description(
            cfg.training.document_masking, trainer.device, trainer.model_cfg, impl, cfg.training.attention
        )
        sync = _sync(trainer.device)
        result = timed_steps(args, step, lambda: next(trainer.data), sync)
        result.update(
            setup_s=setup_s, attention=impl if cfg.training.document_masking else "sdpa-causal", kernel=kernel
        )
        return result, trainer.model_cfg, trainer.device, trainer.param_dtype


def run_hf(args, tokens) -> tuple[dict, object, object, object]:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from cptron.hf_config import hf_config_from_model_config
    from cptron.parallel.dims import mixed_precision_dtype

    cfg = train_config(args, "eager", "unused")
    mc, t = cfg.model, cfg.training
    device = torch.device(args.device)
    dtype = mixed_precision_dtype(cfg.parallel, device)
    t0 = time.perf_counter()
    hf_cfg = hf_config_from_model_config(mc, dtype=torch.float32)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # initialize on the device: a 1B model's random init on the CPU takes minutes
        model = LlamaForCausalLM(hf_cfg).float()
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF model uses attention {model.config._attn_implementation!r}, expected sdpa")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **fused)
    source = make_source(args, cfg, tokens, docs=False)
    setup_s = time.perf_counter() - t0

    def step(batch):
        total = torch.zeros((), device=device)
        for start in range(0, batch.rows, t.micro_batch_size):
            piece = batch.slice(start, start + t.micro_batch_size).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(input_ids=piece.tokens, use_cache=False).logits
            # As transformers' own causal-LM loss: fp32 logits, mean over the tokens.
            loss = F.cross_entropy(logits.float().flatten(0, 1), piece.labels.flatten()) / args.accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total)

    result = timed_steps(args, step, lambda: next(source), _sync(device))
    result.update(setup_s=setup_s, attention="sdpa-causal", kernel=f"transformers {hf_cfg._attn_implementation}")
    return result, mc, device, dtype


def _describe_device(device) -> str:
    import torch

    if device.type != "cuda":
        return device.type
    p = torch.cuda.get_device_properties(device)
    return (
        f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
        f"{p.multi_processor_count} SMs)"
    )


def _sync(device):
    import torch

    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def run_one(args) -> dict:
    import torch

    from cptron.train.metrics import device_peak_flops, flops_per_token

    name = args.one
    vocab = train_config(args, name, "unused").model.vocab_size
    tokens = torch.randint(0, vocab, (1 << 22,), generator=torch.Generator().manual_seed(0))
    runner = run_hf if CONFIGS[name].framework == "hf" else (lambda a, t: run_cptron(a, name, t))
    result, mc, device, dtype = runner(args, tokens)
    cuda = device.type == "cuda"
    tokens_per_step = args.micro_batch * args.accum * args.seq_len
    fpt = flops_per_token(mc, args.seq_len)
    peak, peak_desc = device_peak_flops(device, dtype, override_tflops=args.peak_tflops)
    achieved = tokens_per_step / result["step_s"] * fpt
    result.update(
        config=name,
        device=_describe_device(device),
        dtype=str(dtype).removeprefix("torch."),
        params=mc.num_params(),
        tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / result["step_s"],
        tflops=achieved / 1e12,
        mfu=None if peak is None else achieved / peak,
        peak_desc=peak_desc,
        flops_per_token=fpt,
        max_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        max_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
    )
    return result


# ------------------------------------------------------------ driver


def child_argv(args, name: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--one", name]
    flags = ("preset", "n_layers", "seq_len", "micro_batch", "accum", "warmup", "steps", "device", "dtype", "doc_len")
    for flag in (*flags, "peak_tflops"):
        if (value := getattr(args, flag)) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


def run_child(args, name: str, timeout: float) -> dict:
    """One configuration in a fresh interpreter; its failure (OOM, timeout) is reported, not raised."""
    try:
        proc = subprocess.run(child_argv(args, name), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _save_log(args, name, e.stdout, e.stderr)
        return {"config": name, "error": f"timed out after {timeout:.0f} s (--timeout / --budget)"}
    _save_log(args, name, proc.stdout, proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {"config": name, "error": f"exit status {proc.returncode}", "tail": tail}


def _save_log(args, name: str, stdout, stderr) -> None:
    if not args.log_dir:
        return
    os.makedirs(args.log_dir, exist_ok=True)
    text = [s.decode(errors="replace") if isinstance(s, bytes) else (s or "") for s in (stdout, stderr)]
    with open(os.path.join(args.log_dir, f"gpu_train_{name}.log"), "w") as f:
        f.write(text[0] + "\n--- stderr\n" + text[1])


def print_environment(args) -> int:
    """Device and versions, then the torch API check; non-zero when an API is missing."""
    import torch

    from cptron.errors import CptronError
    from cptron.torch_apis import check_torch_apis

    parts = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda or 'none'}"]
    if torch.backends.cudnn.is_available():
        parts.append(f"cuDNN {torch.backends.cudnn.version()}")
    for package in ("triton", "transformers"):
        try:
            parts.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            parts.append(f"{package} not installed")
    print(", ".join(parts))
    # The device itself is described by each configuration's child: CUDA is not initialized
    # here, so this process holds no context (and no memory) on the GPU while they run.
    print(f"CUDA devices visible: {torch.cuda.device_count()}")
    print(f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}")
    try:
        n = check_torch_apis()
    except CptronError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"torch API check: all {n} torch APIs cptron uses are present")
    return 0


def dry_run(args) -> int:
    """Validate every selected configuration as the Trainer would, without a GPU."""
    import torch

    from cptron.config.parse import validate_config
    from cptron.models.flex import attention_is_masked, build_block_mask, resolve_attention
    from cptron.models.llama import positions_and_segments
    from cptron.parallel.dims import mixed_precision_dtype, resolve_parallel_dims
    from cptron.train.metrics import flops_per_token

    device = torch.device("cuda" if args.device in ("auto", "cuda") else "cpu")
    print(
        f"dry run: {len(args.configs)} configurations of preset {args.preset}, seq {args.seq_len}, "
        f"{args.micro_batch} x {args.accum} sequences per step, as they would run on {device.type}"
    )
    for name in args.configs:
        s, cfg = CONFIGS[name], train_config(args, name, "unused")
        validate_config(cfg)
        dims = resolve_parallel_dims(cfg.parallel, 1, cfg.model)
        t, mc = cfg.training, cfg.model
        masked = attention_is_masked(t.document_masking, mc.sliding_window, t.seq_len)
        attention = resolve_attention(t.attention, device.type, masked) if masked else "sdpa-causal"
        if s.framework == "hf":
            params = hf_param_count(mc)
            if params != mc.num_params():
                raise SystemExit(f"{name}: transformers builds {params:,} parameters, cptron {mc.num_params():,}")
        dtype = str(mixed_precision_dtype(cfg.parallel, device)).removeprefix("torch.")
        print(
            f"  {name:<17} {s.framework:<6} compile={s.compile!s:<5} ac={s.ac:<4} attention={attention:<11} "
            f"{dims.describe()} dtype={dtype} params={mc.num_params():,} "
            f"FLOP/token={flops_per_token(mc, args.seq_len):.4g}: valid"
        )
    if any(CONFIGS[n].docs for n in args.configs):
        rows = 16  # a sample of rows, for the averages
        segments = positions_and_segments(doc_ids_for(0, rows, args.seq_len, args.doc_len))[1]
        bm = build_block_mask(args.seq_len, "cpu", segments)
        n = bm.kv_indices.shape[-1]
        tiles = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) / rows
        print(
            f"packed documents (+docs): mean length {args.doc_len:g} tokens drawn, {segments[:, -1].float().mean():.1f}"
            f" per {args.seq_len}-token row; flex computes {tiles:.0f} of the {n * (n + 1) // 2} causal "
            f"{n}x{n} tiles ({tiles / (n * (n + 1) / 2):.0%}) per row and head"
        )
    return 0


def hf_param_count(mc) -> int:
    """Parameters of transformers' model for `mc`, built on the meta device (nothing allocated)."""
    import torch
    from transformers import LlamaForCausalLM

    from cptron.hf_config import hf_config_from_model_config

    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config_from_model_config(mc, dtype=torch.float32))
    return sum(p.numel() for p in model.parameters())


def _ratio(r: dict, other: Optional[dict]) -> str:
    if other is None or "error" in other or r is other:
        return "-"
    return f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x"


def print_table(args, results: list[dict]) -> int:
    ok = {r["config"]: r for r in results if "error" not in r}
    head = next(iter(ok.values()), {})
    if ok:
        print(
            f"\ndevice {head['device']}, {head['dtype']} mixed precision, preset {args.preset} "
            f"({head['params']:,} params), seq {args.seq_len}, {args.micro_batch} x {args.accum} sequences = "
            f"{head['tokens_per_step']:,} tokens/step, {args.warmup} warmup + {args.steps} timed steps each"
        )
        print(f"FLOP/token {head['flops_per_token']:.4g}; {head['peak_desc']}")
        for r in ok.values():
            print(f"  {r['config']}: attention {r['kernel']}")
    print()
    print(
        f"{'config':<17} {'attention':<11} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak GiB':>8} {'vs hf':>6} {'vs unmasked':>11} {'setup s':>7} {'1st step s':>10} loss first->last"
    )
    hf = ok.get("hf")
    for r in sorted(results, key=lambda r: list(CONFIGS).index(r["config"])):
        if "error" in r:
            print(f"{r['config']:<17} FAILED: {r['error']}")
            for line in r.get("tail", []):
                print(f"    | {line}")
            continue
        s = CONFIGS[r["config"]]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "n/a" if r["max_allocated_gib"] is None else f"{r['max_allocated_gib']:.1f}"
        vs_hf = "-" if s.framework == "hf" else _ratio(r, hf)
        vs_unmasked = _ratio(r, ok.get(s.unmasked)) if s.unmasked else "-"
        print(
            f"{r['config']:<17} {r['attention']:<11} {r['step_s']:>8.4f} {r['tokens_per_s']:>10,.0f} "
            f"{r['tflops']:>8.1f} {mfu:>6} {mem:>8} {vs_hf:>6} {vs_unmasked:>11} {r['setup_s']:>7.1f} "
            f"{r['first_step_s']:>10.1f} {r['first_loss']:.3f}->{r['last_loss']:.3f}"
        )
    print(
        "vs hf, vs unmasked: tokens/s ratios (> 1: faster). peak GiB: torch.cuda.max_memory_allocated. Masked "
        "configurations are credited the unmasked FLOPs (the convention), so their MFU is comparable work."
    )
    print()
    with_mfu = [r for r in ok.values() if r["mfu"] is not None and r["config"] != "hf"]
    if not with_mfu:
        print(
            f"best cptron MFU: n/a (no configuration {'ran' if not ok else 'has a known peak'}), goal >= "
            f"{100 * MFU_GOAL:.0f}%: MISS"
        )
        return 1
    best = max(with_mfu, key=lambda r: r["mfu"])
    print(
        f"best cptron MFU: {100 * best['mfu']:.1f}% ({best['config']}), goal >= {100 * MFU_GOAL:.0f}%: "
        f"{'PASS' if best['mfu'] >= MFU_GOAL else 'MISS'}"
    )
    return 0 if len(ok) == len(results) else 1


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--preset", default="llama3.2-1b", help="model preset (cptron.models.config.PRESETS)")
    ap.add_argument("--n-layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per forward pass")
    ap.add_argument("--accum", type=int, default=2, help="microbatches per optimizer step (gradient accumulation)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (the first one compiles)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--doc-len", type=float, default=1024.0, help="mean document length of the +docs configurations")
    ap.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma-separated, run in this order; 'all' or a subset of {', '.join(CONFIGS)}",
    )
    ap.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="cuda",
        help="cpu only checks the code path (no MFU without --peak-tflops)",
    )
    ap.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="parallel.mixed_precision (auto: bfloat16 on cuda, float32 on cpu)",
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense TFLOP/s per device for MFU (default: the table in cptron.train.metrics)",
    )
    ap.add_argument("--timeout", type=int, default=180, help="seconds per configuration at most")
    ap.add_argument(
        "--budget", type=int, default=450, help="seconds for the whole script; later configurations get what is left"
    )
    ap.add_argument(
        "--log-dir",
        default=os.environ.get("OUT") or None,
        help="write each configuration's full output here (default: $OUT when set)",
    )
    ap.add_argument("--dry-run", action="store_true", help="only check torch's APIs and validate the configurations")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's configuration
    args = ap.parse_args(argv)
    names = list(CONFIGS) if args.configs.strip() == "all" else [c.strip() for c in args.configs.split(",")]
    args.configs = [c for c in names if c]
    for c in args.configs:
        if c not in CONFIGS:
            ap.error(f"--configs: {c!r} is not a configuration: expected 'all' or a subset of {', '.join(CONFIGS)}")
    for name, low in (("seq_len", 1), ("micro_batch", 1), ("accum", 1), ("warmup", 1), ("steps", 1), ("doc_len", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: expected a number >= {low}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(RESULT_TAG + json.dumps(run_one(args)), flush=True)
        return 0
    if rc := print_environment(args):
        return rc
    if args.dry_run:
        return dry_run(args)
    import torch

    if args.device in ("auto", "cuda") and not torch.cuda.is_available():
        print(
            "error: no CUDA device is available (torch.cuda.is_available() is False): this benchmark needs one "
            "GPU. Use --dry-run to check the configurations, or --device cpu with a small shape to run the "
            "code path.",
            file=sys.stderr,
        )
        return 2
    if args.device == "auto":
        args.device = "cuda"
    results = []
    for name in args.configs:
        left = args.budget - (time.perf_counter() - START)
        if left < 30:
            results.append({"config": name, "error": f"not run: the --budget of {args.budget} s is spent"})
        else:
            results.append(run_child(args, name, min(args.timeout, left)))
        r = results[-1]
        status = r["error"] if "error" in r else f"{r['tokens_per_s']:,.0f} tokens/s"
        print(f"  {name}: {status} ({time.perf_counter() - START:.0f} s so far)", flush=True)
    return print_table(args, results)


if __name__ == "__main__":
    sys.exit(main())
