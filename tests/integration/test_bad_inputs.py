"""The bad-input sweep as a regression suite: each class of bad input, given to the real CLI as a user
would, ends with exit 2 and one line that names the thing at fault, never a Python traceback, and
leaves every file that was there byte-identical (a planted payload never runs).

The fixtures are one small trained run (two checkpoints), its HF export, and Megatron shards; each
case copies what it damages into a directory of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cptron.data.indexed_writer import IndexedDatasetWriter
from cptron.testing.fixtures import bible_text, train_bpe_tokenizer

pytestmark = pytest.mark.slow

VOCAB = 500
ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "cptron.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def write_shards(prefix: Path, fingerprint: str, n_docs: int = 60, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, vocab_size=VOCAB, tokenizer_fingerprint=fingerprint) as w:
        for _ in range(n_docs):
            w.add_document(np.append(rng.integers(3, VOCAB, size=int(rng.integers(5, 40))), 2))


def train_config(data: dict, **training) -> dict:
    return {
        "model": {"preset": "tiny", "vocab_size": VOCAB, "pad_vocab_to_multiple_of": 64, "max_seq_len": 64},
        "training": {
            "steps": 2,
            "global_batch_size": 4,
            "micro_batch_size": 2,
            "seq_len": 32,
            "device": "cpu",
            "eval_at_start": False,
            **training,
        },
        "data": data,
        "checkpoint": {"interval": 1, "keep_last": 0},
        "metrics": {"progress_bar": "off"},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    write_shards(root / "shards" / "a" / "part", "fingerprint-of-tokenizer-A")
    write_shards(root / "shards" / "b" / "part", "fingerprint-of-tokenizer-B", seed=1)
    (root / "train.yaml").write_text(
        yaml.safe_dump(train_config({"sources": {"a": {"paths": [str(root / "shards" / "a")]}}}))
    )
    done = cli("train", "train.yaml", "--training.run_dir", "run", cwd=root)
    assert done.returncode == 0, done.stderr
    ckpt = root / "run" / "checkpoints" / "step-00000002"
    export = cli("convert", "cptron-to-hf", "--input", str(ckpt), "--output", "hf", cwd=root)
    assert export.returncode == 0, export.stderr
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class Payload:
    """Unpickling this creates `marker`: proof that a file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- the cases: (argv, what the line names)


def small_tokenizer(out: Path) -> Path:
    train_bpe_tokenizer(out, vocab_size=300, texts=bible_text("en", 200))
    return out


def train(world: Path, run_dir: Path, *options: str) -> list[str]:
    """`cptron train` on the sweep's config in `run_dir`, with `options`."""
    return ["train", str(world / "train.yaml"), "--training.run_dir", str(run_dir), *options]


def case_missing_config(world, d):
    return ["train", str(d / "nope.yaml")], "nope.yaml"


def case_malformed_yaml(world, d):
    (d / "bad.yaml").write_text("training: {steps: [1, 2\n")
    return ["train", str(d / "bad.yaml")], "bad.yaml"


def case_misspelt_option(world, d):
    return ["train", str(world / "train.yaml"), "--training.stepz", "3"], "training.stepz"


def case_value_of_the_wrong_type(world, d):
    return ["train", str(world / "train.yaml"), "--training.steps", "many"], "training.steps"


def case_impossible_model(world, d):
    return ["train", str(world / "train.yaml"), "--model.n_kv_heads", "3"], "model.n_kv_heads=3"


def case_init_from_missing(world, d):
    return ["train", str(world / "train.yaml"), "--checkpoint.init_from", str(d / "nothing")], "checkpoint.init_from"


def case_data_path_missing(world, d):
    return train(world, d / "run", "--data.sources", f"{{x: {{paths: [{d / 'no-shards'}]}}}}"), "no-shards"


def case_config_json_not_an_object(world, d):
    shutil.copytree(world / "hf", d / "hf")
    (d / "hf" / "config.json").write_text("[1, 2, 3]")
    return ["convert", "hf-to-cptron", "--input", str(d / "hf"), "--output", str(d / "out")], "config.json"


def case_pickle_weights_to_verify(world, d):
    shutil.copytree(world / "hf", d / "hf")
    for f in (d / "hf").glob("*.safetensors"):
        f.unlink()
    with open(d / "hf" / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(d / "RAN"), f)
    ckpt = world / "run" / "checkpoints" / "step-00000002"
    return ["convert", "verify", "--checkpoint", str(ckpt), "--hf", str(d / "hf")], "pytorch_model.bin"


