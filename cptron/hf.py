"""Hugging Face <-> cptron conversion, streaming one tensor at a time.

HF → cptron reads safetensors shards lazily (memory-mapped headers, one tensor
loaded at a time) and writes a cptron DCP checkpoint (see `cptron.checkpoint`).
cptron → HF reads the DCP checkpoint one output shard at a time and writes
safetensors shards, an index, `config.json`, `generation_config.json` and the
tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(out)` loads it.

What HF tensor names and `config.json` mean in cptron terms, and which models are
supported, is `cptron.hf_config`'s. The q/k projections keep HF's half-split rotary
layout (see models/llama.py), so no row permutation happens and tensors round-trip
bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from cptron import checkpoint as ckpt
from cptron.config import config_to_dict
from cptron.errors import ConversionError
from cptron.hf_config import (
    FAMILY_TO_ARCH,
    cptron_to_hf_name,
    hf_config_from_model_config,
    hf_to_cptron_name,
    json_type_name,
    model_config_from_hf,
)
from cptron.hf_factors import (
    FACTORS,
    FACTORS_FILE,
    dense_config,
    factorized_matrices,
    hf_embedding_factors,
    materialize,
)
from cptron.models.config import ModelConfig
from cptron.models.llama import Transformer

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tensors some HF checkpoints carry that are derived, not learned.
_DERIVED_HF_TENSORS = re.compile(r"rotary_emb\.inv_freq$")
_PADDED = ("tok_embeddings.weight", "output.weight", "tok_embeddings.coordinates.weight", "output.coordinates.weight")


def tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files present in `directory` (carried in checkpoints, copied on export)."""
    return [Path(directory) / f for f in TOKENIZER_FILES if (Path(directory) / f).is_file()]


