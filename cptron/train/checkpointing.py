"""Training checkpoints: save and resume the model, AdamW and the trainer's state under
any parallel layout, and load the initial weights of a run.

A training checkpoint is an ordinary cptron checkpoint (see `cptron.checkpoint`), so
`cptron convert cptron-to-hf` exports it as it is:

    <run_dir>/checkpoints/step-00000100/
      .metadata, __<rank>_0.distcp   DCP tensors, each stored once with its global shape:
          model.<fqn>                           weights (tied output stored as model.tok_embeddings.weight)
          optimizer.state.<fqn>.<name>          AdamW exp_avg, exp_avg_sq, step (unless save_optimizer=false)
          optimizer.param_groups.<fqn>.<key>    hyperparameters at save time (for reference; not restored)
      cptron.json    format_version, model config, step, train_state, hf_config, hf_generation_config, source
      tokenizer/     the run's tokenizer files
      COMPLETE       written last

Keys are parameter names of the unwrapped model (`layers.3.attention.wq.weight`);
`torch.distributed.checkpoint.state_dict` removes the activation-checkpoint,
compile and FSDP wrappers. Each rank saves and loads only the keys its model parts
hold, so a checkpoint written with pp=2 loads at pp=1 and the reverse, and DCP
reshards FSDP/TP DTensors. On load the optimizer's hyperparameters (lr, betas,
weight decay) stay those of the current config; moments and step counts come from
the checkpoint.

With `async_save` the state is copied to CPU memory during `save` and written by a
background thread over a gloo group of its own; rank 0 adds the COMPLETE marker as
soon as DCP reports every rank's files durable. Until then the checkpoint is the
hidden `.step-N.incomplete` directory, which `latest()` never returns.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from cptron import checkpoint as ckpt
from cptron.config import config_to_dict
from cptron.errors import CheckpointError, ConfigError, CptronError
from cptron.hf import (cptron_to_hf_name, expected_parameters, hf_to_cptron_name, hf_weight_map,
                       model_config_from_hf, tokenizer_files)
from cptron.models.config import ModelConfig

log = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer."
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_PADDED = ("tok_embeddings.weight", "output.weight")  # rows = padded vocabulary
_TIED_ALIAS, _TIED_CANONICAL = "output.weight", "tok_embeddings.weight"
# Fields that change parameter shapes or names: a mismatch makes the weights unusable.
_STRUCTURAL = ("dim", "n_layers", "n_heads", "kv_heads", "head_size", "ffn_hidden_dim", "vocab_size",
               "tie_embeddings", "qkv_bias")
# Fields that change the function but not the shapes (context extension changes rope on purpose).
_BEHAVIOURAL = ("family", "norm_eps", "rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_max_position_embeddings", "sliding_window")


@dataclass
class CheckpointConfig:
    """Saving, resuming and the initial weights of a training run."""

    interval: int = 0
    """Save every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints and delete older ones (0: keep all); the newest is never deleted."""
    async_save: bool = False
    """Copy the state to CPU memory and write it in a background thread while training goes on (dcp.async_save)."""
    save_final: bool = True
    """Save a checkpoint after the last step."""
    folder: str = "checkpoints"
    """Directory of the checkpoints, relative to training.run_dir (or absolute)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the folder; false refuses to start if the folder holds checkpoints."""
    load_step: int = -1
    """Resume from the checkpoint of this step instead of the newest (-1: newest), e.g. to roll back past a loss spike."""
    init_from: Optional[str] = None
    """Initial weights at step 0: an HF model directory (config.json + safetensors) or a cptron checkpoint; ignored when resuming."""
    save_optimizer: bool = True
    """Store the AdamW moments and step counts (needed for an exact resume; false writes weights-only checkpoints)."""
    load_optimizer: bool = True
    """Restore the AdamW state when resuming; false starts it fresh (e.g. from a weights-only checkpoint)."""
    save_on_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """On these signals (SLURM sends SIGTERM before killing a job, or SIGUSR1 with --signal) finish the current step, save a checkpoint and exit with code 75 so the same command resumes (under torchrun: see the README for --signals-to-handle and --shutdown-timeout); the same signal again after 5 s kills at once; [] (or '' on the command line): the default handling."""

    def validate(self) -> None:
        for ok, name, expected in (
                (self.interval >= 0, "interval", "an integer >= 0"),
                (self.keep_last >= 0, "keep_last", "an integer >= 0"),
                (self.load_step >= -1, "load_step", "-1 (newest) or a step >= 0"),
                (self.load_step == -1 or self.resume, "load_step", "-1 when checkpoint.resume=false"),
                (bool(self.folder), "folder", "a directory path"),
                (self.init_from is None or Path(self.init_from).is_dir(), "init_from",
                 "an existing HF model directory or cptron checkpoint"),
                (all(isinstance(n, str) and signal_number(n) is not None for n in self.save_on_signals),
                 "save_on_signals", "a list of signal names such as SIGTERM or SIGUSR1 (not SIGKILL or SIGSTOP)")):
            if not ok:
                raise ConfigError(f"checkpoint.{name}={getattr(self, name)!r} is invalid: expected {expected}")


def signal_number(name: str) -> Optional[int]:
    """The number of the catchable signal `name` (e.g. "SIGTERM" or "TERM"), else None."""
    import signal

    name = name.upper()
    sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
        return None
    return int(sig)


# ------------------------------------------------------------------ state dicts

def _model_state(part: nn.Module, tied: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(every entry of the part's state dict, the entries stored in a checkpoint).

    Values alias the parameters (plain or DTensor), so loading into them in place
    updates the model. A tied output weight is stored once, under tok_embeddings.
    """
    full = get_model_state_dict(part)
    stored = dict(full)
    if tied and _TIED_ALIAS in stored:
        alias = stored.pop(_TIED_ALIAS)
        stored.setdefault(_TIED_CANONICAL, alias)
    return full, stored


