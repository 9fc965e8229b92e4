"""Vocabulary extension on real text: which initialization of the new embeddings continues best?

    python benchmarks/vocab_init.py [--workdir runs/bench-vocab-init] [--base_steps 300] [--steps 100]
                                    [--new_tokens 1024] [--methods random,mean,...,ofa-r16,ofa-r100]

Every step goes through the `cptron` CLI, as a user would run it:

1. A byte-level BPE tokenizer (1,024 tokens) trained on the shipped English verses only, and a
   small Llama-style base (4 layers, dim 128) pretrained on them with `cptron train`
   (`--base_steps` steps), exported to Hugging Face format: an English model whose tokenizer splits
   German badly.
2. `cptron vocab extend`: the base tokenizer extended on the shipped German verses with at most
   `--new_tokens` tokens, the English verses protected (no new token changes their segmentation,
   so the English held-out loss at step 0 measures the initialization alone); its report gives
   the fertility before and after.
3. English and German tokenized with the extended tokenizer (one set of shards for every method).
4. The word vectors the word-vector methods need, built by `cptron vocab vectors` from the shipped
   verses, as a user without downloadable vectors would: English and German monolingual vectors
   (wechsel), German token-level vectors of the extended tokenizer (focus's auxiliary space), and
   English-German vectors from the verse alignment (ofa). wechsel's bilingual dictionary is
   induced from the aligned vectors: the mutual nearest English/German words.
5. For each method, `cptron vocab init` writes the extended model, then `cptron train` continues it
   for `--steps` steps on German with 25% English replay: same seed, data, schedule and batches.
   `ofa-rR` is ofa with `--ofa_output factorized --ofa_rank R`, trained with factorized input
   embedding and LM head (`model.embedding_rank R`, `model.factorize_head`); the issue's r = 100
   and 400 are for hidden sizes of 4096, this model's is 128, so the ranks are 16 and 100.
   The held-out German and English losses at step 0 (the initialization itself) and at the end
   are read from each run's metrics.jsonl.
6. The baseline without extension: the base continued the same way on German tokenized with the
   base tokenizer.

Losses are nats per token of the extended tokenizer, comparable between methods; the last two columns
convert the German losses to nats per character (times tokens/character of the whole German
text under that tokenizer), the one figure that also compares with the unextended baseline. The
tokenizer extension sees all German verses (the held-out ones included): it shapes the token set,
not the model's weights; the word vectors see them too. Embedding parameters count the input embedding
and the LM head (both factorized for ofa-rR). Absolute figures depend on nothing but the seed; the run
takes about 15 minutes on 2 cores.
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
METHODS = ("random", "mean", "multivariate", "subword-mean", "wechsel", "focus", "ofa", "convex", "ofa-r16", "ofa-r100")
MODEL = {
    "preset": "tiny",
    "dim": 128,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "ffn_hidden_dim": 352,
    "vocab_size": 1024,
    "pad_vocab_to_multiple_of": 64,
    "max_seq_len": 256,
}


def train_config(run_dir: Path, steps: int, sources: dict[str, Path], replay: bool, eval_every: int) -> dict:
    cfg = {
        "training": {
            "run_dir": str(run_dir),
            "steps": steps,
            "global_batch_size": 16,
            "micro_batch_size": 8,
            "seq_len": 128,
            "seed": 0,
            "eval_every": eval_every,
        },
        "optim": {"lr": 2.0e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "lr": {"schedule": "cosine", "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1},
        "data": {
            "sources": {name: {"paths": [str(path)]} for name, path in sources.items()},
            "validation": {"held_out_fraction": 0.05, "num_batches": 4},
        },
        "checkpoint": {"interval": steps, "keep_last": 1},
        "metrics": {"log_every": max(1, steps // 3), "progress_bar": "off"},
    }
    if replay:
        cfg["data"]["replay"] = {"fraction": 0.25, "sources": ["en"]}
    return cfg


def tokens_per_char(tokenizer_dir: Path, text_file: Path) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    lines = text_file.read_text(encoding="utf-8").splitlines()
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(lines, add_special_tokens=False))
    return n_tokens / sum(len(line) for line in lines)


def build_vectors(work: Path, ext_tok: Path, en_text: Path, de_text: Path, methods: list[str]) -> dict[str, Path]:
    """The vector files the chosen word-vector methods read, each built by `cptron vocab vectors`."""
    out = work / "vectors"
    jobs = {}
    if any(m.startswith("ofa") or m == "wechsel" for m in methods):
        jobs["aligned"] = ("--mode", "aligned", "--inputs", f"eng={en_text},deu={de_text}")
    if "wechsel" in methods:
        jobs["en"] = ("--mode", "mono", "--inputs", str(en_text))
        jobs["de"] = ("--mode", "mono", "--inputs", str(de_text))
    if "focus" in methods:
        jobs["tokens-de"] = ("--mode", "tokens", "--tokenizer", str(ext_tok), "--inputs", str(de_text))
    paths = {}
    for name, args in jobs.items():
        paths[name] = out / f"{name}.vec"
        run_cli("vocab", "vectors", *args, "--output", str(paths[name]))
    if "wechsel" in methods:
        paths["dictionary"] = induce_dictionary(paths["aligned"], out / "dictionary-en-de.txt")
    return paths


def induce_dictionary(aligned: Path, path: Path) -> Path:
    """English-German word pairs that are each other's nearest neighbour across the aligned space."""
    from cptron.vocab.neighbours import nearest
    from cptron.vocab.vectors import load_vectors

    space = load_vectors(aligned)
    en, de = space.restrict_language("eng"), space.restrict_language("deu")
    _, en_to_de = nearest(en.vectors, de.vectors, 1)
    _, de_to_en = nearest(de.vectors, en.vectors, 1)
    pairs = [(w, de.words[j]) for i, (w, j) in enumerate(zip(en.words, en_to_de[:, 0].tolist())) if de_to_en[j, 0] == i]
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    print(f"   dictionary: {len(pairs)} mutual nearest English-German pairs, e.g. {pairs[:4]}", flush=True)
    return path


