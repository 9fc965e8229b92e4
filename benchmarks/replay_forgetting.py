"""Replay and re-warming on real text: how much English does continual pretraining on German forget?

    python benchmarks/replay_forgetting.py [--workdir runs/bench-replay] [--base_steps 300] [--steps 200]

The comparison of "Simple and Scalable Strategies to Continually Pre-train LLMs" (Ibrahim et al.,
2024) at the scale of the shipped text, every step through the `cptron` CLI:

1. A byte-level BPE tokenizer (2,048 tokens) trained on the shipped English and German verses, both
   tokenized into shards, and a small Llama-style base (4 layers, dim 128) pretrained on English only
   (`--base_steps` steps, cosine to 10%): the "pretrained model" with an old domain to forget.
2. Continual pretraining of that base on German for `--steps` steps each, same seed and batches:
     replay 0%, 5% and 25% of English, each with the LR re-warmed (linear warmup over 10% of the
     steps to the base's peak/1.5, cosine to 10%), and
     replay 25% with no re-warming: a constant LR equal to the base's final LR (the "(Re)warming"
     comparison: continuing where the base's schedule ended).
3. One table: English (old domain) and German (new domain) held-out loss per setting at the end and
   the change from the base (forgetting = English loss increase, learning = German loss decrease),
   read from each run's metrics.jsonl, and `cptron plot` draws the runs' curves into one PNG.

The literature's expectation is that forgetting falls monotonically with replay while the German
loss rises only slightly, and that without re-warming German is learned markedly worse. The
figures depend only on the seed; the run takes about 13 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without an install

from cptron.testing.scripts import run_cli, tokenize_bible, write_yaml

REPO = Path(__file__).resolve().parent.parent
PEAK_LR = 3.0e-3
MODEL = {
    "preset": "tiny",
    "dim": 128,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_hidden_dim": 352,
    "vocab_size": 2048,
    "pad_vocab_to_multiple_of": 64,
    "max_seq_len": 256,
}
# name -> (replay fraction of English, LR: re-warmed cosine or constant at the base's final LR)
SETTINGS = {
    "replay 0%": (0.0, "rewarm"),
    "replay 5%": (0.05, "rewarm"),
    "replay 25%": (0.25, "rewarm"),
    "replay 25%, no re-warm": (0.25, "constant"),
}


def run_config(run_dir: Path, steps: int, data: Path, langs: list[str], *, lr: dict, peak: float) -> dict:
    sources = {lang: {"paths": [str(data / lang)]} for lang in langs}
    cfg = {
        "training": {
            "run_dir": str(run_dir),
            "steps": steps,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "seq_len": 128,
            "seed": 0,
            "eval_every": max(1, steps // 4),
        },
        "optim": {"lr": peak, "weight_decay": 0.1, "grad_clip": 1.0},
        "lr": lr,
        "data": {"sources": sources, "validation": {"held_out_fraction": 0.05, "num_batches": 4}},
        "checkpoint": {"interval": steps, "keep_last": 1},
        "metrics": {"log_every": max(1, steps // 4), "progress_bar": "off"},
    }
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/bench-replay", help="where everything is written (replaced)")
    ap.add_argument("--base_steps", type=int, default=300, help="steps of English pretraining of the base")
    ap.add_argument("--steps", type=int, default=200, help="steps of continual pretraining per setting")
    args = ap.parse_args()
    for name in ("base_steps", "steps"):
        if getattr(args, name) < 4:
            ap.error(f"--{name}={getattr(args, name)}: expected an integer >= 4")
    work = (REPO / args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.time()
    from cptron.testing.fixtures import train_bpe_tokenizer
    from cptron.train.plot_runs import eval_losses

    tok = work / "tokenizer"
    train_bpe_tokenizer(tok, vocab_size=MODEL["vocab_size"])
    for lang in ("en", "de"):
        tokenize_bible(lang, tok, work / "data")
    print(f"base: {args.base_steps} steps on English", flush=True)
    base_lr = {"schedule": "cosine", "warmup_steps": max(1, args.base_steps // 10), "min_lr_ratio": 0.1}
    cfg = run_config(work / "runs" / "base", args.base_steps, work / "data", ["en"], lr=base_lr, peak=PEAK_LR)
    cfg["model"], cfg["training"]["tokenizer"] = dict(MODEL), str(tok)
    run_cli("train", write_yaml(work / "base.yaml", cfg))
    base_ckpt = work / "runs" / "base" / "checkpoints" / f"step-{args.base_steps:08d}"

    rewarm = {"schedule": "cosine", "warmup_steps": max(1, args.steps // 10), "min_lr_ratio": 0.1}
    # The base's schedule ends at 10% of its peak: continuing without re-warming keeps that LR.
    constant = {"schedule": "constant", "warmup_steps": 0}
    results: dict[str, dict[int, dict[str, float]]] = {}
    run_dirs = []
    for name, (replay, lr_kind) in SETTINGS.items():
        print(f"{name}: {args.steps} steps on German", flush=True)
        slug = name.replace("%", "").replace(",", "").replace(" ", "-")
        lr, peak = (rewarm, PEAK_LR / 1.5) if lr_kind == "rewarm" else (constant, PEAK_LR * 0.1)
        cfg = run_config(work / "runs" / slug, args.steps, work / "data", ["en", "de"], lr=lr, peak=peak)
        # English is the replayed old domain (with fraction 0 it is only a validation set).
        cfg["data"]["replay"] = {"fraction": replay, "sources": ["en"]}
        cfg["checkpoint"]["init_from"] = str(base_ckpt)
        cfg["model"] = {"pad_vocab_to_multiple_of": 64}
        run_cli("train", write_yaml(work / f"{slug}.yaml", cfg))
        results[name] = eval_losses(work / "runs" / slug)
        run_dirs.append(str(work / "runs" / slug))
    png = work / "curves.png"
    labels = ",".join(n.replace(",", "") for n in SETTINGS)
    run_cli("plot", *run_dirs, "--output", str(png), "--labels", labels)

    first = next(iter(results.values()))
    base = first[min(first)]
    print(f"\nheld-out loss (nats/token) after {args.steps} steps of continual pretraining on German")
    print(f"{'setting':<24} {'en':>7} {'forgetting':>11} {'de':>7} {'learning':>9}")
    print(f"{'base (step 0)':<24} {base['en']:7.3f} {'':>11} {base['de']:7.3f}")
    for name, evals in results.items():
        last = evals[max(evals)]
        print(
            f"{name:<24} {last['en']:7.3f} {last['en'] - base['en']:+11.3f} "
            f"{last['de']:7.3f} {base['de'] - last['de']:+9.3f}"
        )
    print(f"\ncurves: {png}\ndone in {time.time() - t0:.0f}s; runs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
