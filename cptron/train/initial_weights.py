"""The weights a run starts from: an HF model directory or any cptron checkpoint, in any layout.

Owns the architecture of the initial weights (`model_config_for_init`), what a checkpoint keeps
about its source for export (`init_source_meta`), the compatibility check, and the loading itself:
from safetensors each rank reads only its own region of each of its parameters (memory-mapped;
no rank ever holds a whole tensor it does not own), from a cptron checkpoint through DCP,
resharded, with a vocabulary padded to another multiple re-gridded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from torch import nn

from cptron import checkpoint as ckpt
from cptron.distributed import barrier, local_errors, local_shard_region, raise_on_every_rank
from cptron.errors import CheckpointError, CptronError
from cptron.hf import expected_parameters, hf_weight_map, tokenizer_files
from cptron.hf_config import cptron_to_hf_name, hf_to_cptron_name, json_type_name, model_config_from_hf
from cptron.hf_factors import dense_config, hf_embedding_factors
from cptron.models.config import ModelConfig
from cptron.train.model_state import PADDED, ModelPartsState, copy_duplicates

log = logging.getLogger(__name__)

# Fields that change parameter shapes or names: a mismatch makes the weights unusable.
_STRUCTURAL = (
    "dim",
    "n_layers",
    "n_heads",
    "kv_heads",
    "head_size",
    "ffn_hidden_dim",
    "vocab_size",
    "tie_embeddings",
    "qkv_bias",
    "embedding_rank",
    "factorize_head",
)
# Fields that change the function but not the shapes (context extension changes rope on purpose).
_BEHAVIOURAL = (
    "family",
    "norm_eps",
    "rope_theta",
    "rope_type",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_position_embeddings",
    "sliding_window",
)


def load_initial_weights(path: str | os.PathLike, model_parts: list[nn.Module], model_cfg: ModelConfig) -> None:
    """Collective: weights only, from an HF model directory (streamed: each rank reads just
    its shard of each tensor) or a cptron checkpoint (DCP), into any layout."""
    path = Path(path)
    if is_cptron_checkpoint(path):
        _load_cptron_weights(path, model_parts, model_cfg)
    elif (path / "config.json").is_file():
        _load_hf_weights(path, model_parts, model_cfg)
    else:
        raise CheckpointError(
            f"initial weights {path}: neither a cptron checkpoint ({ckpt.META_FILE}) nor "
            "an HF model directory (config.json)"
        )
    barrier()
    log.info("initial weights loaded from %s", path)


def run_tokenizer_dir(
    tokenizer: Optional[str], init_from: Optional[str], resumed: Optional[Path] = None
) -> Optional[str]:
    """The run's tokenizer directory: `training.tokenizer`, else the one beside `checkpoint.init_from`,
    else the one in the checkpoint the run resumes from; None when none of them has one."""
    return tokenizer or tokenizer_dir_of(init_from) or tokenizer_dir_of(str(resumed) if resumed else None)


def tokenizer_dir_of(path: Optional[str]) -> Optional[str]:
    """The tokenizer directory of initial weights: a cptron checkpoint's tokenizer/, or an HF
    directory holding tokenizer files; None if there is none."""
    if not path:
        return None
    p = Path(path)
    if (p / ckpt.TOKENIZER_DIR).is_dir():
        return str(p / ckpt.TOKENIZER_DIR)
    return str(p) if tokenizer_files(p) else None


def is_cptron_checkpoint(path: Path) -> bool:
    return (path / ckpt.META_FILE).is_file()


def model_config_for_init(
    path: str | os.PathLike, pad_vocab_to_multiple_of: int, factorization: Optional[ModelConfig] = None
) -> ModelConfig:
    """The architecture of the initial weights: an HF directory's config.json or a cptron
    checkpoint's cptron.json, with the run's vocabulary padding. An HF model has full embeddings:
    it takes model.embedding_rank and model.factorize_head from `factorization` (the run's model
    section), and is factorized as it loads; a cptron checkpoint keeps its own."""
    path = Path(path)
    if is_cptron_checkpoint(path):
        return ckpt.model_config_from_meta(
            ckpt.read_meta(path), path, pad_vocab_to_multiple_of=pad_vocab_to_multiple_of
        )
    if (path / "config.json").is_file():
        try:
            cfg = model_config_from_hf(json.loads((path / "config.json").read_text()), pad_vocab_to_multiple_of)
            if factorization is not None:
                cfg = dataclasses.replace(
                    cfg, embedding_rank=factorization.embedding_rank, factorize_head=factorization.factorize_head
                )
                cfg.validate()
                cfg.check_embedding_rank()
            return cfg
        except (CptronError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    raise CheckpointError(
        f"initial weights {path}: neither a cptron checkpoint ({ckpt.META_FILE}) nor an HF "
        "model directory (config.json)"
    )


def init_source_meta(path: str | os.PathLike) -> dict:
    """What a checkpoint keeps about the model it started from, for export: the HF config
    and generation config (from an HF directory or a cptron checkpoint) and the source path."""
    path = Path(path)
    if is_cptron_checkpoint(path):
        meta = ckpt.read_meta(path)
        out = {k: meta[k] for k in ("hf_config", "hf_generation_config") if meta.get(k) is not None}
        return {**out, "source": str(path)}
    out: dict[str, Any] = {"source": str(path)}
    for key, f in (("hf_config", path / "config.json"), ("hf_generation_config", path / "generation_config.json")):
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is not valid JSON: {e}") from e
        if not isinstance(data, dict):  # the export would fail on it at the end of the run
            raise CheckpointError(f"{f} holds a JSON {json_type_name(data)}: expected a JSON object")
        out[key] = data
    return out


def check_compatible(source: ModelConfig, model: ModelConfig, where: str) -> None:
    """Raise CheckpointError if the weights described by `source` cannot fill `model`
    (shapes differ); warn about differences that only change the function (rope, eps)."""
    if source.vocab_size != model.vocab_size:
        raise CheckpointError(
            f"vocabulary mismatch: {where} has vocab_size={source.vocab_size}, the model has "
            f"vocab_size={model.vocab_size} (extend the vocabulary first, or use the source's)"
        )
    for name in _STRUCTURAL:
        a, b = getattr(source, name), getattr(model, name)
        if a != b:
            raise CheckpointError(f"{where} has {name}={a!r}, the model has {name}={b!r}: the weights do not fit")
    differ = [
        f"{n}: {getattr(source, n)!r} -> {getattr(model, n)!r}"
        for n in _BEHAVIOURAL
        if getattr(source, n) != getattr(model, n)
    ]
    if differ:
        log.warning("the model differs from %s in %s (intended for e.g. context extension?)", where, "; ".join(differ))


@torch.no_grad()
def _fill(target: torch.Tensor, read: Callable[[tuple[slice, ...]], torch.Tensor], real_rows: Optional[int]) -> None:
    """Copy this rank's region of a source tensor into `target`; `read(region)` returns that
    region of the source. Rows from `real_rows` on (vocabulary padding) become zero."""
    try:
        local, region = local_shard_region(target)
    except CptronError as e:
        raise CheckpointError(f"cannot place weights into a {e}") from e
    if local.numel() == 0:
        return
    if real_rows is None:
        local.copy_(read(region))
        return
    rows = region[0]
    keep = max(0, min(rows.stop, real_rows) - rows.start)
    local[keep:].zero_()
    if keep:
        local[:keep].copy_(read((slice(rows.start, rows.start + keep), *region[1:])))


def _load_hf_weights(hf_dir: Path, parts: list[nn.Module], model_cfg: ModelConfig) -> None:
    """Each rank opens the safetensors files memory-mapped and reads only its own region
    of each of its parameters: no rank ever holds a whole tensor it does not own."""
    tied = model_cfg.tie_embeddings

    def read_all() -> ModelPartsState:
        check_compatible(
            model_config_for_init(hf_dir, model_cfg.pad_vocab_to_multiple_of, model_cfg),
            model_cfg,
            str(hf_dir / "config.json"),
        )
        try:
            files = hf_weight_map(hf_dir)
        except CptronError as e:
            raise CheckpointError(str(e)) from e
        expected = expected_parameters(dense_config(model_cfg))
        # Factorized: every rank reads the full matrices and factorizes them (deterministic, the same
        # everywhere), or reads embedding_factors.safetensors, then takes its own region.
        factors = hf_embedding_factors(hf_dir, model_cfg, files)
        for hf_name, file in files.items():  # a tensor the model has no place for is not dropped silently
            name = hf_to_cptron_name(hf_name)
            if (name is None and hf_name.endswith("rotary_emb.inv_freq")) or (tied and name == "output.weight"):
                continue
            if name not in expected:
                raise CheckpointError(f"tensor {hf_name!r} in {file} has no place in the model")
        state = ModelPartsState(parts, tied)
        with contextlib.ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for stored in state.stored_per_part():
                for fqn, target in stored.items():
                    if fqn in factors:  # coordinates padded with zero rows already
                        _fill(target, lambda region, t=factors[fqn]: t[region], None)
                        continue
                    hf_name = cptron_to_hf_name(fqn)
                    file = files.get(hf_name)
                    if file is None:
                        raise CheckpointError(f"tensor {hf_name!r} (model parameter {fqn}) is missing from {hf_dir}")
                    try:
                        if file not in handles:
                            handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                        source = handles[file].get_slice(hf_name)
                        shape = tuple(source.get_shape())
                    except Exception as e:  # safetensors raises its own error types
                        raise CheckpointError(f"reading tensor {hf_name!r} from {file} failed: {e}") from e
                    padded = fqn in PADDED
                    want = (model_cfg.vocab_size, *target.shape[1:]) if padded else tuple(target.shape)
                    if shape != want:
                        raise CheckpointError(
                            f"tensor {hf_name!r} in {file} has shape {list(shape)}, the model expects {list(want)}"
                        )
                    _fill(target, lambda region, s=source: s[region], model_cfg.vocab_size if padded else None)
        return state

    state, error = local_errors(read_all)
    raise_on_every_rank(error, error_type=CheckpointError)
    state.apply()


def _load_cptron_weights(path: Path, parts: list[nn.Module], model_cfg: ModelConfig) -> None:
    """Model weights of any cptron checkpoint via DCP (resharded). A checkpoint padded to
    another vocabulary multiple is read whole for the two vocabulary tensors only."""

    def plan():
        meta = ckpt.read_meta(path)
        check_compatible(ckpt.model_config_from_meta(meta, path), model_cfg, str(path / ckpt.META_FILE))
        stored = ckpt.tensor_metadata(path)
        state = ModelPartsState(parts, model_cfg.tie_embeddings)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # a tied embedding held by two stages of this rank
        direct: dict[str, torch.Tensor] = {}
        regrid: list[tuple[torch.Tensor, torch.Tensor]] = []
        for key, target in state.model_entries(copies).items():
            if key not in stored:
                raise CheckpointError(f"checkpoint {path} lacks {key}")
            shape, dtype = tuple(stored[key][0]), stored[key][1]
            if shape == tuple(target.shape):
                direct[key] = target
            elif (
                key[len(ckpt.MODEL_PREFIX) :] in PADDED
                and shape[1:] == tuple(target.shape[1:])
                and shape[0] >= model_cfg.vocab_size
            ):
                direct[key] = buffer = torch.empty(shape, dtype=dtype)
                regrid.append((target, buffer))
            else:
                raise CheckpointError(
                    f"checkpoint {path}: {key} has shape {list(shape)}, the model expects {list(target.shape)}"
                )
        return state, direct, regrid, copies

    planned, error = local_errors(plan)
    raise_on_every_rank(error, error_type=CheckpointError)
    state, direct, regrid, copies = planned
    ckpt.load_state(path, direct)
    for target, buffer in regrid:
        _fill(target, lambda region, b=buffer: b[region], model_cfg.vocab_size)
    copy_duplicates(copies)
    state.apply()