def init_arguments(method: str, vectors: dict[str, Path], de_text: Path) -> list[str]:
    """`cptron vocab init` arguments of a benchmark method beyond base, tokenizer and output."""
    if method.startswith("ofa"):
        args = ["--method", "ofa", "--multilingual_vectors", str(vectors["aligned"])]
        args += ["--source_language", "eng", "--target_language", "deu"]
        if method != "ofa":
            args += ["--ofa_output", "factorized", "--ofa_rank", method.removeprefix("ofa-r")]
        return args
    if method == "wechsel":
        return [
            "--method",
            method,
            "--source_vectors",
            str(vectors["en"]),
            "--target_vectors",
            str(vectors["de"]),
            "--dictionary",
            str(vectors["dictionary"]),
        ]
    if method == "focus":
        return ["--method", method, "--token_vectors", str(vectors["tokens-de"])]
    if method == "convex":
        return ["--method", method, "--texts", str(de_text)]
    return ["--method", method]


def embedding_params(model_dir: Path, rank: int) -> int:
    """Parameters of the input embedding plus the (untied) LM head, factorized at `rank` when > 0."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    rows, dim = config["vocab_size"], config["hidden_size"]
    rows = -(-rows // 64) * 64  # the runs pad the vocabulary to a multiple of 64
    return 2 * (rows * rank + rank * dim if rank else rows * dim)


def continue_on_german(
    work: Path, name: str, init_from: Path, data: Path, steps: int, rank: int = 0
) -> dict[int, dict[str, float]]:
    run_dir = work / "runs" / name
    cfg = train_config(run_dir, steps, {"en": data / "en", "de": data / "de"}, replay=True, eval_every=steps)
    cfg["checkpoint"]["init_from"] = str(init_from)
    cfg["model"] = {"pad_vocab_to_multiple_of": 64}
    if rank:
        cfg["model"].update(embedding_rank=rank, factorize_head=True)
    run_cli("train", write_yaml(work / f"{name}.yaml", cfg))
    from cptron.train.plot_runs import eval_losses

    return eval_losses(run_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/bench-vocab-init", help="where everything is written (replaced)")
    ap.add_argument("--base_steps", type=int, default=300, help="steps of English pretraining of the base")
    ap.add_argument("--steps", type=int, default=100, help="steps of continual pretraining per method")
    ap.add_argument("--new_tokens", type=int, default=1024, help="most tokens `cptron vocab extend` adds")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated `cptron vocab init` methods")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        ap.error(f"--methods={args.methods!r}: expected a comma-separated subset of {','.join(METHODS)}")
    for name in ("base_steps", "steps", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)}: expected an integer >= 1")
    work = (REPO / args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.time()
    from cptron.testing.fixtures import BIBLE_DIR, bible_text, train_bpe_tokenizer

    en_text, de_text = BIBLE_DIR / "web.txt", BIBLE_DIR / "elberfelder.txt"

    print(f"1. English base: BPE tokenizer ({MODEL['vocab_size']} tokens) and {args.base_steps} steps", flush=True)
    base_tok = work / "tokenizer-en"
    train_bpe_tokenizer(base_tok, vocab_size=MODEL["vocab_size"], texts=bible_text("en"))
    tokenize_bible("en", base_tok, work / "data-base")
    tokenize_bible("de", base_tok, work / "data-base")
    cfg = train_config(
        work / "runs" / "base", args.base_steps, {"en": work / "data-base" / "en"}, replay=False, eval_every=0
    )
    cfg["model"], cfg["training"]["tokenizer"] = dict(MODEL), str(base_tok)
    cfg["optim"]["lr"] = 3.0e-3
    run_cli("train", write_yaml(work / "base.yaml", cfg))
    base_hf = work / "base-hf"
    ckpt = work / "runs" / "base" / "checkpoints" / f"step-{args.base_steps:08d}"
    run_cli("convert", "cptron-to-hf", "--input", str(ckpt), "--output", str(base_hf), "--progress", "false")

    print(f"2. cptron vocab extend on German (at most {args.new_tokens} new tokens)", flush=True)
    ext_tok = work / "tokenizer-ext"
    run_cli(
        "vocab",
        "extend",
        "--base",
        str(base_hf),
        "--inputs",
        str(de_text),
        "--source_inputs",
        str(en_text),
        "--protected_inputs",
        str(en_text),
        "--new_tokens",
        str(args.new_tokens),
        "--output",
        str(ext_tok),
        print_stdout=True,
    )
    tokenize_bible("en", ext_tok, work / "data-ext")
    tokenize_bible("de", ext_tok, work / "data-ext")
    word_vector_methods = [m for m in methods if m in ("wechsel", "focus") or m.startswith("ofa")]
    if word_vector_methods:
        print("3. cptron vocab vectors: the word vectors of " + ", ".join(word_vector_methods), flush=True)
    vectors = build_vectors(work, ext_tok, en_text, de_text, word_vector_methods)

    results: dict[str, dict[int, dict[str, float]]] = {}
    per_char = {"no extension": tokens_per_char(base_tok, de_text)}
    params = {"no extension": embedding_params(base_hf, 0)}
    for method in methods:
        print(f"4. cptron vocab init, {method}, then {args.steps} steps on German + 25% English", flush=True)
        out = work / f"init-{method}"
        init = ["--base", str(base_hf), "--tokenizer", str(ext_tok), "--output", str(out), "--progress", "false"]
        run_cli("vocab", "init", *init, *init_arguments(method, vectors, de_text))
        rank = int(method.removeprefix("ofa-r")) if method.startswith("ofa-r") else 0
        results[method] = continue_on_german(work, method, out, work / "data-ext", args.steps, rank)
        per_char[method] = tokens_per_char(ext_tok, de_text)
        params[method] = embedding_params(out, rank)
    print(f"5. baseline: the base with its own tokenizer, {args.steps} steps on German + 25% English", flush=True)
    results["no extension"] = continue_on_german(work, "no-extension", base_hf, work / "data-base", args.steps)

    print(f"\nheld-out loss, nats/token at steps 0 and N={args.steps}; German also in nats/character")
    print(
        f"{'method':<14} {'de@0':>7} {'de@N':>7} {'en@0':>7} {'en@N':>7} {'de/char@0':>10} {'de/char@N':>10} "
        f"{'emb params':>11}"
    )
    for name, evals in results.items():
        first, last = evals[min(evals)], evals[max(evals)]
        print(
            f"{name:<14} {first['de']:7.3f} {last['de']:7.3f} {first['en']:7.3f} {last['en']:7.3f} "
            f"{first['de'] * per_char[name]:10.3f} {last['de'] * per_char[name]:10.3f} {params[name]:11,d}"
        )
    print(f"\ndone in {time.time() - t0:.0f}s; runs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
