"""The main job: a small, real continual-pretraining run on CPU, through the `cptron` CLI.

1. Trains a byte-level BPE tokenizer (4096 tokens) on the shipped Bible verses
   (English + German, data/bible).
2. `cptron data tokenize`: each language into Megatron .bin/.idx shards.
3. `cptron train configs/train/quickstart-base.yaml`: pretrains a small
   Llama-3-style model on English only: the "pretrained base".
4. `cptron train configs/train/quickstart-cpt.yaml`: continual pretraining of
   that base on German with 25% English replay (10% in the last 20% of steps),
   the LR re-warmed, held-out English and German evaluated every 50 steps.
5. `cptron convert cptron-to-hf` and `cptron convert verify`: the result as a
   Hugging Face model whose logits transformers reproduces.

It prints the held-out losses before and after continual pretraining. About
2-3 minutes on 2 CPU cores. Extra arguments go to both `cptron train` calls,
e.g. `--parallel.dp_shard 2` under torchrun, or `--training.steps 50`.

Usage: python examples/quickstart.py [--workdir runs/quickstart] [--steps N] [cptron train overrides...]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> None:
    print("\n$ cptron " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "cptron.cli", *args], check=True, cwd=REPO)


def eval_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "eval":
            out[row["step"]] = {k.removeprefix("val/"): v for k, v in row.items() if k.startswith("val/")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/quickstart", help="where everything is written (replaced)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of each training stage")
    args, train_overrides = ap.parse_known_args()
    work = (REPO / args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    t0 = time.time()

    from cptron.testing.fixtures import bible_text, train_bpe_tokenizer

    tok = train_bpe_tokenizer(work / "tokenizer", vocab_size=4096)
    print(f"tokenizer: byte-level BPE with {len(tok)} tokens, trained on "
          f"{len(bible_text('en')) + len(bible_text('de'))} shipped Bible verses")
    for lang, text in (("en", "web.txt"), ("de", "elberfelder.txt")):
        cli("data", "tokenize", f"configs/data/bible-{lang}.yaml", "--tokenizer", str(work / "tokenizer/tokenizer.json"),
            "--output_prefix", str(work / "data" / lang / "bible"), "--progress", "false")

    common = ["--training.steps", str(args.steps), "--metrics.progress_bar", "off"]
    base_run, cpt_run = work / "base", work / "cpt"
    cli("train", _preset(work, "quickstart-base.yaml"), "--training.run_dir", str(base_run),
        "--training.tokenizer", str(work / "tokenizer"), *common, *train_overrides)
    base_ckpt = base_run / "checkpoints" / f"step-{args.steps:08d}"
    cli("train", _preset(work, "quickstart-cpt.yaml"), "--training.run_dir", str(cpt_run),
        "--checkpoint.init_from", str(base_ckpt), *common, *train_overrides)

    final = cpt_run / "checkpoints" / f"step-{args.steps:08d}"
    cli("convert", "cptron-to-hf", "--input", str(final), "--output", str(work / "hf"), "--progress", "false")
    cli("convert", "verify", "--checkpoint", str(final), "--hf", str(work / "hf"))

    base_eval, cpt_eval = eval_losses(base_run), eval_losses(cpt_run)
    print("\nheld-out loss (nats/token)")
    print(f"  English pretraining, step {max(base_eval):4d}: en {base_eval[max(base_eval)]['en']:.3f}")
    for step, losses in sorted(cpt_eval.items()):
        print(f"  continual pretraining, step {step:4d}: en {losses['en']:.3f}  de {losses['de']:.3f}"
              + ("   (the base, before CPT)" if step == 0 else ""))
    print(f"\ndone in {time.time() - t0:.0f}s; Hugging Face model at {work / 'hf'}")
    return 0


def _preset(work: Path, name: str) -> str:
    """configs/train/<name> with its shard directories moved into this workdir (the
    presets point at runs/quickstart/data)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/train" / name).read_text())
    for lang, src in cfg["data"]["sources"].items():
        src["paths"] = [str(work / "data" / lang)]
    out = work / name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(out)


if __name__ == "__main__":
    sys.exit(main())