def case_planted_metadata_on_export(world, d):
    shutil.copytree(world / "run" / "checkpoints" / "step-00000002", d / "ckpt")
    with open(d / "ckpt" / ".metadata", "wb") as f:
        pickle.dump(Payload(d / "RAN"), f)
    return ["convert", "cptron-to-hf", "--input", str(d / "ckpt"), "--output", str(d / "out")], ".metadata"


def case_planted_metadata_on_resume(world, d):
    shutil.copytree(world / "run", d / "run")
    with open(d / "run" / "checkpoints" / "step-00000002" / ".metadata", "wb") as f:
        pickle.dump(Payload(d / "RAN"), f)
    # The same training.steps: a resume loads the checkpoint even when nothing is left to train
    # (more steps would change the cosine schedule's past, which is refused before any load).
    return train(world, d / "run"), ".metadata"


def case_truncated_checkpoint_on_resume(world, d):
    shutil.copytree(world / "run", d / "run")
    data = sorted((d / "run" / "checkpoints" / "step-00000002").glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:100])
    return train(world, d / "run"), "checkpoint.load_step=1"


def case_resume_disabled_over_checkpoints(world, d):
    shutil.copytree(world / "run", d / "run")
    return train(world, d / "run", "--training.steps", "3", "--checkpoint.resume", "false"), "checkpoint.resume=false"


def case_sources_of_two_tokenizers(world, d):
    sources = f"{{a: {{paths: [{world / 'shards' / 'a'}]}}, b: {{paths: [{world / 'shards' / 'b'}]}}}}"
    return train(world, d / "run", "--data.sources", sources), str(Path("shards") / "b" / "part")


def case_sidecar_understates_the_largest_id(world, d):
    shutil.copytree(world / "shards" / "a", d / "a")
    sidecar = next((d / "a").glob("*.json"))
    meta = json.loads(sidecar.read_text())
    meta["max_token_id"] = 10
    sidecar.write_text(json.dumps(meta))
    return train(
        world, d / "run", "--model.vocab_size", "100", "--data.sources", f"{{a: {{paths: [{d / 'a'}]}}}}"
    ), "vocab_size"


def case_truncated_index(world, d):
    shutil.copytree(world / "shards" / "a", d / "a")
    idx = next((d / "a").glob("*.idx"))
    idx.write_bytes(idx.read_bytes()[:40])
    return train(world, d / "run", "--data.sources", f"{{a: {{paths: [{d / 'a'}]}}}}"), ".idx"


def case_run_dir_in_use(world, d):
    (d / "run").mkdir()
    # A live holder: a run on another node that refreshed its lock just now.
    lock = {"host": "node-7", "pid": 4242, "started": time.time() - 60, "refreshed": time.time()}
    (d / "run" / "run.lock").write_text(json.dumps(lock))
    return train(world, d / "run"), "run.lock"


def case_tokenize_overwrite_with_empty_input(world, d):
    shutil.copytree(world / "shards" / "a", d / "a")
    (d / "empty.jsonl").write_text("")
    tok = small_tokenizer(d / "tok")
    return [
        "data",
        "tokenize",
        "--inputs",
        str(d / "empty.jsonl"),
        "--tokenizer",
        str(tok),
        "--output_prefix",
        str(d / "a" / "part"),
        "--overwrite",
    ], "empty.jsonl"


def case_tokenize_missing_text_field(world, d):
    (d / "docs.jsonl").write_text(json.dumps({"body": "no text field here"}) + "\n")
    tok = small_tokenizer(d / "tok")
    return [
        "data",
        "tokenize",
        "--inputs",
        str(d / "docs.jsonl"),
        "--tokenizer",
        str(tok),
        "--output_prefix",
        str(d / "out" / "part"),
    ], "text"


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_changes_nothing(world, tmp_path, case):
    before_world = snapshot(world)
    argv, names = case(world, tmp_path)
    before = snapshot(tmp_path)
    out = cli(*argv, cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("cptron "), out.stderr[-3000:]
    assert names in errors[0], errors[0]
    assert not (tmp_path / "RAN").exists(), "a planted payload ran"
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that was there changed or vanished"
    assert {k: v for k, v in snapshot(world).items() if k in before_world} == before_world