def dtype_from_name(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None or name == "auto":
        return None
    if name not in _DTYPES:
        raise ConversionError(f"dtype={name!r} is not supported: expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


# ------------------------------------------------------------------------ HF files


def hf_weight_map(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file, checking that every shard exists."""
    index = hf_dir / "model.safetensors.index.json"
    single = hf_dir / "model.safetensors"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index}: no weight_map")
        files = {name: hf_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ConversionError(f"shard {shard} named in {index.name} is missing")
        return files
    if single.is_file():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    pickled = sorted(hf_dir.glob("*.bin"))
    if pickled:  # never loaded: unpickling can run arbitrary code
        raise ConversionError(
            f"{pickled[0]} holds PyTorch .bin (pickle) weights; only safetensors is supported "
            "(re-save with save_pretrained(safe_serialization=True))"
        )
    raise ConversionError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json found")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {json_type_name(data)}: expected a JSON object")
    return data


def expected_parameters(cfg: ModelConfig) -> dict[str, torch.Size]:
    """cptron parameter name -> shape, each stored tensor once, in module order."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: p.shape for name, p in model.named_parameters()}


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e


class _ShardReader:
    """Keeps one safetensors file open at a time; tensors are requested shard by shard."""

    def __init__(self):
        self._path: Optional[Path] = None
        self._handle = None

    def get(self, path: Path, name: str) -> torch.Tensor:
        try:
            if path != self._path:
                self.close()
                self._handle = safe_open(path, framework="pt").__enter__()
                self._path = path
            return self._handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"reading tensor {name!r} from {path} failed: {e}") from e

    def close(self):
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._path = None, None


def convert_hf_to_cptron(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    pad_vocab_to_multiple_of: int = 1,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    embedding_rank: Optional[int] = None,
    factorize_head: bool = False,
) -> Path:
    """Convert an HF model directory into a cptron checkpoint directory; returns `out`. With
    `embedding_rank` the embedding (and with `factorize_head` the head) is stored factorized
    (see `hf_embedding_factors`)."""
    hf_dir, out = Path(hf_dir), Path(out)
    ckpt.check_replaceable(out, overwrite, ConversionError)
    hf_config = _read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(hf_config, pad_vocab_to_multiple_of)
    cfg = dataclasses.replace(cfg, embedding_rank=embedding_rank, factorize_head=factorize_head)
    cfg.validate()
    target_dtype = dtype_from_name(dtype)
    files = hf_weight_map(hf_dir)
    expected = expected_parameters(dense_config(cfg))

    sources: dict[str, tuple[str, Path]] = {}  # cptron name -> (hf name, file)
    for hf_name, path in files.items():
        name = hf_to_cptron_name(hf_name)
        if name == "output.weight" and cfg.tie_embeddings:
            log.info("%s: ignoring lm_head.weight because tie_word_embeddings=true", hf_dir)
            continue
        if name is None:
            if _DERIVED_HF_TENSORS.search(hf_name):
                continue
            raise ConversionError(
                f"tensor {hf_name!r} in {path.name} has no cptron counterpart for a {cfg.family} model"
            )
        if name not in expected:
            raise ConversionError(
                f"tensor {hf_name!r} in {path.name} does not fit the model in config.json "
                f"(layer index beyond num_hidden_layers or bias on a bias-free projection)"
            )
        sources[name] = (hf_name, path)
    missing = [cptron_to_hf_name(n) for n in expected if n not in sources]
    if missing:
        raise ConversionError(
            f"{hf_dir}: tensors missing from the checkpoint: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )

    # Shapes and dtypes come from the safetensors headers; nothing is loaded yet. The
    # state dict is ordered by file so that streaming opens each shard once.
    position = {name: i for i, name in enumerate(expected)}
    by_file: dict[Path, list[str]] = {}
    for name in sorted(expected, key=position.get):
        by_file.setdefault(sources[name][1], []).append(name)
    state: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open_safetensors(path) as f:
            for name in names:
                hf_name = sources[name][0]
                try:
                    sl = f.get_slice(hf_name)
                except Exception as e:
                    raise ConversionError(
                        f"tensor {hf_name!r} is not in {path} although the index names that file: {e}"
                    ) from e
                shape, src_dtype = tuple(sl.get_shape()), _safetensors_dtype(sl.get_dtype(), hf_name)
                want = tuple(expected[name])
                hf_want = (cfg.vocab_size,) + want[1:] if name in _PADDED else want
                if shape != hf_want:
                    raise ConversionError(
                        f"tensor {hf_name!r} in {path.name} has shape {list(shape)}, "
                        f"expected {list(hf_want)} from config.json"
                    )
                state[name] = torch.empty(want, dtype=target_dtype or src_dtype, device="meta")
    factors = hf_embedding_factors(hf_dir, cfg, files)
    for dense in factorized_matrices(cfg):
        dt = state.pop(dense).dtype
        for name in FACTORS[dense][:2]:
            state[name] = torch.empty(factors[name].shape, dtype=target_dtype or dt, device="meta")

    log.info(
        "converting %s (%s, %d layers, %s parameters) from %d file(s) to %s, dtype %s",
        hf_dir,
        hf_config["architectures"][0],
        cfg.n_layers,
        f"{cfg.num_params():,}",
        len(set(files.values())),
        out,
        target_dtype or "as stored",
    )
    reader = _ShardReader()
    bar = tqdm(total=len(state), desc="hf-to-cptron", unit="tensor", disable=not progress)

    def fetch(flat_key: str) -> torch.Tensor:
        name = flat_key[len(ckpt.MODEL_PREFIX) :]
        if name in factors:
            bar.update(1)
            return factors[name].to(state[name].dtype)
        hf_name, path = sources[name]
        t = reader.get(path, hf_name).to(state[name].dtype)
        if name in _PADDED and cfg.padded_vocab_size > cfg.vocab_size:
            padded = torch.zeros(state[name].shape, dtype=t.dtype)
            padded[: cfg.vocab_size] = t
            t = padded
        bar.update(1)
        return t.contiguous()

    gen_path = hf_dir / "generation_config.json"
    meta = {
        "model": config_to_dict(cfg),
        "step": 0,
        "source": str(hf_dir),
        "hf_config": hf_config,
        "hf_generation_config": _read_json(gen_path) if gen_path.is_file() else None,
    }
    try:
        ckpt.write_checkpoint(
            out, {"model": state}, meta, fetch=fetch, tokenizer_files=tokenizer_files(hf_dir), overwrite=overwrite
        )
    finally:
        reader.close()
        bar.close()
    return out


def _safetensors_dtype(code: str, name: str) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    if code not in table:
        raise ConversionError(f"tensor {name!r} has dtype {code}: expected a floating-point tensor")
    return table[code]


# ------------------------------------------------------------------- cptron -> HF


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"size {text!r} is invalid: expected e.g. 5GB, 500MB or a byte count")
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


def _plan_shards(items: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in items:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def convert_cptron_to_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    dtype: Optional[str] = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export a cptron checkpoint directory as an HF model directory; returns `out`."""
    src, out = Path(checkpoint), Path(out)
    meta = ckpt.read_meta(src)
    cfg = ckpt.model_config_from_meta(meta, src)
    stored = ckpt.tensor_metadata(src)
    target_dtype = dtype_from_name(dtype)
    for name, shape in expected_parameters(cfg).items():
        key = ckpt.MODEL_PREFIX + name
        if key not in stored:
            raise ConversionError(f"checkpoint {src} lacks tensor {key!r}")
        if tuple(stored[key][0]) != tuple(shape):
            raise ConversionError(
                f"checkpoint {src}: tensor {key!r} has shape {list(stored[key][0])}, "
                f"expected {list(shape)} from its model config"
            )
    # Factorized matrices are exported materialized (P @ B), as transformers expects them.
    factorized = factorized_matrices(cfg)
    dense_shapes = expected_parameters(dense_config(cfg))
    sources = {n: list(FACTORS[n][:2]) if n in factorized else [n] for n in dense_shapes}
    items = []
    for name, keys in sources.items():
        shape = dense_shapes[name]
        rows = cfg.vocab_size if name in _PADDED else shape[0]
        dt = target_dtype or stored[ckpt.MODEL_PREFIX + keys[0]][1]
        items.append((name, rows * (math.prod(shape) // max(shape[0], 1)) * dt.itemsize))
    shards = _plan_shards(items, parse_size(max_shard_size))
    log.info(
        "exporting %s (%s, %d layers) to %s as %s in %d shard(s)",
        src,
        FAMILY_TO_ARCH[cfg.family],
        cfg.n_layers,
        out,
        target_dtype or "stored dtype",
        len(shards),
    )

    ckpt.check_replaceable(out, overwrite, ConversionError)
    tmp, _ = ckpt.side_dirs(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    out_dtypes = set()
    weight_map = {}
    factors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(items), desc="cptron-to-hf", unit="tensor", disable=not progress)
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        state = {
            k: torch.empty(stored[ckpt.MODEL_PREFIX + k][0], dtype=stored[ckpt.MODEL_PREFIX + k][1])
            for n in group
            for k in sources[n]
        }
        ckpt.load_state(src, {"model": state})
        tensors = {}
        for n in group:
            t = state.pop(n) if n not in factorized else materialize(state, n, cfg.vocab_size, factors)
            if n in _PADDED:
                t = t[: cfg.vocab_size]
            t = t.to(target_dtype) if target_dtype is not None else t
            out_dtypes.add(t.dtype)
            tensors[cptron_to_hf_name(n)] = t.contiguous()
            weight_map[cptron_to_hf_name(n)] = fname
            bar.update(1)
        save_file(tensors, tmp / fname, metadata={"format": "pt"})
        del tensors
    bar.close()
    if factors:  # re-importing at the same rank then starts from these factors exactly, not from an SVD
        save_file(factors, tmp / FACTORS_FILE, metadata={"format": "pt", "rank": str(cfg.embedding_rank)})
    if len(shards) > 1:
        total = sum(b for _, b in items)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    export_dtype = out_dtypes.pop() if len(out_dtypes) == 1 else None
    hf_cfg = hf_config_from_model_config(cfg, meta.get("hf_config"), export_dtype)
    hf_cfg.save_pretrained(tmp)
    _write_generation_config(tmp, hf_cfg, meta.get("hf_generation_config"))
    tok_dir = src / ckpt.TOKENIZER_DIR
    if tok_dir.is_dir():
        for f in tok_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
    ckpt.replace_dir(tmp, out)
    return out


def _write_generation_config(out: Path, hf_cfg, original: Optional[dict]) -> None:
    from transformers import GenerationConfig  # deferred: see hf_config._with_transformers_defaults

    if original:
        gen = GenerationConfig.from_dict({k: v for k, v in original.items() if k != "transformers_version"})
    else:
        gen = GenerationConfig.from_model_config(hf_cfg)
    gen.save_pretrained(out)


class ExportComparison(NamedTuple):
    """What `convert verify` measures on an export."""

    diff: float
    """Largest |logit difference| against the checkpoint rounded to the export's dtypes (what is checked)."""
    rounding: float
    """Largest |logit difference| against the checkpoint as stored: what rounding to the export dtype costs."""
    dtypes: list[str]
    """The dtypes of the exported tensors."""


def export_dtypes(hf_dir: Path) -> dict[str, torch.dtype]:
    """HF tensor name -> dtype as stored in the safetensors headers (nothing is loaded); refuses .bin weights."""
    dtypes = {}
    for path, names in _names_by_file(hf_weight_map(hf_dir)).items():
        with _open_safetensors(path) as f:
            for name in names:
                try:
                    code = f.get_slice(name).get_dtype()
                except Exception as e:  # safetensors raises its own error types
                    raise ConversionError(f"tensor {name!r} is not in {path} although the index names it: {e}") from e
                dtypes[name] = _safetensors_dtype(code, name)
    return dtypes


def _names_by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    return by_file


@torch.no_grad()
def compare_export(
    checkpoint: str | os.PathLike, hf_dir: str | os.PathLike, batch_size: int = 2, seq_len: int = 64, seed: int = 0
) -> ExportComparison:
    """cptron's and transformers' float32 logits for the same random tokens (the real vocabulary only).

    Both models run in float32. The export stores each tensor in its own dtype (e.g. bf16 after
    `--dtype bfloat16`), so the checkpoint's weights are rounded to those dtypes, exactly as the export
    rounds them, before the checked comparison: what remains is float32 arithmetic only, whatever the
    export dtype, while a wrong tensor still moves the logits by about their own size."""
    from transformers import AutoModelForCausalLM  # deferred: see hf_config._with_transformers_defaults

    hf_dir = Path(hf_dir)
    dtypes = export_dtypes(hf_dir)  # before transformers sees the directory: refuses pickle weights
    model = ckpt.load_model(checkpoint).float().eval()
    # use_safetensors: never fall back to unpickling a .bin that lies beside the safetensors files
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, use_safetensors=True).float().eval()
    vocab = model.cfg.vocab_size
    if hf_model.config.vocab_size != vocab:
        raise ConversionError(
            f"{hf_dir} has vocab_size {hf_model.config.vocab_size}, checkpoint {checkpoint} has {vocab}"
        )
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    theirs = hf_model(tokens).logits
    rounding = (model(tokens)[..., :vocab] - theirs).abs().max().item()
    for name, p in model.named_parameters():
        # Factors have no HF tensor of their own: the export rounds their product, not them.
        if name.endswith((".coordinates.weight", ".basis.weight")):
            continue
        dtype = dtypes.get(cptron_to_hf_name(name))
        if dtype is not None and dtype != p.dtype:
            p.copy_(p.to(dtype))
    diff = (model(tokens)[..., :vocab] - theirs).abs().max().item()
    return ExportComparison(diff, rounding, sorted({str(d).removeprefix("torch.") for d in dtypes.values()}))


def compare_with_transformers(
    checkpoint: str | os.PathLike, hf_dir: str | os.PathLike, batch_size: int = 2, seq_len: int = 64, seed: int = 0
) -> float:
    """Largest absolute difference between cptron's and transformers' float32 logits, with the
    checkpoint's weights rounded to the export's dtypes (see `compare_export`)."""
    return compare_export(checkpoint, hf_dir, batch_size=batch_size, seq_len=seq_len, seed=seed).diff
