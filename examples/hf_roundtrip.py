"""A real Hugging Face round trip through cptron on CPU (conversion alone; the main job is quickstart.py).

1. Trains a small byte-level BPE tokenizer on the shipped Bible text (data/bible).
2. Builds a random-initialized Llama-3-style model with transformers (GQA, llama3
   rope scaling) and saves it, sharded, with the tokenizer: the "pretrained base".
3. Runs the real CLI: `cptron convert hf-to-cptron` (vocabulary padded for tensor
   parallelism), `cptron convert cptron-to-hf`, `cptron convert verify`.
4. Checks that every exported tensor is bit-identical to the base and that
   transformers loads the exported model and tokenizer.

Usage: python examples/hf_roundtrip.py [--workdir runs/hf-roundtrip]
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

from cptron.testing.fixtures import bible_text, train_bpe_tokenizer
from cptron.testing.scripts import run_cli

cli = functools.partial(run_cli, echo=True, script="hf_roundtrip")  # prints each command, exits on failure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/hf-roundtrip", help="where the models are written (replaced)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()  # the commands run from the repository root
    if work.exists():
        shutil.rmtree(work)
    base, ckpt, export = work / "hf-base", work / "cptron-ckpt", work / "hf-export"
    t0 = time.time()

    tok = train_bpe_tokenizer(base, vocab_size=1000)
    print(f"tokenizer: byte-level BPE, {len(tok)} tokens, trained on {len(bible_text('en')) + len(bible_text('de'))} "
          "shipped Bible verses (English + German)")
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(base, max_shard_size="1MB")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base model: LlamaForCausalLM, {n_params:,} parameters, saved in "
          f"{len(list(base.glob('*.safetensors')))} safetensors shards at {base}")

    cli("convert", "hf-to-cptron", "--input", str(base), "--output", str(ckpt), "--pad_vocab_to_multiple_of", "64")
    cli("convert", "cptron-to-hf", "--input", str(ckpt), "--output", str(export), "--max_shard_size", "2MB")
    cli("convert", "verify", "--checkpoint", str(ckpt), "--hf", str(export), "--seq_len", "256")

    back = transformers.AutoModelForCausalLM.from_pretrained(export)
    original, exported = model.state_dict(), back.state_dict()
    identical = set(original) == set(exported) and all(torch.equal(original[k], exported[k]) for k in original)
    tok_back = transformers.AutoTokenizer.from_pretrained(export)
    verse = bible_text("de", 1)[0]
    tok_ok = tok_back(verse)["input_ids"] == tok(verse)["input_ids"]
    print(f"\nexported tensors bit-identical to the base: {identical} ({len(original)} tensors)")
    print(f"exported tokenizer encodes like the original: {tok_ok}")
    print(f"done in {time.time() - t0:.1f}s; files under {work}")
    return 0 if identical and tok_ok else 1


if __name__ == "__main__":
    sys.exit(main())
