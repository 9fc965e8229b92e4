"""The main job: a small, real continual-pretraining run on CPU, through the `cptron` CLI.

The whole story of continually pretraining an English model on German, every step one command:

1. An English tokenizer (byte-level BPE, 2,048 tokens, trained on the shipped English verses,
   data/bible) and `cptron data tokenize` of the English verses into Megatron shards.
2. `cptron train configs/train/quickstart-base.yaml`: a small Llama-3-style model pretrained on
   English only: the "pretrained base", exported to Hugging Face format.
3. `cptron vocab extend`: the tokenizer extended with German tokens learned from the German
   verses (English protected: its segmentation stays the same); prints the fertility change.
4. `cptron vocab init --method subword-mean`: the base resized to the extended tokenizer, each new
   row the mean of the rows of the old pieces it replaces.
5. `cptron data tokenize` of English and German with the extended tokenizer.
6. `torchrun --nproc_per_node 2 -m cptron.cli train configs/train/quickstart-cpt.yaml`: continual
   pretraining on German with 25% English replay (10% in the last 20% of steps), the LR re-warmed,
   on 2 processes (`parallel.dp_shard=2`) through the real loader and checkpoints; held-out English
   (old domain) and German (new domain) evaluated every 50 steps. Its report (report.md) gives the
   forgetting of English and the learning of German since step 0.
7. `cptron plot` and `cptron lr-plot`: the loss curves of both stages and the CPT schedule as PNGs.
8. `cptron convert cptron-to-hf` and `convert verify`: the result as a Hugging Face model whose logits
   transformers reproduces, and transformers generates a short German and English continuation.

About 5 minutes on 2 CPU cores. Extra arguments go to both `cptron train` calls, e.g.
`--training.steps 50` (or use --steps).

Usage: python examples/quickstart.py [--workdir runs/quickstart] [--steps N] [--nproc 2] [cptron train overrides...]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

from cptron.testing.scripts import CPTRON, run_cli, tokenize_bible, torchrun, write_yaml

REPO = Path(__file__).resolve().parent.parent
# Every step prints its command (`$ cptron ...`) and streams its output.
cli = functools.partial(run_cli, echo=True, script="quickstart")


def generate(hf_dir: Path, prompts: list[str], new_tokens: int = 16) -> list[str]:
    """Greedy continuations by transformers from the exported model and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/quickstart", help="where everything is written (replaced)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of each training stage")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the continual-pretraining run (dp_shard)")
    args, train_overrides = ap.parse_known_args()
    if args.steps < 1 or args.nproc < 1:
        ap.error("--steps and --nproc must be integers >= 1")
    work = (REPO / args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    t0 = time.time()

    from cptron.testing.fixtures import BIBLE_DIR, bible_text, train_bpe_tokenizer
    from cptron.train.plot_runs import eval_losses

    en_text, de_text = str(BIBLE_DIR / "web.txt"), str(BIBLE_DIR / "elberfelder.txt")
    tok = train_bpe_tokenizer(work / "tokenizer-en", vocab_size=2048, texts=bible_text("en"))
    print(f"tokenizer: byte-level BPE with {len(tok)} tokens, trained on {len(bible_text('en'))} English verses")
    tokenize_bible("en", work / "tokenizer-en", work / "data-en", run=cli)

    warmup = str(max(1, min(20, args.steps // 10)))  # the presets' 20 steps, fewer in a shortened run
    common = ["--training.steps", str(args.steps), "--lr.warmup_steps", warmup, "--metrics.progress_bar", "off"]
    base_run, cpt_run = work / "base", work / "cpt"
    cli(
        "train",
        _preset(work, "quickstart-base.yaml", work / "data-en"),
        "--training.run_dir",
        str(base_run),
        "--training.tokenizer",
        str(work / "tokenizer-en"),
        *common,
        *train_overrides,
    )
    base_ckpt = base_run / "checkpoints" / f"step-{args.steps:08d}"
    cli("convert", "cptron-to-hf", "--input", str(base_ckpt), "--output", str(work / "base-hf"), "--progress", "false")

    cli(
        "vocab",
        "extend",
        "--base",
        str(work / "base-hf"),
        "--inputs",
        de_text,
        "--source_inputs",
        en_text,
        "--protected_inputs",
        en_text,
        "--new_tokens",
        "2048",
        "--output",
        str(work / "tokenizer-de"),
        "--progress",
        "false",
    )
    cli(
        "vocab",
        "init",
        "--base",
        str(work / "base-hf"),
        "--tokenizer",
        str(work / "tokenizer-de"),
        "--method",
        "subword-mean",
        "--output",
        str(work / "base-hf-de"),
        "--progress",
        "false",
    )
    tokenize_bible("en", work / "tokenizer-de", work / "data", run=cli)
    tokenize_bible("de", work / "tokenizer-de", work / "data", run=cli)

    cpt_cfg = _preset(work, "quickstart-cpt.yaml", work / "data")
    launcher = torchrun(args.nproc) if args.nproc > 1 else CPTRON
    cli(
        "train",
        cpt_cfg,
        "--training.run_dir",
        str(cpt_run),
        "--parallel.dp_shard",
        str(args.nproc),
        *common,
        *train_overrides,
        launcher=launcher,
    )

    cli(
        "plot",
        str(base_run),
        str(cpt_run),
        "--output",
        str(work / "curves.png"),
        "--labels",
        "English base,CPT on German",
    )
    cli("lr-plot", cpt_cfg, "--output", str(work / "lr.png"), *common[:4])
    final = cpt_run / "checkpoints" / f"step-{args.steps:08d}"
    cli("convert", "cptron-to-hf", "--input", str(final), "--output", str(work / "hf"), "--progress", "false")
    cli("convert", "verify", "--checkpoint", str(final), "--hf", str(work / "hf"))

    extension = json.loads((work / "tokenizer-de" / "vocab_extension_report.json").read_text())
    before, after = extension["target"]["before"]["fertility"], extension["target"]["after"]["fertility"]
    print(
        f"\nGerman tokens per word: {before:.2f} with the English tokenizer, {after:.2f} after `vocab extend` "
        f"({100 * (after - before) / before:+.0f}%, {extension['tokens_added']} tokens added)"
    )
    print("\n" + (cpt_run / "report.md").read_text())
    base_eval = eval_losses(base_run)
    print(f"English pretraining, step {max(base_eval)}: held-out en {base_eval[max(base_eval)]['en']:.3f} nats/token")
    print("\ngreedy continuations by transformers from the exported model:")
    prompts = ["Und Gott sprach:", "And God said,"]
    for prompt, text in zip(prompts, generate(work / "hf", prompts)):
        print(f"  {prompt!r} -> {text!r}")
    print(f"\npictures: {work / 'curves.png'}, {work / 'lr.png'}")
    print(f"done in {time.time() - t0:.0f}s; Hugging Face model at {work / 'hf'}")
    return 0


def _preset(work: Path, name: str, data: Path) -> str:
    """configs/train/<name> with its shard directories and initial weights moved into this workdir (the
    presets point at runs/quickstart)."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs/train" / name).read_text())
    for lang, src in cfg["data"]["sources"].items():
        src["paths"] = [str(data / lang)]
    if cfg.get("checkpoint", {}).get("init_from"):  # runs/quickstart/base-hf-de
        cfg["checkpoint"]["init_from"] = str(work / Path(cfg["checkpoint"]["init_from"]).name)
    return write_yaml(work / name, cfg)


if __name__ == "__main__":
    sys.exit(main())