def _stored_optimizer_keys(part: nn.Module, state: dict[str, Any], tied: bool) -> dict[str, Any]:
    """The optimizer entries under their checkpoint keys (same values): a last pipeline stage's copy
    of a tied output weight is stored as tok_embeddings.weight, as its weight is."""
    if not (tied and getattr(part, "tok_embeddings", True) is None and getattr(part, "output", None) is not None):
        return state
    out = {}
    for key, value in state.items():
        kind, _, rest = key.partition(".")
        if rest.startswith(_TIED_ALIAS + "."):
            key = f"{kind}.{_TIED_CANONICAL}{rest[len(_TIED_ALIAS):]}"
        out[key] = value
    return out


def _is_tied_key(key: str) -> bool:
    """True for the tied embedding's weight or optimizer entries, with or without the checkpoint prefix."""
    for prefix in (ckpt.MODEL_PREFIX, OPTIMIZER_PREFIX):
        key = key[len(prefix):] if key.startswith(prefix) else key
    return key == _TIED_CANONICAL or any(key.startswith(f"{kind}.{_TIED_CANONICAL}.")
                                         for kind in ("state", "param_groups"))


def _merge_entries(target: dict[str, Any], entries: dict[str, Any], copies: Optional[list] = None) -> None:
    """Add `entries` to `target`. A key already there is an error unless it is the tied embedding, which
    a rank holding both the first and the last pipeline stage has twice (equal copies): the first one is
    kept, and (for loading) `copies` receives (second, first) to copy after the first is read."""
    for key, value in entries.items():
        if key not in target:
            target[key] = value
        elif not _is_tied_key(key):
            raise CheckpointError(f"model parts of rank {_rank()} both hold {key}")
        elif copies is not None and isinstance(value, torch.Tensor) and value is not target[key]:
            copies.append((value, target[key]))


def _optimizer_state(part: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The flattened, FQN-keyed optimizer state dict; a fresh optimizer gets its state
    created first (torch does that with a zero-lr step, which needs grads to be None)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    fresh = not optimizer.state
    if fresh:
        for p in params:
            p.grad = None
    try:
        state = get_optimizer_state_dict(part, optimizer, options=_FLAT)
    finally:
        if fresh:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
    if fresh:
        # That zero-lr step counted as a step (Adam's bias correction reads the count): reset
        # it, so the live and the saved state equal a fresh optimizer's (zero moments, step 0).
        live = [st["step"] for st in optimizer.state.values() if isinstance(st.get("step"), torch.Tensor)]
        saved = [v for k, v in state.items() if k.startswith("state.") and k.endswith(".step")
                 and isinstance(v, torch.Tensor)]
        for count in live + saved:
            count.zero_()
    return state


def _stored_entries(path: Path) -> dict[str, Optional[torch.Size]]:
    """Every key of the DCP checkpoint at `path`: global shape for tensors, None otherwise."""
    md = FileSystemReader(str(path)).read_metadata()
    return {k: (v.size if isinstance(v, TensorStorageMetadata) else None) for k, v in md.state_dict_metadata.items()}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (ranks must act on one filesystem view)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _local_errors(fn: Callable[[], Any]) -> tuple[Any, Optional[str]]:
    """Run `fn`, returning (result, None) or (None, message of its CptronError)."""
    try:
        return fn(), None
    except CptronError as e:
        return None, str(e)


# ------------------------------------------------------------------ the checkpointer

class TrainCheckpointer:
    """Saves and restores training state under `<run_dir>/<cfg.folder>`; every method that
    touches checkpoints is collective (all ranks call it, in the same order)."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | os.PathLike, *, model_cfg: ModelConfig,
                 tokenizer_dir: Optional[str] = None, hf_meta: Optional[dict] = None):
        """`tokenizer_dir`: tokenizer files copied into every checkpoint; None: those of the
        checkpoint resumed from. `hf_meta`: {"hf_config": config.json dict, "hf_generation_config":
        dict or None} kept for export; None: taken from init_from, or the checkpoint resumed from."""
        cfg.validate()
        self.cfg = cfg
        self.folder = Path(run_dir) / cfg.folder
        self.model_cfg = model_cfg
        self._tokenizer_explicit = tokenizer_dir is not None
        self._tokenizer_files: list[Path] = []
        if tokenizer_dir is not None:
            self._tokenizer_files = tokenizer_files(Path(tokenizer_dir))
            if not self._tokenizer_files:
                raise CheckpointError(f"tokenizer directory {tokenizer_dir} holds no tokenizer files "
                                      "(tokenizer.json, tokenizer.model, ...)")
        unknown = sorted(set(hf_meta or {}) - {"hf_config", "hf_generation_config", "source"})
        if unknown:
            raise ValueError(f"hf_meta keys {unknown} are not known: expected hf_config, hf_generation_config, source")
        self._source_explicit = hf_meta is not None
        self._source = dict(hf_meta) if hf_meta is not None else (
            init_source_meta(cfg.init_from) if cfg.init_from else {})
        self._pending: Optional[ckpt.PendingCheckpointWrite] = None
        self._async_group = None
        self.last_save_blocking_s = 0.0
        """Seconds the last `save` held the caller (staging only, with async_save)."""

    # -------------------------------------------------------------- where to resume

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint in the folder (rank 0's view, on every rank)."""
        self.wait()
        return _from_rank0(ckpt.latest_complete_checkpoint(self.folder))

    def resume_path(self) -> Optional[Path]:
        """The checkpoint this run resumes from per the config (load_step, resume), or None.

        With resume=false and checkpoints already in the folder, raises rather than
        letting the new run overwrite and prune them."""
        if self.cfg.load_step >= 0:
            path = self.folder / ckpt.step_dir_name(self.cfg.load_step)
            _, error = _local_errors(lambda: ckpt.read_meta(path))
            ckpt.raise_on_every_rank(error and f"checkpoint.load_step={self.cfg.load_step}: {error}")
            return path
        latest = self.latest()
        if latest is not None and not self.cfg.resume:
            raise CheckpointError(f"checkpoint.resume=false, but {self.folder} already holds checkpoints (newest "
                                  f"{latest.name}) that this run would overwrite and prune: use a new run_dir or "
                                  "checkpoint.folder, delete them, or set checkpoint.resume=true")
        return latest

    # -------------------------------------------------------------- saving

    def save(self, step: int, model_parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
             train_state: dict) -> Path:
        """Collective: checkpoint `step`. `train_state` (JSON, the same on every rank) goes to
        cptron.json. Returns the checkpoint path; with async_save it becomes complete in the
        background (`wait()` makes sure)."""
        start = time.perf_counter()
        self.wait()
        if len(model_parts) != len(optimizers):
            raise ValueError(f"{len(model_parts)} model parts but {len(optimizers)} optimizers: expected one each")
        self._check_train_state(train_state)
        path = self.folder / ckpt.step_dir_name(step)
        state = self._collect(model_parts, optimizers if self.cfg.save_optimizer else None)
        meta = {"model": config_to_dict(self.model_cfg), "step": step, "train_state": train_state,
                "optimizer_saved": self.cfg.save_optimizer, "saved_by": "cptron train",
                "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
                **self._source}
        tok = list(self._tokenizer_files) or None
        if self.cfg.async_save:
            self._pending = ckpt.write_checkpoint_async(path, state, meta, tokenizer_files=tok, overwrite=True,
                                                        process_group=self._async_process_group(),
                                                        on_complete=self._prune)
        else:
            ckpt.write_checkpoint(path, state, meta, tokenizer_files=tok, overwrite=True)
            if _rank() == 0:
                self._prune(path)
            self._completed(path)
        self.last_save_blocking_s = time.perf_counter() - start
        log.info("checkpoint %s %s in %.2f s", path, "staged" if self.cfg.async_save else "written",
                 self.last_save_blocking_s)
        return path

    def wait(self) -> None:
        """Collective: finish a pending async save; raises CheckpointError if it failed (the
        previous checkpoint then stays the newest complete one)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            start = time.perf_counter()
            self._completed(pending.wait())
            log.info("checkpoint %s complete (waited %.2f s)", pending.path, time.perf_counter() - start)

    def _completed(self, path: Path) -> None:
        if not self._tokenizer_explicit and self._tokenizer_files:
            # Their source may be an older checkpoint that pruning removes; `path` is the newest.
            self._tokenizer_files = [path / ckpt.TOKENIZER_DIR / f.name for f in self._tokenizer_files]

    def _check_train_state(self, train_state: dict) -> None:
        text, error = None, None
        try:
            text = json.dumps(train_state, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            error = f"train_state is not JSON-serializable: {e}"
        ckpt.raise_on_every_rank(error)
        if text != _from_rank0(text):
            error = ("train_state differs from rank 0's; it must be identical on every rank "
                     "(per-rank state such as a data position belongs in a rank-independent form)")
        ckpt.raise_on_every_rank(error)

    def _collect(self, parts: list[nn.Module], optimizers) -> dict[str, dict]:
        model: dict[str, torch.Tensor] = {}
        optim: dict[str, Any] = {}
        tied = self.model_cfg.tie_embeddings
        for i, part in enumerate(parts):
            _, stored = _model_state(part, tied)
            optim_sd = (_stored_optimizer_keys(part, _optimizer_state(part, optimizers[i]), tied)
                        if optimizers is not None else {})
            _merge_entries(model, stored)
            _merge_entries(optim, optim_sd)
        return {"model": model, "optimizer": optim}

    def _async_process_group(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self._async_group is None:  # collective, on the first async save of every rank
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _prune(self, newest: Path) -> None:
        """Rank 0, after `newest` is complete: delete complete checkpoints older than the
        keep_last newest and stale staging directories. Never raises: the new checkpoint is
        safe, and a failed deletion only costs disk space."""
        try:
            self._prune_unsafe(newest)
        except Exception as e:
            log.warning("pruning old checkpoints in %s failed: %s: %s", self.folder, type(e).__name__, e)

    def _prune_unsafe(self, newest: Path) -> None:
        newest_step = int(ckpt.STEP_DIR_RE.match(newest.name).group(1))
        complete = sorted((int(m.group(1)), d) for d in self.folder.iterdir()
                          if (m := ckpt.STEP_DIR_RE.match(d.name)) and ckpt.is_complete(d))
        newer = [d for s, d in complete if s > newest_step]
        if newer:
            log.warning("%s holds %s, newer than the checkpoint just written (%s); a resume picks the newest",
                        self.folder, newer[-1].name, newest.name)
        doomed = []
        if self.cfg.keep_last > 0:
            older = [d for s, d in complete if s < newest_step]
            doomed = older[:max(0, len(older) - (self.cfg.keep_last - 1))]
        for hidden in self.folder.glob(".step-*.incomplete"):  # writes of killed runs; never readable
            m = ckpt.STEP_DIR_RE.match(hidden.name[1:-len(".incomplete")])
            if m and int(m.group(1)) < newest_step:
                doomed.append(hidden)
        for d in doomed:
            # Renamed first, so a crash mid-deletion never leaves a COMPLETE but partial step-N.
            os.replace(d, d.parent / f".{d.name.lstrip('.')}.deleting")
            log.info("removed old checkpoint %s (keep_last=%d)", d, self.cfg.keep_last)
        trash = list(self.folder.glob(".*.deleting"))
        if trash:
            threading.Thread(target=lambda: [shutil.rmtree(t, ignore_errors=True) for t in trash],
                             name="prune-checkpoints", daemon=True).start()

    # -------------------------------------------------------------- loading

    def load(self, path: str | os.PathLike, model_parts: list[nn.Module],
             optimizers: list[torch.optim.Optimizer]) -> dict:
        """Collective: restore model parts (and optimizers unless load_optimizer=false) from the
        training checkpoint `path`, resharding to the current layout; returns its train_state."""
        self.wait()
        path = Path(path)
        if len(model_parts) != len(optimizers):
            raise ValueError(f"{len(model_parts)} model parts but {len(optimizers)} optimizers: expected one each")
        tied = self.model_cfg.tie_embeddings
        meta, error = _local_errors(lambda: ckpt.read_meta(path))
        if error is None and "train_state" not in meta:
            error = (f"checkpoint {path} has no train_state: it was not written by the trainer; start from its "
                     "weights with checkpoint.init_from instead")
        ckpt.raise_on_every_rank(error)
        models = [_model_state(p, tied) for p in model_parts]
        want: dict[str, Any] = {}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _, stored in models:
            _merge_entries(want, {ckpt.MODEL_PREFIX + k: v for k, v in stored.items()}, copies)
        optim_sds = []
        if self.cfg.load_optimizer:
            for part, opt in zip(model_parts, optimizers, strict=True):
                osd = _optimizer_state(part, opt)
                optim_sds.append(osd)
                # Only the state; hyperparameters stay those of the current config.
                _merge_entries(want, {OPTIMIZER_PREFIX + k: v for k, v in _stored_optimizer_keys(part, osd, tied).items()
                                      if k.startswith("state.")}, copies)
        ckpt.raise_on_every_rank(_missing_or_misshaped(want, _stored_entries(path), path))
        ckpt.load_state(path, want)
        _copy_duplicates(copies)
        _set_parts(model_parts, models, tied)
        for part, opt, osd in zip(model_parts, optimizers, optim_sds, strict=True) if optim_sds else ():
            set_optimizer_state_dict(part, opt, osd, options=_FLAT)
        _barrier()  # nobody prunes or overwrites what a slower rank still reads
        self._adopt_sources(path, meta)
        log.info("loaded %s (step %s%s)", path, meta.get("step"),
                 "" if self.cfg.load_optimizer else ", optimizer state not restored")
        return meta["train_state"]

    def _adopt_sources(self, path: Path, meta: dict) -> None:
        if not self._tokenizer_explicit and (path / ckpt.TOKENIZER_DIR).is_dir():
            self._tokenizer_files = tokenizer_files(path / ckpt.TOKENIZER_DIR)
        if not self._source_explicit and not self.cfg.init_from:
            self._source = {k: meta[k] for k in ("hf_config", "hf_generation_config", "source") if k in meta}

    def load_initial_weights(self, path: str | os.PathLike, model_parts: list[nn.Module]) -> None:
        """Collective: weights only, from an HF model directory (streamed: each rank reads just
        its shard of each tensor) or a cptron checkpoint (DCP), into any layout."""
        self.wait()
        path = Path(path)
        if _is_cptron_checkpoint(path):
            _load_cptron_weights(path, model_parts, self.model_cfg)
        elif (path / "config.json").is_file():
            _load_hf_weights(path, model_parts, self.model_cfg)
        else:
            raise CheckpointError(f"initial weights {path}: neither a cptron checkpoint ({ckpt.META_FILE}) nor "
                                  "an HF model directory (config.json)")
        _barrier()
        log.info("initial weights loaded from %s", path)


def _missing_or_misshaped(want: dict[str, Any], stored: dict[str, Optional[torch.Size]],
                          path: Path) -> Optional[str]:
    missing = [k for k in want if k not in stored]
    optim = [k for k in missing if k.startswith(OPTIMIZER_PREFIX)]
    if optim:
        return (f"checkpoint {path} has no optimizer state for {optim[0]} ({len(optim)} entries missing): it was "
                "saved without it (save_optimizer=false) or for other parameters; set "
                "checkpoint.load_optimizer=false to start the optimizer fresh")
    if missing:
        return f"checkpoint {path} lacks {missing[0]} ({len(missing)} entries missing): it holds another model"
    for key, value in want.items():
        if isinstance(value, torch.Tensor) and stored[key] is not None and tuple(value.shape) != tuple(stored[key]):
            return (f"checkpoint {path}: {key} has shape {list(stored[key])}, the model expects "
                    f"{list(value.shape)}")
    return None


# ------------------------------------------------------------------ initial model config

def _is_cptron_checkpoint(path: Path) -> bool:
    return (path / ckpt.META_FILE).is_file()


def model_config_for_init(path: str | os.PathLike, pad_vocab_to_multiple_of: int) -> ModelConfig:
    """The architecture of the initial weights: an HF directory's config.json or a cptron
    checkpoint's cptron.json, with the run's vocabulary padding."""
    path = Path(path)
    if _is_cptron_checkpoint(path):
        cfg = ckpt.model_config_from_meta(ckpt.read_meta(path), path)
        cfg = dataclasses.replace(cfg, pad_vocab_to_multiple_of=pad_vocab_to_multiple_of)
        try:
            cfg.validate()
        except ConfigError as e:
            raise CheckpointError(f"{path / ckpt.META_FILE}: {e}") from e
        return cfg
    if (path / "config.json").is_file():
        try:
            return model_config_from_hf(json.loads((path / "config.json").read_text()), pad_vocab_to_multiple_of)
        except (CptronError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    raise CheckpointError(f"initial weights {path}: neither a cptron checkpoint ({ckpt.META_FILE}) nor an HF "
                          "model directory (config.json)")


def init_source_meta(path: str | os.PathLike) -> dict:
    """What a checkpoint keeps about the model it started from, for export: the HF config
    and generation config (from an HF directory or a cptron checkpoint) and the source path."""
    path = Path(path)
    if _is_cptron_checkpoint(path):
        meta = ckpt.read_meta(path)
        out = {k: meta[k] for k in ("hf_config", "hf_generation_config") if meta.get(k) is not None}
        return {**out, "source": str(path)}
    out: dict[str, Any] = {"source": str(path)}
    for key, f in (("hf_config", path / "config.json"), ("hf_generation_config", path / "generation_config.json")):
        try:
            out.update({key: json.loads(f.read_text())} if f.is_file() else {})
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is not valid JSON: {e}") from e
    return out


def check_compatible(source: ModelConfig, model: ModelConfig, where: str) -> None:
    """Raise CheckpointError if the weights described by `source` cannot fill `model`
    (shapes differ); warn about differences that only change the function (rope, eps)."""
    if source.vocab_size != model.vocab_size:
        raise CheckpointError(f"vocabulary mismatch: {where} has vocab_size={source.vocab_size}, the model has "
                              f"vocab_size={model.vocab_size} (extend the vocabulary first, or use the source's)")
    for name in _STRUCTURAL:
        a, b = getattr(source, name), getattr(model, name)
        if a != b:
            raise CheckpointError(f"{where} has {name}={a!r}, the model has {name}={b!r}: the weights do not fit")
    differ = [f"{n}: {getattr(source, n)!r} -> {getattr(model, n)!r}" for n in _BEHAVIOURAL
              if getattr(source, n) != getattr(model, n)]
    if differ:
        log.warning("the model differs from %s in %s (intended for e.g. context extension?)", where,
                    "; ".join(differ))


# ------------------------------------------------------------------ initial weights

def _local_region(target: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's piece of `target` (plain or DTensor) and where it sits in the global tensor."""
    if not (hasattr(target, "device_mesh") and hasattr(target, "placements")):
        return target, tuple(slice(0, n) for n in target.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    local = target.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CheckpointError(f"cannot place weights into a DTensor with placements {target.placements}: its "
                              "local shard is not one block of the global tensor")
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


@torch.no_grad()
def _fill(target: torch.Tensor, read: Callable[[tuple[slice, ...]], torch.Tensor], real_rows: Optional[int]) -> None:
    """Copy this rank's region of a source tensor into `target`; `read(region)` returns that
    region of the source. Rows from `real_rows` on (vocabulary padding) become zero."""
    local, region = _local_region(target)
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


@torch.no_grad()
def _copy_duplicates(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dst, src in copies:
        dst.copy_(src)


def _set_parts(parts: list[nn.Module], states: list[tuple[dict, dict]], tied: bool) -> None:
    for part, (full, stored) in zip(parts, states, strict=True):
        if tied and _TIED_ALIAS in full:
            full[_TIED_ALIAS] = stored[_TIED_CANONICAL]
        set_model_state_dict(part, full)


def _load_hf_weights(hf_dir: Path, parts: list[nn.Module], model_cfg: ModelConfig) -> None:
    """Each rank opens the safetensors files memory-mapped and reads only its own region
    of each of its parameters: no rank ever holds a whole tensor it does not own."""
    tied = model_cfg.tie_embeddings

    def read_all() -> list[tuple[dict, dict]]:
        check_compatible(model_config_for_init(hf_dir, model_cfg.pad_vocab_to_multiple_of), model_cfg,
                         str(hf_dir / "config.json"))
        try:
            files = hf_weight_map(hf_dir)
        except CptronError as e:
            raise CheckpointError(str(e)) from e
        expected = expected_parameters(model_cfg)
        for hf_name, file in files.items():  # a tensor the model has no place for is not dropped silently
            name = hf_to_cptron_name(hf_name)
            if (name is None and hf_name.endswith("rotary_emb.inv_freq")) or (tied and name == _TIED_ALIAS):
                continue
            if name not in expected:
                raise CheckpointError(f"tensor {hf_name!r} in {file} has no place in the model")
        states = [_model_state(p, tied) for p in parts]
        with contextlib.ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for _, stored in states:
                for fqn, target in stored.items():
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
                    padded = fqn in _PADDED
                    want = (model_cfg.vocab_size, *target.shape[1:]) if padded else tuple(target.shape)
                    if shape != want:
                        raise CheckpointError(f"tensor {hf_name!r} in {file} has shape {list(shape)}, the model "
                                              f"expects {list(want)}")
                    _fill(target, lambda region, s=source: s[region], model_cfg.vocab_size if padded else None)
        return states

    states, error = _local_errors(read_all)
    ckpt.raise_on_every_rank(error)
    _set_parts(parts, states, tied)


def _load_cptron_weights(path: Path, parts: list[nn.Module], model_cfg: ModelConfig) -> None:
    """Model weights of any cptron checkpoint via DCP (resharded). A checkpoint padded to
    another vocabulary multiple is read whole for the two vocabulary tensors only."""
    tied = model_cfg.tie_embeddings

    def plan():
        meta = ckpt.read_meta(path)
        check_compatible(ckpt.model_config_from_meta(meta, path), model_cfg, str(path / ckpt.META_FILE))
        stored = ckpt.tensor_metadata(path)
        states = [_model_state(p, tied) for p in parts]
        direct: dict[str, torch.Tensor] = {}
        regrid: list[tuple[torch.Tensor, torch.Tensor]] = []
        targets: dict[str, torch.Tensor] = {}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for _, entries in states:
            for fqn, target in entries.items():
                key = ckpt.MODEL_PREFIX + fqn
                if key in targets:  # a tied embedding held by two stages of this rank
                    copies.append((target, targets[key]))
                    continue
                targets[key] = target
                if key not in stored:
                    raise CheckpointError(f"checkpoint {path} lacks {key}")
                shape, dtype = tuple(stored[key][0]), stored[key][1]
                if shape == tuple(target.shape):
                    direct[key] = target
                elif fqn in _PADDED and shape[1:] == tuple(target.shape[1:]) and shape[0] >= model_cfg.vocab_size:
                    direct[key] = buffer = torch.empty(shape, dtype=dtype)
                    regrid.append((target, buffer))
                else:
                    raise CheckpointError(f"checkpoint {path}: {key} has shape {list(shape)}, the model expects "
                                          f"{list(target.shape)}")
        return states, direct, regrid, copies

    planned, error = _local_errors(plan)
    ckpt.raise_on_every_rank(error)
    states, direct, regrid, copies = planned
    ckpt.load_state(path, direct)
    for target, buffer in regrid:
        _fill(target, lambda region, b=buffer: b[region], model_cfg.vocab_size)
    _copy_duplicates(copies)
    _set_parts(parts, states, tied)
